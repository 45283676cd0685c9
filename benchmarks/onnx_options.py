"""ONNX builder options, measured side by side: `python -m benchmarks.onnx_options`.

Which build of the full-size checkpoint (random weights, benchmarks/build.py) serves users best?
Each variant is built by phi3flow.fetching.onnx_build, the code `fetch_model -P onnx_source=build` runs:
- `int4`: the default (block size 32, accuracy level 4 = int8 compute, fp32 KV cache), the
  benchmark's own build;
- `int4-kv8`: `kv_cache=int8`, the KV cache quantized per channel with calibrated scales;
- `int4-block128`: int4 weights in blocks of 128 (fewer scales to read, coarser);
- `int8`: 8-bit weights (`-p int8`): twice the bytes per decode step; does prefill gain?

For each, in one run:
1. raw onnxruntime-genai, variants loaded side by side (in GROUPS, each with int4) and timed in
   alternation, as benchmarks/run.py does: load, TTFT, decode tokens/s at 16, 256 and 2,048
   tokens, peak RSS;
2. accuracy against `int4`: a fixed 512-token sequence fed in 32-token chunks (so every chunk
   attends to the cache the variant stores), the greedy next token at every position compared,
   and the logits' relative L2 error. Random weights make near-ties common, so this bounds the
   numerical change rather than a task's accuracy; the fixture test
   (tests/unit/test_onnx_build.py) checks greedy answers on the eval set;
3. where a 1,024-token prefill's time goes: onnxruntime's profiler over the decoder graph
   (plain onnxruntime, the same threads), time per operator type, and the MatMulNBits
   kernels' arithmetic rate against the CPU's instruction sets.

Writes docs/onnx-options.{md,json}. Each full-size build peaks at about 23 GB: run it alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import build as build_mod
from benchmarks import cost, measure, report
from benchmarks.probe import STARTED, progress
from phi3flow.fetching import onnx_build

VARIANTS = {  # name -> onnx_build.build options
    "int4": {},
    "int4-kv8": {"kv_cache": "int8"},
    "int4-block128": {"extra_options": ("block_size=128",)},
    "int8": {"precision": "int8"},
}
# Timed side by side in these groups, each with the default for its ratios: all four loaded at
# once would not fit in 24 GB at 2,048 tokens of context (the int8 build alone holds 4 GB).
GROUPS = (("int4", "int4-kv8"), ("int4", "int4-block128", "int8"))
AGREEMENT_TOKENS, AGREEMENT_CHUNK, PROFILE_TOKENS = 512, 32, 1024
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def variants(cache: Path, checkpoint: Path, default: Path, names: list[str]) -> dict[str, Path]:
    folders = {}
    for name in names:
        folder = default if name == "int4" else cache / f"{checkpoint.name}-{name}"
        if not (folder / build_mod.DONE).is_file():
            progress(f"building {name} (onnxruntime-genai's builder; alone, it peaks at ~23 GB)")
            options = {"precision": "int4", **VARIANTS[name]}
            started = time.perf_counter()
            onnx_build.build(checkpoint, folder, options.pop("precision"), "cpu",
                             baseline=default, **options)
            build_mod.mark_done(folder, seconds=round(time.perf_counter() - started, 1))
        folders[name] = folder
    return folders


def facts(folder: Path) -> dict:
    """What the build really has (the builder ignores options it does not know, silently)."""
    attributes = onnx_build.quantization(folder)
    return {"kv_cache": onnx_build.kv_cache_dtype(folder), "bits": attributes.get("bits"),
            "block_size": attributes.get("block_size"),
            "accuracy_level": attributes.get("accuracy_level"),
            "weight_bytes": cost.weight_bytes(folder),
            "kv_bytes_per_token": cost.kv_bytes_per_token(folder),
            "share_buffer": json.loads((folder / "genai_config.json").read_text())["search"]
            .get("past_present_share_buffer")}


# --- accuracy: teacher-forced logits over a fixed sequence, one fresh process per variant ------


def logits(folder: Path, ids: list[int], out: Path) -> None:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": len(os.sched_getaffinity(0))}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    chunks = []
    for start in range(0, len(ids), AGREEMENT_CHUNK):
        generator.append_tokens(ids[start:start + AGREEMENT_CHUNK])
        chunks.append(generator.get_output("logits")[0])
    np.save(out, np.concatenate(chunks).astype(np.float32))


def agreement(folders: dict[str, Path], ids: list[int]) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="phi3flow-options-") as tmp:
        found, sequence = {}, Path(tmp) / "ids.json"
        sequence.write_text(json.dumps(ids))
        for name, folder in folders.items():
            progress(f"{name}: logits over a fixed {len(ids)}-token sequence")
            path = Path(tmp) / f"{name}.npy"
            subprocess.run([sys.executable, "-m", "benchmarks.onnx_options", "logits", str(folder),
                            str(sequence), str(path)], check=True)
            found[name] = np.load(path)
    base = found["int4"]
    return {name: {
        "next_token_agreement": float((x.argmax(-1) == base.argmax(-1)).mean()),
        "logits_relative_l2": float(np.linalg.norm(x - base) / np.linalg.norm(base)),
    } for name, x in found.items()}


# --- where prefill time goes: onnxruntime's profiler ----------------------------------------


def profile(folder: Path, tokens: int, out: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.enable_profiling = True
    options.profile_file_prefix = str(out.with_suffix(""))
    session = ort.InferenceSession(str(folder / "model.onnx"), options)
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    feeds_for = _feeds(session, decoder["num_key_value_heads"], decoder["head_size"], vocab)
    session.run(None, feeds_for(16))  # first-run costs (allocations) apart
    started = time.perf_counter()
    session.run(None, feeds_for(tokens))
    wall = time.perf_counter() - started
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    last = runs[-1]  # the measured prefill
    by_op: dict[str, float] = collections.defaultdict(float)
    for event in trace:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and last["ts"] <= event["ts"] <= last["ts"] + last["dur"]):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e6
    out.write_text(json.dumps({"tokens": tokens, "wall_s": wall, "by_op_s": dict(by_op)}))


def _feeds(session, heads: int, size: int, vocab: int):
    inputs = {i.name: i for i in session.get_inputs()}
    past = [i for i in inputs.values() if i.name.startswith("past_key_values")]
    dtype = {"tensor(float)": np.float32, "tensor(int8)": np.int8,
             "tensor(float16)": np.float16}[past[0].type]

    def feeds(tokens: int) -> dict:
        ids = np.random.default_rng(0).integers(0, vocab, (1, tokens), dtype=np.int64)
        row = {"input_ids": ids, "attention_mask": np.ones((1, tokens), dtype=np.int64)}
        if "position_ids" in inputs:
            row["position_ids"] = np.arange(tokens, dtype=np.int64)[None]
        for p in past:
            row[p.name] = np.zeros((1, heads, 0, size), dtype=dtype)
        return row

    return feeds


def profiles(folders: dict[str, Path], weight_params: int) -> dict[str, dict]:
    found = {}
    with tempfile.TemporaryDirectory(prefix="phi3flow-profile-") as tmp:
        for name, folder in folders.items():
            progress(f"{name}: profiling a {PROFILE_TOKENS}-token prefill")
            out = Path(tmp) / f"{name}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.onnx_options", "profile",
                            str(folder), str(PROFILE_TOKENS), str(out)], check=True)
            row = json.loads(out.read_text())
            matmul = row["by_op_s"].get("MatMulNBits", 0.0)
            # 2 flops per weight per token: the rate MatMulNBits' kernels reached
            row["matmul_gflops"] = 2 * weight_params * PROFILE_TOKENS / matmul / 1e9 if matmul else None
            found[name] = row
    return found


# --- the report ---------------------------------------------------------------------------


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# ONNX builder options", "",
        f"Generated by `python -m benchmarks.onnx_options` on {m['date']} (commit {m['commit']}); "
        "do not edit by hand. The full-size Phi-3-mini architecture with random weights; raw "
        "onnxruntime-genai, the variants of each table loaded side by side and timed in "
        f"alternation, {results['plan']['new_tokens']} new tokens, greedy.", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; instruction sets: "
        f"{', '.join(m['isa']) or 'none of ' + ', '.join(ISA_FLAGS)}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
        "## The builds", "",
        "As read from each build's graph (the builder ignores options it does not know).", "",
        "| variant | weights | block | accuracy level | KV cache | weights read per step (GB) "
        "| KV per token (MB) |", "|---|---|---:|---:|---|---:|---:|",
    ]
    for name, f in results["facts"].items():
        lines.append(f"| {name} | {f['bits']}-bit | {f['block_size']} | {f['accuracy_level']} | "
                     f"{f['kv_cache']} | {f['weight_bytes'] / 1e9:.2f} | "
                     f"{f['kv_bytes_per_token'] / 1e6:.3f} |")
    lines += ["", "## Speed and accuracy", "",
              "x int4: the median ratio over alternating pairs of runs. Accuracy: the greedy next "
              f"token at each of {AGREEMENT_TOKENS} positions of a fixed sequence (fed in "
              f"{AGREEMENT_CHUNK}-token chunks) the same as int4's; logits' relative L2 error "
              "against int4's. Only int4-kv8 has int4's weights, so only its row measures what "
              "the option changes; random weights quantized to 4 bits are far from their own "
              "unquantized values, so variants with other weights differ from int4 about as "
              "much as from each other, which says nothing of their accuracy on real weights "
              "(measure that with `evaluate` on the real checkpoint)."]
    for runtimes in results["groups"]:
        lines += ["", "| variant | load (s) | peak RSS (MB) | prompt | TTFT (s) | x int4 | decode "
                  "(tokens/s) | x int4 | next-token agreement | logits error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, runtime in runtimes.items():
            for i, (length, row) in enumerate(runtime["prompts"].items()):
                head = (f"| {name} | {runtime['load_s']:.1f} | {runtime['peak_rss_mb']:.0f} "
                        if i == 0 else "| | | ")
                ttft = report.paired_ratio(runtimes, name, "int4", length, "ttft_s")
                decode = report.paired_ratio(runtimes, name, "int4", length, "decode_tokens_per_s")
                acc = results["agreement"][name] if i == 0 else None
                tail = (f"{acc['next_token_agreement']:.3f} | {acc['logits_relative_l2']:.4f} |"
                        if acc else "| |")
                lines.append(f"{head}| {length} | {row['ttft_s']:.2f} | {ttft:.2f} | "
                             f"{row['decode_tokens_per_s']:.2f} | {decode:.2f} | {tail}")
    lines += ["", f"## Where a {PROFILE_TOKENS}-token prefill's time goes", "",
              "onnxruntime's profiler, one prefill through the decoder graph (plain onnxruntime, "
              "every core). MatMulNBits rate: 2 flops per weight per token over the time in its "
              "kernels.", "",
              "| variant | prefill (s) | MatMulNBits | GroupQueryAttention | other ops | "
              "MatMulNBits GFLOP/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in results["profiles"].items():
        total = sum(row["by_op_s"].values())
        matmul = row["by_op_s"].get("MatMulNBits", 0.0)
        attention = row["by_op_s"].get("GroupQueryAttention", 0.0)
        rate = f"{row['matmul_gflops']:.0f}" if row["matmul_gflops"] else "-"
        lines.append(f"| {name} | {row['wall_s']:.1f} | {matmul / total:.0%} | "
                     f"{attention / total:.0%} | {(total - matmul - attention) / total:.0%} | "
                     f"{rate} |")
    top = sorted(results["profiles"]["int4"]["by_op_s"].items(), key=lambda kv: -kv[1])[:6]
    lines += ["", "int4's operators by time: " + ", ".join(f"{op} {s:.2f} s" for op, s in top)
              + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=build_mod.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=build_mod.ROOT / "docs")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (int4 always)")
    parser.add_argument("--smoke", action="store_true", help="the tiny fixture: checks the harness")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite OUT/onnx-options.md from its .json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "onnx-options.json").read_text())
        (args.out / "onnx-options.md").write_text(markdown(results))
        return results
    names = ["int4"] + [v for v in args.variants.split(",") if v and v != "int4"]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    os.environ.setdefault(STARTED, str(time.time()))
    os.environ.update(measure.QUIET)
    checkpoint, default = build_mod.build(args.cache, args.smoke)
    folders = variants(args.cache, checkpoint, default, names)
    plan = measure.SMOKE if args.smoke else measure.Plan(repeats=3)
    prompts = measure.chat_prompts(checkpoint, plan.prompt_lengths)
    flags = set(Path("/proc/cpuinfo").read_text().split())
    results = {
        "plan": plan.__dict__,
        "machine": {**measure.machine(), "isa": [f for f in ISA_FLAGS if f in flags]},
        "facts": {name: facts(folder) for name, folder in folders.items()},
    }
    results["groups"] = []
    for group in GROUPS:
        picked = [name for name in group if name in folders]
        if len(picked) > 1:
            results["groups"].append(measure.paired_probes(
                {name: (name, "raw", folders[name]) for name in picked}, prompts, plan,
                checkpoint))
    from transformers import AutoTokenizer

    text = " ".join(measure.WORDS * 64)
    ids = AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"][:AGREEMENT_TOKENS]
    results["agreement"] = agreement(folders, ids)
    weight_params = sum(int(np.prod(t["shape"])) for name, t in build_mod.tensors(checkpoint)
                        .items() if "embed_tokens" not in name)  # the embedding: a gather
    results["profiles"] = profiles(folders, weight_params)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx-options.json").write_text(json.dumps(results, indent=1))
    (args.out / "onnx-options.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["logits"]:
        logits(Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()), Path(sys.argv[4]))
    elif sys.argv[1:2] == ["profile"]:
        profile(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()

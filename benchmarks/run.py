"""The performance benchmark: `python -m benchmarks.run` (full size) or `--smoke` (tiny fixture).

In one run, side by side on this machine:
1. raw onnxruntime-genai, the ONNX pyfunc (mlflow.pyfunc.load_model), the transformers pyfunc,
   the ONNX pyfunc behind the front door (streamed over HTTP, timed in alternation with the
   in-process pyfunc, and with 4 concurrent streams each), and the ONNX pyfunc served by
   `mlflow models serve` over HTTP: load time, time to first token,
   decode tokens/s and peak RSS at prompts of 16, 256 and 2048 tokens (benchmarks/probe.py says
   how each is timed; each runtime runs in its own fresh process);
2. the served ONNX model under 1, 2, 4 and 8 concurrent clients: aggregate tokens/s, p50/p95;
   and a short request's latency while a long one is running (head-of-line blocking);
3. the pipeline: `main` on the fixture, cold and with every step reused;
4. the machine's memory read bandwidth (all cores), against which each decode step's bytes
   (weights + KV cache) per second are compared;
5. batch_score (Spark, local[*]) against the ONNX pyfunc's predict in one process, batched the
   same and one row at a time: 64 prompts of 16 and of 256 tokens; memory per worker
   (benchmarks/batch.py; `--batch-score-only` measures just this and updates the report);
6. a conversation's follow-up turns: the ONNX pyfunc with its prefix cache, without it, and
   llama.cpp Q4_0 with --llama-cpp (benchmarks/multiturn.py; `--multiturn-only` measures just
   this and updates the report);
7. with --llama-cpp (opt-in, benchmarks/llamacpp.py): llama.cpp on the same checkpoint as GGUF
   Q4_0 and Q4_K_M, timed in alternation with raw onnxruntime-genai and the ONNX pyfunc.

It writes docs/performance.{md,json,png} (or --out), and prints the ratios the targets are about.

Everywhere but in the multi-turn part the ONNX model's prefix cache is off: those parts send one
prompt again and again, which the cache would answer from a kept KV cache instead of a prefill.
The multi-turn part measures the cache's cost where nothing is shared, with it and without.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import batch, llamacpp, multiturn
from benchmarks import build as build_mod
from benchmarks.cost import kv_bytes_per_token, step_bytes, weight_bytes
from benchmarks.measure import (
    QUIET,
    ROOT,
    SMOKE,
    Plan,
    chat_prompts,
    free_port,
    machine,
    paired_probes,
    pipeline,
    probe,
    read_bandwidth_gbs,
    served,
    touch_free_memory,
)
from benchmarks.probe import STARTED, progress
from benchmarks.report import report


def save_models(checkpoint: Path, onnx: Path, cache: Path, plan: Plan) -> dict[str, Path]:
    """The two MLflow models, saved exactly as the log steps log them (cached)."""
    import mlflow

    from phi3flow.models import onnx_model, transformers_model
    from phi3flow.models.config import LogOnnxPyfuncConfig, LogTransformersConfig

    # The configs want the run that fetched the files; the benchmark saves from folders directly.
    no_fetch_run = "0" * 32
    generation = dict(max_new_tokens=plan.new_tokens, temperature=0.0)
    paths = {"onnx": cache / f"{onnx.name}-pyfunc", "transformers": cache / f"{checkpoint.name}-pyfunc"}
    # The saved ONNX model carries a copy of its code: save again whenever that code changed.
    code = hashlib.sha256(b"".join(
        f.read_bytes() for f in sorted(onnx_model.CHAT_CORE.glob("*.py")))).hexdigest()
    marker = paths["onnx"] / build_mod.DONE
    if not marker.is_file() or json.loads(marker.read_text()).get("code_sha256") != code:
        shutil.rmtree(paths["onnx"], ignore_errors=True)
        cfg = LogOnnxPyfuncConfig(fetch_run_id=no_fetch_run, **generation)
        mlflow.pyfunc.save_model(path=paths["onnx"], **onnx_model.model_options(cfg, onnx, "bench"))
        build_mod.mark_done(paths["onnx"], code_sha256=code)
    if not (paths["transformers"] / build_mod.DONE).is_file():
        shutil.rmtree(paths["transformers"], ignore_errors=True)
        cfg = LogTransformersConfig(fetch_run_id=no_fetch_run, **generation)
        pipeline = transformers_model.load_pipeline(checkpoint, cfg.torch_dtype, False)
        mlflow.transformers.save_model(path=paths["transformers"],
                                       **transformers_model.model_options(cfg, pipeline))
        del pipeline
        build_mod.mark_done(paths["transformers"])
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny fixture at small sizes: checks the harness, measures nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="folder for performance.md/.json/.png")
    parser.add_argument("--cache", type=Path, default=build_mod.DEFAULT_CACHE)
    parser.add_argument("--no-pipeline", action="store_true", help="skip timing `main`")
    parser.add_argument("--llama-cpp", nargs="?", const=",".join(llamacpp.QUANTS), default="",
                        metavar="QUANTS", help="also measure llama.cpp (pip install -r "
                        "benchmarks/requirements-llama.txt first) at these quantizations "
                        f"(default: {','.join(llamacpp.QUANTS)})")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite the report from OUT/performance.json")
    parser.add_argument("--multiturn-only", action="store_true",
                        help="measure only the multi-turn conversation (with --llama-cpp: and "
                        "llama.cpp Q4_0's), and put it into OUT/performance.json's report")
    parser.add_argument("--batch-score-only", action="store_true",
                        help="measure only batch_score against in-process predict, and put it "
                        "into OUT/performance.json's report (which must exist)")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "performance.json").read_text())
        # Static facts of the build (not measurements) are taken afresh from the cache.
        onnx = build_mod.onnx_folder(args.cache, "--smoke" in results["command"])
        results["weight_bytes"] = weight_bytes(onnx)
        results["kv_bytes_per_token"] = kv_bytes_per_token(onnx)
        checkpoint, _ = build_mod.build(args.cache, "--smoke" in results["command"])
        quants = [k.removeprefix("llama_cpp_") for k in results["runtimes"]
                  if k.startswith("llama_cpp_")]
        results["step_bytes"] = step_bytes(checkpoint, onnx, llamacpp.models(
            checkpoint, args.cache, tuple(quants)) if quants else {})
        return report(results, results["command"], args.out)
    os.environ.setdefault(STARTED, str(time.time()))
    os.environ.update(QUIET)  # inherited by every process the run starts
    os.environ[multiturn.CACHE_ENV] = "0"  # repeated prompts (module docstring); multiturn sets its own
    plan = SMOKE if args.smoke else Plan()
    if args.no_pipeline:
        plan.pipeline = False
    if args.llama_cpp:
        plan.llama_quants = tuple(q.strip() for q in args.llama_cpp.split(",") if q.strip())
        unknown = sorted(set(plan.llama_quants) - set(llamacpp.QUANTS))
        if unknown:
            parser.error(f"--llama-cpp: unknown quantization(s) {unknown}; choose from "
                         f"{list(llamacpp.QUANTS)}")
        llamacpp.version()  # installed, or a message saying how
    command = "python -m benchmarks.run" + (" --smoke" if args.smoke else "") + (
        f" --llama-cpp {','.join(plan.llama_quants)}" if plan.llama_quants else "")

    progress("the checkpoint and its ONNX build (built once, then cached in "
             f"{args.cache})")
    checkpoint, onnx = build_mod.build(args.cache, args.smoke)
    progress("the two MLflow models (saved once, then cached)")
    models = save_models(checkpoint, onnx, args.cache, plan)
    if not args.smoke:
        progress("touching the free memory once (measure.touch_free_memory says why)")
        touch_free_memory()
    if args.batch_score_only:
        results = json.loads((args.out / "performance.json").read_text())
        results["plan"] |= {k: v for k, v in plan.__dict__.items() if k.startswith("batch_")}
        results["batch_score"] = batch.measure(models["onnx"], checkpoint, plan)
        results["batch_score"]["machine"] = machine()  # this part's own run
        return report(results, results["command"], args.out)
    ggufs = llamacpp.models(checkpoint, args.cache, plan.llama_quants) if plan.llama_quants else {}
    if args.multiturn_only:
        results = json.loads((args.out / "performance.json").read_text())
        results["multiturn"] = multiturn.measure(models["onnx"], checkpoint, ggufs.get("Q4_0"),
                                                 plan, small=args.smoke)
        results["multiturn"]["machine"] = machine()  # this part's own run
        return report(results, results["command"], args.out)
    os.sync()  # a freshly saved model's pages would otherwise be written back while we measure
    prompts = chat_prompts(checkpoint, plan.prompt_lengths)
    results: dict[str, Any] = {
        "model": "tiny fixture (tests/fixtures/tiny-phi3)" if args.smoke
        else "full-size Phi-3-mini-4k architecture, random weights (3.8 B parameters)",
        "plan": plan.__dict__, "machine": machine(), "weight_bytes": weight_bytes(onnx),
        "kv_bytes_per_token": kv_bytes_per_token(onnx),
        "step_bytes": step_bytes(checkpoint, onnx, ggufs),
    }
    progress("the machine's read bandwidth")
    kernels = read_bandwidth_gbs()
    results["machine"]["read_bandwidth_gbs"] = max(kernels.values())
    results["machine"]["read_bandwidth_kernels_gbs"] = kernels
    progress("read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in kernels.items()))
    # The first llama.cpp quantization is timed in alternation with onnxruntime-genai, the
    # others alone afterwards: four runtimes side by side at 2,048 tokens of context leave the
    # machine (24 GB) reclaiming page cache.
    peers = [(f"llama_cpp_{q}", (f"llama.cpp {q}", "llama_cpp", path)) for q, path in ggufs.items()]
    results["runtimes"] = paired_probes({
        "raw": ("raw onnxruntime-genai", "raw", onnx),
        "onnx_pyfunc": ("ONNX pyfunc", "pyfunc", models["onnx"]),
        "front_door": ("ONNX pyfunc behind the front door", "front_door", models["onnx"]),
        **dict(peers[:1]),
    }, prompts, plan, checkpoint)
    for key, (name, runtime, path) in peers[1:]:
        results["runtimes"][key] = probe(name, runtime, path, prompts, plan, plan.repeats,
                                         stream=True, tokenizer=checkpoint)
    results["runtimes"] |= {
        "served": served(models["onnx"], prompts, plan, free_port()),
        "transformers_pyfunc": probe("transformers pyfunc", "pyfunc", models["transformers"],
                                     prompts, plan, plan.transformers_repeats),
    }
    results["multiturn"] = multiturn.measure(models["onnx"], checkpoint, ggufs.get("Q4_0"), plan,
                                             small=args.smoke)
    results["batch_score"] = batch.measure(models["onnx"], checkpoint, plan)
    if plan.pipeline:
        progress("the pipeline: main on the fixture, cold and reused")
        results["pipeline"] = pipeline()
    results["command"] = command
    progress("done measuring; writing the report")
    return report(results, command, args.out)


if __name__ == "__main__":
    main()

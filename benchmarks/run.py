"""The performance benchmark: `python -m benchmarks.run` (full size) or `--smoke` (tiny fixture).

In one run, side by side on this machine:
1. raw onnxruntime-genai, the ONNX pyfunc (mlflow.pyfunc.load_model), the transformers pyfunc,
   and the ONNX pyfunc served by `mlflow models serve` over HTTP: load time, time to first token,
   decode tokens/s and peak RSS at prompts of 16, 256 and 2048 tokens (benchmarks/probe.py says
   how each is timed; each runtime runs in its own fresh process);
2. the served ONNX model under 1, 2, 4 and 8 concurrent clients: aggregate tokens/s, p50/p95;
   and a short request's latency while a long one is running (head-of-line blocking);
3. the pipeline: `main` on the fixture, cold and with every step reused;
4. the machine's memory read bandwidth (all cores), against which each decode step's bytes
   (weights + KV cache) per second are compared;
5. with --llama-cpp (opt-in, benchmarks/llamacpp.py): llama.cpp on the same checkpoint as GGUF
   Q4_0 and Q4_K_M, timed in alternation with raw onnxruntime-genai and the ONNX pyfunc.

It writes docs/performance.{md,json,png} (or --out), and prints the ratios the targets are about.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import build as build_mod
from benchmarks import llamacpp
from benchmarks.probe import HEAD_OF_LINE, STARTED, progress
from phi3flow import onnx_build
from phi3flow.eval_worker import peak_rss_mb
from phi3flow.evaluation import percentile
from tests.ports import free_port

ROOT = build_mod.ROOT
WORDS = ("the quick brown fox jumps over the lazy dog while a small model answers questions "
         "about capitals rivers and numbers").split()
# Progress bars off in every process of the run: with stderr in a log file each redraw is a line
# (artifact downloads, weight loading, shard writes), burying the progress lines.
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
VERSIONS = ("onnxruntime-genai", "onnxruntime", "mlflow", "transformers", "torch", "numpy",
            "llama-cpp-python")


@dataclass
class Plan:
    """What one run measures. The full plan is the issue's; the smoke plan only exercises it."""

    prompt_lengths: tuple[int, ...] = (16, 256, 2048)
    new_tokens: int = 32
    repeats: int = 5  # runs per measurement (median), for prompts up to 256 tokens
    transformers_repeats: int = 1  # it is several times slower; one run of each is minutes
    clients: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_client: int = 2
    pipeline: bool = True
    llama_quants: tuple[str, ...] = ()  # llama.cpp peers (opt-in: --llama-cpp)


SMOKE = Plan(prompt_lengths=(16, 256), new_tokens=8, repeats=1, clients=(1, 2),
             requests_per_client=2)


# --- inputs ---------------------------------------------------------------------------------


def chat_prompts(checkpoint: Path, lengths: tuple[int, ...]) -> dict[str, list[dict]]:
    """One user message per length whose chat-templated prompt is exactly that many tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def size(text: str) -> int:
        messages = [{"role": "user", "content": text}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])

    prompts = {}
    for length in lengths:
        words: list[str] = []
        while size(" ".join(words + [WORDS[len(words) % len(WORDS)]])) <= length:
            words.append(WORDS[len(words) % len(WORDS)])
        text = " ".join(words)
        while size(text) < length:  # top up one short token at a time
            text += " a"
        if size(text) != length:
            raise RuntimeError(f"could not build a {length}-token prompt (got {size(text)})")
        prompts[str(length)] = [{"role": "user", "content": text}]
    return prompts


def save_models(checkpoint: Path, onnx: Path, cache: Path, plan: Plan) -> dict[str, Path]:
    """The two MLflow models, saved exactly as the log steps log them (cached)."""
    import mlflow

    from phi3flow import onnx_model, transformers_model
    from phi3flow.config import LogOnnxPyfuncConfig, LogTransformersConfig

    # The configs want the run that fetched the files; the benchmark saves from folders directly.
    no_fetch_run = "0" * 32
    generation = dict(max_new_tokens=plan.new_tokens, temperature=0.0)
    paths = {"onnx": cache / f"{onnx.name}-pyfunc", "transformers": cache / f"{checkpoint.name}-pyfunc"}
    # The saved ONNX model carries a copy of its code: save again whenever that code changed.
    code = hashlib.sha256(onnx_model.MODEL_CODE.read_bytes()).hexdigest()
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


# --- in-process runtimes (each in a fresh process) ------------------------------------------


def probe(name: str, runtime: str, model: Path, prompts: dict, plan: Plan, repeats: int,
          stream: bool = False, tokenizer: Path | None = None) -> dict:
    progress(f"{name}: loading {model}")
    with tempfile.TemporaryDirectory(prefix="phi3flow-bench-") as tmp:
        spec, out = _spec(Path(tmp), name, runtime, model, prompts, plan, repeats, stream,
                          tokenizer=tokenizer)
        subprocess.run([sys.executable, "-m", "benchmarks.probe", str(spec), str(out)],
                       check=True, cwd=ROOT)
        return json.loads(out.read_text())


def paired_probes(runtimes: dict[str, tuple[str, str, Path]], prompts: dict, plan: Plan,
                  checkpoint: Path) -> dict:
    """Runtimes loaded side by side (each in its own process) and timed in alternation.

    The machine's speed drifts by tens of percent within minutes (a shared VM); alternating
    prompt by prompt puts each pair of runs in the same conditions, so their ratio is fair.
    """
    from benchmarks.probe import log, runs_for, summary

    with tempfile.TemporaryDirectory(prefix="phi3flow-bench-") as tmp:
        procs, outs = {}, {}
        for key, (name, runtime, model) in runtimes.items():
            progress(f"{name}: loading {model}")
            spec, outs[key] = _spec(Path(tmp) / key, name, runtime, model, prompts, plan,
                                    plan.repeats, stream=True, paired=True,
                                    tokenizer=checkpoint)
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.probe", str(spec), str(outs[key])],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            _read_line(procs[key], lambda line: line == "ready")  # loaded: the next one may load
        short = min(prompts, key=int)
        for proc in procs.values():  # settle: one untimed run each once both are loaded
            proc.stdin.write(short + "\n")
            proc.stdin.flush()
            _read_line(proc, _is_json)
        runs: dict[str, dict[str, list]] = {key: {n: [] for n in prompts} for key in runtimes}
        for length in prompts:
            count = runs_for(length, plan.repeats)
            for index in range(count):
                for key, proc in procs.items():
                    progress(f"{runtimes[key][0]}: prompt {length} tokens, run {index + 1}/"
                             f"{count} (alternating with the other runtime)")
                    proc.stdin.write(length + "\n")
                    proc.stdin.flush()
                    runs[key][length].append(json.loads(_read_line(proc, _is_json)))
        blocking = None
        if "onnx_pyfunc" in procs:
            progress("ONNX pyfunc: a 1-token request beside the longest prompt's prefill")
            # sent a quarter into that prefill (its measured TTFT): well inside it
            longest = max(prompts, key=int)
            delay = statistics.median(r["ttft_s"] for r in runs["onnx_pyfunc"][longest]) / 4
            procs["onnx_pyfunc"].stdin.write(f"{HEAD_OF_LINE} {delay}\n")
            procs["onnx_pyfunc"].stdin.flush()
            blocking = json.loads(_read_line(procs["onnx_pyfunc"], _is_json))
            progress(f"ONNX pyfunc: the 1-token request, sent at {blocking['short_sent_at_s']:.1f}"
                     f" s, returned at {blocking['short_returned_at_s']:.1f} s; the long prompt's"
                     f" first token came at {blocking['long_first_token_at_s']:.1f} s")
        results = {}
        for key, proc in procs.items():
            proc.stdin.close()
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"the {key} probe exited with {proc.returncode}")
            results[key] = json.loads(outs[key].read_text())
            results[key]["prompts"] = {n: summary(r) for n, r in runs[key].items()}
            for length, row in results[key]["prompts"].items():
                log(runtimes[key][0], length, row)
        if blocking:
            results["onnx_pyfunc"]["head_of_line"] = blocking
        return results


def _spec(folder: Path, name: str, runtime: str, model: Path, prompts: dict, plan: Plan,
          repeats: int, stream: bool, paired: bool = False,
          tokenizer: Path | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({
        "name": name, "runtime": runtime, "model": str(model), "prompts": prompts,
        "warmup": prompts[min(prompts, key=int)], "new_tokens": plan.new_tokens,
        "repeats": repeats, "stream": stream, "paired": paired,
        # llama.cpp: the checkpoint's tokenizer (the same prompt ids), a context that fits
        "tokenizer": str(tokenizer), "n_ctx": max(map(int, prompts)) + plan.new_tokens,
    }))
    return folder / "spec.json", folder / "out.json"


def _read_line(proc: subprocess.Popen, wanted) -> str:
    """The probe's next protocol line (libraries may print other lines to stdout)."""
    for line in proc.stdout:
        if wanted(line.strip()):
            return line.strip()
    raise RuntimeError(f"the probe exited with {proc.wait()} before answering")


def _is_json(line: str) -> bool:
    return line.startswith("{")


# --- served over HTTP -----------------------------------------------------------------------


class Server:
    """`mlflow models serve` on loopback, as the README tells users to run it."""

    def __init__(self, model: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model),
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-t", "3600"],
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {self.proc.returncode}")
            time.sleep(0.2)
        self.load_s = time.perf_counter() - started

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def chat(self, messages: list[dict], max_tokens: int) -> int:
        body = json.dumps({"messages": messages, "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(self.url + "/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            body = json.loads(response.read())
        (completion,) = body["predictions"] if isinstance(body, dict) else body
        return int(completion["usage"]["completion_tokens"])

    def peak_rss_mb(self) -> float:
        """The largest VmHWM in the server's process tree (the worker holds the model)."""
        return max((peak_rss_mb(pid) for pid in _tree(self.proc.pid)), default=0.0)

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=60)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return pids


def served(model: Path, prompts: dict, plan: Plan, port: int) -> dict:
    from benchmarks.probe import measure

    progress(f"served ONNX pyfunc: starting mlflow models serve on port {port}")
    server = Server(model, port)
    try:
        server.chat(prompts[min(prompts, key=int)], 2)  # warm-up
        rows = measure(server.chat, prompts, plan.new_tokens, plan.repeats, False,
                       "served ONNX pyfunc")
        short = prompts[min(prompts, key=int)]
        concurrency = {str(n): clients(server, short, plan, n) for n in plan.clients}
        blocking = head_of_line(server, short, prompts[max(prompts, key=int)], plan)
        return {"load_s": server.load_s, "peak_rss_mb": server.peak_rss_mb(), "prompts": rows,
                "concurrency": concurrency, "head_of_line": blocking}
    finally:
        server.stop()


def clients(server: Server, messages: list[dict], plan: Plan, n: int) -> dict:
    """n closed-loop clients, each sending requests_per_client requests one after another."""
    progress(f"served, {n} client(s): {plan.requests_per_client} requests each")

    def client(_: int) -> list[tuple[float, int]]:
        done = []
        for _ in range(plan.requests_per_client):
            started = time.perf_counter()
            tokens = server.chat(messages, plan.new_tokens)
            done.append((time.perf_counter() - started, tokens))
        return done

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = [r for rs in pool.map(client, range(n)) for r in rs]
    wall = time.perf_counter() - started
    latencies = [latency for latency, _ in results]
    row = {
        "requests": len(results), "wall_s": wall,
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
        "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
    }
    progress(f"served, {n} client(s): {row['tokens_per_s']:.2f} tokens/s, p50 "
             f"{row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s")
    return row


def head_of_line(server: Server, short: list[dict], long: list[dict], plan: Plan) -> dict:
    """A 1-token short request, alone and while a long-prompt request is being answered."""
    alone = min(_latency(server, short) for _ in range(2))
    background = threading.Thread(target=server.chat, args=(long, plan.new_tokens))
    background.start()
    time.sleep(0.5)  # the long request is in its prefill or decode
    during = _latency(server, short)
    long_still_running = background.is_alive()
    background.join()
    row = {"short_alone_s": alone, "short_during_long_s": during,
           "long_still_running": long_still_running}
    progress(f"head of line: short request {alone:.2f} s alone, {during:.2f} s beside a long one "
             f"(long still running when it returned: {long_still_running})")
    return row


def _latency(server: Server, messages: list[dict]) -> float:
    started = time.perf_counter()
    server.chat(messages, 1)
    return time.perf_counter() - started


# --- the pipeline -----------------------------------------------------------------------------


def pipeline() -> dict:
    """`main` on the fixture (the README quickstart's command), cold, then with every step reused."""
    times = {}
    with tempfile.TemporaryDirectory(prefix="phi3flow-bench-main-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
                   "-P", f"model_id={build_mod.FIXTURE}", "-P", "onnx_source=build"]
        for label in ("cold", "reused"):
            progress(f"main, {label}: running")
            started = time.perf_counter()
            subprocess.run(command, cwd=tmp, env=env, check=True, capture_output=True)
            times[f"main_{label}_s"] = time.perf_counter() - started
            progress(f"main, {label}: {times[f'main_{label}_s']:.1f} s")
    return times


# --- machine ----------------------------------------------------------------------------------


def read_bandwidth_gbs(size_bytes: int = 1 << 30) -> dict[str, float]:
    """Memory read bandwidth: for each of four bandwidth-bound reads of a 1 GiB array, the best
    of 5 runs; the machine's figure is the best of them.

    BLAS's dot product (however many threads it uses), and three reductions with every core
    reading its own slice (numpy releases the GIL): float32 max, uint8 max and uint64 bitwise
    or. A read probe is only a lower bound of what the memory can deliver: each kernel is partly
    compute-bound (numpy's float64 sum is entirely so, at about 18 GB/s per core), and on one
    CPU of this machine kind onnxruntime's int4 decode read 1.3x what the two float32 reads
    managed. The byte-wide reductions do the least work per byte; the report lists all four.
    """
    cores = len(os.sched_getaffinity(0))
    data = np.ones(size_bytes // 4, dtype=np.float32)
    kernels = {
        "blas_dot_f32": (data, lambda a: a @ a),
        "max_f32": (data, np.max),
        "max_u8": (data.view(np.uint8), np.max),
        "bitwise_or_u64": (data.view(np.uint64), np.bitwise_or.reduce),
    }
    found = {}
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        for name, (array, kernel) in kernels.items():
            slices = np.array_split(array, cores)
            read = ((lambda: kernel(array)) if name.startswith("blas")
                    else (lambda: list(pool.map(kernel, slices))))
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - started)
            found[name] = size_bytes / best / 1e9
    return found


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    memory = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                  if l.startswith("MemTotal"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**20, 1),
        "python": platform.python_version(), "commit": commit or "unknown",
        "versions": {d: metadata.version(d) for d in VERSIONS if _installed(d)},
        "date": time.strftime("%Y-%m-%d"),
    }


def _installed(distribution: str) -> bool:
    try:
        return bool(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return False


def weight_bytes(onnx_folder: Path) -> int:
    """Bytes of weights one decode step reads: every initializer but the embedding table, of
    which a step gathers one row (394 MB of the full-size model's 2.72 GB are that table)."""
    import onnx

    model = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"),
                      len(tensor.raw_data))
        if "embed_tokens" not in tensor.name:
            total += length
    return total


def kv_bytes_per_token(onnx_folder: Path) -> int:
    """Bytes of KV cache one token adds, which every later decode step reads: keys and values of
    every layer, in the cache's dtype (fp32 in the CPU int4 build)."""
    decoder = json.loads((onnx_folder / "genai_config.json").read_text())["model"]["decoder"]
    return (2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"]
            * decoder["head_size"] * onnx_build.kv_cache_numpy_dtype(onnx_folder).itemsize)


def step_bytes(checkpoint: Path, onnx: Path, ggufs: dict[str, Path]) -> dict[str, dict]:
    """What one decode step of each model reads: weights (the embedding table aside: a step
    gathers one row of it) and KV cache per token of context, in each runtime's cache dtype."""
    config = json.loads((checkpoint / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    kv_per_token = 2 * config["num_hidden_layers"] * kv_heads * (
        config["hidden_size"] // config["num_attention_heads"])  # elements, keys and values
    tensors = build_mod.tensors(checkpoint)
    torch_weights = sum(end - begin for name, t in tensors.items()
                        for begin, end in [t["data_offsets"]] if "embed_tokens" not in name)
    torch_kv = 4 if {t["dtype"] for t in tensors.values()} == {"F32"} else 2  # the weights' dtype
    return {
        "onnx": {"weights": weight_bytes(onnx), "kv_per_token": kv_bytes_per_token(onnx)},
        "transformers": {"weights": torch_weights, "kv_per_token": kv_per_token * torch_kv},
        # llama.cpp's default KV cache type is f16
        **{f"llama_cpp_{q}": {"weights": llamacpp.weight_bytes(path), "kv_per_token": kv_per_token * 2}
           for q, path in ggufs.items()},
    }


STEP_MODEL = {"raw": "onnx", "onnx_pyfunc": "onnx", "transformers_pyfunc": "transformers"}


def decode_limits(results: dict) -> list[dict]:
    """Per runtime and prompt length: the bytes one decode step reads (weights, plus the KV cache
    at the mean context of the answer), times the measured tokens/s, against the bandwidth probe."""
    if "kv_bytes_per_token" not in results:  # a run from before this was measured
        return []
    steps = results.get("step_bytes") or {"onnx": {
        "weights": results["weight_bytes"], "kv_per_token": results["kv_bytes_per_token"]}}
    rows, new_tokens = [], results["plan"]["new_tokens"]
    bandwidth = results["machine"]["read_bandwidth_gbs"] * 1e9
    for key, runtime in results["runtimes"].items():
        step = steps.get(STEP_MODEL.get(key, key))
        if step is None:  # the served model: the same steps as the pyfunc, plus HTTP
            continue
        for length, row in runtime["prompts"].items():
            kv = step["kv_per_token"] * (int(length) + new_tokens / 2)
            achieved = (step["weights"] + kv) * row["decode_tokens_per_s"]
            rows.append({"runtime": key, "prompt": length, "weights_gb": step["weights"] / 1e9,
                         "kv_gb": kv / 1e9, "tokens_per_s": row["decode_tokens_per_s"],
                         "achieved_gbs": achieved / 1e9, "of_probe": achieved / bandwidth,
                         "met": achieved / bandwidth >= 0.8})
    return rows


# --- results ----------------------------------------------------------------------------------

RUNTIMES = {  # result key -> label, in the order of the table (llama.cpp only with --llama-cpp)
    "raw": "onnxruntime-genai (raw)",
    "onnx_pyfunc": "ONNX pyfunc",
    "served": "ONNX pyfunc, served (HTTP)",
    "transformers_pyfunc": "transformers pyfunc",
    **{f"llama_cpp_{q}": f"llama.cpp {q}" for q in llamacpp.QUANTS},
}


def measured(results: dict) -> dict[str, str]:
    """The runtimes this run measured, in the table's order, with their labels."""
    return {k: label for k, label in RUNTIMES.items() if k in results["runtimes"]}


def paired_ratio(runtimes: dict, a: str, b: str, length: str, field: str) -> float:
    """Median over alternating pairs of runs of a's field / b's (both from paired_probes)."""
    pairs = zip(runtimes[a]["prompts"][length]["runs"], runtimes[b]["prompts"][length]["runs"])
    return statistics.median(x[field] / y[field] for x, y in pairs)


def _target(rows: list[dict], name: str, value: float, bound: float, at_least: bool,
            unit: str = "x") -> None:
    met = value >= bound if at_least else value <= bound
    rows.append({"target": name, "measured": value, "bound": f"{'>=' if at_least else '<='} "
                 f"{bound:g}{unit}", "met": met, "by_percent": (value / bound - 1) * 100})


def targets_15(results: dict) -> list[dict]:
    """Issue 15's targets, each at its worst prompt length (which one is in the name)."""
    runtimes, rows = results["runtimes"], []
    lengths = list(runtimes["raw"]["prompts"])

    def worst(name: str, values: dict[str, float], bound: float, at_least: bool) -> None:
        length = (min if at_least else max)(values, key=values.get)
        _target(rows, f"{name} (worst: {length}-token prompt)", values[length], bound, at_least)

    limits = [r for r in results["decode_limits"] if r["runtime"] == "onnx_pyfunc"]
    worst("ONNX pyfunc decode: bytes read per step x tokens/s / read-bandwidth probe",
          {r["prompt"]: r["of_probe"] for r in limits}, 0.8, True)
    if "llama_cpp_Q4_0" in runtimes:
        worst("ONNX pyfunc / llama.cpp Q4_0 decode tokens/s, paired runs",
              {n: paired_ratio(runtimes, "onnx_pyfunc", "llama_cpp_Q4_0", n, "decode_tokens_per_s")
               for n in lengths}, 1.0, True)
        worst("ONNX pyfunc / llama.cpp Q4_0 TTFT, paired runs",
              {n: paired_ratio(runtimes, "onnx_pyfunc", "llama_cpp_Q4_0", n, "ttft_s")
               for n in lengths}, 1.0, False)
    long = [n for n in lengths if int(n) >= 256]
    worst("ONNX pyfunc / transformers pyfunc TTFT",
          {n: runtimes["onnx_pyfunc"]["prompts"][n]["ttft_s"]
           / runtimes["transformers_pyfunc"]["prompts"][n]["ttft_s"] for n in long}, 1.0, False)
    worst("A request alone: ONNX pyfunc / raw TTFT, paired runs",
          {n: paired_ratio(runtimes, "onnx_pyfunc", "raw", n, "ttft_s") for n in lengths}, 1.05, False)
    blocking = runtimes["onnx_pyfunc"].get("head_of_line")
    if blocking:
        rss = (f"; peak RSS {blocking['peak_rss_before_mb']:.0f} MB before, "
               f"{blocking['peak_rss_after_mb']:.0f} MB with both requests"
               if "peak_rss_after_mb" in blocking else "")
        rows.append({"target": f"A 1-token request sent {blocking['short_sent_at_s']:.1f} s into "
                     f"a {max(lengths, key=int)}-token prefill returns before that prefill ends "
                     f"(its first token at {blocking['long_first_token_at_s']:.1f} s{rss}); "
                     "seconds",
                     "measured": blocking["short_returned_at_s"],
                     "bound": f"< {blocking['long_first_token_at_s']:.1f} s",
                     "met": blocking["short_returned_at_s"] < blocking["long_first_token_at_s"],
                     "by_percent": None})
    steps = results["step_bytes"]
    ratio = steps["transformers"]["weights"] / steps["onnx"]["weights"]
    worst(f"ONNX pyfunc / transformers pyfunc decode tokens/s (reported; weights read per step: "
          f"{ratio:.1f}x fewer)",
          {n: runtimes["onnx_pyfunc"]["prompts"][n]["decode_tokens_per_s"]
           / runtimes["transformers_pyfunc"]["prompts"][n]["decode_tokens_per_s"]
           for n in lengths}, ratio, True)
    return rows


def targets(results: dict) -> list[dict]:
    """Each target of issue 7: measured value, the bound, met or missed by how much."""
    runtimes = results["runtimes"]

    def decode(key: str, length: str) -> float:
        return runtimes[key]["prompts"][length]["decode_tokens_per_s"]

    lengths = list(runtimes["raw"]["prompts"])
    rows: list[dict] = []

    def target(name: str, value: float, bound: float, at_least: bool, unit: str = "x") -> None:
        _target(rows, name, value, bound, at_least, unit)

    target("ONNX pyfunc / raw decode tokens/s, paired runs (worst prompt length)",
           min(paired_ratio(runtimes, "onnx_pyfunc", "raw", n, "decode_tokens_per_s")
               for n in lengths), 0.95, True)
    # Single requests on both sides: the pyfunc's head-of-line test (two requests at once,
    # which raw onnxruntime-genai is never asked) comes after, and is reported on its own.
    blocking = runtimes["onnx_pyfunc"].get("head_of_line", {})
    target("ONNX pyfunc / raw peak RSS, single requests",
           blocking.get("peak_rss_before_mb", runtimes["onnx_pyfunc"]["peak_rss_mb"])
           / runtimes["raw"]["peak_rss_mb"], 1.1, False)
    target("ONNX pyfunc / transformers pyfunc decode tokens/s (worst prompt length)",
           min(decode("onnx_pyfunc", n) / decode("transformers_pyfunc", n) for n in lengths),
           5, True)
    roofline = results["machine"]["read_bandwidth_gbs"] * 1e9 / results["weight_bytes"]
    target(f"ONNX pyfunc decode / roofline ({roofline:.1f} tokens/s), {lengths[0]}-token prompt",
           decode("onnx_pyfunc", lengths[0]) / roofline, 0.40, True)
    concurrency = runtimes["served"]["concurrency"]
    if "4" in concurrency:
        target("served: 4 clients / 1 client aggregate tokens/s",
               concurrency["4"]["tokens_per_s"] / concurrency["1"]["tokens_per_s"], 1.8, True)
    blocking = runtimes["served"]["head_of_line"]
    rows.append({"target": "served: a short request is answered while a long one still runs",
                 "measured": blocking["short_during_long_s"], "bound": "before the long one ends",
                 "met": blocking["long_still_running"], "by_percent": None})
    if "pipeline" in results:
        target("`main` on the fixture, cold", results["pipeline"]["main_cold_s"], 90, False, " s")
        target("`main` on the fixture, every step reused", results["pipeline"]["main_reused_s"],
               15, False, " s")
    return rows


def markdown(results: dict, command: str) -> str:
    m = results["machine"]
    lines = [
        "# Performance",
        "",
        f"Generated by `{command}` on {m['date']} (commit {m['commit']}); do not edit by hand.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, no GPU; "
        f"memory read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s (all cores; the best of "
        + (", ".join(f"{k} {v:.1f}" for k, v in m["read_bandwidth_kernels_gbs"].items())
           if "read_bandwidth_kernels_gbs" in m else "two reads") + ").",
        f"- Model: {results['model']}; a decode step reads {results['weight_bytes'] / 1e9:.2f} GB "
        "of int4 weights (the embedding table aside); "
        f"{results['plan']['new_tokens']} new tokens per request, greedy.",
        "- Versions: Python " + m["python"] + ", "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "- Timing (benchmarks/probe.py): raw onnxruntime-genai and the ONNX pyfunc stream, so "
        "TTFT is the time to the first token and decode = (N - 1) / (last - first token) in one "
        "request; the transformers pyfunc and the REST server cannot stream, so TTFT is the "
        "latency of a 1-token request and decode = (N - 1) / (latency of N tokens - TTFT). "
        "Medians of the repeats (prompts over 256 tokens: one run). Each in-process runtime runs "
        "in its own fresh process (its own load time and peak RSS); raw onnxruntime-genai, "
        "the ONNX pyfunc (and llama.cpp, when measured) are loaded side by side and timed in "
        "alternation, prompt by prompt.",
    ]
    if results["plan"].get("llama_quants"):
        sizes = ", ".join(f"{q} {results['step_bytes'][f'llama_cpp_{q}']['weights'] / 1e9:.2f} GB"
                          for q in results["plan"]["llama_quants"])
        lines.append(
            f"- llama.cpp (llama-cpp-python {m['versions'].get('llama-cpp-python', '?')}, "
            "benchmarks/llamacpp.py): the same checkpoint converted by llama.cpp's "
            "convert_hf_to_gguf.py and quantized by llama_model_quantize; weights a decode step "
            f"reads: {sizes}. Every core, flash attention on, n_ctx = longest prompt + new "
            "tokens, the same prompt token ids, its own `Llama.generate` loop.")
    lines += [
        "",
        "## Single request",
        "",
        "| runtime | load (s) | peak RSS (MB) | prompt | TTFT (s) | decode (tokens/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in measured(results).items():
        runtime = results["runtimes"][key]
        for i, (length, row) in enumerate(runtime["prompts"].items()):
            head = (f"| {label} | {runtime['load_s']:.1f} | {runtime['peak_rss_mb']:.0f} "
                    if i == 0 else "| | | ")
            lines.append(f"{head}| {length} | {row['ttft_s']:.3f} | "
                         f"{row['decode_tokens_per_s']:.2f} |")
    served = results["runtimes"]["served"]
    lines += ["", "## Served, concurrent clients (short prompt, "
              f"{results['plan']['requests_per_client']} requests per client)", "",
              "| clients | requests | aggregate tokens/s | x one client | p50 (s) | p95 (s) |",
              "|---:|---:|---:|---:|---:|---:|"]
    one = served["concurrency"]["1"]["tokens_per_s"]
    for n, row in served["concurrency"].items():
        lines.append(f"| {n} | {row['requests']} | {row['tokens_per_s']:.2f} | "
                     f"{row['tokens_per_s'] / one:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} |")
    blocking = served["head_of_line"]
    lines += ["", f"A 1-token request took {blocking['short_alone_s']:.2f} s alone and "
              f"{blocking['short_during_long_s']:.2f} s while a "
              f"{max(served['prompts'], key=int)}-token request was being answered.", ""]
    if "pipeline" in results:
        p = results["pipeline"]
        lines += ["## Pipeline", "", f"`main` on the fixture: {p['main_cold_s']:.1f} s cold, "
                  f"{p['main_reused_s']:.1f} s with every step reused.", ""]
    if results.get("decode_limits"):
        kv = {STEP_MODEL.get(r["runtime"], r["runtime"]) for r in results["decode_limits"]}
        per_token = ", ".join(f"{m} {results['step_bytes'][m]['kv_per_token'] / 1e6:.3f} MB"
                              for m in sorted(kv)) if "step_bytes" in results else (
            f"{results['kv_bytes_per_token'] / 1e6:.3f} MB")
        lines += ["## Decode against the machine's limit (issue 15)", "",
                  "Bytes one decode step reads: the weights (embedding table aside) plus the KV "
                  f"cache at the answer's mean context (per token of context: {per_token}), "
                  "times decode tokens/s, against the read-bandwidth probe. Target, for the "
                  "ONNX pyfunc: >= 0.8x the probe.", "",
                  "| runtime | prompt | weights (GB) | KV (GB) | decode (tokens/s) | read (GB/s) "
                  "| x probe | met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        labels = measured(results)
        for row in results["decode_limits"]:
            met = ("yes" if row["met"] else f"**no**, by {(1 - row['of_probe'] / 0.8) * 100:.0f}%"
                   ) if row["runtime"] == "onnx_pyfunc" else ""
            lines.append(f"| {labels[row['runtime']]} | {row['prompt']} | "
                         f"{row['weights_gb']:.2f} | {row['kv_gb']:.2f} | "
                         f"{row['tokens_per_s']:.2f} | {row['achieved_gbs']:.1f} | "
                         f"{row['of_probe']:.2f} | {met} |")
        lines.append("")
    for title, key in (("Targets (issue 7)", "targets"), ("Targets (issue 15)", "targets_15")):
        if not results.get(key):
            continue
        lines += [f"## {title}", "", "| target | measured | bound | met |", "|---|---:|---|---|"]
        for row in results[key]:
            met = "yes" if row["met"] else (f"**no**, by {abs(row['by_percent']):.0f}%"
                                            if row["by_percent"] is not None else "**no**")
            lines.append(f"| {row['target']} | {row['measured']:.2f} | {row['bound']} | {met} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = results["runtimes"]
    lengths = list(runtimes["raw"]["prompts"])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 5))
    width = 0.8 / len(measured(results))
    for i, (key, label) in enumerate(measured(results).items()):
        xs = np.arange(len(lengths)) + i * width
        left.bar(xs, [runtimes[key]["prompts"][n]["decode_tokens_per_s"] for n in lengths],
                 width, label=label)
        middle.bar(xs, [runtimes[key]["prompts"][n]["ttft_s"] for n in lengths], width, label=label)
    roofline = results["machine"]["read_bandwidth_gbs"] * 1e9 / results["weight_bytes"]
    left.axhline(roofline, color="grey", linestyle="--", label="bandwidth roofline")
    for axis, title, unit in ((left, "Decode speed", "tokens/s"),
                              (middle, "Time to first token", "seconds (log)")):
        axis.set_xticks(np.arange(len(lengths)) + 0.4 - width / 2, [f"{n} tokens" for n in lengths])
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.set_xlabel("prompt length")
    middle.set_yscale("log")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9)
    concurrency = runtimes["served"]["concurrency"]
    clients = [int(n) for n in concurrency]
    right.plot(clients, [concurrency[str(n)]["tokens_per_s"] for n in clients], "o-",
               label="aggregate tokens/s")
    right.set_xticks(clients)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("tokens/s")
    right.set_title("Served ONNX model")
    twin = right.twinx()
    twin.plot(clients, [concurrency[str(n)]["p95_s"] for n in clients], "s--", color="tab:red",
              label="p95 latency (s)")
    twin.set_ylabel("p95 latency (s)")
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{results['model']} on {results['machine']['cores']} CPU cores "
                 f"({results['machine']['cpu']})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "performance.json").read_text())
        # Static facts of the build (not measurements) are taken afresh from the cache.
        onnx = build_mod.onnx_folder(args.cache, "--smoke" in results["command"])
        results["weight_bytes"] = weight_bytes(onnx)
        results["kv_bytes_per_token"] = kv_bytes_per_token(onnx)
        if "step_bytes" in results:
            checkpoint, _ = build_mod.build(args.cache, "--smoke" in results["command"])
            quants = [k.removeprefix("llama_cpp_") for k in results["runtimes"]
                      if k.startswith("llama_cpp_")]
            results["step_bytes"] = step_bytes(checkpoint, onnx, llamacpp.models(
                checkpoint, args.cache, tuple(quants)) if quants else {})
        return report(results, results["command"], args.out)
    os.environ.setdefault(STARTED, str(time.time()))
    os.environ.update(QUIET)  # inherited by every process the run starts
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
    ggufs = llamacpp.models(checkpoint, args.cache, plan.llama_quants) if plan.llama_quants else {}
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
    if plan.pipeline:
        progress("the pipeline: main on the fixture, cold and reused")
        results["pipeline"] = pipeline()
    results["command"] = command
    progress("done measuring; writing the report")
    return report(results, command, args.out)


def report(results: dict, command: str, out: Path) -> dict:
    results["targets"] = targets(results)
    results["decode_limits"] = decode_limits(results)
    if "step_bytes" in results:  # a run from before issue 15 lacks what these need
        results["targets_15"] = targets_15(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(results, indent=1))
    (out / "performance.md").write_text(markdown(results, command))
    plot(results, out / "performance.png")
    print(markdown(results, command).split("## Targets (issue 7)")[1])
    print(f"written: {out / 'performance.md'}, .json, .png")
    return results


if __name__ == "__main__":
    main()

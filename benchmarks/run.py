"""The performance benchmark: `python -m benchmarks.run` (full size) or `--smoke` (tiny fixture).

In one run, side by side on this machine:
1. raw onnxruntime-genai, the ONNX pyfunc (mlflow.pyfunc.load_model), the transformers pyfunc,
   and the ONNX pyfunc served by `mlflow models serve` over HTTP: load time, time to first token,
   decode tokens/s and peak RSS at prompts of 16, 256 and 2048 tokens (benchmarks/probe.py says
   how each is timed; each runtime runs in its own fresh process);
2. the served ONNX model under 1, 2, 4 and 8 concurrent clients: aggregate tokens/s, p50/p95;
   and a short request's latency while a long one is running (head-of-line blocking);
3. the pipeline: `main` on the fixture, cold and with every step reused;
4. the machine's memory read bandwidth (all cores), for the decode roofline (bandwidth / int4
   weight bytes).

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
from benchmarks.probe import STARTED, progress
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
VERSIONS = ("onnxruntime-genai", "onnxruntime", "mlflow", "transformers", "torch", "numpy")


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
          stream: bool = False) -> dict:
    progress(f"{name}: loading {model}")
    with tempfile.TemporaryDirectory(prefix="phi3flow-bench-") as tmp:
        spec, out = _spec(Path(tmp), name, runtime, model, prompts, plan, repeats, stream)
        subprocess.run([sys.executable, "-m", "benchmarks.probe", str(spec), str(out)],
                       check=True, cwd=ROOT)
        return json.loads(out.read_text())


def paired_probes(runtimes: dict[str, tuple[str, str, Path]], prompts: dict, plan: Plan) -> dict:
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
                                    plan.repeats, stream=True, paired=True)
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
        results = {}
        for key, proc in procs.items():
            proc.stdin.close()
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"the {key} probe exited with {proc.returncode}")
            results[key] = json.loads(outs[key].read_text())
            results[key]["prompts"] = {n: summary(r) for n, r in runs[key].items()}
            for length, row in results[key]["prompts"].items():
                log(runtimes[key][0], length, row)
        return results


def _spec(folder: Path, name: str, runtime: str, model: Path, prompts: dict, plan: Plan,
          repeats: int, stream: bool, paired: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({
        "name": name, "runtime": runtime, "model": str(model), "prompts": prompts,
        "warmup": prompts[min(prompts, key=int)], "new_tokens": plan.new_tokens,
        "repeats": repeats, "stream": stream, "paired": paired,
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


def read_bandwidth_gbs(size_bytes: int = 1 << 30) -> float:
    """Memory read bandwidth: the best of two bandwidth-bound reads of a 1 GiB array, 5 times each.

    One is BLAS's dot product (however many threads it uses), the other a float32 max with every
    core reading its own slice (numpy releases the GIL). numpy's float64 sum is not enough: it is
    compute-bound at about 18 GB/s per core here. The decode roofline is this divided by the int4
    weight bytes, since every new token reads every weight once.
    """
    cores = len(os.sched_getaffinity(0))
    data = np.ones(size_bytes // 4, dtype=np.float32)
    slices = np.array_split(data, cores)
    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        for read in (lambda: data @ data, lambda: list(pool.map(np.max, slices))):
            for _ in range(5):
                started = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - started)
    return size_bytes / best / 1e9


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
        "versions": {d: metadata.version(d) for d in VERSIONS},
        "date": time.strftime("%Y-%m-%d"),
    }


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
    import onnx

    decoder = json.loads((onnx_folder / "genai_config.json").read_text())["model"]["decoder"]
    model = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False)
    past = next(i for i in model.graph.input if i.name.startswith("past_key_values"))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
    return (2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"]
            * decoder["head_size"] * np.dtype(dtype).itemsize)


def decode_limits(results: dict) -> list[dict]:
    """Per prompt length: the bytes one ONNX decode step reads (weights, plus the KV cache at the
    mean context of the answer), times the measured tokens/s, against the bandwidth probe."""
    if "kv_bytes_per_token" not in results:  # a run from before this was measured
        return []
    rows, new_tokens = [], results["plan"]["new_tokens"]
    bandwidth = results["machine"]["read_bandwidth_gbs"] * 1e9
    for length, row in results["runtimes"]["onnx_pyfunc"]["prompts"].items():
        kv = results["kv_bytes_per_token"] * (int(length) + new_tokens / 2)
        step = results["weight_bytes"] + kv
        achieved = step * row["decode_tokens_per_s"]
        rows.append({"prompt": length, "weights_gb": results["weight_bytes"] / 1e9,
                     "kv_gb": kv / 1e9, "tokens_per_s": row["decode_tokens_per_s"],
                     "achieved_gbs": achieved / 1e9, "of_probe": achieved / bandwidth,
                     "met": achieved / bandwidth >= 0.8})
    return rows


# --- results ----------------------------------------------------------------------------------

RUNTIMES = {  # result key -> label, in the order of the table
    "raw": "onnxruntime-genai (raw)",
    "onnx_pyfunc": "ONNX pyfunc",
    "served": "ONNX pyfunc, served (HTTP)",
    "transformers_pyfunc": "transformers pyfunc",
}


def targets(results: dict) -> list[dict]:
    """Each target of issue 7: measured value, the bound, met or missed by how much."""
    runtimes = results["runtimes"]

    def decode(key: str, length: str) -> float:
        return runtimes[key]["prompts"][length]["decode_tokens_per_s"]

    lengths = list(runtimes["raw"]["prompts"])
    rows = []

    def target(name: str, value: float, bound: float, at_least: bool, unit: str = "x") -> None:
        met = value >= bound if at_least else value <= bound
        gap = (value / bound - 1) * 100
        rows.append({"target": name, "measured": value, "bound": f"{'>=' if at_least else '<='} "
                     f"{bound:g}{unit}", "met": met, "by_percent": gap})

    def paired(length: str) -> float:  # median over the alternating pairs of runs
        pairs = zip(runtimes["onnx_pyfunc"]["prompts"][length]["runs"],
                    runtimes["raw"]["prompts"][length]["runs"])
        return statistics.median(p["decode_tokens_per_s"] / r["decode_tokens_per_s"]
                                 for p, r in pairs)

    target("ONNX pyfunc / raw decode tokens/s, paired runs (worst prompt length)",
           min(paired(n) for n in lengths), 0.95, True)
    target("ONNX pyfunc / raw peak RSS",
           runtimes["onnx_pyfunc"]["peak_rss_mb"] / runtimes["raw"]["peak_rss_mb"], 1.1, False)
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
        f"memory read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s (all cores).",
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
        "in its own fresh process (its own load time and peak RSS); raw onnxruntime-genai and "
        "the ONNX pyfunc are loaded side by side and timed in alternation, prompt by prompt.",
        "",
        "## Single request",
        "",
        "| runtime | load (s) | peak RSS (MB) | prompt | TTFT (s) | decode (tokens/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in RUNTIMES.items():
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
        lines += ["## Decode against the machine's limit (issue 15)", "",
                  "Bytes one ONNX pyfunc decode step reads: the int4 weights (embedding table "
                  f"aside) plus the KV cache ({results['kv_bytes_per_token'] / 1e6:.3f} MB per "
                  "token of context, at the answer's mean context), times decode tokens/s, "
                  "against the read-bandwidth probe. Target: >= 0.8x the probe.", "",
                  "| prompt | weights (GB) | KV (GB) | decode (tokens/s) | read (GB/s) | "
                  "x probe | met |", "|---:|---:|---:|---:|---:|---:|---|"]
        for row in results["decode_limits"]:
            met = "yes" if row["met"] else f"**no**, by {(1 - row['of_probe'] / 0.8) * 100:.0f}%"
            lines.append(f"| {row['prompt']} | {row['weights_gb']:.2f} | {row['kv_gb']:.2f} | "
                         f"{row['tokens_per_s']:.2f} | {row['achieved_gbs']:.1f} | "
                         f"{row['of_probe']:.2f} | {met} |")
        lines.append("")
    lines += ["## Targets (issue 7)", "", "| target | measured | bound | met |", "|---|---:|---|---|"]
    for row in results["targets"]:
        met = "yes" if row["met"] else (
            f"**no**, by {abs(row['by_percent']):.0f}%" if row["by_percent"] is not None else "**no**")
        lines.append(f"| {row['target']} | {row['measured']:.2f} | {row['bound']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = results["runtimes"]
    lengths = list(runtimes["raw"]["prompts"])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 5))
    width = 0.8 / len(RUNTIMES)
    for i, (key, label) in enumerate(RUNTIMES.items()):
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
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=9)
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
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite the report from OUT/performance.json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "performance.json").read_text())
        # Static facts of the build (not measurements) are taken afresh from the cache.
        onnx = build_mod.onnx_folder(args.cache, "--smoke" in results["command"])
        results["weight_bytes"] = weight_bytes(onnx)
        results["kv_bytes_per_token"] = kv_bytes_per_token(onnx)
        return report(results, results["command"], args.out)
    os.environ.setdefault(STARTED, str(time.time()))
    os.environ.update(QUIET)  # inherited by every process the run starts
    plan = SMOKE if args.smoke else Plan()
    if args.no_pipeline:
        plan.pipeline = False
    command = "python -m benchmarks.run" + (" --smoke" if args.smoke else "")

    progress("the checkpoint and its ONNX build (built once, then cached in "
             f"{args.cache})")
    checkpoint, onnx = build_mod.build(args.cache, args.smoke)
    progress("the two MLflow models (saved once, then cached)")
    models = save_models(checkpoint, onnx, args.cache, plan)
    os.sync()  # a freshly saved model's pages would otherwise be written back while we measure
    prompts = chat_prompts(checkpoint, plan.prompt_lengths)
    results: dict[str, Any] = {
        "model": "tiny fixture (tests/fixtures/tiny-phi3)" if args.smoke
        else "full-size Phi-3-mini-4k architecture, random weights (3.8 B parameters)",
        "plan": plan.__dict__, "machine": machine(), "weight_bytes": weight_bytes(onnx),
        "kv_bytes_per_token": kv_bytes_per_token(onnx),
    }
    progress("the machine's read bandwidth")
    results["machine"]["read_bandwidth_gbs"] = read_bandwidth_gbs()
    results["runtimes"] = paired_probes({
        "raw": ("raw onnxruntime-genai", "raw", onnx),
        "onnx_pyfunc": ("ONNX pyfunc", "pyfunc", models["onnx"]),
    }, prompts, plan)
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(results, indent=1))
    (out / "performance.md").write_text(markdown(results, command))
    plot(results, out / "performance.png")
    print(markdown(results, command).split("## Targets (issue 7)")[1])
    print(f"written: {out / 'performance.md'}, .json, .png")
    return results


if __name__ == "__main__":
    main()

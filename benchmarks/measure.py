"""What the benchmark measures, and how: the plan, the prompts, each runtime timed in a fresh
process (benchmarks/probe.py) or served over HTTP, the pipeline, the machine and its read
bandwidth. benchmarks/run.py runs it; benchmarks/cost.py and report.py read what it returns.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import socket
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

import numpy as np

from benchmarks import build as build_mod
from benchmarks.probe import CONCURRENT, GUIDED, HEAD_OF_LINE, progress
from phi3flow.evaluation.eval_worker import peak_rss_mb
from phi3flow.evaluation.records import percentile

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
    """What one run measures: the full plan at the sizes docs/speed.md reports; the smoke plan
    only exercises the harness."""

    prompt_lengths: tuple[int, ...] = (16, 256, 2048)
    new_tokens: int = 32
    repeats: int = 5  # runs per measurement (median), for prompts up to 256 tokens
    transformers_repeats: int = 1  # it is several times slower; one run of each is minutes
    clients: tuple[int, ...] = (1, 2, 4, 8)
    stream_clients: int = 4  # concurrent streams, in process and through the front door
    requests_per_client: int = 2
    pipeline: bool = True
    llama_quants: tuple[str, ...] = ()  # llama.cpp peers (opt-in: --llama-cpp)
    # batch_score against in-process predict (benchmarks/batch.py)
    batch_lengths: tuple[int, ...] = (16, 256)
    batch_prompts: int = 64
    batch_size: int = 16  # batch_score's default


SMOKE = Plan(prompt_lengths=(16, 256), new_tokens=8, repeats=1, clients=(1, 2),
             requests_per_client=2, batch_prompts=8, batch_size=4)



# --- inputs ---------------------------------------------------------------------------------


def chat_prompts(checkpoint: Path, lengths: tuple[int, ...],
                 variant: int = 0) -> dict[str, list[dict]]:
    """One user message per length whose chat-templated prompt is exactly that many tokens.
    Another `variant` starts elsewhere in the text: prompts that share no prefix (the ONNX
    model's prefix cache would serve a repeated prompt's KV cache instead of its prefill)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    words_from = WORDS[variant % len(WORDS):] + WORDS[: variant % len(WORDS)]

    def size(text: str) -> int:
        messages = [{"role": "user", "content": text}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])

    prompts = {}
    for length in lengths:
        words: list[str] = []
        while size(" ".join(words + [words_from[len(words) % len(WORDS)]])) <= length:
            words.append(words_from[len(words) % len(WORDS)])
        text = " ".join(words)
        while size(text) < length:  # top up one short token at a time
            text += " a"
        if size(text) != length:
            raise RuntimeError(f"could not build a {length}-token prompt (got {size(text)})")
        prompts[str(length)] = [{"role": "user", "content": text}]
    return prompts


# --- in-process runtimes (each in a fresh process) ------------------------------------------

# Runtimes also timed with Plan.stream_clients concurrent streams (in alternation).
STREAMED_TOGETHER = ("onnx_pyfunc", "front_door")


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
        guided: dict[str, list] = {n: [] for n in prompts}  # the pyfunc, answering in JSON
        for length in prompts:
            count = runs_for(length, plan.repeats)
            for index in range(count):
                for key, proc in procs.items():
                    progress(f"{runtimes[key][0]}: prompt {length} tokens, run {index + 1}/"
                             f"{count} (alternating with the other runtime)")
                    proc.stdin.write(length + "\n")
                    proc.stdin.flush()
                    runs[key][length].append(json.loads(_read_line(proc, _is_json)))
                    if key == "onnx_pyfunc":  # the same request under a JSON schema, next
                        progress(f"{runtimes[key][0]}: prompt {length} tokens, JSON schema, run "
                                 f"{index + 1}/{count}")
                        proc.stdin.write(f"{GUIDED} {length}\n")
                        proc.stdin.flush()
                        guided[length].append(json.loads(_read_line(proc, _is_json)))
        together: dict[str, list[dict]] = {key: [] for key in procs if key in STREAMED_TOGETHER}
        for index in range(2 if together else 0):
            for key in together:
                progress(f"{runtimes[key][0]}: {plan.stream_clients} concurrent streams, run "
                         f"{index + 1}/2 (alternating)")
                procs[key].stdin.write(f"{CONCURRENT} {plan.stream_clients}\n")
                procs[key].stdin.flush()
                together[key].append(json.loads(_read_line(procs[key], _is_json)))
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
        if "onnx_pyfunc" in procs:
            results["onnx_pyfunc"]["guided"] = {n: summary(r) for n, r in guided.items()}
        for key, runs_of_key in together.items():
            results[key]["concurrent"] = {
                field: statistics.median(run[field] for run in runs_of_key)
                for field in runs_of_key[0] if field != "clients"} | {
                "clients": plan.stream_clients, "runs": runs_of_key}
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


def touch_free_memory(keep_free_gib: float = 2.0) -> float:
    """Write to the machine's free memory once (all but keep_free_gib), then free it; seconds.

    Some virtual machines back a guest's memory only when the guest first touches a page: on
    this project's (Firecracker) machines a fresh GiB costs 2.7 s to fault in the first time
    and 0.23 s afterwards (numpy, 3 GiB). Kept KV caches take fresh memory, so without this a
    run would charge the VM's first touch to whichever request came first; a real machine's
    memory is always backed.
    """
    available = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                     .splitlines() if line.startswith("MemAvailable")) / 2**20
    started, blocks = time.perf_counter(), []
    for _ in range(max(0, int(available - keep_free_gib))):
        blocks.append(np.ones(2**27, dtype=np.float64))  # 1 GiB, every page written
    del blocks
    return time.perf_counter() - started


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

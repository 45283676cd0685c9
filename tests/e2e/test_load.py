"""Load on the served champions, loopback only, bounded in requests and time.

ONNX: 8 concurrent clients x 25 requests; transformers: 2 clients x 25; and the ONNX model
through the front door (tests/e2e/test_front_door.py), 8 x 25. Requests mix prompt
lengths and max_tokens. Checked: no errors, every greedy answer equal to the same request's
answer sent alone beforehand, /ping answered throughout, the server's memory (RSS of its process
tree) at start and end. Reported, not asserted: throughput and p50/p95 latency, printed, and
written to docs/load-test.md (the last run's numbers) when PHI3FLOW_WRITE_DOCS=1.
"""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bad_input_table import WRITE_DOCS, writing_docs
from tests.helpers import ROOT, eval_rows, ping, post

pytestmark = pytest.mark.e2e

DOC = ROOT / "docs" / "load-test.md"
RESULTS = DOC.with_suffix(".json")
REQUESTS_PER_CLIENT = 25
DEADLINE_S = 300  # the whole load phase of one test, whatever happens
FILLER = "Please answer briefly and precisely. "


def _requests() -> list[dict]:
    """12 distinct requests: 4 questions x 3 prompt lengths, with varied max_tokens."""
    rows = eval_rows()[:4]
    out = []
    for i, row in enumerate(rows):
        for j, repeat in enumerate((0, 20, 120)):  # about 0, 150 and 900 extra prompt tokens
            question = row["messages"][-1]["content"]
            out.append({"messages": [{"role": "user", "content": FILLER * repeat + question}],
                        "max_tokens": (8, 16, 32)[(i + j) % 3]})
    return out


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("VmRSS:"))
        todo += [int(c) for c in children]
    return total / 1024


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Endpoint:
    """How to ask a server: `mlflow models serve` by default, or the front door."""

    url: str
    model: str | None = None  # the front door's `model` name; None: MLflow's /invocations

    def post(self, request: dict, timeout: float = 120) -> tuple[int, bytes]:
        if self.model is None:
            return post(self.url, request, timeout=timeout)
        return post(self.url, {"model": self.model, **request}, timeout=timeout,
                    path="/v1/chat/completions")

    def answer(self, raw: bytes) -> tuple[str, int]:
        body = json.loads(raw)
        body = body if self.model is not None else body[0]
        return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]

    def ping(self) -> int:
        if self.model is None:
            return ping(self.url, timeout=30)
        with urllib.request.urlopen(f"{self.url}/health", timeout=30) as response:
            return response.status


def run_load(url: str, pid: int, clients: int, model: str | None = None) -> dict:
    endpoint = Endpoint(url, model)
    requests = _requests()
    expected = {}
    for i, request in enumerate(requests):  # each request alone, one after another
        status, raw = endpoint.post(request)
        assert status == 200, raw[:2000]
        expected[i] = endpoint.answer(raw)[0]
    rss_start = _rss_mb(pid)

    pings: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def poll_ping():
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcome: int | str = endpoint.ping()
            except Exception as exc:  # a refused or timed-out ping is the failure we look for
                outcome = f"{type(exc).__name__}: {exc}"
            pings.append((time.monotonic() - started, outcome))
            stop.wait(0.2)

    deadline = time.monotonic() + DEADLINE_S

    def client(c: int) -> list[dict]:
        results = []
        for k in range(REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                results.append({"error": "deadline reached before this request"})
                continue
            i = (c * 7 + k) % len(requests)  # clients walk the mix in different orders
            started = time.monotonic()
            try:
                status, raw = endpoint.post(requests[i], timeout=120)
            except Exception as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})
                continue
            latency = time.monotonic() - started
            if status != 200:
                results.append({"error": f"HTTP {status}: {raw[:300]!r}"})
                continue
            text, tokens = endpoint.answer(raw)
            results.append({"i": i, "latency": latency, "text": text, "tokens": tokens})
        return results

    poller = threading.Thread(target=poll_ping, daemon=True)
    poller.start()
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    elapsed = time.monotonic() - started
    stop.set()
    poller.join()
    rss_end = _rss_mb(pid)

    done = [r for r in results if "error" not in r]
    latencies = [r["latency"] for r in done]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": [r["error"] for r in results if "error" in r],
        "mismatches": [(r["i"], r["text"], expected[r["i"]]) for r in done
                       if r["text"] != expected[r["i"]]],
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(done) / elapsed, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in done) / elapsed, 1),
        "p50_s": round(_percentile(latencies, 50), 3),
        "p95_s": round(_percentile(latencies, 95), 3),
        "pings": len(pings),
        "ping_failures": [p for _, p in pings if p != 200],
        "ping_max_s": round(max(s for s, _ in pings), 3),
        "rss_start_mb": round(rss_start),
        "rss_end_mb": round(rss_end),
    }


def _report(model: str, result: dict) -> None:
    print(f"\n{model}: {json.dumps(result, indent=1)}")
    if not writing_docs():  # a plain test run leaves the tree as it was
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[model] = {**result, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {_cpus()} CPUs"}
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Load test: the served champions on loopback",
        "",
        f"Written by `{WRITE_DOCS}=1 python -m pytest tests/e2e/test_load.py -s` (the last run's "
        "numbers; the raw "
        "results are in load-test.json). Tiny fixture model (tests/fixtures/tiny-phi3), "
        "`mlflow models serve --env-manager local`, one worker, 12 distinct requests (4 "
        "questions x 3 prompt lengths, max_tokens 8/16/32) cycled by each client.",
        "",
        "| model | clients x requests | errors | answers differing from sequential | "
        "requests/s | generated tokens/s | p50 latency s | p95 latency s | /ping answered | "
        "max /ping s | RSS start -> end MiB | when, machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(results.items()):
        lines.append(
            f"| {name} | {r['clients']} x {r['requests'] // r['clients']} | {len(r['errors'])} | "
            f"{len(r['mismatches'])} | {r['requests_per_s']} | {r['tokens_per_s']} | "
            f"{r['p50_s']} | {r['p95_s']} | {r['pings'] - len(r['ping_failures'])}/{r['pings']} "
            f"| {r['ping_max_s']} | {r['rss_start_mb']} -> {r['rss_end_mb']} | {r['when']}, "
            f"{r['machine']} |")
    DOC.write_text("\n".join(lines) + "\n")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("model", "clients"), [("onnx", 8), ("transformers", 2)])
def test_served_model_under_concurrent_load(served, model, clients):
    url, proc = served[model]
    result = run_load(url, proc.pid, clients)
    _report(model, result)
    assert result["requests"] == clients * REQUESTS_PER_CLIENT
    assert not result["errors"], result["errors"][:5]
    assert not result["mismatches"], result["mismatches"][:5]
    assert result["pings"] >= 5 and not result["ping_failures"], result["ping_failures"][:5]
    # Memory: the model is loaded before the start reading; serving 25 x clients requests may
    # grow allocator caches but must not grow with the number of requests.
    growth = result["rss_end_mb"] - result["rss_start_mb"]
    assert growth < max(300, 0.5 * result["rss_start_mb"]), result

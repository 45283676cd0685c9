"""evaluate's worker: one model, one fresh process, every row answered and timed.

`python -m phi3flow.eval_worker MODEL_URI ROWS_JSON MAX_NEW_TOKENS RESULT_JSON`, started by
`evaluation.evaluate_in_fresh_process`: a process of its own, so the model's load time and peak
memory are not the other model's leftovers.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _answer(model, messages: list[dict], max_tokens: int) -> tuple[dict, float]:
    started = time.perf_counter()
    (response,) = model.predict({"messages": messages, "max_tokens": max_tokens})
    return response, time.perf_counter() - started


def run_worker(model_uri: str, rows: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Load the model once, answer every row, and time each answer and its first token."""
    import mlflow

    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    load_seconds = time.perf_counter() - started
    _answer(model, rows[0]["messages"], 1)  # warm-up, not measured
    results = []
    for row in rows:
        # Time to first token, measured the same way for both models: a 1-token request
        # (the transformers pyfunc has no streaming to time the first chunk of).
        _, ttft = _answer(model, row["messages"], 1)
        response, latency = _answer(model, row["messages"], max_new_tokens)
        results.append({
            "answer": response["choices"][0]["message"]["content"],
            "finish_reason": response["choices"][0]["finish_reason"],
            "completion_tokens": response["usage"]["completion_tokens"],
            "latency_s": latency,
            "ttft_s": ttft,
        })
    return {"load_s": load_seconds, "peak_rss_mb": peak_rss_mb(), "rows": results}


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (this one by default; 0 for a process that is gone).

    VmHWM belongs to the process's own address space, so it starts afresh at exec; getrusage's
    ru_maxrss does not: a child forked from a big parent reports the parent's peak.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    if pid == "self":  # not Linux: best effort
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return 0.0


def main(argv: list[str]) -> None:
    model_uri, data, max_new_tokens, out = argv  # positional: only evaluate starts this
    result = run_worker(model_uri, json.loads(Path(data).read_text()), int(max_new_tokens))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])

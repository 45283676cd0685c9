"""batch_score against in-process predict: the same prompts, the same ONNX pyfunc, side by side.

For each prompt length (Plan.batch_lengths), Plan.batch_prompts distinct chat prompts of exactly
that many tokens, Plan.new_tokens new tokens each, greedy, timed three ways, each in a fresh
process so its memory is its own:
- one at a time: `predict([row])` in a loop;
- in-process batches: `predict(rows[i:i + batch_size])`, the batch size batch_score uses, the
  model loaded with the same cap on a batch's one-call prefill as batch_score's workers;
- batch_score: `steps.batch_score` on a local Spark (every core, one model copy: its defaults),
  input a JSONL file, output Parquet; its `score_s` is the Spark job, the worker's model load
  included.
Aggregate tokens/s = completion tokens / seconds from the model's load to the last answer, for all
three (each loads the model once); the same without the load ("warm") is reported beside.
Memory: the peak RSS of the process that holds the model (for batch_score, the largest Python
worker of Spark, sampled; the JVM's is reported apart).

`python -m benchmarks.batch predict SPEC OUT` and `... batch_score SPEC OUT` are the two probes;
benchmarks/run.py calls `measure`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.measure import ROOT, WORDS, Plan
from benchmarks.probe import progress
from phi3flow.batch import udf_model as batch_model
from phi3flow.evaluation.eval_worker import peak_rss_mb

LOADED = re.compile(r"loaded the chat model in Python worker process (\d+) \(([\d.]+) s\)")


def distinct_prompts(checkpoint: Path, length: int, count: int) -> list[list[dict]]:
    """`count` different user messages whose chat-templated prompt is exactly `length` tokens
    (the same words, each prompt starting further along them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def size(text: str) -> int:
        return len(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])

    prompts = []
    for start in range(count):
        words: list[str] = []
        while True:
            word = f"{start}" if not words else WORDS[(start + len(words)) % len(WORDS)]
            if size(" ".join(words + [word])) > length:
                break
            words.append(word)
        text = " ".join(words)
        while size(text) < length:
            text += " a"
        if size(text) != length:
            raise RuntimeError(f"could not build a {length}-token prompt (got {size(text)})")
        prompts.append([{"role": "user", "content": text}])
    return prompts


def measure(model: Path, checkpoint: Path, plan: Plan) -> dict:
    """Every length x (one at a time, in-process batches, batch_score); ratios and memory."""
    prompts = {str(n): distinct_prompts(checkpoint, n, plan.batch_prompts)
               for n in plan.batch_lengths}
    with tempfile.TemporaryDirectory(prefix="phi3flow-bench-batch-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": str(model), "prompts": prompts,
                                    "new_tokens": plan.new_tokens,
                                    "batch_size": plan.batch_size}))
        results = {}
        for mode in ("predict", "batch_score"):
            progress(f"batch scoring: {mode} in a fresh process")
            out = Path(tmp) / f"{mode}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.batch", mode, str(spec), str(out)],
                           check=True, cwd=ROOT)
            results[mode] = json.loads(out.read_text())
    rows = {}
    for length in prompts:
        one, batched = results["predict"]["loop"][length], results["predict"]["batched"][length]
        spark = results["batch_score"]["lengths"][length]
        rows[length] = {
            "prompts": plan.batch_prompts, "batch_size": plan.batch_size,
            "one_at_a_time": one, "in_process": batched, "batch_score": spark,
            "batch_score_vs_in_process": spark["tokens_per_s"] / batched["tokens_per_s"],
            "batch_score_vs_one_at_a_time": spark["tokens_per_s"] / one["tokens_per_s"],
        }
        progress(f"batch scoring, {length}-token prompts: one at a time "
                 f"{one['tokens_per_s']:.2f} tokens/s, in-process batches "
                 f"{batched['tokens_per_s']:.2f}, batch_score {spark['tokens_per_s']:.2f} "
                 f"({rows[length]['batch_score_vs_in_process']:.2f}x in-process, "
                 f"{rows[length]['batch_score_vs_one_at_a_time']:.2f}x one at a time)")
    return {"lengths": rows, "in_process_peak_rss_mb": results["predict"]["peak_rss_mb"],
            "worker_peak_rss_mb": results["batch_score"]["worker_peak_rss_mb"],
            "workers": results["batch_score"]["workers"],
            "jvm_peak_rss_mb": results["batch_score"]["jvm_peak_rss_mb"],
            "spark_start_s": results["batch_score"]["spark_start_s"]}


# --- the probes (each in its own process) -------------------------------------------------


def _rows(messages: list[list[dict]], new_tokens: int) -> list[dict]:
    return [{"messages": m, "max_tokens": new_tokens} for m in messages]


def probe_predict(spec: dict) -> dict:
    """One loaded ONNX pyfunc: every length one row at a time, then in batches."""
    import mlflow

    # Loaded as batch_score's workers load it (one long prefill call per batch): the in-process
    # batches are the same model, so the ratio is Spark's overhead. One row per call (the loop)
    # does not reach the cap.
    started = time.perf_counter()
    with batch_model.scoring_settings():
        model = mlflow.pyfunc.load_model(spec["model"])
    load_s = time.perf_counter() - started
    first = next(iter(spec["prompts"].values()))
    model.predict(_rows(first[:1], 2))  # warm-up, not timed
    found: dict[str, dict] = {"loop": {}, "batched": {}}
    size = spec["batch_size"]
    for length, messages in spec["prompts"].items():
        rows = _rows(messages, spec["new_tokens"])
        for mode, calls in (("loop", [[r] for r in rows]),
                            ("batched", [rows[i:i + size] for i in range(0, len(rows), size)])):
            progress(f"batch scoring: predict, {mode}, {length}-token prompts")
            clock = time.perf_counter()
            tokens = sum(r["usage"]["completion_tokens"] for call in calls
                         for r in model.predict(call))
            seconds = time.perf_counter() - clock
            found[mode][length] = {"completion_tokens": tokens, "warm_s": seconds,
                                   "load_s": load_s,
                                   "tokens_per_s": tokens / (load_s + seconds),
                                   "warm_tokens_per_s": tokens / seconds}
    found["peak_rss_mb"] = peak_rss_mb()
    return found


class _Sampler(threading.Thread):
    """Peak RSS of this process's descendants, by kind (Spark's Python workers, its JVM)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, float]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            for pid in _descendants(os.getpid()):
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                kind = ("jvm" if b"java" in command.split(b" ")[0]
                        else "" if b"pyspark" not in command
                        # pyspark.daemon forks the workers: a worker's parent is the daemon
                        else "python_worker" if b"pyspark" in _cmdline(_parent(pid))
                        else "python_daemon")
                if kind:
                    self.peaks[pid] = (kind, max(peak_rss_mb(pid),
                                                 self.peaks.get(pid, ("", 0.0))[1]))

    def peak(self, kind: str) -> tuple[float, int]:
        """(the largest peak RSS of that kind, how many such processes were seen)."""
        values = [mb for k, mb in self.peaks.values() if k == kind]
        return max(values, default=0.0), len(values)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    try:  # the field after the command's closing parenthesis and the state
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def probe_batch_score(spec: dict) -> dict:
    """batch_score for every length, in one Spark session made as batch_score makes its own
    for local[*] (every core to one model copy), so the JVM starts once."""
    import mlflow
    import pandas as pd
    from pyspark.sql import SparkSession

    from phi3flow.batch.score import local_cores
    from steps import batch_score

    folder = Path(tempfile.mkdtemp(prefix="phi3flow-bench-spark-"))
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    sampler = _Sampler()
    sampler.start()
    clock = time.perf_counter()
    spark = (SparkSession.builder.master("local[*]").appName("phi3flow batch_score benchmark")
             .config("spark.task.cpus", str(local_cores("local[*]")))
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.pyspark.python", sys.executable).getOrCreate())
    spark_start_s = time.perf_counter() - clock
    found = {}
    try:
        for length, messages in spec["prompts"].items():
            progress(f"batch scoring: batch_score, {length}-token prompts")
            source = folder / f"prompts-{length}.jsonl"
            source.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n"
                                      for i, m in enumerate(messages)))
            scored = batch_score.main([
                "--model_uri", spec["model"], "--input", str(source),
                "--output", str(folder / f"scored-{length}"), "--spark_master", "local[*]",
                "--batch_size", str(spec["batch_size"]),
                "--max_new_tokens", str(spec["new_tokens"])])
            if scored.failed_rows:
                raise RuntimeError(f"{scored.failed_rows} rows failed at {length} tokens")
            # A model call's rows share its latency_s: the distinct values add up to the time
            # spent in predict; the rest of score_s is Spark's, and the worker's model load.
            calls = pd.read_parquet(folder / f"scored-{length}")["latency_s"].unique()
            found[length] = {"completion_tokens": scored.completion_tokens,
                             "score_s": scored.score_s, "wall_s": scored.wall_s,
                             "model_calls_s": float(calls.sum()),
                             "tokens_per_s": scored.tokens_per_s,
                             "warm_tokens_per_s": scored.completion_tokens / float(calls.sum())}
    finally:
        spark.stop()
        sampler.stopped.set()
        sampler.join()
    worker, workers = sampler.peak("python_worker")
    return {"lengths": found, "worker_peak_rss_mb": worker, "workers": workers,
            "daemon_peak_rss_mb": sampler.peak("python_daemon")[0],
            "jvm_peak_rss_mb": sampler.peak("jvm")[0], "spark_start_s": spark_start_s}


def main(argv: list[str]) -> None:
    mode, spec, out = argv
    probe = {"predict": probe_predict, "batch_score": probe_batch_score}[mode]
    Path(out).write_text(json.dumps(probe(json.loads(Path(spec).read_text()))))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main(sys.argv[1:])

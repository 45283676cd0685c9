"""evaluate's measurements: both models on the same rows, measured the same way (the gate and the
written decision are phi3flow/decision.py).

Each model runs in a fresh Python process (phi3flow/eval_worker.py), so its load time and peak
memory are its own and not the other model's leftovers. Quality scorers
are offline (the expected answer contained in the reply, exact match); MLflow's
question-answering metrics and LLM judges need downloads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from phi3flow.decision import MODELS
from phi3flow.errors import StepError
from phi3flow.names import PROJECT_ROOT

logger = logging.getLogger(__name__)

class EvalDataError(StepError):
    """The eval file is missing, empty or malformed; the message names the line."""


def load_eval_data(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvalDataError(f"eval_data {path} does not exist: pass a JSONL file of "
                            "{\"messages\": [...], \"expected\": \"...\"} rows.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path} line {number} is not valid JSON: {exc.msg}.") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{path} line {number} must be a JSON object.")
        missing = [k for k in ("messages", "expected") if k not in row]
        if missing:
            raise EvalDataError(f"{path} line {number} has no {' or '.join(missing)} field; "
                                "each row needs messages (a chat) and expected (a string).")
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise EvalDataError(f"{path} line {number}: messages must be a non-empty list of "
                                "{\"role\": ..., \"content\": ...} objects with string values.")
        if not isinstance(row["expected"], str) or not row["expected"].strip():
            raise EvalDataError(f"{path} line {number}: expected must be a non-empty string.")
        rows.append({"messages": messages, "expected": row["expected"]})
    if not rows:
        raise EvalDataError(f"{path} holds no rows: an empty eval set cannot judge a model.")
    return rows


def evaluate_in_fresh_process(model_uri: str, rows: list[dict], max_new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="phi3flow-eval-") as tmp:
        data, out = Path(tmp) / "rows.json", Path(tmp) / "result.json"
        data.write_text(json.dumps(rows))
        command = [sys.executable, "-m", "phi3flow.eval_worker", model_uri, str(data),
                   str(max_new_tokens), str(out)]
        logger.info("evaluating %s on %d rows in a fresh process", model_uri, len(rows))
        import mlflow

        from phi3flow import tracking

        env = {
            **tracking.child_environment(),
            # The same store as ours, even when ours is MLflow's relative default.
            "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
            "PYTHONPATH": os.pathsep.join(
                [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            raise StepError(f"evaluating {model_uri} failed (exit code {done.returncode}); "
                            "its log is above.")
        return json.loads(out.read_text())


# --- metrics ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def contains(answer: str, expected: str) -> bool:
    return expected.strip().lower() in answer.lower()


def exact(answer: str, expected: str) -> bool:
    return answer.strip().strip(".").lower() == expected.strip().strip(".").lower()


def model_metrics(rows: list[dict], result: dict, size_mb: float) -> dict[str, float]:
    answers = result["rows"]
    tokens = sum(a["completion_tokens"] for a in answers)
    seconds = sum(a["latency_s"] for a in answers)
    return {
        "quality_contains": sum(contains(a["answer"], r["expected"])
                                for a, r in zip(answers, rows)) / len(rows),
        "quality_exact": sum(exact(a["answer"], r["expected"])
                             for a, r in zip(answers, rows)) / len(rows),
        "latency_p50_s": percentile([a["latency_s"] for a in answers], 0.5),
        "latency_p95_s": percentile([a["latency_s"] for a in answers], 0.95),
        "ttft_p50_s": percentile([a["ttft_s"] for a in answers], 0.5),
        "output_tokens_per_s": tokens / seconds if seconds else 0.0,
        "load_s": result["load_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "size_mb": size_mb,
    }


def eval_table(rows: list[dict], results: dict[str, dict], grades: dict[str, list]) -> dict:
    """Per row: the question, the expected answer, and each model's answer, score and timings."""
    table = {
        "question": [r["messages"][-1]["content"] for r in rows],
        "expected": [r["expected"] for r in rows],
    }
    for name, result in results.items():
        answers = result["rows"]
        table[f"{name}_answer"] = [a["answer"] for a in answers]
        table[f"{name}_contains"] = [contains(a["answer"], r["expected"])
                                     for a, r in zip(answers, rows)]
        table[f"{name}_latency_s"] = [a["latency_s"] for a in answers]
        table[f"{name}_ttft_s"] = [a["ttft_s"] for a in answers]
        table[f"{name}_completion_tokens"] = [a["completion_tokens"] for a in answers]
        if name in grades:
            table[f"{name}_judge"] = grades[name]
    table["agree"] = [same_answer(a, b) for a, b in
                      zip(results["transformers"]["rows"], results["onnx"]["rows"])]
    return table


def same_answer(first: dict, second: dict) -> bool:
    return first["answer"].strip() == second["answer"].strip()


def agreement(first: dict, second: dict) -> float:
    pairs = list(zip(first["rows"], second["rows"]))
    return sum(same_answer(a, b) for a, b in pairs) / len(pairs)


def folder_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# --- optional LLM judge -------------------------------------------------------------------------

JUDGE_PROMPT = (
    "You are grading an answer to a question.\nQuestion: {question}\nReference answer: "
    "{expected}\nCandidate answer: {answer}\nDoes the candidate answer agree with the reference "
    "answer? Reply with one word: yes or no."
)


def judge_answers(judge_uri: str, rows: list[dict], results: dict[str, dict]) -> dict[str, list]:
    """Ask a chat model (any MLflow model that takes {"messages": ...}) to grade each answer.

    Off unless the user names a judge: useful judges are large hosted models, which need network
    access and credentials this project never assumes.
    """
    import mlflow

    logger.info("grading answers with the judge %s", judge_uri)
    judge = mlflow.pyfunc.load_model(judge_uri)
    grades: dict[str, list] = {}
    for name, result in results.items():
        grades[name] = []
        for row, answer in zip(rows, result["rows"]):
            prompt = JUDGE_PROMPT.format(question=row["messages"][-1]["content"],
                                         expected=row["expected"], answer=answer["answer"])
            reply = judge.predict({"messages": [{"role": "user", "content": prompt}],
                                   "max_tokens": 4})
            text = reply[0]["choices"][0]["message"]["content"]
            grades[name].append(text.strip().lower().startswith("yes"))
    return grades


# --- chart ------------------------------------------------------------------------------------


def chart(metrics: dict[str, dict[str, float]], agree: float, verdict: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Quality (share of rows)", ["quality_contains", "quality_exact"], "{:.0%}"),
        ("Latency (s)", ["ttft_p50_s", "latency_p50_s", "latency_p95_s"], "{:.3g}"),
        ("Throughput (output tokens/s)", ["output_tokens_per_s"], "{:.3g}"),
        ("Footprint (MB)", ["peak_rss_mb", "size_mb"], "{:.0f}"),
    ]
    colors = {"transformers": "#4c72b0", "onnx": "#dd8452"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (title, keys, fmt) in zip(axes, panels):
        width = 0.38
        for i, name in enumerate(MODELS):
            xs = [k + (i - 0.5) * width for k in range(len(keys))]
            values = [metrics[name][key] for key in keys]
            bars = ax.bar(xs, values, width, label=name, color=colors[name])
            ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(keys)), [k.replace("_", " ") for k in keys], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.2)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"transformers vs onnx on the same rows — answers agree on {agree:.0%}\n"
                 f"{verdict}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

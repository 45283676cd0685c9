"""What evaluate and its worker hand each other, and what each model's answers add up to.

evaluate writes a `WorkerSpec` for each model; the worker (phi3flow/evaluation/eval_worker.py), in a process
of its own, answers every row and writes a `WorkerResult`: an `Answer` per row and the model's
load time, size and peak memory. evaluate scores the answers (phi3flow/evaluation/evaluate.py) and sums
them up as `ModelMetrics`, whose flat form (`logged`) is what the runs' metrics, the logged
models' metrics and `decision.json` hold, each under its metric's name
(phi3flow/evaluation/metrics.py; `unnamed_metrics` finds a key that has none).

Records, as between steps (phi3flow/core/record.py): a worker file that is not what the other side
writes is refused by name, never half-read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from phi3flow.core import names
from phi3flow.core.record import Record, record
from phi3flow.evaluation import metrics
from phi3flow.evaluation.eval_data import EvalRow


@record
class WorkerSpec(Record):
    """One model to answer every row with, and where its traces go."""

    ARTIFACT = "worker spec"
    PRODUCER = names.EVALUATE

    name: str  # the model's key, decision.TRANSFORMERS or ONNX
    model_uri: str
    model_location: str  # where its files download from (model_uris.model_location)
    experiment_id: str
    run_id: str  # the model's evaluation run: its answers' traces go there
    max_new_tokens: int
    rows: tuple[EvalRow, ...]
    tracing: bool  # False on a store without a trace API: answers come back whole instead
    model_id: str | None = None  # a models:/m-... model's ID: its traces link to it


@record
class Answer:
    """One row's answer, or the error the model raised on it (then only trace_id and error)."""

    trace_id: str | None = None  # None without tracing (and then absent from the JSON)
    answer: str = ""
    error: str | None = None
    # The chat.completion, which a scorer reads where there is no trace (tracing off only).
    response: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    ttft_s: float | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@record
class LongPrompt:
    """The first token of a long (RAG-style) prompt: where prefill speed shows."""

    prompt_tokens: int
    ttft_s: float


@record
class WorkerResult(Record):
    ARTIFACT = "worker result"
    PRODUCER = "phi3flow.evaluation.eval_worker"

    load_s: float
    size_mb: float  # the model's files, as the worker fetched them
    peak_rss_mb: float
    answers: tuple[Answer, ...]
    long_prompt: LongPrompt | None = None  # None if the model could not take it


@record
class ModelMetrics:
    """One model over the eval set: each scorer's share of true rows, speed and footprint."""

    quality: dict[str, float]  # {scorer name (metrics.SCORES): share of rows it scored true}
    failed_rows: int
    scorer_errors: int
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    prompt_tokens_p50: float
    output_tokens_per_s: float
    load_s: float
    peak_rss_mb: float
    size_mb: float
    long_prompt_tokens: int | None = None
    ttft_long_prompt_s: float | None = None

    @classmethod
    def of(cls, result: WorkerResult, scores: dict[str, list[bool | None]]) -> ModelMetrics:
        answered = [a for a in result.answers if not a.failed]
        tokens = sum(a.completion_tokens for a in answered)
        seconds = sum(a.latency_s for a in answered)
        long = result.long_prompt
        return cls(
            quality={name: share(values) for name, values in scores.items()},
            failed_rows=len(result.answers) - len(answered),
            scorer_errors=sum(v is None for values in scores.values() for v in values),
            latency_p50_s=percentile([a.latency_s for a in answered], 0.5),
            latency_p95_s=percentile([a.latency_s for a in answered], 0.95),
            ttft_p50_s=percentile([a.ttft_s for a in answered], 0.5),
            prompt_tokens_p50=percentile([a.prompt_tokens for a in answered], 0.5),
            output_tokens_per_s=tokens / seconds if seconds else 0.0,
            load_s=result.load_s, peak_rss_mb=result.peak_rss_mb, size_mb=result.size_mb,
            long_prompt_tokens=long.prompt_tokens if long else None,
            ttft_long_prompt_s=long.ttft_s if long else None)

    def logged(self) -> dict[str, float]:
        """{metric name: value}: the scorers' shares and every other field that has a value, as
        MLflow metrics are logged and `decision.json` holds them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values.pop("quality"),
                **{key: float(value) for key, value in values.items() if value is not None}}


def loggable_names() -> tuple[str, ...]:
    """Every key `ModelMetrics.logged` can produce: each scorer's share (its `quality` keys,
    scorers named after metrics.SCORES), then every other field, in the record's order."""
    fields = [f.name for f in dataclasses.fields(ModelMetrics) if f.name != "quality"]
    return (*(m.name for m in metrics.SCORES), *fields)


def unnamed_metrics() -> list[str]:
    """The keys `ModelMetrics.logged` can produce that are no metric of metrics.BY_NAME: none,
    unless a field was added to the record and not to metrics.py (a test holds this empty)."""
    return [name for name in loggable_names() if name not in metrics.BY_NAME]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def share(values: list[bool | None]) -> float:
    """The share of rows scored true; a row the scorer failed on counts as false."""
    return sum(v is True for v in values) / len(values)

"""The records evaluate and its worker hand each other, and a model's metrics built from them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from phi3flow.core.record import RecordError
from phi3flow.evaluation import metrics
from phi3flow.evaluation.eval_data import EvalRow
from phi3flow.evaluation.records import (
    Answer,
    LongPrompt,
    ModelMetrics,
    WorkerResult,
    WorkerSpec,
    loggable_names,
    percentile,
    unnamed_metrics,
)

ROW = EvalRow(({"role": "user", "content": "What is the capital of Spain?"},), "Madrid", "facts")


def answered(latency: float, tokens: int = 4) -> Answer:
    return Answer(trace_id="tr-1", answer="Madrid", finish_reason="stop", prompt_tokens=12,
                  completion_tokens=tokens, latency_s=latency, ttft_s=latency / 4)


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([0, 10], 0.95) == pytest.approx(9.5)


def test_metrics_count_only_answered_rows_for_speed_and_every_row_for_quality():
    result = WorkerResult(load_s=3.0, size_mb=120.5, peak_rss_mb=900.0, answers=(
        answered(1.0), answered(3.0, tokens=8), Answer(trace_id=None, error="ValueError: boom")),
        long_prompt=LongPrompt(prompt_tokens=1020, ttft_s=2.5))
    quality, exact = metrics.QUALITY.name, metrics.EXACT.name
    measured = ModelMetrics.of(result, {quality: [True, True, False],
                                        exact: [True, None, False]})
    assert measured.failed_rows == 1 and measured.scorer_errors == 1
    assert measured.quality == {quality: pytest.approx(2 / 3), exact: pytest.approx(1 / 3)}
    assert measured.latency_p50_s == 2.0 and measured.output_tokens_per_s == 3.0  # 12 tokens / 4 s
    logged = measured.logged()
    assert logged[metrics.LATENCY_P95.name] == pytest.approx(2.9)
    assert logged[quality] == pytest.approx(2 / 3)  # the scorers sit beside the rest, flat
    assert logged["long_prompt_tokens"] == 1020.0 and logged["ttft_long_prompt_s"] == 2.5
    assert all(isinstance(value, float) for value in logged.values())


def test_a_model_that_could_not_take_the_long_prompt_logs_no_long_prompt_metrics():
    result = WorkerResult(load_s=1.0, size_mb=1.0, peak_rss_mb=1.0, answers=(answered(1.0),))
    logged = ModelMetrics.of(result, {metrics.QUALITY.name: [True]}).logged()
    assert "long_prompt_tokens" not in logged and "ttft_long_prompt_s" not in logged


def test_each_metric_has_one_name_and_every_logged_key_is_a_metric():
    """One record per metric (metrics.py): evaluate logs, the gate judges, decision.json holds
    and register tags a metric under the one name its Metric gives."""
    all_names = [metric.name for metric in metrics.ALL]
    assert len(set(all_names)) == len(all_names) == len(metrics.BY_NAME)
    assert all(metrics.BY_NAME[metric.name] is metric for metric in metrics.ALL)
    assert unnamed_metrics() == []
    others = {f.name: 1 for f in dataclasses.fields(ModelMetrics) if f.name != "quality"}
    full = ModelMetrics(quality={metric.name: 0.5 for metric in metrics.SCORES}, **others)
    logged = full.logged()
    # A scorer named like a field would overwrite it in the flat dict: one key each, no fewer.
    assert len(logged) == len(metrics.SCORES) + len(others)
    assert sorted(logged) == sorted(all_names) == sorted(loggable_names())


def test_the_worker_spec_survives_its_file_and_a_foreign_one_is_refused_by_name():
    spec = WorkerSpec(name="onnx", model_uri="models:/m-1", model_location="runs:/r/phi3-onnx",
                      experiment_id="0", run_id="r", max_new_tokens=32, rows=(ROW,),
                      tracing=False, model_id="m-1")
    assert WorkerSpec.from_json(spec.to_json(), "spec.json") == spec
    alien = json.loads(spec.to_json()) | {"temperature": 0.7}
    with pytest.raises(RecordError, match=r"spec.json is not a worker spec that evaluate writes "
                                          r"\(temperature: not a field of this record\)"):
        WorkerSpec.from_json(json.dumps(alien), "spec.json")


def test_a_worker_result_without_its_answers_is_refused():
    text = json.dumps({"load_s": 1.0, "size_mb": 1.0, "peak_rss_mb": 1.0})
    with pytest.raises(RecordError, match=r"answers: Field required"):
        WorkerResult.from_json(text, "result.json")


def test_a_worker_result_survives_its_file_with_and_without_traces():
    """Without a trace API the answers have no trace ID and carry their whole response."""
    untraced = Answer(answer="Madrid", response={"object": "chat.completion"}, latency_s=1.0)
    result = WorkerResult(load_s=1.0, size_mb=1.0, peak_rss_mb=1.0,
                          answers=(answered(1.0), untraced, Answer(error="ValueError: boom")))
    assert WorkerResult.from_json(result.to_json(), "result.json") == result

"""Unit tests of the records steps hand each other: each round-trips through its JSON, and a
malformed or foreign artifact is refused by name, saying which step to re-run."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from phi3flow.core.record import RecordError
from phi3flow.evaluation import decision
from phi3flow.evaluation.decision import Decision, ModelRef
from phi3flow.pipeline import stages as pipeline
from phi3flow.pipeline.stages import Produced
from phi3flow.registry import register as registry
from phi3flow.registry.register import Registration

THRESHOLDS = {"min_quality": 0.8, "max_quality_drop": 0.05, "max_p95_latency_s": 10.0}
RUN = "0123456789abcdef0123456789abcdef"


def _metrics(quality: float, p95: float) -> dict[str, float]:
    return {"quality_contains": quality, "quality_exact": 0.0, "latency_p95_s": p95}


def _decision(onnx_quality: float = 1.0, onnx_p95: float = 1.0) -> Decision:
    metrics = {"transformers": _metrics(1.0, 5.0), "onnx": _metrics(onnx_quality, onnx_p95)}
    models = {name: ModelRef(f"models:/m-{name}", RUN) for name in metrics}
    return decision.decide(metrics, THRESHOLDS, models, 0.9, "data/eval.jsonl", "ab" * 32)


def test_the_gate_chooses_the_fastest_model_that_passed_and_says_why():
    fast = _decision()
    assert fast.chosen == "onnx" and fast.chosen_passed
    assert fast.verdicts["onnx"].reasons == ("all thresholds met",)
    dropped = _decision(onnx_quality=0.9)  # 0.1 below transformers > max_quality_drop
    assert dropped.chosen == "transformers" and not dropped.verdicts["onnx"].passed
    assert "max_quality_drop 0.05" in dropped.verdicts["onnx"].reasons[0]
    slow = decision.decide({"transformers": _metrics(0.5, 50), "onnx": _metrics(0.6, 60)},
                           THRESHOLDS, _decision().models, 0.0, "e", "ab" * 32)
    assert slow.chosen == "onnx" and not slow.chosen_passed  # best quality, not champion


def test_the_gate_and_register_word_their_reasons_from_each_metric():
    """Reasons read label, unit and format from the Metric (metrics.py): worded as they were
    when each Threshold spelled them out, since users and tests match on them."""
    low = _decision(onnx_quality=0.5, onnx_p95=12.0)
    assert low.verdicts["onnx"].reasons == (
        "quality 0.500 < min_quality 0.8", "quality drop vs transformers 0.500 > "
        "max_quality_drop 0.05", "p95 latency 12.00 s > max_p95_latency_s 10.0")
    assert low.gated_on == ("quality_contains", "latency_p95_s")

    def holder(quality: float, p95: float) -> ModelVersion:
        return ModelVersion("phi3", "3", 0, tags=[
            ModelVersionTag(f"phi3flow.metric.{key}", repr(value))
            for key, value in (("quality_contains", quality), ("latency_p95_s", p95))])

    candidate = _metrics(1.0, 1.0)
    assert registry._beats(candidate, holder(1.0, 2.0)) == (
        True, "equal quality; p95 latency 1.000 s vs 2.000 s of version 3")
    assert registry._beats(candidate, holder(1.0, 0.5)) == (
        False, "equal quality; p95 latency 1.000 s vs 0.500 s of version 3")
    assert registry._beats(_metrics(0.9, 1.0), holder(1.0, 9.0)) == (
        False, "quality 0.900 vs 1.000 of version 3")
    assert [m.name for m in registry.KEY_METRICS] == [
        "quality_contains", "latency_p95_s", "quality_exact", "output_tokens_per_s",
        "peak_rss_mb"]


def test_the_decision_says_which_model_answers_first_at_each_prompt_length():
    """The gate's latency winner need not be first to answer a long prompt (prefill speed)."""
    timing = {"transformers": {"ttft_p50_s": 0.2, "prompt_tokens_p50": 38.0,
                               "ttft_long_prompt_s": 12.0, "long_prompt_tokens": 1024.0},
              "onnx": {"ttft_p50_s": 0.1, "prompt_tokens_p50": 38.0,
                       "ttft_long_prompt_s": 20.0, "long_prompt_tokens": 1024.0}}
    metrics = {name: _metrics(1.0, 1.0) | timing[name] for name in timing}
    decided = decision.decide(metrics, THRESHOLDS, _decision().models, 1.0, "e", "ab" * 32)
    assert decided.faster_first_token == {"38": "onnx", "1024": "transformers"}
    assert _decision().faster_first_token == {}  # not measured: nothing claimed


@pytest.mark.parametrize("record", [
    _decision(),
    registry.registration("phi3", "3", "champion", "passed the gate", reused=False),
    Produced(*(RUN,) * 5, "models:/m-a", "models:/m-b", "models:/phi3/1", "champion",
             "passed", "models:/phi3@champion"),
], ids=["decision", "registration", "produced"])
def test_records_round_trip_through_their_artifact_json(record):
    assert type(record).from_json(record.to_json(), "x") == record


def test_a_registration_without_alias_api_serves_the_version():
    by_tag = registry.registration("phi3", "3", "champion", "r", reused=False, by_tag=True)
    assert by_tag.serve_uri == "models:/phi3/3" and by_tag.model_uri == "models:/phi3/3"
    assert registry.registration("phi3", "3", "champion", "r", False).serve_uri == (
        "models:/phi3@champion")


def test_produced_names_each_run_id_after_the_parameter_that_consumes_it():
    produced = Produced(*(RUN,) * 5, "u", "v", "w", "none", "r", "s")
    written = json.loads(produced.to_json())
    consumed = {stage.output for stage in pipeline.PIPELINE}
    assert consumed <= written.keys()
    assert not {key for key in written if key.endswith("_run_id")} - consumed
    assert Produced.from_json(produced.to_json(), "x") == produced


def _edited(record, **changes) -> str:
    data = json.loads(record.to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(("text", "message"), [
    ("", "is not valid JSON"),
    (_edited(_decision(), chosen="gpt-4"), "chosen 'gpt-4' is not one of transformers, onnx"),
    (_edited(_decision(), agreement="high"), "agreement: Input should be a valid number"),
    (_edited(_decision(), models={"onnx": {"model_uri": "u", "run_id": RUN}}),
     "models has no 'transformers' model"),
    (_edited(_decision(), verdict="ok"), "verdict: not a field of this record"),
    (json.dumps({"model_name": "phi3"}), "thresholds: Field required"),
], ids=["empty", "unknown-model", "wrong-type", "missing-model", "unknown-field",
        "foreign-file"])
def test_a_malformed_decision_is_refused_by_name(text, message):
    with pytest.raises(RecordError, match=message) as raised:
        Decision.from_json(text, "decision.json of evaluate run x")
    assert "decision.json of evaluate run x" in str(raised.value)
    assert "re-run evaluate" in str(raised.value)


def test_a_registration_is_refused_when_a_field_is_missing():
    data = json.loads(registry.registration("p", "1", "", "r", False).to_json())
    del data["serve_uri"]
    with pytest.raises(RecordError, match="serve_uri: Field required.*re-run register"):
        Registration.from_json(json.dumps(data), "registration.json of register run x")


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _decision().chosen = "transformers"

"""evaluate and register on the fixture: metrics, artifacts, the gate, aliases, idempotency."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.core.errors import StepError
from phi3flow.evaluation.decision import Decision, decide
from phi3flow.evaluation.metrics import QUALITY
from steps import evaluate, register
from tests.helpers import (
    EVAL_DATA,
    FIXTURE,
    QUESTION,
    created_run,
    evaluate_args,
    predict_in_fresh_process,
)
from tests.steps.conftest import logged_decision

METRICS = ("quality_contains", "quality_exact", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
           "output_tokens_per_s", "load_s", "peak_rss_mb", "size_mb")


@pytest.fixture
def evaluated(evaluated):
    """(run ID, Decision) of the test run's one evaluation (tests/steps/conftest.py)."""
    run, decision = evaluated
    return run.info.run_id, decision


def regated(decision: Decision, thresholds: dict[str, float],
            quality: float | None = None) -> Decision:
    """`decision` gated again with other thresholds (and, given `quality`, that quality)."""
    metrics = {name: {**values, **({QUALITY.name: quality} if quality is not None else {})}
               for name, values in decision.metrics.items()}
    return decide(metrics, {**decision.thresholds, **thresholds}, decision.models,
                  decision.agreement, decision.eval_data, decision.eval_data_sha256,
                  decision.quality_by_category, decision.eval_runs, decision.scoring,
                  decision.scoring_reason)


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_evaluate_logs_every_metric_for_both_models_in_range(evaluated):
    run_id, decision = evaluated
    metrics = mlflow.get_run(run_id).data.metrics
    for model in ("transformers", "onnx"):
        m = {k: metrics[f"{model}_{k}"] for k in METRICS}
        assert m["quality_contains"] == 1.0  # the fixture was trained on this set
        assert 0 <= m["quality_exact"] <= 1
        assert 0 < m["ttft_p50_s"] and 0 < m["latency_p50_s"] <= m["latency_p95_s"] < 60
        assert m["output_tokens_per_s"] > 0 and m["load_s"] > 0
        assert 50 < m["peak_rss_mb"] < 8000 and 0.1 < m["size_mb"] < 100
    assert metrics["agreement"] == 1.0  # fp32 ONNX and transformers give the same answers


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_evaluate_writes_table_chart_and_decision(evaluated):
    run_id, decision = evaluated
    store = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=""))
    table = json.loads((store / names.EVAL_TABLE).read_text())
    rows = table["data"]
    assert len(rows) == len(EVAL_DATA.read_text().splitlines())
    for column in ("question", "expected", "transformers_answer", "onnx_answer",
                   "transformers_latency_s", "onnx_ttft_s", "agreement", "category",
                   "onnx_trace_id"):
        assert column in table["columns"]
    png = (store / names.EVAL_CHART).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    written = Decision.read(mlflow.get_run(run_id))  # decision.json, validated as it is read
    assert written == decision
    assert written.thresholds == {"min_quality": 0.8, "max_quality_drop": 0.05,
                                  "max_p95_latency_s": 120.0}
    assert all(v.passed for v in written.verdicts.values())
    assert written.chosen in ("transformers", "onnx") and written.chosen_passed
    assert written.eval_data_sha256 == mlflow.get_run(run_id).data.tags[
        names.TAG_EVAL_DATA_SHA256]


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_metrics_are_attached_to_the_logged_models(evaluated, transformers_model_uri,
                                                   onnx_model_uri):
    for uri in (transformers_model_uri, onnx_model_uri):
        model = mlflow.get_logged_model(uri.split("/")[-1])
        assert {m.key for m in model.metrics} >= set(METRICS)
    ranked = mlflow.search_logged_models(
        experiment_ids=[mlflow.get_run(evaluated[0]).info.experiment_id],
        filter_string="metrics.quality_contains >= 1.0",
        order_by=[{"field_name": "metrics.latency_p95_s", "ascending": True}],
        output_format="list")
    assert {m.model_id for m in ranked} >= {transformers_model_uri.split("/")[-1],
                                            onnx_model_uri.split("/")[-1]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}], "expected": "x"}\n{oops\n',
         "line 2 is not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: has no expected field"),
        ('{"expected": "x"}\n', "line 1: has no messages field"),
        ('{"messages": "hi", "expected": "x"}\n', "line 1: messages must be a non-empty list"),
        ("\n\n", "holds no rows"),
    ],
)
def test_bad_eval_files_are_refused_with_the_line(log_runs, tmp_path, content, message):
    path = tmp_path / "eval.jsonl"
    path.write_text(content)
    with pytest.raises(StepError, match=message):
        evaluate.main(evaluate_args(log_runs, "--eval_data", str(path)))
    assert mlflow.get_run(created_run().info.run_id).info.status == "FAILED"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--min_quality", "1.5"], "min_quality=1.5 must be between 0 and 1"),
        (["--max_quality_drop", "-0.1"], "max_quality_drop=-0.1 must be between 0 and 1"),
        (["--max_p95_latency_s", "0"], "max_p95_latency_s=0.0 must be > 0"),
        (["--eval_data", "/no/such.jsonl"], "eval_data='/no/such.jsonl' does not exist"),
        (["--judge_model_uri", "gpt-4"], "judge_model_uri='gpt-4' is not a models:/"),
    ],
)
def test_bad_thresholds_are_refused(log_runs, extra, message):
    with pytest.raises(StepError, match=message):
        evaluate.main(evaluate_args(log_runs, *extra))


@pytest.mark.e2e  # a whole evaluation of its own
def test_an_optional_llm_judge_grades_every_answer(log_runs, transformers_model_uri, tmp_path):
    """Any MLflow chat model can judge; the tiny fixture stands in for a real judge here."""
    subset = tmp_path / "eval.jsonl"
    subset.write_text("".join(EVAL_DATA.read_text().splitlines(keepends=True)[:3]))
    evaluate.main(evaluate_args(log_runs, "--eval_data", str(subset),
                                "--judge_model_uri", transformers_model_uri))
    run_id = created_run().info.run_id
    metrics = mlflow.get_run(run_id).data.metrics
    for model in ("transformers", "onnx"):
        assert 0 <= metrics[f"{model}_judge_correct"] <= 1
    table = json.loads(mlflow.artifacts.load_text(
        f"{mlflow.get_run(run_id).info.artifact_uri}/{names.EVAL_TABLE}"))
    assert {"transformers_judge_correct", "onnx_judge_correct"} <= set(table["columns"])
    assert len(table["data"]) == 3


def test_run_ids_of_the_wrong_step_are_refused(log_runs):
    swapped = {"transformers_run_id": log_runs["onnx_run_id"],
               "onnx_run_id": log_runs["transformers_run_id"]}
    with pytest.raises(StepError, match="is a log_onnx_pyfunc run, not a log_transformers run"):
        evaluate.main(evaluate_args(swapped))


# --- register ---------------------------------------------------------------------------------


@pytest.fixture
def model_name() -> str:
    return f"phi3-test-{uuid.uuid4().hex[:8]}"


def versions(name: str) -> list:
    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def test_register_makes_a_champion_with_lineage_and_is_idempotent(decided, model_name,
                                                                   transformers_model_uri):
    run_id, decision = decided
    first = register.main(["--evaluate_run_id", run_id, "--model_name", model_name])
    assert first.alias == "champion" and first.version == "1"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(model_name, "champion")
    log_run = decision.models[decision.chosen].run_id
    fetch_run = mlflow.get_run(log_run).data.tags[names.TAG_FETCH_RUN_ID]
    assert version.tags[names.TAG_EVALUATE_RUN_ID] == run_id
    assert version.tags[names.TAG_LOG_RUN_ID] == log_run
    assert version.tags[names.TAG_FETCH_RUN_ID] == fetch_run
    assert version.tags[names.TAG_MODEL_ID] == str(FIXTURE)
    assert version.tags[names.TAG_MANIFEST_SHA256] == mlflow.get_run(fetch_run).data.tags[
        names.TAG_MANIFEST_SHA256]
    assert float(version.tags["phi3flow.metric.quality_contains"]) == 1.0
    assert names.TAG_GIT_COMMIT in version.tags and run_id in version.description

    again = register.main(["--evaluate_run_id", run_id, "--model_name", model_name])
    assert again.reused and again.version == "1" and len(versions(model_name)) == 1

    answer = predict_in_fresh_process(f"models:/{model_name}@champion", QUESTION)
    assert "Madrid" in answer["choices"][0]["message"]["content"]


def test_gate_failure_registers_a_challenger_and_says_why(decided, model_name):
    register.main(["--evaluate_run_id", decided[0], "--model_name", model_name])
    failing = logged_decision(regated(decided[1], {"max_p95_latency_s": 0.000001}))
    result = register.main(["--evaluate_run_id", failing, "--model_name", model_name])
    assert result.alias == "challenger"
    assert "failed the gate" in result.reason and "max_p95_latency_s" in result.reason
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == "1"
    # Forced through: recorded as such.
    forced = register.main(["--evaluate_run_id", failing, "--model_name", f"{model_name}-f",
                            "--allow_unvalidated", "true"])
    version = client.get_model_version_by_alias(f"{model_name}-f", "champion")
    assert forced.alias == "champion" and version.tags[names.TAG_UNVALIDATED] == "true"


def test_a_better_candidate_takes_champion(decided, model_name):
    # A weak first champion: no answer right, passed by a gate that asks for none.
    weak = logged_decision(regated(decided[1], {"min_quality": 0.0}, quality=0.0))
    weak_registered = register.main(["--evaluate_run_id", weak, "--model_name", model_name])
    assert weak_registered.alias == "champion"
    strong = register.main(["--evaluate_run_id", decided[0], "--model_name", model_name])
    assert strong.alias == "champion" and strong.version == "2"
    assert "beats the current champion: quality 1.000 vs 0.0" in strong.reason
    # The weak one does not win it back.
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == "2"


def test_register_refuses_a_store_without_a_registry(decided, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"file://{tmp_path / 'no-registry'}")
    with pytest.raises(StepError, match="has no usable model registry"):
        register.main(["--evaluate_run_id", decided[0]])


def test_register_refuses_a_run_that_is_not_an_evaluation(log_runs):
    with pytest.raises(StepError, match="is a log_transformers run, not a evaluate run"):
        register.main(["--evaluate_run_id", log_runs["transformers_run_id"]])


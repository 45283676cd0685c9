"""What the evaluate and register tests share: the two log runs of the session's fixture models,
one evaluation of them (the one real evaluate run that several e2e tests read), and, for the
fast loop, a decision built from records (register's tests need a decision, not an evaluation)."""

from __future__ import annotations

import mlflow
import pytest

from tests.helpers import created_run, evaluate_args, run_of


@pytest.fixture(scope="session")
def log_runs(transformers_model_uri, onnx_model_uri):
    return {"transformers_run_id": run_of(transformers_model_uri),
            "onnx_run_id": run_of(onnx_model_uri)}


@pytest.fixture(scope="session")
def evaluated(log_runs):
    """(the evaluate run, its Decision): evaluate on the smoke set, once per test run."""
    from steps import evaluate

    decision = evaluate.main(evaluate_args(log_runs))
    return created_run(), decision


def logged_decision(decision) -> str:
    """An evaluate run holding `decision`, as evaluate logs it: register's rules tested on
    records (made by the real gate), not on evaluations re-run to get them."""
    from phi3flow.core import names

    with mlflow.start_run() as run:
        mlflow.set_tag(names.TAG_STEP, names.EVALUATE)
        decision.log()
    return run.info.run_id


@pytest.fixture(scope="session")
def decided(log_runs, transformers_model_uri, onnx_model_uri):
    """(an evaluate run ID, its Decision): the real gate, with evaluate's default thresholds,
    over metrics records of the session's two logged models (every answer right, ONNX the
    faster), logged as evaluate logs its decision. The e2e tests check that a real evaluation
    measures such metrics (test_evaluate_logs_every_metric_for_both_models_in_range)."""
    from phi3flow.evaluation import metrics
    from phi3flow.evaluation.config import EvaluateOptions
    from phi3flow.evaluation.decision import ModelRef, decide
    from phi3flow.evaluation.records import ModelMetrics

    def measured(p95: float) -> dict[str, float]:
        return ModelMetrics(
            quality={m.name: 1.0 for m in (metrics.QUALITY, metrics.EXACT)}, failed_rows=0,
            scorer_errors=0, latency_p50_s=p95 / 2, latency_p95_s=p95, ttft_p50_s=p95 / 10,
            prompt_tokens_p50=20.0, output_tokens_per_s=50.0, load_s=1.0, peak_rss_mb=500.0,
            size_mb=5.0).logged()

    models = {"transformers": ModelRef(transformers_model_uri, log_runs["transformers_run_id"]),
              "onnx": ModelRef(onnx_model_uri, log_runs["onnx_run_id"])}
    decision = decide({"transformers": measured(0.4), "onnx": measured(0.2)},
                      EvaluateOptions().thresholds(), models, agreement=1.0,
                      eval_data="data/eval.jsonl", eval_data_sha256="0" * 64)
    return logged_decision(decision), decision

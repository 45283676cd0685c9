"""What the evaluate and register tests share: the two log runs of the session's fixture models,
and one evaluation of them (the one real evaluate run that several test files read)."""

from __future__ import annotations

import mlflow
import pytest


def run_of(model_uri: str) -> str:
    return mlflow.get_logged_model(model_uri.split("/")[-1]).source_run_id


@pytest.fixture(scope="session")
def log_runs(transformers_model_uri, onnx_model_uri):
    return {"transformers_run_id": run_of(transformers_model_uri),
            "onnx_run_id": run_of(onnx_model_uri)}


def evaluate_args(log_runs, *extra) -> list[str]:
    return ["--transformers_run_id", log_runs["transformers_run_id"],
            "--onnx_run_id", log_runs["onnx_run_id"], "--max_new_tokens", "32", *extra]


@pytest.fixture(scope="session")
def evaluated(log_runs):
    """(the evaluate run, its Decision): evaluate on the smoke set, once per test run."""
    from steps import evaluate
    from tests.conftest import created_run

    decision = evaluate.main(evaluate_args(log_runs))
    return created_run(), decision

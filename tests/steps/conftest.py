"""What the evaluate and register tests share: the two log runs of the session's fixture models,
and one evaluation of them (the one real evaluate run that several test files read)."""

from __future__ import annotations

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

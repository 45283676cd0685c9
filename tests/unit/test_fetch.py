"""Which fetched files a fetch_model run logs (`log_weights`), and the upload timeout it sets."""

from __future__ import annotations

import pytest

from phi3flow import fetch, tracking
from phi3flow.config import ConfigError, FetchModelConfig
from tests.helpers import FIXTURE

WORKSPACE_URI = ("azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/0/resourceGroups/g/"
                 "providers/Microsoft.MachineLearningServices/workspaces/w")


@pytest.mark.parametrize(("log_weights", "tracking_uri", "hub", "local"), [
    ("auto", "sqlite:///mlflow.db", True, True),
    ("auto", WORKSPACE_URI, False, True),  # hub files re-resolve from the pinned commit
    ("true", WORKSPACE_URI, True, True),
    ("false", "sqlite:///mlflow.db", False, False),
])
def test_log_weights(monkeypatch, log_weights, tracking_uri, hub, local):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    cfg = FetchModelConfig(model_id=str(FIXTURE), onnx_source="build", log_weights=log_weights)
    assert (fetch.logs_weights(cfg, "hub"), fetch.logs_weights(cfg, "local")) == (hub, local)


def test_log_weights_takes_booleans_and_refuses_other_words():
    assert FetchModelConfig(model_id=str(FIXTURE), onnx_source="build",
                            log_weights=False).log_weights == "false"
    with pytest.raises(ConfigError, match="log_weights='maybe' is not one of auto, true, false"):
        FetchModelConfig(model_id=str(FIXTURE), onnx_source="build", log_weights="maybe")


@pytest.mark.parametrize(("size", "seconds"), [(0, 300), (2_700_000_000, 300),
                                               (7_640_000_000, 764), (20_000_000_000, 2000)])
def test_upload_timeout_grows_with_the_upload(size, seconds):
    assert tracking.upload_timeout_s(size) == seconds

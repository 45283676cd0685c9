"""Which fetched files a fetch_model run logs (`log_weights`), and the upload timeout it sets."""

from __future__ import annotations

import pytest

from phi3flow.core import azureml_store
from phi3flow.core.config import ConfigError
from phi3flow.fetching import fetch
from phi3flow.fetching.config import FetchModelConfig
from tests.helpers import FIXTURE

# A run's artifact URI in a workspace, in the form current workspaces answer, and the older one.
WORKSPACE_RUN = ("azureml://eastus.api.azureml.ms/mlflow/v2.0/subscriptions/0/resourceGroups/g/"
                 "providers/Microsoft.MachineLearningServices/workspaces/w/experiments/1/runs/r/"
                 "artifacts")
OLD_WORKSPACE_RUN = "azureml://experiments/phi3/runs/r/artifacts"
LOCAL_RUN = "/home/me/mlruns/0/r/artifacts"


@pytest.mark.parametrize(("log_weights", "artifact_uri", "hub", "local"), [
    ("auto", LOCAL_RUN, True, True),
    ("auto", "mlflow-artifacts:/0/r/artifacts", True, True),
    ("auto", WORKSPACE_RUN, False, True),  # hub files re-resolve from the pinned commit
    ("auto", OLD_WORKSPACE_RUN, False, True),
    ("true", WORKSPACE_RUN, True, True),
    ("false", LOCAL_RUN, False, False),
])
def test_log_weights(log_weights, artifact_uri, hub, local):
    cfg = FetchModelConfig(model_id=str(FIXTURE), onnx_source="build", log_weights=log_weights)
    assert (fetch.logs_weights(cfg, "hub", artifact_uri),
            fetch.logs_weights(cfg, "local", artifact_uri)) == (hub, local)


def test_log_weights_takes_booleans_and_refuses_other_words():
    assert FetchModelConfig(model_id=str(FIXTURE), onnx_source="build",
                            log_weights=False).log_weights == "false"
    with pytest.raises(ConfigError, match="log_weights='maybe' is not one of auto, true, false"):
        FetchModelConfig(model_id=str(FIXTURE), onnx_source="build", log_weights="maybe")


@pytest.mark.parametrize(("size", "seconds"), [(0, 300), (2_700_000_000, 300),
                                               (7_640_000_000, 764), (20_000_000_000, 2000)])
def test_upload_timeout_grows_with_the_upload(size, seconds):
    assert azureml_store.upload_timeout_s(size) == seconds

"""What Azure ML's MLflow client (azureml-mlflow) needs from a step, beside the store adapter.

`phi3flow/core/store.py` asks this module; no other module of the project knows that a workspace
exists. Everything here does nothing outside an Azure ML job or workspace: each function checks
the thing it depends on (a job's run token in the environment, an `azureml://` artifact URI, the
scheme by which MLflow itself picks azureml-mlflow's artifact repository).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from urllib.parse import urlparse

import mlflow

logger = logging.getLogger(__name__)

# Set by Azure ML inside a job: the job's own run, the one its run token was issued for.
AZUREML_RUN_ID = "AZUREML_RUN_ID"


def job_run_for_tokens() -> str | None:
    """Inside an Azure ML job, refresh this process's token under the job's run; returns the
    step's own run ID (from MLFLOW_RUN_ID) to start, or None elsewhere.

    azureml-mlflow refreshes a job's token for the run in MLFLOW_RUN_ID when it builds its
    stores, and `mlflow run` puts the step's nested run there. Whether Azure ML refreshes a
    token for a run nested under the job is not documented; for the job's own run it does. So
    MLFLOW_RUN_ID names the job's run for this process and its children, and the step's run is
    started by ID.
    """
    own, job = os.environ.get("MLFLOW_RUN_ID"), os.environ.get(AZUREML_RUN_ID)
    if not (own and job and own != job and os.environ.get("MLFLOW_TRACKING_TOKEN")):
        return None
    os.environ["MLFLOW_RUN_ID"] = job
    return own


def refresh_token() -> None:
    """Put the tracking store's current token in os.environ, for the processes we start.

    Only matters inside an Azure ML job, where MLFLOW_TRACKING_TOKEN is a run token that
    expires. azureml-mlflow refreshes it within each process, but a child starts from its
    environment's copy, stale once the job has outlived it. Steps that main starts with
    `pipeline.launch` inherit os.environ, so that is where the fresh token goes.
    """
    if not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return
    from mlflow.tracking._tracking_service.utils import _get_store

    creds = getattr(_get_store(), "get_host_creds", None)
    if callable(creds) and (token := creds().token):
        os.environ["MLFLOW_TRACKING_TOKEN"] = token


def child_environment() -> dict[str, str]:
    """The environment for a worker process that uses this step's run without starting one.

    A fresh token (refresh_token), and a run ID in MLFLOW_RUN_ID, by which azureml-mlflow
    recognises a job's process (MLflow removes it once a run has started): the job's run, under
    which tokens are refreshed (see `job_run_for_tokens`).
    """
    refresh_token()
    env = dict(os.environ)
    if os.environ.get("MLFLOW_TRACKING_TOKEN") and not env.get("MLFLOW_RUN_ID") and (
            run := mlflow.active_run()):
        env["MLFLOW_RUN_ID"] = os.environ.get(AZUREML_RUN_ID) or run.info.run_id
    return env


def is_workspace_artifact_uri(artifact_uri: str) -> bool:
    """Whether a run's artifacts are written by azureml-mlflow into a workspace's blob storage:
    MLflow picks azureml-mlflow's artifact repository for this scheme, so this is the same test
    MLflow makes."""
    return urlparse(artifact_uri).scheme == "azureml"


# azureml-mlflow uploads `log_artifacts` in batches of 50 files, each of which must finish within
# AZUREML_ARTIFACTS_DEFAULT_TIMEOUT seconds (300 by default, read at every upload), or it raises
# "Failed to flush task queue". A 7.6 GB checkpoint is one batch (docs/decisions.md).
ARTIFACTS_TIMEOUT = "AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"
DEFAULT_ARTIFACTS_TIMEOUT_S = 300
# Assumed: a slow link from a compute node to its workspace's storage. Sized low on purpose: a
# timeout that is too long costs nothing while the upload progresses.
ASSUMED_UPLOAD_BYTES_PER_S = 10e6


def upload_timeout_s(size_bytes: int) -> int:
    """Azure ML's artifact upload timeout for an upload of this size."""
    return max(DEFAULT_ARTIFACTS_TIMEOUT_S, math.ceil(size_bytes / ASSUMED_UPLOAD_BYTES_PER_S))


@contextlib.contextmanager
def upload_timeout(artifact_uri: str, size_bytes: int) -> Iterator[None]:
    """azureml-mlflow's upload timeout sized for an upload, while it runs; nothing where the
    artifacts go elsewhere or the user set AZUREML_ARTIFACTS_DEFAULT_TIMEOUT (e.g. through
    backend-config `extra_env`)."""
    if not is_workspace_artifact_uri(artifact_uri) or ARTIFACTS_TIMEOUT in os.environ:
        yield
        return
    seconds = upload_timeout_s(size_bytes)
    logger.info(
        "%s=%d for this upload (%.0f MB at an assumed %.0f MB/s; set it in backend-config "
        "extra_env to choose your own)", ARTIFACTS_TIMEOUT, seconds, size_bytes / 1e6,
        ASSUMED_UPLOAD_BYTES_PER_S / 1e6)
    os.environ[ARTIFACTS_TIMEOUT] = str(seconds)
    try:
        yield
    finally:
        del os.environ[ARTIFACTS_TIMEOUT]

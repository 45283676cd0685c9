"""A step's run lifecycle: one run per step, ended FAILED on any error, and its upstream runs.

Beside it: `phi3flow.stale` (runs whose process was killed) and `phi3flow.model_uris` (where a
log step's model is). Nothing here sets the tracking URI or the experiment:
`MLFLOW_TRACKING_URI` and `mlflow run --experiment-name` decide them (MLflow's default is
`sqlite:///mlflow.db`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from phi3flow import config as config_mod
from phi3flow import names, redact, stale
from phi3flow.errors import StepError

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    redact.install_log_filter()


@contextlib.contextmanager
def step_run(step: str) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under `mlflow run`, join) the step's run; end it FAILED if anything escapes.

    SIGTERM is turned into an exception so a terminated step also ends its run FAILED instead of
    leaving it RUNNING. SIGKILL cannot be caught: the run is tagged with this host and process, so
    the next `main` can mark it FAILED once that process is gone (mark_stale_runs).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    run = mlflow.start_run(run_id=_token_run_is_the_jobs())
    try:
        mlflow.set_tags({names.TAG_STEP: step, **stale.this_process()})
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            mlflow.set_tag(names.TAG_ERROR, redact.error_text(exc))
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# Set by Azure ML inside a job: the job's own run, the one its run token was issued for.
AZUREML_RUN_ID = "AZUREML_RUN_ID"


def _token_run_is_the_jobs() -> str | None:
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
    which tokens are refreshed (see `_token_run_is_the_jobs`).
    """
    refresh_token()
    env = dict(os.environ)
    if os.environ.get("MLFLOW_TRACKING_TOKEN") and not env.get("MLFLOW_RUN_ID") and (
            run := mlflow.active_run()):
        env["MLFLOW_RUN_ID"] = os.environ.get(AZUREML_RUN_ID) or run.info.run_id
    return env


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # Once: a second SIGTERM (main's cancel follows the one sent to the whole process tree)
    # would interrupt the cleanup that ends this step's runs FAILED. SIGKILL still works.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def log_config(config: Any) -> None:
    """The resolved config as a JSON artifact, and as params where `mlflow run` has not logged them.

    `mlflow run` logs the parameters as given (an empty value as "''") and MLflow refuses to
    change a logged param, so resolved values (an empty revision -> the pinned commit) live in the
    artifact and in tags; in-process runs get every param here.
    """
    params = config_mod.parameters(config)
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    mlflow.log_text(json.dumps(params, indent=2, sort_keys=True) + "\n", names.RESOLVED_CONFIG)


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


def log_artifacts(folder: Path, artifact_path: str) -> None:
    """`mlflow.log_artifacts`, with Azure ML's upload timeout sized for the folder (unless the
    user set AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, e.g. through backend-config `extra_env`)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    logger.info("uploading %s/: %d files, %.1f MB", artifact_path, len(files), size / 1e6)
    if urlparse(mlflow.get_tracking_uri()).scheme != "azureml" or ARTIFACTS_TIMEOUT in os.environ:
        mlflow.log_artifacts(str(folder), artifact_path)
        return
    seconds = upload_timeout_s(size)
    logger.info("%s=%d for this upload (%.0f MB at an assumed %.0f MB/s; set it in backend-config "
                "extra_env to choose your own)", ARTIFACTS_TIMEOUT, seconds, size / 1e6,
                ASSUMED_UPLOAD_BYTES_PER_S / 1e6)
    os.environ[ARTIFACTS_TIMEOUT] = str(seconds)
    try:
        mlflow.log_artifacts(str(folder), artifact_path)
    finally:
        del os.environ[ARTIFACTS_TIMEOUT]


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db as sqlite:////its/absolute/path.db; other URIs as they are (for
    commands printed to run from any folder)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def upstream_run(param: str, run_id: str, step: str) -> Run:
    """The finished run of `step` that `param` names, or a StepError saying what is wrong."""
    config_mod.require_run_id(param, run_id, step)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise StepError(
            f"{param}={run_id}: no such run in the tracking store {mlflow.get_tracking_uri()}. "
            "Check MLFLOW_TRACKING_URI points at the store where the run was made."
        ) from None
    actual = run.data.tags.get(names.TAG_STEP)
    if actual != step:
        raise StepError(
            f"{param}={run_id} is a {actual or 'non-phi3flow'} run, not a {step} run: pass the "
            f"run ID of a {step} run."
        )
    if run.info.status != "FINISHED":
        raise StepError(
            f"{param}={run_id} is a {step} run with status {run.info.status}, not FINISHED: its "
            f"outputs are not trusted. Re-run {step} and pass the new run ID."
        )
    return run


def run_cli(step: str, main: Callable[[list[str] | None], Any]) -> None:
    """Entry for `python -m steps.<step>`: a StepError is one clear line and exit code 2; any
    other error its traceback, through the (redacting) log, and exit code 1."""
    setup_logging()
    try:
        main(None)
    except StepError as exc:
        logger.error("%s failed: %s", step, redact.redact(str(exc)))
        sys.exit(2)
    except Exception:  # noqa: BLE001 - the traceback through the log, so it is redacted too
        logger.exception("%s failed", step)
        sys.exit(1)

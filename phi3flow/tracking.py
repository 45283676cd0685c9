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
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from phi3flow import config as config_mod
from phi3flow import names, stale
from phi3flow.errors import StepError

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    run = mlflow.start_run()
    try:
        mlflow.set_tags({names.TAG_STEP: step, **stale.this_process()})
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            mlflow.set_tag(names.TAG_ERROR, f"{type(exc).__name__}: {exc}"[:4000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def refresh_token() -> None:
    """Put the tracking store's current token in os.environ, for the processes we start.

    Only matters inside an Azure ML job, where MLFLOW_TRACKING_TOKEN is a run token that
    expires. azureml-mlflow refreshes it within each process, but a child starts from its
    environment's copy, stale once the job has outlived it. Steps that main starts with
    `mlflow.projects.run` inherit os.environ, so that is where the fresh token goes.
    """
    if not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return
    from mlflow.tracking._tracking_service.utils import _get_store

    creds = getattr(_get_store(), "get_host_creds", None)
    if callable(creds) and (token := creds().token):
        os.environ["MLFLOW_TRACKING_TOKEN"] = token


def child_environment() -> dict[str, str]:
    """The environment for a worker process that uses this step's run without starting one.

    A fresh token (refresh_token), and the active run's ID: azureml-mlflow recognises a job's
    process by MLFLOW_RUN_ID, which MLflow removes once a run has started.
    """
    refresh_token()
    env = dict(os.environ)
    if os.environ.get("MLFLOW_TRACKING_TOKEN") and not env.get("MLFLOW_RUN_ID") and (
            run := mlflow.active_run()):
        env["MLFLOW_RUN_ID"] = run.info.run_id
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
    """Entry for `python -m steps.<step>`: a StepError is one clear line and exit code 2."""
    setup_logging()
    try:
        main(None)
    except StepError as exc:
        logger.error("%s failed: %s", step, exc)
        sys.exit(2)

"""A step's run lifecycle: one run per step, ended FAILED on any error, and its upstream runs.

Beside it: `phi3flow.core.stale` (runs whose process was killed), `phi3flow.core.model_uris` (where a
log step's model is) and `phi3flow.core.store` (what the tracking store can do). Nothing here sets
the tracking URI or the experiment: `MLFLOW_TRACKING_URI` and `mlflow run --experiment-name`
decide them (MLflow's default is `sqlite:///mlflow.db`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from phi3flow.core import config as config_mod
from phi3flow.core import names, redact, stale, store
from phi3flow.core.errors import StepError

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
    run = mlflow.start_run(run_id=store.job_run_for_tokens())
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

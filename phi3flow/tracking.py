"""How every step talks to MLflow: one run per step, ended FAILED on any error.

Nothing here sets the tracking URI or the experiment: `MLFLOW_TRACKING_URI` and
`mlflow run --experiment-name` decide them (MLflow's default is `sqlite:///mlflow.db`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from phi3flow import config as config_mod
from phi3flow import names
from phi3flow.errors import StepError

logger = logging.getLogger(__name__)

TAG_STEP = names.TAG_PREFIX + "step"
TAG_ERROR = names.TAG_PREFIX + "error"


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
        mlflow.set_tags({TAG_STEP: step, **_this_process()})
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            mlflow.set_tag(TAG_ERROR, f"{type(exc).__name__}: {exc}"[:4000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _this_process() -> dict[str, str]:
    return {names.TAG_HOST: socket.gethostname(), names.TAG_PID: str(os.getpid()),
            names.TAG_PROCESS_START: _process_start(os.getpid()) or "unknown"}


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, Linux /proc), or None if it is gone.

    A pid alone can be reused by a later process; the pair (pid, start time) cannot.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie (killed, not yet reaped: no init in containers)
        return None
    return fields[19]  # field 22, starttime


def mark_stale_runs(experiment_id: str) -> list[str]:
    """End FAILED the RUNNING step runs of this host whose process no longer exists.

    A step killed with SIGKILL (or by the OOM killer, or a crash) cannot end its own run; without
    this it would show RUNNING forever. Runs of other hosts, of live processes and runs without
    our process tags are left alone. Returns the run IDs it marked.
    """
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{names.TAG_HOST}` = '{host}'",
        max_results=1000,
    )
    marked = []
    for run in runs:
        tags = run.data.tags
        pid, started = tags.get(names.TAG_PID, ""), tags.get(names.TAG_PROCESS_START)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        now = _process_start(int(pid))
        if now is not None and (now == started or "unknown" in (now, started)):
            continue  # still running (or cannot tell): leave it
        reason = (f"process {pid} on {host} that ran this step ended without ending the run "
                  "(killed with SIGKILL, out of memory or a crash); marked FAILED by a later main")
        client.set_tag(run.info.run_id, names.TAG_STALE, reason)
        client.set_tag(run.info.run_id, TAG_ERROR, reason)
        client.set_terminated(run.info.run_id, "FAILED")
        logger.warning("run %s (%s): %s", run.info.run_id, tags.get(TAG_STEP), reason)
        marked.append(run.info.run_id)
    return marked


def child_environment() -> dict[str, str]:
    """The environment for a process this one starts, able to reach the tracking store.

    Only matters inside an Azure ML job, where MLFLOW_TRACKING_TOKEN is a run token that
    expires. azureml-mlflow refreshes it within each process, but a child starts from its
    environment's copy, stale once the job has outlived it: children get the store's current
    token (also put in os.environ, for children that MLflow starts from it). And azureml-mlflow
    recognises a job's process by MLFLOW_RUN_ID, which MLflow removes once a run has started: a
    child that does not start a run of its own gets the active run's.
    """
    env = dict(os.environ)
    if not env.get("MLFLOW_TRACKING_TOKEN"):
        return env
    from mlflow.tracking._tracking_service.utils import _get_store

    creds = getattr(_get_store(), "get_host_creds", None)
    if callable(creds) and (token := creds().token):
        os.environ["MLFLOW_TRACKING_TOKEN"] = env["MLFLOW_TRACKING_TOKEN"] = token
    if not env.get("MLFLOW_RUN_ID") and (run := mlflow.active_run()):
        env["MLFLOW_RUN_ID"] = run.info.run_id
    return env


def _raise_on_sigterm(signum: int, frame: Any) -> None:
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
    actual = run.data.tags.get(TAG_STEP)
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


TAG_MODEL_URI = names.TAG_PREFIX + "model_uri"


def log_model_or_fallback(log: Callable[[], Any], save: Callable[[str], None], name: str) -> str:
    """Log a model; where the server lacks MLflow 3's logged-model API, log it as run artifacts.

    Azure ML's MLflow endpoint answers 404 on /api/2.0/mlflow/logged-models with MLflow 3
    (docs/decisions.md); the workaround is save_model + log_artifacts, after which the model is
    `runs:/<run>/<name>` and registers from there. Returns the model URI, also tagged on the run.
    """
    try:
        uri = log().model_uri
    except MlflowException as exc:
        if "logged-models" not in str(exc) and getattr(exc, "error_code", "") not in (
                "ENDPOINT_NOT_FOUND", "NOT_FOUND"):
            raise
        logger.warning("the tracking server has no logged-model API (%s): saving the model and "
                       "logging it as run artifacts instead", str(exc)[:200])
        with tempfile.TemporaryDirectory(prefix="phi3flow-model-") as tmp:
            save(f"{tmp}/{name}")
            mlflow.log_artifacts(f"{tmp}/{name}", name)
        uri = f"runs:/{mlflow.active_run().info.run_id}/{name}"
    mlflow.set_tag(TAG_MODEL_URI, uri)
    return uri


def logged_model_uri(run_id: str) -> str:
    """The URI of the model a log step's run produced (models:/m-... or runs:/.../name)."""
    run = mlflow.get_run(run_id)
    if uri := run.data.tags.get(TAG_MODEL_URI):
        return uri
    models = run.outputs.model_outputs if run.outputs else []
    if not models:
        raise StepError(f"run {run_id} logged no model; re-run it.")
    return f"models:/{models[-1].model_id}"


def model_location(model_uri: str) -> str:
    """Where a model's files live, for reading them (MLmodel, requirements, artifacts)."""
    if model_uri.startswith("models:/m-"):
        return mlflow.get_logged_model(model_uri.split("/")[-1]).artifact_location
    return model_uri


def run_cli(step: str, main: Callable[[list[str] | None], Any]) -> None:
    """Entry for `python -m steps.<step>`: a StepError is one clear line and exit code 2."""
    setup_logging()
    try:
        main(None)
    except StepError as exc:
        logger.error("%s failed: %s", step, exc)
        sys.exit(2)

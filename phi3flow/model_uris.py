"""Where a log step's model is: logged with MLflow 3's logged-model API, or as run artifacts.

The log steps log through `log_model_or_fallback`; later steps find the model of a log run with
`logged_model_uri` and its files with `model_location`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from phi3flow import names, tracking
from phi3flow.errors import StepError

logger = logging.getLogger(__name__)


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
            tracking.log_artifacts(Path(tmp) / name, name)
        uri = f"runs:/{mlflow.active_run().info.run_id}/{name}"
    mlflow.set_tag(names.TAG_MODEL_URI, uri)
    return uri


def logged_model_uri(run_id: str) -> str:
    """The URI of the model a log step's run produced (models:/m-... or runs:/.../name)."""
    run = mlflow.get_run(run_id)
    if uri := run.data.tags.get(names.TAG_MODEL_URI):
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


def logged_model_id(model_uri: str) -> str | None:
    """The logged model's ID (m-...) of a models:/m-... URI; None for a runs:/ fallback model."""
    return model_uri.split("/")[-1] if model_uri.startswith("models:/m-") else None

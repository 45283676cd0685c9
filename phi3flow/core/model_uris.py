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

from phi3flow.core import names, store
from phi3flow.core.errors import StepError

logger = logging.getLogger(__name__)


def log_model_or_fallback(log: Callable[[], Any], save: Callable[[str], None], name: str) -> str:
    """Log a model; where the store lacks MLflow 3's logged-model API, log it as run artifacts.

    An Azure ML workspace answers 404 on /api/2.0/mlflow/logged-models with MLflow 3
    (docs/decisions.md); `store.logged_models` probes for it. Without it the model is saved and
    logged with log_artifacts, and is `runs:/<run>/<name>`, which registers from there. Returns
    the model URI, also tagged on the run.
    """
    found = store.current().logged_models(mlflow.active_run().info.experiment_id)
    if found:
        uri = log().model_uri
    else:
        logger.warning("the tracking store has no logged-model API (%s): saving the model and "
                       "logging it as run artifacts instead", found.how)
        with tempfile.TemporaryDirectory(prefix="phi3flow-model-") as tmp:
            save(f"{tmp}/{name}")
            store.current().log_artifacts(Path(tmp) / name, name)
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
    """Where a model's files live, for reading them (MLmodel, requirements, artifacts).

    A runs:/ model is read at its run's artifact URI: MLflow resolves a runs:/ URI by first
    searching the logged-model API for a model of that name, which the stores that made us log
    it as run artifacts do not have (one refused call per read).
    """
    if model_uri.startswith("models:/m-"):
        return mlflow.get_logged_model(model_uri.split("/")[-1]).artifact_location
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/"):].partition("/")
        return f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    return model_uri


def logged_model_id(model_uri: str) -> str | None:
    """The logged model's ID (m-...) of a models:/m-... URI; None for a runs:/ fallback model."""
    return model_uri.split("/")[-1] if model_uri.startswith("models:/m-") else None

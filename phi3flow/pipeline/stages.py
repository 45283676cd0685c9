"""main's pipeline, declared once: which steps, with which options, fed by which upstream runs.

`PIPELINE` lists the stages in order. Each stage's config class says what it consumes (its
`_run_id_of` fields name the producing step), `output` names the run ID it hands on (after the
parameter that consumes it: a fetch_model run is `fetch_run_id`), and the stage says which local
files its result depends on and whether a finished run may be reused (phi3flow/pipeline/reuse.py decides).

Each step runs as `mlflow run --env-manager local` would run it (`launch`), on this same project
directory, in this same environment (main already runs inside the project's environment), as a
child of the main run. Steps hand each other run IDs only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.projects.submitted_run import SubmittedRun

from phi3flow.core import config, names, store, tracking
from phi3flow.core.errors import StepError
from phi3flow.core.record import Record, record
from phi3flow.evaluation.config import EvaluateConfig
from phi3flow.fetching.config import FetchModelConfig
from phi3flow.models.config import LogOnnxPyfuncConfig, LogTransformersConfig
from phi3flow.pipeline import reuse
from phi3flow.pipeline.config import MainConfig
from phi3flow.registry.config import RegisterConfig
from phi3flow.serving import front_door

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    entry_point: str  # the MLproject entry point, also main's part holding its options
    config: type  # the step's config: its options plus its inputs (run IDs)
    output: str  # the name of the run ID it hands on
    local_inputs: Callable[[Any], list[Path]] = lambda options: []
    reusable: Callable[[Any], bool] = lambda options: True  # False: inputs may have moved

    @property
    def upstream(self) -> dict[str, str]:
        """{parameter: entry point whose run ID it takes}, from the config's input fields."""
        return {f.name: f.metadata["upstream"] for f in dataclasses.fields(self.config)
                if "upstream" in f.metadata}

    def parameters(self, main: MainConfig, run_ids: dict[str, str]) -> dict[str, str]:
        """This step's parameters: main's options for it and the run IDs of its upstream."""
        options = getattr(main, self.entry_point)
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        inputs = {param: run_ids[producer] for param, producer in self.upstream.items()}
        return config.parameters(self.config(**values, **inputs))


PIPELINE = (
    Stage(names.FETCH_MODEL, FetchModelConfig, "fetch_run_id",
          local_inputs=lambda options: options.local_inputs,
          reusable=lambda options: options.pinned),
    Stage(names.LOG_TRANSFORMERS, LogTransformersConfig, "transformers_run_id"),
    Stage(names.LOG_ONNX_PYFUNC, LogOnnxPyfuncConfig, "onnx_run_id"),
    Stage(names.EVALUATE, EvaluateConfig, "evaluate_run_id",
          local_inputs=lambda options: options.eval_data_files,
          reusable=lambda options: not options.eval_data_is_dataset),
    Stage(names.REGISTER, RegisterConfig, "register_run_id"),
)

@record
class Produced(Record):
    """What main made: `produced.json`, and tags `phi3flow.<field>` on the main run."""

    ARTIFACT = names.PRODUCED
    PRODUCER = names.MAIN

    fetch_run_id: str
    transformers_run_id: str
    onnx_run_id: str
    evaluate_run_id: str
    register_run_id: str
    transformers_model_uri: str
    onnx_model_uri: str
    registered_model_uri: str
    registered_alias: str  # "none" when the version holds no alias
    alias_reason: str
    serve_uri: str


@dataclass
class StepRunner:
    experiment_id: str
    force: bool
    project_root: Path = names.PROJECT_ROOT
    git_commit: str | None = None  # of the main run, when `mlflow run` recorded one
    code_sha256: str = field(default_factory=reuse.code_sha256)
    reused: list[str] = field(default_factory=list)

    def run(self, stage: Stage, params: dict[str, str], local_inputs: list[Path],
            reusable: bool) -> str:
        """The run ID of a FINISHED run of `stage` for these params: reused or new."""
        key = reuse.cache_key(stage.entry_point, params, self.code_sha256, local_inputs,
                              self.git_commit)
        previous = reuse.reusable_run(self.experiment_id, stage.entry_point, key,
                                      force=self.force, reusable=reusable)
        if previous is not None:
            self.reused.append(stage.entry_point)
            return previous.info.run_id
        logger.info("%s: starting a child run", stage.entry_point)
        store.refresh_token()  # the step inherits os.environ
        submitted = launch(self.project_root, stage.entry_point, params, self.experiment_id)
        run_id = submitted.run_id
        try:
            succeeded = submitted.wait()
        except BaseException:  # main interrupted (Ctrl-C, SIGTERM): stop the child step too
            submitted.cancel()
            _end_failed_if_running(run_id)
            raise
        if not succeeded:
            _end_failed_if_running(run_id)  # a step killed before it could end its own run
            raise StepError(f"step {stage.entry_point} failed (run {run_id}); its log is above. "
                            "Fix the cause and re-run main: finished steps are reused.")
        client = mlflow.MlflowClient()
        client.set_tag(run_id, names.TAG_CACHE_KEY, key)
        client.set_tag(run_id, names.TAG_CODE_SHA256, self.code_sha256)
        return run_id


def launch(project_root: Path, entry_point: str, params: dict[str, str],
           experiment_id: str) -> SubmittedRun:
    """Start one step as `mlflow run --env-manager local` starts it, with MLflow's own project
    functions (the run, its tags and params, the entry point's command), as a child of main's run.

    Not through `mlflow.projects.run(synchronous=False)`: that runs each step under an extra
    `mlflow run` process, whose store client may refresh a job's run token for the step's
    nested run, which the store may refuse; the steps themselves refresh under the job's run
    (`store.job_run_for_tokens`, in tracking.step_run). The step is the leader of its own process
    group, so `cancel()` stops it and everything it started.
    """
    from mlflow.projects import _project_spec
    from mlflow.projects.submitted_run import LocalSubmittedRun
    from mlflow.projects.utils import (
        fetch_and_validate_project,
        get_entry_point_command,
        get_or_create_run,
        get_run_env_vars,
    )
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_BACKEND, MLFLOW_PROJECT_ENV

    work_dir = fetch_and_validate_project(str(project_root), None, entry_point, params)
    project = _project_spec.load_project(work_dir)
    run = get_or_create_run(None, str(project_root), experiment_id, work_dir, None, entry_point,
                            params)
    run_id = run.info.run_id
    client = mlflow.MlflowClient()
    client.set_tag(run_id, MLFLOW_PROJECT_ENV, "local")
    client.set_tag(run_id, MLFLOW_PROJECT_BACKEND, "local")
    (command,) = get_entry_point_command(project, entry_point, params, None)
    logger.info("%s: running %r in run %s", entry_point, command, run_id)
    process = subprocess.Popen(["bash", "-c", command], cwd=work_dir, start_new_session=True,
                               env={**os.environ, **get_run_env_vars(run_id, experiment_id)})
    return LocalSubmittedRun(run_id, process)


def run_pipeline(cfg: MainConfig, steps: StepRunner) -> dict[str, str]:
    """Walk PIPELINE: each stage's run ID, by the name of its output."""
    run_ids: dict[str, str] = {}  # by entry point
    for stage in PIPELINE:
        options = getattr(cfg, stage.entry_point)
        run_ids[stage.entry_point] = steps.run(
            stage, stage.parameters(cfg, run_ids), stage.local_inputs(options),
            stage.reusable(options))
    return {stage.output: run_ids[stage.entry_point] for stage in PIPELINE}


def _end_failed_if_running(run_id: str) -> None:
    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


# The printed commands run side by side, from any folder: the UI on MLflow's default port, the
# front door (OpenAI-compatible) beside it, both naming the tracking store (a relative sqlite
# path made absolute) and the front door this project's code.
UI_PORT, SERVE_PORT = 5000, front_door.DEFAULT_PORT


def summary(run_id: str, experiment_id: str, produced: Produced, reused: list[str]) -> str:
    """main's closing lines: what it made, and the commands to look at it."""
    store_uri = shlex.quote(tracking.absolute_uri(mlflow.get_tracking_uri()))
    model = produced.serve_uri.removeprefix("models:/")
    request = json.dumps({"model": model, "messages": [
        {"role": "user", "content": "What is the capital of Spain?"}]})
    lines = [f"main run {run_id} (experiment {experiment_id}) finished:"]
    lines += [f"  {key:<26} {value}" for key, value in produced.to_dict().items()]
    lines.append(f"  {'reused steps':<26} {', '.join(reused) or 'none'}")
    # This environment's own interpreter, by absolute path: a new terminal has neither its
    # `python` (Debian ships python3 only) nor `mlflow` on PATH unless the environment is active.
    python = shlex.quote(sys.executable)
    lines.append("Look at it with (each in its own terminal, from any folder):")
    lines.append(f"  {python} -m mlflow ui --backend-store-uri {store_uri} -p {UI_PORT}")
    lines.append(f"  MLFLOW_TRACKING_URI={store_uri} "
                 f"PYTHONPATH={shlex.quote(str(names.PROJECT_ROOT))} "
                 f"{python} -m phi3flow.front_door --model {model} --port {SERVE_PORT}")
    lines.append(f"  curl -s localhost:{SERVE_PORT}/v1/chat/completions -H 'Content-Type: "
                 f"application/json' -d {shlex.quote(request)}")
    return "\n".join(lines)

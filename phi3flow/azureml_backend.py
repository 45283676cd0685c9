"""An MLflow project backend that runs an entry point as an Azure Machine Learning v2 command job.

    mlflow run . --backend azureml-v2 --backend-config azureml.json -e main -P ...

`azureml-mlflow`'s `azureml` backend cannot be used (it crashes on MLflow 3, rejects
python_env.yaml, and Microsoft retired MLflow Projects on Azure ML in September 2026). This
backend takes Microsoft's supported route instead: an `azure-ai-ml` command job whose command is
`mlflow run ... --env-manager local` inside an environment built from the project's conda.yaml.

The job is described once, as the YAML that `az ml job create --file` accepts; `dry_run` writes
that file and submits nothing, otherwise the same YAML is loaded with azure-ai-ml's own loader and
submitted. Credentials come from azure-identity's DefaultAzureCredential and are never written
to the job, the YAML, the run or the log.

The backend creates the run `mlflow run` tracks in the current tracking store (MLflow tags it
right after submission), tags it with the job's name and studio URL, and mirrors the job's
status onto it in wait()/get_status(). The job's own MLflow run in the workspace is named after
the job (Azure ML's convention), recorded as the tag `phi3flow.azureml.mlflow_run_id`.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import RunStatus
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
    fetch_and_validate_project,
)

from phi3flow.errors import StepError

# Under MLflow's logger, so `mlflow run` shows our messages with its own.
logger = logging.getLogger("mlflow.projects.azureml_v2")

BACKEND_NAME = "azureml-v2"
DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
# Azure ML's limits on a job's code snapshot.
MAX_SNAPSHOT_MB = 300
MAX_SNAPSHOT_FILES = 2000
TAG = "phi3flow.azureml."
TERMINAL = {"Completed": RunStatus.FINISHED, "Failed": RunStatus.FAILED,
            "Canceled": RunStatus.KILLED, "NotResponding": RunStatus.FAILED}
# MLflow's own keys in backend_config (it adds them for every backend); not ours to validate.
MLFLOW_KEYS = {PROJECT_ENV_MANAGER, PROJECT_SYNCHRONOUS, PROJECT_DOCKER_ARGS, PROJECT_STORAGE_DIR,
               PROJECT_BUILD_IMAGE, PROJECT_DOCKER_AUTH}


class AzureMLConfigError(StepError):
    """A backend-config key is missing or wrong; the message names it."""


@dataclass
class AzureMLConfig:
    subscription_id: str
    resource_group: str
    workspace_name: str
    compute: str = ""  # a compute cluster name; or leave empty and set instance_type (serverless)
    instance_type: str = ""
    environment: str = ""  # an existing Azure ML environment (azureml:name:version) ...
    image: str = DEFAULT_IMAGE  # ... or this base image + the project's conda.yaml
    experiment_name: str = ""
    display_name: str = ""
    dry_run: bool = False
    dry_run_path: str = "azureml-job.yml"
    poll_seconds: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_backend_config(cls, config: dict[str, Any] | str | None) -> AzureMLConfig:
        if isinstance(config, str):
            config = json.loads(Path(config).read_text())
        config = {k: v for k, v in (config or {}).items() if k not in MLFLOW_KEYS}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise AzureMLConfigError(
                f"unknown backend-config key(s) {unknown}; known keys: {sorted(known)}.")
        for key in ("subscription_id", "resource_group", "workspace_name"):
            if not isinstance(config.get(key), str) or not config[key].strip():
                raise AzureMLConfigError(
                    f"backend-config key {key!r} is required (a non-empty string): it names the "
                    "Azure ML workspace (see `az ml workspace show`).")
        for key, value in config.items():
            expected = {"dry_run": bool, "poll_seconds": (int, float), "extra_env": dict}.get(
                key, str)
            if not isinstance(value, expected) or isinstance(value, bool) and expected != bool:
                raise AzureMLConfigError(f"backend-config key {key!r} must be "
                                         f"{getattr(expected, '__name__', 'a number')}, got "
                                         f"{json.dumps(value)}.")
        cfg = cls(**config)
        if not cfg.compute and not cfg.instance_type:
            raise AzureMLConfigError("backend-config needs 'compute' (a compute cluster name) or "
                                     "'instance_type' (serverless compute, e.g. Standard_E4s_v3).")
        secrets = [k for k in cfg.extra_env if any(s in k.upper() for s in
                                                    ("TOKEN", "SECRET", "KEY", "PASSWORD"))]
        if secrets:
            raise AzureMLConfigError(f"extra_env {secrets} look like secrets; a job's environment "
                                     "variables are visible in the workspace. Use a Key Vault.")
        return cfg


def check_snapshot(project_dir: Path) -> tuple[int, float]:
    """Files and MB Azure ML would upload, with its own ignore rules (.amlignore/.gitignore)."""
    from azure.ai.ml._utils._asset_utils import get_ignore_file

    ignore = get_ignore_file(project_dir)
    files = [p for p in project_dir.rglob("*")
             if p.is_file() and ".git" not in p.relative_to(project_dir).parts
             and not ignore.is_file_excluded(str(p))]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    if len(files) > MAX_SNAPSHOT_FILES or size_mb > MAX_SNAPSHOT_MB:
        raise AzureMLConfigError(
            f"the project snapshot is {len(files)} files and {size_mb:.0f} MB, over Azure ML's "
            f"limits ({MAX_SNAPSHOT_FILES} files, {MAX_SNAPSHOT_MB} MB): add what the job does "
            "not need (mlruns/, .venv/, model folders) to .amlignore or .gitignore, or run from "
            "a git URL.")
    return len(files), size_mb


def job_spec(project_uri: str, project_dir: Path, entry_point: str, params: dict[str, Any],
             version: str | None, cfg: AzureMLConfig, experiment_name: str) -> dict[str, Any]:
    """The command job, as the YAML document `az ml job create --file` takes."""
    is_git = not Path(project_uri).exists()
    source = shlex.quote(project_uri) if is_git else "."
    command = ["mlflow", "run", source]
    if is_git and version:
        command += ["-v", shlex.quote(version)]
    command += ["--env-manager", "local", "-e", shlex.quote(entry_point)]
    for key, value in params.items():
        command += ["-P", shlex.quote(f"{key}={value}")]
    spec: dict[str, Any] = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command",
        "command": " ".join(command),
        "experiment_name": experiment_name,
        "display_name": cfg.display_name or f"{project_dir.name}-{entry_point}",
        "environment_variables": {"HF_HUB_DISABLE_TELEMETRY": "1", **cfg.extra_env},
    }
    if not is_git:
        spec["code"] = str(project_dir)
    spec["environment"] = cfg.environment or {
        "image": cfg.image, "conda_file": str(project_dir / "conda.yaml")}
    if cfg.compute:
        spec["compute"] = f"azureml:{cfg.compute}"
    if cfg.instance_type:
        spec["resources"] = {"instance_type": cfg.instance_type}
    return spec


def make_client(cfg: AzureMLConfig):
    """The real Azure ML client (the outside boundary tests replace)."""
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(DefaultAzureCredential(), cfg.subscription_id, cfg.resource_group,
                    cfg.workspace_name)


class AzureMLSubmittedRun(SubmittedRun):
    def __init__(self, run_id: str, job_name: str, client, poll_seconds: float):
        super().__init__()
        self._run_id, self.job_name, self.client, self.poll = run_id, job_name, client, poll_seconds

    @property
    def run_id(self) -> str:
        return self._run_id

    def _job_status(self) -> str:
        return self.client.jobs.get(self.job_name).status

    def get_status(self) -> RunStatus:
        status = self._job_status()
        return TERMINAL.get(status, RunStatus.RUNNING)

    def wait(self) -> bool:
        while (status := self._job_status()) not in TERMINAL:
            logger.info("Azure ML job %s: %s", self.job_name, status)
            time.sleep(self.poll)
        mlflow.MlflowClient().set_terminated(self._run_id, RunStatus.to_string(TERMINAL[status]))
        logger.info("Azure ML job %s ended %s", self.job_name, status)
        return status == "Completed"

    def cancel(self) -> None:
        self.client.jobs.begin_cancel(self.job_name).wait()
        mlflow.MlflowClient().set_terminated(self._run_id, "KILLED")


class DryRun(SubmittedRun):
    def __init__(self, run_id: str):
        super().__init__()
        self._run_id = run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def wait(self) -> bool:
        return True

    def get_status(self) -> RunStatus:
        return RunStatus.FINISHED

    def cancel(self) -> None:
        pass


class AzureMLBackend(AbstractBackend):
    client_factory = staticmethod(make_client)

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        cfg = AzureMLConfig.from_backend_config(backend_config)
        project_dir = Path(fetch_and_validate_project(project_uri, version, entry_point, params))
        is_git = not Path(project_uri).exists()
        if not is_git:
            files, size_mb = check_snapshot(project_dir)
            logger.info("project snapshot: %d files, %.1f MB", files, size_mb)
        client = mlflow.MlflowClient(tracking_uri)
        experiment_name = (cfg.experiment_name
                           or client.get_experiment(experiment_id).name)
        spec = job_spec(project_uri, project_dir, entry_point, params, version, cfg,
                        experiment_name)
        path = (Path(cfg.dry_run_path) if cfg.dry_run
                else Path(tempfile.mkdtemp(prefix="phi3flow-azureml-")) / "job.yml")
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        from azure.ai.ml import load_job

        job = load_job(str(path))  # azure-ai-ml's own validation of the document
        run = client.create_run(experiment_id, tags={
            "mlflow.source.name": project_uri, "mlflow.project.entryPoint": entry_point,
            TAG + "workspace": f"{cfg.subscription_id}/{cfg.resource_group}/"
                               f"{cfg.workspace_name}",
            TAG + "job_yaml": str(path.resolve()) if cfg.dry_run else "",
        })
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        if cfg.dry_run:
            logger.info("dry_run: wrote %s (submit it with `az ml job create --file %s`); "
                        "nothing was submitted", path, path)
            client.set_tag(run.info.run_id, TAG + "dry_run", "true")
            client.set_terminated(run.info.run_id, "FINISHED")
            return DryRun(run.info.run_id)
        try:
            azure = self.client_factory(cfg)
            submitted = azure.jobs.create_or_update(job)
        except Exception:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_tag(run.info.run_id, TAG + "job_name", submitted.name)
        client.set_tag(run.info.run_id, TAG + "mlflow_run_id", submitted.name)
        client.set_tag(run.info.run_id, TAG + "studio_url", submitted.studio_url or "")
        logger.info("submitted Azure ML job %s: %s", submitted.name, submitted.studio_url)
        return AzureMLSubmittedRun(run.info.run_id, submitted.name, azure, cfg.poll_seconds)


def backend() -> AzureMLBackend:
    """The entry point MLflow loads for `--backend azureml-v2` (see pyproject.toml)."""
    return AzureMLBackend()

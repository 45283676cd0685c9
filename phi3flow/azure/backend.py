"""An MLflow project backend that runs an entry point as an Azure Machine Learning v2 command job.

    export MLFLOW_TRACKING_URI=$(az ml workspace show --query mlflow_tracking_uri -o tsv)
    mlflow run . --backend azureml-v2 --backend-config azureml.json -e main -P ...

`azureml-mlflow`'s `azureml` backend cannot be used (it crashes on MLflow 3, rejects
python_env.yaml, and Microsoft retired MLflow Projects on Azure ML in September 2026). This
backend takes Microsoft's supported route instead: an `azure-ai-ml` command job whose command,
`python -m phi3flow.azure.job`, runs the entry point with `mlflow run --env-manager local` in an
environment built from the project's conda.yaml.

Where the results land: Azure ML creates one MLflow run per job in the workspace, whose run ID is
the job's name. That run is the one this backend returns (so `mlflow run` prints it) and the one
the job's command runs the entry point into, so the ID the user gets holds main's child runs, the
logged models and the registration. A tracking store other than the workspace is refused before
anything is submitted: the run could not be recorded there.

The job is described once, as the YAML that `az ml job create --file` accepts; `dry_run` writes
that file and submits nothing, otherwise the same YAML is loaded with azure-ai-ml's own loader and
submitted. Credentials come from azure-identity's DefaultAzureCredential and are never written
to the job, the YAML, the run or the log.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import ExecutionException
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

from phi3flow.core import names, redact
from phi3flow.core.errors import StepError

# Under MLflow's logger, so `mlflow run` shows our messages with its own.
logger = logging.getLogger("mlflow.projects.azureml_v2")

BACKEND_NAME = "azureml-v2"
DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
# PyPI's Linux torch wheels pull about 3 GB of CUDA libraries; the job's image is CPU-only, so its
# pip takes torch from PyTorch's CPU index (see docs/decisions.md, "Azure ML job environment").
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Azure ML's limits on a job's code snapshot.
MAX_SNAPSHOT_MB = 300
MAX_SNAPSHOT_FILES = 2000
# The backend's tags on the run it returns (`phi3flow.azureml.job_status`, ...).
TAG = names.TAG_PREFIX + "azureml."
JOB_MODULE = "phi3flow.azure.job"
# The terminal job states of azure-ai-ml (azure/ai/ml/operations/_run_history_constants.py); any
# other state is in progress. Its terminal set includes Paused: a paused job runs nothing until
# resumed in the studio.
TERMINAL = {"Completed": RunStatus.FINISHED, "Failed": RunStatus.FAILED,
            "Canceled": RunStatus.KILLED, "NotResponding": RunStatus.FAILED,
            "Paused": RunStatus.KILLED}
# Consecutive failed status polls tolerated before wait() gives up (a long job outlives blips).
MAX_POLL_ERRORS = 5
# MLflow's own keys in backend_config (it adds them for every backend); not ours to validate.
MLFLOW_KEYS = {PROJECT_ENV_MANAGER, PROJECT_SYNCHRONOUS, PROJECT_DOCKER_ARGS, PROJECT_STORAGE_DIR,
               PROJECT_BUILD_IMAGE, PROJECT_DOCKER_AUTH}
# Keys a user may expect here whose setting lives elsewhere, with where.
MOVED_KEYS = {"experiment_name": "choose the experiment with `mlflow run --experiment-name NAME`: "
                                 "the job's run is created in the experiment MLflow resolved"}
WORKSPACE_PATH = re.compile(
    r"/subscriptions/(?P<subscription_id>[^/]+)/resourceGroups/(?P<resource_group>[^/]+)"
    r"/providers/Microsoft\.MachineLearningServices/workspaces/(?P<workspace_name>[^/?]+)",
    re.IGNORECASE)


class AzureMLConfigError(ExecutionException, StepError):
    """A backend-config key, the tracking URI or the workspace is wrong; the message says how.

    An ExecutionException, so `mlflow run` prints it as one line and exits non-zero.
    """


@dataclass
class AzureMLConfig:
    subscription_id: str
    resource_group: str
    workspace_name: str
    compute: str = ""  # a compute cluster name; or leave empty and set instance_type (serverless)
    instance_type: str = ""
    environment: str = ""  # an existing Azure ML environment (azureml:name:version) ...
    image: str = DEFAULT_IMAGE  # ... or this base image + the project's conda.yaml
    display_name: str = ""
    dry_run: bool = False
    dry_run_path: str = "azureml-job.yml"
    poll_seconds: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_backend_config(cls, config: dict[str, Any] | str | None) -> AzureMLConfig:
        if isinstance(config, str):
            try:
                config = json.loads(Path(config).read_text())
            except (OSError, ValueError) as exc:
                raise AzureMLConfigError(
                    f"--backend-config {config}: cannot read it as JSON ({exc}); pass a JSON "
                    "file of the keys in docs/azureml.md.")
        if not isinstance(config, dict):
            raise AzureMLConfigError(f"--backend-config must be a JSON object, got "
                                     f"{type(config).__name__}.")
        config = {k: v for k, v in config.items() if k not in MLFLOW_KEYS}
        if moved := sorted(set(config) & set(MOVED_KEYS)):
            raise AzureMLConfigError(f"backend-config key {moved[0]!r} is gone: "
                                     f"{MOVED_KEYS[moved[0]]}.")
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
            if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
                raise AzureMLConfigError(f"backend-config key {key!r} must be "
                                         f"{getattr(expected, '__name__', 'a number')}, got "
                                         f"{json.dumps(value)}.")
        cfg = cls(**config)
        if not cfg.compute and not cfg.instance_type:
            raise AzureMLConfigError("backend-config needs 'compute' (a compute cluster name) or "
                                     "'instance_type' (serverless compute, e.g. Standard_E4s_v3).")
        if cfg.poll_seconds < 0:
            raise AzureMLConfigError(f"backend-config key 'poll_seconds' must be >= 0, got "
                                     f"{cfg.poll_seconds}.")
        secrets = [k for k in cfg.extra_env if any(s in k.upper() for s in
                                                    ("TOKEN", "SECRET", "KEY", "PASSWORD"))]
        if secrets:
            raise AzureMLConfigError(f"extra_env {secrets} look like secrets; a job's environment "
                                     "variables are visible in the workspace. Use a Key Vault.")
        return cfg

    @property
    def workspace(self) -> str:
        return f"{self.subscription_id}/{self.resource_group}/{self.workspace_name}"


def check_tracking_uri(tracking_uri: str, cfg: AzureMLConfig) -> None:
    """The run is created by Azure ML in the workspace, so MLflow must be tracking there.

    Like MLflow's own Databricks backend, which refuses a local store: the run `mlflow run`
    prints could not be recorded in one, and the user would get a run that stays empty.
    """
    fix = ("export MLFLOW_TRACKING_URI=$(az ml workspace show -g "
           f"{cfg.resource_group} -n {cfg.workspace_name} --query mlflow_tracking_uri -o tsv)")
    if urlparse(tracking_uri).scheme != "azureml":
        raise AzureMLConfigError(
            f"the tracking URI is {tracking_uri!r}, not an Azure ML workspace: the job's run "
            f"and everything it logs are recorded in the workspace. Set it first: {fix}")
    match = WORKSPACE_PATH.search(tracking_uri)
    named = {k: v.lower() for k, v in (match.groupdict() if match else {}).items()}
    wanted = {"subscription_id": cfg.subscription_id.lower(),
              "resource_group": cfg.resource_group.lower(),
              "workspace_name": cfg.workspace_name.lower()}
    if named != wanted:
        raise AzureMLConfigError(
            f"the tracking URI names workspace {'/'.join(named.values()) or '(none)'} but the "
            f"backend-config names {cfg.workspace}: point both at the same workspace ({fix}).")


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


def job_conda_env(conda_yaml: Path) -> dict[str, Any]:
    """The project's conda.yaml, with torch taken from PyTorch's CPU index instead of PyPI's.

    Same pins otherwise: `torch==X` becomes `torch==X+cpu` (the same release, built without CUDA),
    which pip finds only on that index, so the image build fails loudly rather than pulling CUDA.
    """
    env = yaml.safe_load(conda_yaml.read_text())
    for dep in env["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            pins = [f"{p}+cpu" if p.startswith("torch==") and "+" not in p else p
                    for p in dep["pip"]]
            dep["pip"] = [f"--extra-index-url {TORCH_CPU_INDEX}", *pins]
    return env


@dataclass(frozen=True)
class GitSource:
    """Where a git-URL project came from, recorded on the job's run as MLflow's git tags."""

    url: str
    commit: str


def git_source(project_uri: str, project_dir: Path) -> GitSource | None:
    """The URL and the commit MLflow checked out for a git-URL project; None for a local one."""
    if Path(project_uri).exists():
        return None
    from mlflow.utils.git_utils import get_git_commit

    commit = get_git_commit(str(project_dir))
    if not commit:
        raise AzureMLConfigError(f"{project_uri}: MLflow fetched it, but {project_dir} is not a "
                                 "git checkout, so its commit cannot be recorded.")
    return GitSource(project_uri.split("#")[0], commit)


def job_spec(project_dir: Path, entry_point: str, params: dict[str, Any],
             source: GitSource | None, cfg: AzureMLConfig, experiment_name: str,
             job_path: Path) -> dict[str, Any]:
    """The command job, as the YAML document `az ml job create --file` takes (at `job_path`).

    The code uploaded is always a local folder: the project itself, or for a git URL the checkout
    MLflow made here, at the commit it resolved (so the job needs neither git nor credentials for
    the repository); the URL and commit travel as arguments and become the run's git tags. The
    environment's conda file is written beside the YAML (`<name>.conda.yaml`).
    """
    command = ["python", "-m", JOB_MODULE, "-e", shlex.quote(entry_point)]
    if source:
        command += ["--source-url", shlex.quote(source.url),
                    "--source-commit", shlex.quote(source.commit)]
    for key, value in params.items():
        command += ["-P", shlex.quote(f"{key}={value}")]
    spec: dict[str, Any] = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command",
        "command": " ".join(command),
        "code": str(project_dir),
        "experiment_name": experiment_name,
        "display_name": cfg.display_name or f"{project_dir.name}-{entry_point}",
        "environment_variables": {"HF_HUB_DISABLE_TELEMETRY": "1", **cfg.extra_env},
    }
    if cfg.environment:
        spec["environment"] = cfg.environment
    else:
        conda_file = job_path.with_name(job_path.stem + ".conda.yaml")
        conda_file.write_text(yaml.safe_dump(job_conda_env(project_dir / "conda.yaml"),
                                             sort_keys=False))
        spec["environment"] = {"image": cfg.image, "conda_file": str(conda_file)}
    if cfg.compute:
        spec["compute"] = f"azureml:{cfg.compute}"
    if cfg.instance_type:
        spec["resources"] = {"instance_type": cfg.instance_type}
    return spec


def make_client(cfg: AzureMLConfig):
    """The real Azure ML client (the outside boundary tests replace with a stand-in)."""
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(DefaultAzureCredential(), cfg.subscription_id, cfg.resource_group,
                    cfg.workspace_name)


# How Azure ML and MLflow spell "who are you" and "not allowed" when no HTTP status survives
# (MLflow's RestException keeps only the body of a non-MLflow error).
_STATUS_WORDS = {401: ("AuthenticationFailed", "Unauthorized", "UNAUTHENTICATED", " 401"),
                 403: ("AuthorizationFailed", "Forbidden", "PERMISSION_DENIED", " 403"),
                 404: ("RESOURCE_DOES_NOT_EXIST", "ResourceNotFound", "NotFound", " 404")}


def _http_status(exc: Exception) -> int | None:
    from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError

    if isinstance(exc, ClientAuthenticationError):  # also: no credential could be found
        return 401
    if isinstance(exc, ResourceNotFoundError):
        return 404
    status = getattr(exc, "status_code", None) or getattr(
        getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status
    text = str(exc)
    return next((code for code, words in _STATUS_WORDS.items()
                 if any(word in text for word in words)), None)


def _workspace_error(what: str, exc: Exception, cfg: AzureMLConfig,
                     not_found: str = "check the name (`az ml compute list`, "
                                      "`az ml workspace show`)") -> AzureMLConfigError:
    """One line for a failed call to the workspace: what failed, why, and what to do."""
    text = " ".join(redact.error_text(exc).split())[:300]
    hint = {401: "sign in (`az login`, or any credential DefaultAzureCredential accepts)",
            403: f"ask for a role on workspace {cfg.workspace} that may submit jobs and write "
                 "MLflow runs (for example AzureML Data Scientist)",
            404: not_found}.get(
        _http_status(exc), f"check that workspace {cfg.workspace} exists and is reachable "
                           "from here")
    return AzureMLConfigError(f"{what} failed ({text}): {hint}.")


class AzureMLSubmittedRun(SubmittedRun):
    """The job's own MLflow run in the workspace (run ID = job name), followed through the job."""

    def __init__(self, run_id: str, client, poll_seconds: float, studio_url: str = ""):
        super().__init__()
        self._run_id, self.client, self.poll = run_id, client, poll_seconds
        self.studio_url = studio_url

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def job_name(self) -> str:
        return self._run_id

    def _job_status(self) -> str:
        return self.client.jobs.get(self.job_name).status

    def get_status(self) -> RunStatus:
        return TERMINAL.get(self._job_status(), RunStatus.RUNNING)

    def wait(self) -> bool:
        errors, last = 0, None
        while True:
            try:
                status = self._job_status()
                errors = 0
            except Exception as exc:  # a long job outlives network blips and token refreshes
                errors += 1
                if errors >= MAX_POLL_ERRORS:
                    raise
                logger.warning("Azure ML job %s: status poll failed (%s), retrying", self.job_name,
                               str(exc)[:200])
                time.sleep(self.poll)
                continue
            if status in TERMINAL:
                break
            if status != last:
                logger.info("Azure ML job %s: %s", self.job_name, status)
                last = status
            time.sleep(self.poll)
        self._end_run(status)
        return status == "Completed"

    def _end_run(self, status: str) -> None:
        """Record how the job ended on its run, and say it in one line with where to look."""
        client = mlflow.MlflowClient()
        run = client.get_run(self._run_id)
        client.set_tag(self._run_id, TAG + "job_status", status)
        where = f"; logs: {self.studio_url}" if self.studio_url else ""
        if status == "Completed":
            logger.info("Azure ML job %s completed%s", self.job_name, where)
        elif status == "Paused":
            logger.error("Azure ML job %s is paused: nothing runs until it is resumed in the "
                         "studio%s", self.job_name, where)
        else:
            error = run.data.tags.get(names.TAG_ERROR) or "no error recorded by the job's steps"
            logger.error("Azure ML job %s ended %s: %s%s", self.job_name, status, error, where)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(self._run_id, RunStatus.to_string(TERMINAL[status]))

    def cancel(self) -> None:
        self.client.jobs.begin_cancel(self.job_name).wait()
        client = mlflow.MlflowClient()
        client.set_tag(self._run_id, TAG + "job_status", "Canceled")
        if client.get_run(self._run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(self._run_id, "KILLED")


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
        if not cfg.dry_run:
            check_tracking_uri(tracking_uri, cfg)
        project_dir = Path(fetch_and_validate_project(project_uri, version, entry_point, params))
        source = git_source(project_uri, project_dir)
        files, size_mb = check_snapshot(project_dir)
        logger.info("project snapshot: %d files, %.1f MB%s", files, size_mb,
                    f" of {source.url} at {source.commit}" if source else "")
        client = mlflow.MlflowClient(tracking_uri)
        try:
            experiment_name = client.get_experiment(experiment_id).name
        except Exception as exc:
            raise _workspace_error(
                f"reading experiment {experiment_id} from {tracking_uri}", exc, cfg,
                not_found="choose an experiment of the workspace with `mlflow run "
                          "--experiment-name NAME` (it is created if missing)") from None
        path = (Path(cfg.dry_run_path).resolve() if cfg.dry_run
                else Path(tempfile.mkdtemp(prefix="phi3flow-azureml-")) / "job.yml")
        spec = job_spec(project_dir, entry_point, params, source, cfg, experiment_name, path)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        from azure.ai.ml import load_job

        job = load_job(str(path))  # azure-ai-ml's own validation of the document
        if cfg.dry_run:
            return self._dry_run(client, experiment_id, project_uri, entry_point, params, cfg,
                                 path)
        azure = self.client_factory(cfg)
        if cfg.compute:
            try:
                azure.compute.get(cfg.compute)
            except Exception as exc:
                raise _workspace_error(f"looking up compute {cfg.compute!r}", exc, cfg) from None
        try:
            submitted = azure.jobs.create_or_update(job)
        except Exception as exc:
            raise _workspace_error("submitting the job", exc, cfg) from None
        # Azure ML made the job's MLflow run, named after the job: that is the run we return.
        run_id = submitted.name
        client.set_tag(run_id, TAG + "workspace", cfg.workspace)
        client.set_tag(run_id, TAG + "studio_url", submitted.studio_url or "")
        logger.info("submitted Azure ML job %s (its MLflow run in the workspace): %s",
                    submitted.name, submitted.studio_url)
        return AzureMLSubmittedRun(run_id, azure, cfg.poll_seconds, submitted.studio_url or "")

    @staticmethod
    def _dry_run(client, experiment_id, project_uri, entry_point, params, cfg, path) -> DryRun:
        """A finished run holding the job document, in whatever store MLflow tracks to."""
        run = client.create_run(experiment_id, tags={
            "mlflow.source.name": project_uri, "mlflow.project.entryPoint": entry_point,
            TAG + "workspace": cfg.workspace, TAG + "dry_run": "true",
            TAG + "job_yaml": str(path.resolve())})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.log_artifact(run.info.run_id, str(path), "azureml")
        client.set_terminated(run.info.run_id, "FINISHED")
        logger.info("dry_run: wrote %s (submit it with `az ml job create --file %s`); "
                    "nothing was submitted", path, path)
        return DryRun(run.info.run_id)


def backend() -> AzureMLBackend:
    """The entry point MLflow loads for `--backend azureml-v2` (see pyproject.toml)."""
    redact.install_log_filter()  # `mlflow run`'s own log lines, ours among them
    return AzureMLBackend()

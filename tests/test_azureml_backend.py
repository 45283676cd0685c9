"""The Azure ML v2 project backend: config checks, the job it builds, and its submitted run.

No Azure subscription is reachable from here. The job document is checked with azure-ai-ml's
own loader, and submission runs against an offline fake of the Azure ML client, a true outside
boundary: the tests that use it say so in their names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from azure.ai.ml import load_job
from azure.ai.ml.entities import Command

from phi3flow import azureml_backend
from phi3flow.azureml_backend import AzureMLBackend, AzureMLConfig, AzureMLConfigError
from tests.conftest import ROOT

WORKSPACE = {"subscription_id": "00000000-0000-0000-0000-000000000000",
             "resource_group": "rg-phi3", "workspace_name": "ws-phi3"}
PARAMS = {"model_id": "tests/fixtures/tiny-phi3", "onnx_source": "build"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "'subscription_id' is required"),
        ({**WORKSPACE, "workspace_name": ""}, "'workspace_name' is required"),
        ({**WORKSPACE, "compute": "c", "gpu": True}, "unknown backend-config key(s) ['gpu']"),
        ({**WORKSPACE, "compute": 3}, "'compute' must be str, got 3"),
        ({**WORKSPACE, "compute": "c", "dry_run": "yes"}, "'dry_run' must be bool"),
        (WORKSPACE, "needs 'compute'"),
        ({**WORKSPACE, "compute": "c", "extra_env": {"HF_TOKEN": "x"}}, "look like secrets"),
    ],
)
def test_bad_backend_config_names_the_key(config, message):
    with pytest.raises(AzureMLConfigError) as error:
        AzureMLConfig.from_backend_config(config)
    assert message in str(error.value)


def test_mlflows_own_backend_config_keys_are_left_alone():
    from mlflow.projects.utils import PROJECT_ENV_MANAGER, PROJECT_SYNCHRONOUS

    cfg = AzureMLConfig.from_backend_config({**WORKSPACE, "compute": "cpu",
                                             PROJECT_ENV_MANAGER: "local",
                                             PROJECT_SYNCHRONOUS: True})
    assert cfg.compute == "cpu"


def _load(spec: dict, tmp_path: Path) -> Command:
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    job = load_job(str(path))
    assert isinstance(job, Command) and job.type == "command"
    return job


def test_job_for_a_local_project(tmp_path):
    cfg = AzureMLConfig.from_backend_config({**WORKSPACE, "compute": "cpu-cluster",
                                             "experiment_name": "phi3", "display_name": "try"})
    spec = azureml_backend.job_spec(str(ROOT), ROOT, "main", PARAMS, None, cfg, "phi3")
    job = _load(spec, tmp_path)
    assert job.command == ("mlflow run . --env-manager local -e main "
                           "-P model_id=tests/fixtures/tiny-phi3 -P onnx_source=build")
    assert Path(job.code) == ROOT
    assert job.compute == "cpu-cluster"  # the loader strips the azureml: prefix
    assert job.environment.image == azureml_backend.DEFAULT_IMAGE
    # The environment is the project's own conda.yaml, read by azure-ai-ml.
    assert job.environment.conda_file == yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert job.experiment_name == "phi3" and job.display_name == "try"
    assert job.environment_variables == {"HF_HUB_DISABLE_TELEMETRY": "1"}


def test_job_for_a_git_url_runs_the_pinned_commit_with_no_upload(tmp_path):
    cfg = AzureMLConfig.from_backend_config({**WORKSPACE, "instance_type": "Standard_E4s_v3"})
    url = "https://github.com/example/phi3-mlflow"
    spec = azureml_backend.job_spec(url, ROOT, "fetch_model", {}, "a" * 40, cfg, "phi3")
    job = _load(spec, tmp_path)
    assert job.command == f"mlflow run {url} -v {'a' * 40} --env-manager local -e fetch_model"
    assert job.code is None
    assert job.resources.instance_type == "Standard_E4s_v3"


def test_snapshot_over_azures_limit_is_refused(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"0" * 2_000_000)
    monkeypatch.setattr(azureml_backend, "MAX_SNAPSHOT_MB", 1)
    with pytest.raises(AzureMLConfigError, match="over Azure ML's limits"):
        azureml_backend.check_snapshot(tmp_path)
    (tmp_path / ".amlignore").write_text("*.bin\n")  # Azure's own ignore file is honoured
    assert azureml_backend.check_snapshot(tmp_path)[0] == 1


class FakeJobs:
    """Offline fake of MLClient.jobs: records submissions, plays back job statuses."""

    def __init__(self, statuses):
        self.submitted, self.statuses, self.cancelled = [], list(statuses), []

    def create_or_update(self, job):
        self.submitted.append(job)
        return SimpleNamespace(name="brave_job_42", studio_url="https://ml.azure.com/runs/42")

    def get(self, name):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(name=name, status=status)

    def begin_cancel(self, name):
        self.cancelled.append(name)
        return SimpleNamespace(wait=lambda: None)


def _backend_with_fake_client(monkeypatch, jobs):
    monkeypatch.setattr(AzureMLBackend, "client_factory",
                        staticmethod(lambda cfg: SimpleNamespace(jobs=jobs)))
    return AzureMLBackend()


def test_submit_with_fake_azure_client_mirrors_the_job_status(tracking, monkeypatch):
    jobs = FakeJobs(["Queued", "Running", "Completed"])
    backend = _backend_with_fake_client(monkeypatch, jobs)
    experiment = mlflow.create_experiment("azure-fake")
    submitted = backend.run(str(ROOT), "main", PARAMS, None,
                            {**WORKSPACE, "compute": "cpu", "poll_seconds": 0}, tracking,
                            experiment)
    (job,) = jobs.submitted
    assert isinstance(job, Command) and job.compute == "cpu"
    assert job.experiment_name == "azure-fake"
    run = mlflow.get_run(submitted.run_id)
    assert run.data.tags["phi3flow.azureml.job_name"] == "brave_job_42"
    assert run.data.params == PARAMS
    assert submitted.get_status() == mlflow.entities.RunStatus.RUNNING
    assert submitted.wait() is True
    assert mlflow.get_run(submitted.run_id).info.status == "FINISHED"


def test_failed_and_cancelled_jobs_with_fake_azure_client(tracking, monkeypatch):
    experiment = mlflow.create_experiment("azure-fake-2")
    config = {**WORKSPACE, "compute": "cpu", "poll_seconds": 0}
    failed = _backend_with_fake_client(monkeypatch, FakeJobs(["Failed"])).run(
        str(ROOT), "main", PARAMS, None, config, tracking, experiment)
    assert failed.wait() is False and mlflow.get_run(failed.run_id).info.status == "FAILED"
    jobs = FakeJobs(["Running"])
    running = _backend_with_fake_client(monkeypatch, jobs).run(
        str(ROOT), "main", PARAMS, None, config, tracking, experiment)
    running.cancel()
    assert jobs.cancelled == ["brave_job_42"]
    assert mlflow.get_run(running.run_id).info.status == "KILLED"


def test_mlflow_run_finds_the_plugin_and_dry_run_writes_a_loadable_job(tracking, tmp_path):
    config = tmp_path / "azureml.json"
    job_yaml = tmp_path / "job.yml"
    config.write_text(json.dumps({**WORKSPACE, "compute": "cpu-cluster", "dry_run": True,
                                  "dry_run_path": str(job_yaml)}))
    env = {**os.environ, "AZURE_CLIENT_SECRET": "must-not-appear-anywhere",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--backend", "azureml-v2",
         "--backend-config", str(config), "-e", "main", "-P", "model_id=tests/fixtures/tiny-phi3",
         "-P", "onnx_source=build"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "nothing was submitted" in done.stderr
    job = load_job(str(job_yaml))
    assert "mlflow run . --env-manager local -e main" in job.command
    assert "must-not-appear-anywhere" not in job_yaml.read_text() + done.stderr + done.stdout
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["phi3flow.azureml.dry_run"] == "true"
    assert run.data.tags["mlflow.project.backend"] == "azureml-v2"
    assert run.info.status == "FINISHED"

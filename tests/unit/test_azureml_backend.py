"""The Azure ML v2 project backend: config checks, the tracking URI, and the job it builds.

No Azure subscription is reachable from here. The job document is checked with azure-ai-ml's
own loader; submission, status and the job itself run against local stand-ins for the
workspace and the job service in tests/e2e/test_azureml_workspace.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from azure.ai.ml import load_job
from azure.ai.ml.entities import Command

from phi3flow.azure import backend as azureml_backend
from phi3flow.azure.backend import AzureMLConfig, AzureMLConfigError
from tests.helpers import ROOT

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
        ({**WORKSPACE, "compute": "c", "poll_seconds": -1}, "'poll_seconds' must be >= 0"),
        ({**WORKSPACE, "compute": "c", "experiment_name": "x"}, "mlflow run --experiment-name"),
        ([WORKSPACE], "must be a JSON object"),
    ],
)
def test_bad_backend_config_names_the_key(config, message):
    with pytest.raises(AzureMLConfigError) as error:
        AzureMLConfig.from_backend_config(config)
    assert message in str(error.value)


def test_backend_config_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "azureml.cfg"  # MLflow itself parses only files ending in .json
    path.write_text("subscription_id = 1\n")
    with pytest.raises(AzureMLConfigError, match=f"--backend-config {path}: cannot read it"):
        AzureMLConfig.from_backend_config(str(path))


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
                                             "display_name": "try"})
    spec = azureml_backend.job_spec(ROOT, "main", PARAMS, None, cfg, "phi3",
                                    tmp_path / "job.yml")
    job = _load(spec, tmp_path)
    assert job.command == ("python -m phi3flow.azure.job -e main "
                           "-P model_id=tests/fixtures/tiny-phi3 -P onnx_source=build")
    assert Path(job.code) == ROOT
    assert job.compute == "cpu-cluster"  # the loader strips the azureml: prefix
    assert job.environment.image == azureml_backend.DEFAULT_IMAGE
    # The environment is the project's conda.yaml with torch from PyTorch's CPU index.
    assert job.environment.conda_file == azureml_backend.job_conda_env(ROOT / "conda.yaml")
    assert job.experiment_name == "phi3" and job.display_name == "try"
    assert job.environment_variables == {"HF_HUB_DISABLE_TELEMETRY": "1"}


def test_job_environment_is_conda_yaml_with_the_cpu_build_of_the_same_torch():
    project = yaml.safe_load((ROOT / "conda.yaml").read_text())
    job = azureml_backend.job_conda_env(ROOT / "conda.yaml")
    pins = next(d["pip"] for d in project["dependencies"] if isinstance(d, dict))
    job_pins = next(d["pip"] for d in job["dependencies"] if isinstance(d, dict))
    torch = next(p for p in pins if p.startswith("torch=="))
    assert job_pins[0] == f"--extra-index-url {azureml_backend.TORCH_CPU_INDEX}"
    assert job_pins[1:] == [f"{p}+cpu" if p == torch else p for p in pins]
    assert "azureml-mlflow==1.62.0.post6" in job_pins  # the job tracks through Microsoft's client
    assert [d for d in job["dependencies"] if not isinstance(d, dict)] == [
        d for d in project["dependencies"] if not isinstance(d, dict)]


def test_job_for_a_git_url_uploads_the_checkout_and_names_its_source(tmp_path):
    """The job gets the checkout made on the user's side (no git, no credentials in the job),
    and the URL and commit to record as MLflow's git tags."""
    cfg = AzureMLConfig.from_backend_config({**WORKSPACE, "instance_type": "Standard_E4s_v3"})
    url = "https://github.com/example/phi3-mlflow"
    source = azureml_backend.GitSource(url, "a" * 40)
    spec = azureml_backend.job_spec(ROOT, "fetch_model", {}, source, cfg, "phi3",
                                    tmp_path / "job.yml")
    job = _load(spec, tmp_path)
    assert job.command == (f"python -m phi3flow.azure.job -e fetch_model --source-url {url} "
                           f"--source-commit {'a' * 40}")
    assert Path(job.code) == ROOT
    assert job.resources.instance_type == "Standard_E4s_v3"


def test_git_source_is_the_commit_mlflow_checked_out(tmp_path):
    assert azureml_backend.git_source(str(ROOT), ROOT) is None  # a local project
    url = "git://127.0.0.1/phi3-mlflow.git"
    source = azureml_backend.git_source(f"{url}#steps", ROOT / "steps")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert source == azureml_backend.GitSource(url, head)
    with pytest.raises(AzureMLConfigError, match="is not a git checkout"):
        azureml_backend.git_source(url, tmp_path)


TRACKING = ("azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/"
            f"{WORKSPACE['subscription_id']}/resourceGroups/RG-PHI3/providers/"
            "Microsoft.MachineLearningServices/workspaces/ws-phi3")


@pytest.mark.parametrize(("uri", "message"), [
    ("sqlite:///mlflow.db", "not an Azure ML workspace"),
    ("http://127.0.0.1:5000", "not an Azure ML workspace"),
    (TRACKING.replace("ws-phi3", "other"), "names workspace"),
])
def test_tracking_uri_must_be_the_configured_workspace(uri, message):
    cfg = AzureMLConfig.from_backend_config({**WORKSPACE, "compute": "c"})
    with pytest.raises(AzureMLConfigError, match=message) as error:
        azureml_backend.check_tracking_uri(uri, cfg)
    assert "az ml workspace show -g rg-phi3 -n ws-phi3 --query mlflow_tracking_uri" in str(
        error.value)


@pytest.mark.parametrize("uri", [TRACKING, TRACKING.replace("ws-phi3", "WS-Phi3")])
def test_tracking_uri_of_the_workspace_is_accepted_whatever_the_case(uri):
    """Azure resource names are case-insensitive: RG-PHI3 is the configured rg-phi3."""
    cfg = AzureMLConfig.from_backend_config({**WORKSPACE, "compute": "c"})
    assert azureml_backend.check_tracking_uri(uri, cfg) is None  # raises if refused


def test_job_entry_refuses_to_run_outside_a_job(monkeypatch, capsys):
    from phi3flow.azure import job as azureml_job

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert azureml_job.main(["-e", "main"]) == 2


def test_job_entry_keeps_one_experiment_variable():
    from phi3flow.azure import job as azureml_job

    env = {"MLFLOW_EXPERIMENT_ID": "7", "MLFLOW_EXPERIMENT_NAME": "phi3"}
    azureml_job.normalise_environment(env, "7")
    assert env == {"MLFLOW_EXPERIMENT_ID": "7"}


def test_snapshot_over_azures_limit_is_refused(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"0" * 2_000_000)
    monkeypatch.setattr(azureml_backend, "MAX_SNAPSHOT_MB", 1)
    with pytest.raises(AzureMLConfigError, match="over Azure ML's limits"):
        azureml_backend.check_snapshot(tmp_path)
    (tmp_path / ".amlignore").write_text("*.bin\n")  # Azure's own ignore file is honoured
    assert azureml_backend.check_snapshot(tmp_path)[0] == 1


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
    assert job.command.startswith("python -m phi3flow.azure.job -e main")
    assert "must-not-appear-anywhere" not in job_yaml.read_text() + done.stderr + done.stdout
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["phi3flow.azureml.dry_run"] == "true"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "azureml")] == [
        "azureml/job.yml"]
    assert run.data.tags["mlflow.project.backend"] == "azureml-v2"
    assert run.info.status == "FINISHED"

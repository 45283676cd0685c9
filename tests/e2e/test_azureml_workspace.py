"""`--backend azureml-v2` end to end against local stand-ins for an Azure ML workspace and its jobs.

No Azure is reachable here. `tests/azureml_standin.py` provides both stand-ins, named as such:
the workspace stand-in speaks the protocol azureml-mlflow speaks (a real `mlflow server` under
Azure ML's path over TLS, bearer tokens, the logged-model 404, Azure's artifact URIs, run-history
artifact endpoints handing out SAS URLs into Azurite, run-token refresh), and the job-service
stand-in runs the exact job the backend submits with the environment an Azure ML job gets.
The user's side runs in this process through MLflow's own `mlflow.projects.run(backend=...)`,
with only the Azure ML client (`MLClient`) replaced by the job-service stand-in.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import mlflow
import mlflow.projects
import pytest

from phi3flow import names, registry
from phi3flow.azureml_backend import AzureMLBackend, AzureMLConfigError
from tests.azureml_standin import (
    JOB_ENVIRONMENT,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    WORKSPACE,
    JobService,
    workspace,
)
from tests.conftest import QUESTION, ROOT, predict_in_fresh_process

pytestmark = pytest.mark.e2e

CONFIG = {"subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP,
          "workspace_name": WORKSPACE, "compute": "cpu-cluster", "poll_seconds": 1}
FIXTURE_PARAMS = {"model_id": "tests/fixtures/tiny-phi3", "onnx_source": "build"}
EXPERIMENT = "phi3-azureml"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One workspace stand-in for the module; run tokens live 100 s, so long jobs refresh them."""
    with workspace(tmp_path_factory.mktemp("workspace"), run_token_seconds=100) as stand_in:
        yield stand_in


@pytest.fixture
def user_side(ws, monkeypatch):
    """This process as the user's machine: tracking into the workspace, signed in."""
    for key, value in ws.client_env().items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.setenv(key, "")  # recorded, so whatever MLflow sets is undone afterwards
        monkeypatch.delenv(key)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    ws.mode = "ok"
    yield ws
    ws.mode = "ok"


def _jobs(ws, tmp_path, monkeypatch, **options) -> JobService:
    jobs = JobService(ws, tmp_path / "jobs", **options)
    monkeypatch.setattr(AzureMLBackend, "client_factory", staticmethod(lambda cfg: jobs.client))
    return jobs


def _submit(entry_point: str, params: dict, config: dict = CONFIG, synchronous: bool = True,
            **experiment):
    return mlflow.projects.run(str(ROOT), entry_point=entry_point, parameters=params,
                               backend="azureml-v2", backend_config=config,
                               synchronous=synchronous,
                               **(experiment or {"experiment_name": EXPERIMENT}))


def test_main_on_the_job_service_stand_in_lands_everything_in_the_workspace_stand_in(
        user_side, tmp_path, monkeypatch):
    """main as an Azure ML job: the run the user gets holds main's results, all in the workspace."""
    ws = user_side
    jobs = _jobs(ws, tmp_path, monkeypatch)  # both MLFLOW_EXPERIMENT_ID and _NAME set
    before = ws.counters.token_refreshes
    submitted = _submit("main", FIXTURE_PARAMS)

    (job,) = jobs.submitted
    assert job.command.startswith("python -m phi3flow.azureml_job -e main")
    assert set(JOB_ENVIRONMENT) <= set(jobs.jobs[submitted.run_id]["env"])
    log = jobs.jobs[submitted.run_id]["log"].read_text()
    assert jobs.jobs[submitted.run_id]["status"] == "Completed", log[-4000:]

    client = mlflow.MlflowClient()
    run = client.get_run(submitted.run_id)  # the job's own run, read back from the workspace
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("azureml://experiments/")
    tags = run.data.tags
    assert tags["phi3flow.azureml.job_status"] == "Completed"
    assert tags[names.TAG_PREFIX + "registered_alias"] == "champion"
    assert run.data.params["model_id"] == FIXTURE_PARAMS["model_id"]
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{submitted.run_id}'")
    assert sorted(c.data.tags[names.TAG_PREFIX + "step"] for c in children) == sorted(
        [names.FETCH_MODEL, names.LOG_TRANSFORMERS, names.LOG_ONNX_PYFUNC, names.EVALUATE,
         names.REGISTER])
    assert all(c.info.status == "FINISHED" for c in children)

    # The logged-model API answered 404, so both log steps took the save + log_artifacts path.
    assert ws.counters.logged_models_404 >= 2
    for key in ("transformers_model_uri", "onnx_model_uri"):
        assert tags[names.TAG_PREFIX + key].startswith("runs:/")
    # Every artifact went through the run-history API into Azurite.
    onnx_run = tags[names.TAG_PREFIX + "onnx_run_id"]
    assert any(p.endswith("MLmodel") for p in ws.artifact_paths(onnx_run))
    assert "registration.json" in ws.artifact_paths(tags[names.TAG_PREFIX + "register_run_id"])
    assert "produced.json" in ws.artifact_paths(submitted.run_id)

    # The champion is in the workspace's registry and answers when loaded from it.
    name = "phi3-mini-4k-instruct-chat"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.source.startswith("azureml://experiments/")
    answer = predict_in_fresh_process(f"models:/{name}@champion", QUESTION, env=ws.client_env())
    assert answer["choices"][0]["message"]["content"]

    # No token (the job's, refreshed ones, the user's) in a param, tag or the job's log.
    runs = client.search_runs([run.info.experiment_id])
    recorded = [*log.splitlines(), *(v for r in runs for v in
                                     [*r.data.params.values(), *r.data.tags.values()])]
    assert not [line for line in recorded if "eyJhbGciOi" in line]  # a JWT's first bytes
    assert ws.counters.unauthorized == [], ws.counters.unauthorized[:5]
    # The job outlived its first token (100 s): it was refreshed, and no request was refused.
    assert ws.counters.token_refreshes > before


@pytest.mark.parametrize("variables", [("MLFLOW_EXPERIMENT_NAME",), ("MLFLOW_EXPERIMENT_ID",)],
                         ids=["name-only", "id-only"])
def test_experiment_variable_variants_on_the_job_service_stand_in(user_side, tmp_path,
                                                                  monkeypatch, variables):
    """Azure may set either experiment variable (or both, as in the main test): all work."""
    jobs = _jobs(user_side, tmp_path, monkeypatch, experiment_variables=variables)
    submitted = _submit(names.FETCH_MODEL, FIXTURE_PARAMS)
    record = jobs.jobs[submitted.run_id]
    assert record["status"] == "Completed", record["log"].read_text()[-4000:]
    assert not set(("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")) - set(variables) & set(
        record["env"])
    run = mlflow.MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["phi3flow.step"] == names.FETCH_MODEL
    assert "manifest.json" in user_side.artifact_paths(submitted.run_id)
    assert user_side.counters.unauthorized == []


def test_failed_job_on_the_job_service_stand_in_ends_failed_with_the_steps_error(
        user_side, tmp_path, monkeypatch):
    """A step that fails inside the job: the run ends FAILED and the user is told why and where."""
    _jobs(user_side, tmp_path, monkeypatch)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mlflow.projects.azureml_v2")  # MLflow's loggers do not propagate
    logger.addHandler(handler)
    try:
        with pytest.raises(mlflow.exceptions.ExecutionException):
            _submit(names.LOG_TRANSFORMERS, {"fetch_run_id": "f" * 32})
    finally:
        logger.removeHandler(handler)
    (run,) = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                filter_string="tags.`phi3flow.azureml.job_status` = 'Failed'")
    assert run.info.status == "FAILED"
    message = next(r.getMessage() for r in records if "ended Failed" in r.getMessage())
    assert "fetch_run_id=" + "f" * 32 in message and "no such run" in message
    assert "https://ml.azure.com/runs/" in message


@pytest.mark.parametrize(("status", "run_status", "succeeded"),
                         [("Paused", "KILLED", False), ("Failed", "FAILED", False),
                          ("Canceled", "KILLED", False), ("NotResponding", "FAILED", False),
                          ("Completed", "FINISHED", True)])
def test_every_terminal_job_state_is_mapped_with_the_job_service_stand_in(
        user_side, tmp_path, monkeypatch, status, run_status, succeeded):
    """States as the job service reports them; the job's run ends in the matching MLflow status."""
    jobs = _jobs(user_side, tmp_path, monkeypatch,
                 statuses=["Queued", "Preparing", "Running", status])
    submitted = _submit(names.FETCH_MODEL, FIXTURE_PARAMS, synchronous=False)
    assert submitted.get_status() == mlflow.entities.RunStatus.RUNNING
    assert submitted.wait() is succeeded
    run = mlflow.MlflowClient().get_run(submitted.run_id)
    assert run.info.status == run_status
    assert run.data.tags["phi3flow.azureml.job_status"] == status
    assert jobs.cancelled == []


def test_cancel_with_the_job_service_stand_in_stops_the_job_and_kills_the_run(
        user_side, tmp_path, monkeypatch):
    jobs = _jobs(user_side, tmp_path, monkeypatch, statuses=["Running"])
    submitted = _submit(names.FETCH_MODEL, FIXTURE_PARAMS, synchronous=False)
    submitted.cancel()
    assert jobs.cancelled == [submitted.run_id]
    assert mlflow.MlflowClient().get_run(submitted.run_id).info.status == "KILLED"


@pytest.mark.parametrize("alias_api", [True, False], ids=["aliases", "no-alias-api"])
def test_champion_is_recorded_with_or_without_an_alias_api_on_the_workspace_stand_in(
        user_side, monkeypatch, alias_api):
    """Whether a real workspace accepts aliases is not verified: register works either way."""
    monkeypatch.setattr(user_side, "alias_api", alias_api)
    client = mlflow.MlflowClient()
    name = f"alias-probe-{alias_api}"
    client.create_registered_model(name)
    v1, v2 = (client.create_model_version(name, f"azureml://experiments/e/runs/r{i}/artifacts/m")
              for i in (1, 2))
    assert registry.set_alias(client, name, "champion", v1.version) is alias_api
    assert registry._holder(client, name, "champion").version == v1.version
    registry.set_alias(client, name, "champion", v2.version)
    assert registry._holder(client, name, "champion").version == v2.version
    assert registry._holder(client, name, "challenger") is None
    assert registry._aliases_of(client, name, client.get_model_version(name, v1.version)) == []
    assert registry._aliases_of(client, name, client.get_model_version(name, v2.version)) == [
        "champion"]
    registered = registry.registration(name, v2.version, "champion", "test", reused=False,
                                       by_tag=not alias_api)
    expected = f"models:/{name}@champion" if alias_api else f"models:/{name}/{v2.version}"
    assert registered.serve_uri == expected
    # models:/NAME/VERSION resolves to that version's source.
    assert client.get_model_version_download_uri(name, v2.version).endswith("/r2/artifacts/m")


def _runs_in_workspace() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


@pytest.mark.parametrize(("change", "message"), [
    ({"compute": "no-such-cluster"}, "looking up compute 'no-such-cluster' failed"),
    ({"workspace_name": "other-ws"}, "the tracking URI names workspace"),
    ({"experiment_name": "x"}, "choose the experiment with `mlflow run --experiment-name"),
])
def test_bad_azure_settings_stop_before_submission_with_the_stand_ins(
        user_side, tmp_path, monkeypatch, change, message):
    jobs = _jobs(user_side, tmp_path, monkeypatch)
    before = _runs_in_workspace()
    with pytest.raises(AzureMLConfigError) as error:
        _submit(names.FETCH_MODEL, FIXTURE_PARAMS, {**CONFIG, **change})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert jobs.submitted == [] and _runs_in_workspace() == before


@pytest.mark.parametrize(("mode", "message"), [("401", "sign in"), ("403", "ask for a role")])
def test_workspace_stand_in_refusing_the_user_stops_before_submission(
        user_side, tmp_path, monkeypatch, mode, message):
    """The backend's first call to the workspace is refused: one line, and nothing submitted.

    (With `--experiment-name`, MLflow's own experiment lookup comes first and fails with
    MLflow's message instead; docs/azureml.md says so.)
    """
    jobs = _jobs(user_side, tmp_path, monkeypatch)
    client = mlflow.MlflowClient()  # not mlflow.set_experiment: that would outlive the test
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    user_side.mode = mode
    with pytest.raises(AzureMLConfigError) as error:
        _submit(names.FETCH_MODEL, FIXTURE_PARAMS, experiment_id=experiment_id)
    assert message in str(error.value), str(error.value)
    assert jobs.submitted == []


def test_unreachable_workspace_stops_before_submission(user_side, tmp_path, monkeypatch):
    """The tracking URI names the workspace, but nothing answers there (a closed local port)."""
    from tests.ports import free_port

    jobs = _jobs(user_side, tmp_path, monkeypatch)
    unreachable = user_side.tracking_uri.replace(user_side.host, f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", unreachable)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(AzureMLConfigError) as error:
        _submit(names.FETCH_MODEL, FIXTURE_PARAMS, experiment_id="1")
    assert "is reachable from here" in str(error.value) and "\n" not in str(error.value)
    assert jobs.submitted == []


def test_local_tracking_store_is_refused_by_name(tracking, tmp_path, monkeypatch):
    """No workspace at all: the real `mlflow run --backend azureml-v2` CLI says what to set."""
    config = tmp_path / "azureml.json"
    config.write_text(__import__("json").dumps(CONFIG))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}"
                                 f"{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--backend", "azureml-v2",
         "--backend-config", str(config), "-e", names.FETCH_MODEL],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    line = next(x for x in done.stderr.splitlines() if "not an Azure ML workspace" in x)
    assert "az ml workspace show" in line and "mlflow_tracking_uri" in line
    assert "Traceback" not in done.stderr
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


CHILD = ("import mlflow, os\n"
         "print(mlflow.MlflowClient().get_run(os.environ['MLFLOW_RUN_ID']).info.run_id)\n")
LONG_STEP = f"""
import os, subprocess, sys, time
import mlflow
from phi3flow import tracking

initial = os.environ["MLFLOW_TRACKING_TOKEN"]
with mlflow.start_run():  # the job's run, from MLFLOW_RUN_ID, as a step joins it
    time.sleep(float(sys.argv[1]))  # longer than the job's first token lives
    fresh = tracking.child_environment()
    stale = {{**fresh, "MLFLOW_TRACKING_TOKEN": initial}}
    ok = subprocess.run([sys.executable, "-c", {CHILD!r}], env=fresh, timeout=240).returncode
    bad = subprocess.run([sys.executable, "-c", {CHILD!r}], env=stale, capture_output=True,
                         timeout=240).returncode
    print(f"RESULT {{ok}} {{bad}} {{fresh['MLFLOW_TRACKING_TOKEN'] != initial}}")
"""


def test_a_process_started_after_the_jobs_first_token_expired_gets_a_valid_one(
        ws, tmp_path, monkeypatch):
    """Against the workspace stand-in, whose run tokens expire after 45 s (and refreshes too).

    azureml-mlflow refreshes a process's own token every 30 s; a child started later from the
    environment's copy is refused, one started from `tracking.child_environment()` is not.
    """
    monkeypatch.setattr(ws, "run_token_seconds", 45)
    experiment = ws.experiment("Default")
    run = ws.backend("POST", "/api/2.0/mlflow/runs/create",
                     {"experiment_id": experiment["experiment_id"]})["run"]["info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IDENTITY_"))}
    env.update(ws.tls_env())
    env.update({"MLFLOW_TRACKING_URI": ws.tracking_uri, "MLFLOW_RUN_ID": run["run_id"],
                "AZUREML_RUN_ID": run["run_id"], "MLFLOW_EXPERIMENT_ID": run["experiment_id"],
                "MLFLOW_TRACKING_TOKEN": ws.run_token(run["run_id"], run["experiment_id"]),
                "PYTHONPATH": str(ROOT)})
    # Generous: on a loaded machine each Python start with mlflow and azureml-mlflow takes
    # tens of seconds (a CI run with other work beside it needed more than 300 s).
    done = subprocess.run([sys.executable, "-c", LONG_STEP, "50"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    result = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), done.stderr)
    assert result == "RESULT 0 1 True", done.stderr[-3000:]

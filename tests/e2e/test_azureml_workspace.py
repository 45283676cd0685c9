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

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.projects
import pytest

from phi3flow.azure.backend import AzureMLBackend, AzureMLConfigError
from phi3flow.core import azureml_store, names, store
from phi3flow.core.errors import StepError
from phi3flow.evaluation import evaluate as evaluation
from phi3flow.evaluation.decision import MODELS, Decision
from phi3flow.evaluation.metrics import AGREEMENT, EXACT, QUALITY
from phi3flow.registry import register as registry
from phi3flow.registry.register import Registration
from tests.azureml_standin import (
    JOB_ENVIRONMENT,
    RESOURCE_GROUP,
    SCOPE,
    STANDIN_USER,
    SUBSCRIPTION,
    WORKSPACE,
    JobService,
    workspace,
)
from tests.helpers import QUESTION, ROOT, eval_rows, git, predict_in_fresh_process

pytestmark = pytest.mark.e2e

CONFIG = {"subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP,
          "workspace_name": WORKSPACE, "compute": "cpu-cluster", "poll_seconds": 1}
FIXTURE_PARAMS = {"model_id": "tests/fixtures/tiny-phi3", "onnx_source": "build"}
EXPERIMENT = "phi3-azureml"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One workspace stand-in for the module, as strict as it comes (aliases refused, tokens
    refreshed only for the job's own run); run tokens live 100 s, so long jobs refresh them."""
    with workspace(tmp_path_factory.mktemp("workspace"), run_token_seconds=100) as stand_in:
        yield stand_in


def _as_user(ws, patch: pytest.MonkeyPatch) -> None:
    """This process as the user's machine: tracking into the workspace, signed in."""
    for key, value in ws.client_env().items():
        patch.setenv(key, value)
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        patch.setenv(key, "")  # recorded, so whatever MLflow sets is undone afterwards
        patch.delenv(key)
    patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)


@pytest.fixture
def user_side(ws, monkeypatch):
    _as_user(ws, monkeypatch)
    defaults = {k: getattr(ws, k) for k in ("mode", "alias_answer", "token_scope",
                                             "artifact_fault")}
    yield ws
    for key, value in defaults.items():
        setattr(ws, key, value)


def _workspace_artifacts(ws) -> str:
    """The start of every artifact URI the workspace stand-in answers (the long regional form)."""
    return f"azureml://{ws.host}/mlflow/v2.0{SCOPE}/experiments/"


def _jobs(ws, tmp_path, monkeypatch, **options) -> JobService:
    jobs = JobService(ws, tmp_path / "jobs", **options)
    monkeypatch.setattr(AzureMLBackend, "client_factory", staticmethod(lambda cfg: jobs.client))
    return jobs


def _submit(entry_point: str, params: dict, config: dict = CONFIG, synchronous: bool = True,
            project: str = str(ROOT), version: str | None = None, **experiment):
    return mlflow.projects.run(project, entry_point=entry_point, parameters=params,
                               version=version, backend="azureml-v2", backend_config=config,
                               synchronous=synchronous,
                               **(experiment or {"experiment_name": EXPERIMENT}))


@dataclass
class MainJob:
    run_id: str
    command: str
    log: str
    env: dict[str, str]
    status: str
    requests: list  # every MLflow API call the workspace saw while the job ran
    refusals: list
    refreshes: int  # run-token refreshes while it ran (all granted: the scope is strict)


@pytest.fixture(scope="module")
def main_job(ws, tmp_path_factory) -> MainJob:
    """`main` on the fixture as one Azure ML job, against the strict workspace stand-in."""
    with pytest.MonkeyPatch.context() as patch:
        _as_user(ws, patch)
        jobs = _jobs(ws, tmp_path_factory.mktemp("main-job"), patch)
        seen, refused = len(ws.counters.requests), len(ws.counters.refusals)
        refreshes = ws.counters.token_refreshes
        submitted = _submit("main", FIXTURE_PARAMS)
        record = jobs.jobs[submitted.run_id]
        return MainJob(submitted.run_id, jobs.submitted[0].command, record["log"].read_text(),
                       record["env"],
                       record["status"], ws.counters.requests[seen:],
                       ws.counters.refusals[refused:],
                       ws.counters.token_refreshes - refreshes)


def _children(client, run) -> dict[str, object]:
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                  max_results=store.PAGE)
    return {c.data.tags[names.TAG_PREFIX + "step"]: c for c in children}


# A secret in any of its forms: a JWT, a bearer header, a SAS signature that is not redacted.
SECRET = re.compile(r"eyJhbGciOi|Bearer [A-Za-z0-9]|sig=(?!\[REDACTED\])")


def test_main_as_a_job_completes_in_the_strict_workspace_stand_in(user_side, main_job):
    """main as an Azure ML job: the run the user gets holds main's results, all in the workspace,
    with the aliases refused, no trace API and tokens refreshed only for the job's run."""
    ws = user_side
    assert main_job.status == "Completed", main_job.log[-4000:]
    assert set(JOB_ENVIRONMENT) <= set(main_job.env)
    assert main_job.command.startswith("python -m phi3flow.azure.job -e main")

    client = mlflow.MlflowClient()
    run = client.get_run(main_job.run_id)  # the job's own run, read back from the workspace
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(_workspace_artifacts(ws))
    # The tags Azure sets on a job's run, kept (the project changes none of them).
    assert run.data.tags.items() >= {"mlflow.rootRunId": main_job.run_id,
                                     "mlflow.user": STANDIN_USER}.items()
    tags = run.data.tags
    assert tags["phi3flow.azureml.job_status"] == "Completed"
    assert run.data.params["model_id"] == FIXTURE_PARAMS["model_id"]
    children = _children(client, run)
    assert sorted(children) == sorted([names.FETCH_MODEL, names.LOG_TRANSFORMERS,
                                       names.LOG_ONNX_PYFUNC, names.EVALUATE, names.REGISTER])
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert not [r for r in client.search_runs([run.info.experiment_id], max_results=store.PAGE)
                if r.data.tags.get(names.TAG_ERROR)]

    # The logged-model API answered 404, so both log steps took the save + log_artifacts path.
    assert ws.counters.logged_models_404 >= 2
    for key in ("transformers_model_uri", "onnx_model_uri"):
        assert tags[names.TAG_PREFIX + key].startswith("runs:/")
    # Every artifact went through the run-history API into Azurite.
    onnx_run = tags[names.TAG_PREFIX + "onnx_run_id"]
    assert any(p.endswith("MLmodel") for p in ws.artifact_paths(onnx_run))
    assert "produced.json" in ws.artifact_paths(main_job.run_id)

    # The alias endpoints refused: the champion is the version's tag, served by version.
    registered = Registration.read(children[names.REGISTER])
    assert registered.alias == "champion" and registered.alias_by_tag
    assert registered.serve_uri == f"models:/{names.DEFAULT_REGISTERED_MODEL}/{registered.version}"
    assert "the alias API refused it" in registered.reason
    assert tags[names.TAG_PREFIX + "serve_uri"] == registered.serve_uri
    version = client.get_model_version(names.DEFAULT_REGISTERED_MODEL, registered.version)
    assert version.source.startswith(_workspace_artifacts(ws))
    assert version.tags[names.TAG_ALIAS_PREFIX + "champion"] == registry.HOLDS
    answer = predict_in_fresh_process(registered.serve_uri, QUESTION, env=ws.client_env())
    assert "Madrid" in answer["choices"][0]["message"]["content"]

    # Each upload got azureml-mlflow's batch timeout sized for it (the fixture: the 300 s floor).
    assert f"{azureml_store.ARTIFACTS_TIMEOUT}=300 for this upload" in main_job.log
    # The job outlived its first token (100 s): it was refreshed, only ever for the job's run.
    assert main_job.refreshes > 0 and ws.counters.refused_refreshes == []
    assert ws.counters.unauthorized == [], ws.counters.unauthorized[:5]


def test_evaluate_without_traces_scores_the_same_rows_the_same_way(user_side, main_job):
    """No trace API: the same scorers on the same rows, a per-row table and `<scorer>/mean`
    metrics on each model's evaluation run, and the decision says which mode ran and why; the
    fixture's answers score as they do on a local store with traces
    (tests/steps/test_genai_evaluation.py)."""
    client = mlflow.MlflowClient()
    evaluate_run = _children(client, client.get_run(main_job.run_id))[names.EVALUATE]
    decision = Decision.read(evaluate_run)
    assert decision.scoring == evaluation.WITHOUT_TRACES
    assert "no usable trace API" in decision.scoring_reason and "403" in decision.scoring_reason
    rows = eval_rows()
    for name in MODELS:
        child = client.get_run(decision.eval_runs[name])
        assert child.info.status == "FINISHED"
        for scorer, expected in ((QUALITY.name, 1.0), (EXACT.name, 0.0),
                                 (AGREEMENT.name, 1.0)):
            assert child.data.metrics[f"{scorer}/mean"] == expected, (name, scorer)
            assert decision.metrics[name][scorer] == expected
        table = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id, artifact_path=names.EVAL_RESULTS)).read_text())
        frame = dict(zip(table["columns"], zip(*table["data"])))
        assert list(frame["expected"]) == [r["expected"] for r in rows]
        assert all(frame[f"{QUALITY.name}/value"])
        assert all(frame[f"{AGREEMENT.name}/rationale"])
    assert all(v.passed for v in decision.verdicts.values())
    assert decision.chosen == min(MODELS, key=lambda m: decision.metrics[m]["latency_p95_s"])
    assert names.EVAL_TABLE in [a.path for a in client.list_artifacts(evaluate_run.info.run_id)]


def test_main_as_a_job_called_nothing_the_workspace_refuses_but_the_store_probes(main_job):
    """The only refused calls are the store adapter's probes, each made once by the step that
    needed it: the trace API (evaluate), tag filters in a version search and the alias API
    (register), and the logged-model API (each log step: an empty 404, counted apart). No trace
    call succeeded, and no refused call came after a probe."""
    assert Counter(r.feature for r in main_job.refusals) == {
        "traces": 1, "tag filter in a registry search": 1, "aliases (404)": 1}, main_job.refusals
    traces = [r for r in main_job.refusals if r.feature == "traces"]
    # MLflow's client tries /api/3.0 first, /api/2.0 only after a 404
    assert [r.path for r in traces] == ["/api/3.0/mlflow/traces/search"]
    assert [r.path for r in main_job.refusals if r.feature.startswith("aliases")] == [
        "/api/2.0/mlflow/registered-models/alias"]
    assert not [r for r in main_job.requests if "/traces" in r[1] and r[2] == 200]
    assert len([r for r in main_job.requests if "/logged-models" in r[1]]) == 2


def test_no_secret_reaches_a_param_tag_or_the_log_of_the_job(user_side, main_job):
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_run(main_job.run_id).info.experiment_id],
                              max_results=store.PAGE)
    recorded = [*main_job.log.splitlines(), *(v for r in runs for v in
                                              [*r.data.params.values(), *r.data.tags.values()])]
    assert not [line for line in recorded if SECRET.search(line)]


def test_bytes_each_step_of_the_job_uploads(user_side, main_job, capsys):
    """What each step stores in the workspace's blob storage (the closing note scales it)."""
    client = mlflow.MlflowClient()
    children = _children(client, client.get_run(main_job.run_id))
    uploaded = {step: user_side.artifact_bytes(run.info.run_id)
                for step, run in children.items()}
    for step, run in children.items():
        if step == names.EVALUATE:
            decision = Decision.read(run)
            uploaded[step] += sum(user_side.artifact_bytes(r) for r in decision.eval_runs.values())
    with capsys.disabled():
        print("\nbytes uploaded per step (fixture):", json.dumps(uploaded))
    # Every step stored something; only the two log steps store a model.
    assert all(uploaded.values())
    fetch_files = user_side.artifact_paths(children[names.FETCH_MODEL].info.run_id)
    assert any(p.startswith(f"{names.ONNX_DIR}/") for p in fetch_files)


@pytest.mark.parametrize("variables", [("MLFLOW_EXPERIMENT_NAME",), ("MLFLOW_EXPERIMENT_ID",)],
                         ids=["name-only", "id-only"])
def test_experiment_variable_variants_on_the_job_service_stand_in(user_side, tmp_path,
                                                                  monkeypatch, variables):
    """Azure may set either experiment variable (or both, as in the main test): all work.
    The user's own upload timeout (backend-config `extra_env`) reaches the job and is kept."""
    jobs = _jobs(user_side, tmp_path, monkeypatch, experiment_variables=variables)
    config = {**CONFIG, "extra_env": {azureml_store.ARTIFACTS_TIMEOUT: "900"}}
    submitted = _submit(names.FETCH_MODEL, FIXTURE_PARAMS, config)
    record = jobs.jobs[submitted.run_id]
    log = record["log"].read_text()
    assert record["status"] == "Completed", log[-4000:]
    assert record["env"][azureml_store.ARTIFACTS_TIMEOUT] == "900"
    assert "for this upload" not in log and "uploading checkpoint/" in log
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
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                "tags.phi3flow.azureml.job_status = 'Failed'",
                                max_results=store.PAGE)
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


ALIAS_ANSWERS = ["serve", "404", "403", "azure-error", "timeout"]


@pytest.mark.parametrize("answer", ALIAS_ANSWERS)
def test_register_keeps_the_champion_whatever_the_alias_endpoints_answer(
        user_side, monkeypatch, answer):
    """Served, an empty 404, a 403, Azure's error body, no answer in time: the champion is
    recorded (alias or version tag), read back, moved, and never lost to an error."""
    user_side.alias_answer = answer
    if answer in ("azure-error", "timeout"):  # MLflow retries a 5xx for minutes by default
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if answer == "timeout":  # the client gives up long before the stand-in answers
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        user_side.alias_hang_s = 4
    client = mlflow.MlflowClient()
    name = f"alias-probe-{answer}"
    client.create_registered_model(name)
    v1, v2 = (client.create_model_version(name, f"azureml://experiments/e/runs/r{i}/artifacts/m")
              for i in (1, 2))
    assert registry.current_holder(client, name, "champion").version is None
    refused = registry.set_alias(client, name, "champion", v1.version)
    assert bool(refused) is (answer != "serve")
    holder = registry.current_holder(client, name, "champion")
    assert holder.version.version == v1.version
    assert bool(holder.alias_api_error) is (answer != "serve")
    registry.set_alias(client, name, "champion", v2.version)
    assert registry.current_holder(client, name, "champion").version.version == v2.version
    assert registry.current_holder(client, name, "challenger").version is None
    assert registry.aliases_of(client, name, client.get_model_version(name, v1.version)) == []
    assert registry.aliases_of(client, name, client.get_model_version(name, v2.version)) == [
        "champion"]
    registered = registry.registration(name, v2.version, "champion", "test", reused=False,
                                       by_tag=bool(refused), alias_api_error=refused)
    expected = f"models:/{name}@champion" if answer == "serve" else f"models:/{name}/{v2.version}"
    assert registered.serve_uri == expected
    # models:/NAME/VERSION resolves to that version's source.
    assert client.get_model_version_download_uri(name, v2.version).endswith("/r2/artifacts/m")


def test_an_unanswered_alias_with_an_unreadable_registry_stops_register(user_side):
    """Neither the alias API nor the version search answers: register does not guess."""
    client = mlflow.MlflowClient()
    name = "alias-probe-unreadable"
    client.create_registered_model(name)
    user_side.alias_answer, user_side.mode = "azure-error", "403"
    with pytest.raises(StepError, match="cannot tell which version of alias-probe-unreadable "
                                        "holds @champion"):
        registry.current_holder(client, name, "champion")


# Each feature the workspace stand-in refuses, as a call through MLflow's own client, and the
# refusal's feature name: the stand-in must refuse it (so it cannot quietly become lenient),
# and main as a job must not have called it (but for the store adapter's probes).
REFUSED = {
    "traces": lambda c, e: c.search_traces(locations=[e], max_results=1),
    "the MLflow endpoint logged-models/search": None,  # an empty 404, asserted below
    "filter on attributes": lambda c, e: c.search_runs([e], "attributes.status = 'FINISHED'",
                                                       max_results=10),
    "LIKE/ILIKE": lambda c, e: c.search_runs([e], "tags.phi3flow.step LIKE 'fetch%'",
                                             max_results=10),
    "OR": lambda c, e: c.search_runs([e], "tags.a = 'x' OR tags.b = 'y'", max_results=10),
    "!= on tags": lambda c, e: c.search_runs([e], "tags.phi3flow.step != 'main'",
                                             max_results=10),
    "order by metrics, params or tags": lambda c, e: c.search_runs(
        [e], "", order_by=["tags.phi3flow.step DESC"], max_results=10),
    "escaped identifiers": lambda c, e: c.search_runs(
        [e], "tags.`phi3flow.step` = 'main'", max_results=10),
    # MLflow's own prompt filter, added to every registered-model search (issue 42155)
    "tag filter in a registry search": lambda c, e: c.search_registered_models(max_results=1),
    # MLflow's own metric-history page of 25,000 (issue 10694)
    "max_results of 1000 or more": lambda c, e: c.get_metric_history(
        c.search_runs([e], max_results=1)[0].info.run_id, "anything"),
    "aliases (404)": lambda c, e: c.get_model_version_by_alias("any", "champion"),
    "the MLflow endpoint registered-models/set-tag": lambda c, e: c.set_registered_model_tag(
        _registered(c, "refusal-probe"), "k", "v"),
}
# The store adapter's probes, each made once by the step that needs it.
PROBED = {"traces": 1, "tag filter in a registry search": 1, "aliases (404)": 1}


def _registered(client, name: str) -> str:
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    return name


@pytest.mark.parametrize("feature", [f for f, call in REFUSED.items() if call])
def test_the_workspace_stand_in_refuses_and_main_does_not_call(user_side, main_job, feature):
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(main_job.run_id).info.experiment_id
    before = len(user_side.counters.refusals)
    with pytest.raises(mlflow.exceptions.MlflowException) as refused:
        REFUSED[feature](client, experiment_id)
    assert [r.feature for r in user_side.counters.refusals[before:]][-1:] == [feature]
    if feature.startswith(("filter", "LIKE", "OR", "!=", "order", "escaped")):
        assert feature in str(refused.value)  # a 400 naming what is not supported
    if feature == "tag filter in a registry search":  # issue 42155's answer
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
        assert "Currently unsupported filter string format" in str(refused.value)
        assert "tag.`mlflow.prompt.is_prompt` != 'true'" in str(refused.value)
    if feature.startswith("max_results"):  # issue 10694's answer
        assert "MaxResults = 25000 is invalid" in str(refused.value)
    if feature == "traces":
        assert "403" in str(refused.value)
    made = [r for r in main_job.refusals if r.feature == feature]
    assert len(made) == PROBED.get(feature, 0), made


@pytest.mark.parametrize("search", ["runs", "versions"])
def test_the_workspace_stand_in_refuses_mlflows_default_pages(user_side, main_job, search):
    """MLflow asks for 10,000 runs a page in `mlflow.search_runs` and 10,000 model versions in
    `search_model_versions`: refused (issue 10694's limit); the project's pages are answered."""
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(main_job.run_id).info.experiment_id
    name = names.DEFAULT_REGISTERED_MODEL
    with pytest.raises(mlflow.exceptions.MlflowException, match="MaxResults must be less than"):
        if search == "runs":
            mlflow.search_runs([experiment_id], output_format="list")
        else:
            client.search_model_versions(f"name = '{name}'")
    if search == "runs":
        found = store.current().runs_tagged(experiment_id, names.TAG_STEP, names.REGISTER)
    else:
        found = store.current().versions(name)
    assert found
    assert not [r for r in main_job.refusals if r.feature == "max_results of 1000 or more"]


def test_a_run_token_writes_only_to_its_jobs_runs_in_the_workspace_stand_in(user_side, main_job):
    """A job's run token is checked on every write: its job's run and the runs under it, yes;
    another run, or a run in another experiment, no (403). main as a job made no such write."""
    import requests

    ws = user_side
    client = mlflow.MlflowClient()
    job = client.get_run(main_job.run_id)
    step = _children(client, job)[names.FETCH_MODEL]
    elsewhere = client.create_run(job.info.experiment_id)  # the user's, not the job's
    token = ws.run_token(main_job.run_id, job.info.experiment_id)
    base = f"https://{ws.host}/mlflow/v2.0{SCOPE}/api/2.0/mlflow"

    def set_tag(run_id: str) -> int:
        return requests.post(f"{base}/runs/set-tag", json={"run_id": run_id, "key": "probe",
                                                           "value": "x"},
                             headers={"Authorization": f"Bearer {token}"},
                             verify=str(ws.bundle), timeout=60).status_code

    assert (set_tag(main_job.run_id), set_tag(step.info.run_id)) == (200, 200)
    assert set_tag(elsewhere.info.run_id) == 403
    other = client.create_experiment("another-experiment")
    created = requests.post(f"{base}/runs/create", json={"experiment_id": other},
                            headers={"Authorization": f"Bearer {token}"},
                            verify=str(ws.bundle), timeout=60)
    assert created.status_code == 403
    assert ws.refused("a run token beyond its run")[-2:] and not [
        r for r in main_job.refusals if r.feature == "a run token beyond its run"]


def test_the_workspace_stand_in_keeps_the_tags_azure_sets_on_a_jobs_run(user_side, main_job):
    client = mlflow.MlflowClient()
    with pytest.raises(mlflow.exceptions.MlflowException, match="mlflow.user are set by Azure"):
        client.set_tag(main_job.run_id, "mlflow.user", "someone else")
    client.set_tag(main_job.run_id, "mlflow.user", STANDIN_USER)  # the same value: a no-op
    assert client.get_run(main_job.run_id).data.tags["mlflow.user"] == STANDIN_USER
    assert not [r for r in main_job.refusals if r.feature.startswith("changing a system tag")]


def test_the_workspace_stand_in_answers_logged_models_with_an_empty_404(user_side):
    client = mlflow.MlflowClient()
    with pytest.raises(mlflow.exceptions.MlflowException) as refused:
        client.search_logged_models(experiment_ids=["0"])
    assert "404" in str(refused.value)


def _runs_in_workspace() -> int:
    client = mlflow.MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, max_results=store.PAGE))


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
    from tests.helpers import free_port

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
from phi3flow.core import store
from phi3flow.core import tracking

initial = os.environ["MLFLOW_TRACKING_TOKEN"]
with tracking.step_run("probe") as run:  # the step's nested run, from MLFLOW_RUN_ID
    time.sleep(float(sys.argv[1]))  # longer than the job's first token lives
    fresh = store.child_environment()
    stale = {{**fresh, "MLFLOW_TRACKING_TOKEN": initial}}
    ok = subprocess.run([sys.executable, "-c", {CHILD!r}], env=fresh, timeout=240).returncode
    bad = subprocess.run([sys.executable, "-c", {CHILD!r}], env=stale, capture_output=True,
                         timeout=240).returncode
    print(f"RESULT {{ok}} {{bad}} {{fresh['MLFLOW_TRACKING_TOKEN'] != initial}} "
          f"{{run.info.run_id}}")
"""


@pytest.mark.parametrize("scope", ["job", "descendants"])
def test_a_step_outlives_the_jobs_first_token_whatever_runs_a_refresh_may_name(
        ws, tmp_path, monkeypatch, scope):
    """Against the workspace stand-in, whose run tokens expire after 45 s (and refreshes too),
    refreshing for the job's run only, or for the runs nested under it as well.

    A step's own run is nested under the job's, but its process refreshes the token under the
    job's run, so it works either way; a child started later from the environment's copy of the
    token is refused, one started from `store.child_environment()` is not.
    """
    monkeypatch.setattr(ws, "run_token_seconds", 45)
    monkeypatch.setattr(ws, "token_scope", scope)
    experiment = ws.experiment("Default")
    job = ws.backend("POST", "/api/2.0/mlflow/runs/create",
                     {"experiment_id": experiment["experiment_id"]})["run"]["info"]
    step = ws.backend("POST", "/api/2.0/mlflow/runs/create", {
        "experiment_id": experiment["experiment_id"],
        "tags": [{"key": "mlflow.parentRunId", "value": job["run_id"]}]})["run"]["info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IDENTITY_"))}
    env.update(ws.tls_env())
    env.update({"MLFLOW_TRACKING_URI": ws.tracking_uri, "MLFLOW_RUN_ID": step["run_id"],
                "AZUREML_RUN_ID": job["run_id"], "MLFLOW_EXPERIMENT_ID": job["experiment_id"],
                "MLFLOW_TRACKING_TOKEN": ws.run_token(job["run_id"], job["experiment_id"]),
                "PYTHONPATH": str(ROOT)})
    refused = len(ws.counters.refused_refreshes)
    # Generous: on a loaded machine each Python start with mlflow and azureml-mlflow takes
    # tens of seconds (a CI run with other work beside it needed more than 300 s).
    done = subprocess.run([sys.executable, "-c", LONG_STEP, "50"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    result = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), done.stderr)
    assert result == f"RESULT 0 1 True {step['run_id']}", done.stderr[-3000:]
    assert ws.counters.refused_refreshes[refused:] == []
    assert ws.backend("GET", f"/api/2.0/mlflow/runs/get?run_id={step['run_id']}")["run"][
        "info"]["status"] == "FINISHED"


def test_a_blob_error_quoting_its_sas_url_is_redacted_everywhere(user_side, tmp_path,
                                                                 monkeypatch):
    """Every upload fails with an error that quotes its SAS URL: the step fails, and neither
    the run's error tag, nor the job's log, nor the user's `mlflow run` log holds the signature."""
    user_side.artifact_fault = True
    jobs = _jobs(user_side, tmp_path, monkeypatch)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mlflow.projects.azureml_v2")
    logger.addHandler(handler)
    try:
        with pytest.raises(mlflow.exceptions.ExecutionException):
            _submit(names.FETCH_MODEL, FIXTURE_PARAMS)
    finally:
        logger.removeHandler(handler)
    (name,) = jobs.jobs
    log = jobs.jobs[name]["log"].read_text()
    error = mlflow.MlflowClient().get_run(name).data.tags[names.TAG_ERROR]
    assert "AuthorizationFailure" in error and "sig=[REDACTED]" in error
    assert "sig=[REDACTED]" in log and "RequestUrl: https://127.0.0.1" in log
    lines = [*log.splitlines(), error, *(r.getMessage() for r in records)]
    assert not [line for line in lines if SECRET.search(line)]


def test_a_git_url_job_needs_neither_git_nor_credentials_in_the_job(
        user_side, tmp_path, monkeypatch, git_server):
    """A project from a git URL: the job runs the checkout made on the user's side, in an image
    without git (as Azure ML's base image), and its run carries MLflow's git tags."""
    url, _, work = git_server
    commit = git("rev-parse", "HEAD", cwd=work)
    jobs = _jobs(user_side, tmp_path, monkeypatch, image_has_git=False)
    submitted = _submit(names.FETCH_MODEL, FIXTURE_PARAMS, project=url, version=commit)
    record = jobs.jobs[submitted.run_id]
    assert record["status"] == "Completed", record["log"].read_text()[-4000:]
    assert "--source-commit " + commit in jobs.submitted[0].command
    tags = mlflow.MlflowClient().get_run(submitted.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["mlflow.source.git.repoURL"] == tags["mlflow.source.name"] == url
    workdir = record["workdir"]
    assert (workdir / "MLproject").is_file() and not (workdir / ".git").exists()

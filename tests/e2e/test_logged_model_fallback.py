"""The quickstart's `main` against a tracking server that refuses what an Azure ML workspace
refuses (`tests/refusing_proxy.py`: a real `mlflow server` behind a proxy stand-in).

No logged-model API (an empty 404), no registry search with a tag clause or `!=` (issue 42155's
400, which MLflow's own prompt filter gets), no escaped keys in run searches, no page of 1,000 or
more, no trace API, no aliases: `main` must complete and register a champion that answers, and
the store adapter's probes must be the only refused calls. The URI is a plain `http://` one, so
nothing can be decided from its name.
"""

from __future__ import annotations

import re
from collections import Counter

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.registry import register as registry
from phi3flow.registry.register import Registration
from tests.helpers import FIXTURE, QUESTION, predict_in_fresh_process, run_project
from tests.refusing_proxy import refusing_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def refusing(tmp_path, monkeypatch):
    with refusing_server(tmp_path) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
        yield proxy


def test_quickstart_main_completes_against_a_refusing_server_stand_in(refusing, tmp_path):
    """`mlflow run . -P model_id=tests/fixtures/tiny-phi3 -P onnx_source=build`, as the README's
    quickstart, tracking into the refusing server stand-in."""
    done = run_project("-P", f"model_id={FIXTURE}", "-P", "onnx_source=build", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]
    (main_id,) = re.findall(r"=== Run \(ID '([0-9a-f]{32})'\) succeeded ===", done.stderr)

    # The probes, each once in the process that needed it, are the only refused calls: the
    # logged-model API by each log step, tag filters by register (which then lists versions by
    # name), the trace API by evaluate, the alias API by register.
    assert Counter(name for name, _ in refusing.refused) == {
        "logged-models": 2, "registry-tag-filters": 1, "traces": 1, "aliases": 1}, \
        refusing.refused

    client = mlflow.MlflowClient()
    main_run = client.get_run(main_id)
    assert main_run.info.status == "FINISHED"
    tags = main_run.data.tags
    for key in ("transformers_model_uri", "onnx_model_uri"):
        assert tags[names.TAG_PREFIX + key].startswith("runs:/")
    children = client.search_runs([main_run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{main_id}'", max_results=100)
    assert all(c.info.status == "FINISHED" and not c.data.tags.get(names.TAG_ERROR)
               for c in children)
    register_run = next(c for c in children if c.data.tags[names.TAG_STEP] == names.REGISTER)
    registered = Registration.read(register_run)
    # No alias API: the champion is the version's tag, served by version.
    assert registered.alias == "champion" and registered.alias_by_tag
    assert registered.serve_uri == f"models:/{names.DEFAULT_REGISTERED_MODEL}/{registered.version}"
    version = client.get_model_version(names.DEFAULT_REGISTERED_MODEL, registered.version)
    assert version.tags[names.TAG_ALIAS_PREFIX + "champion"] == registry.HOLDS
    answer = predict_in_fresh_process(registered.serve_uri, QUESTION,
                                      env={"MLFLOW_TRACKING_URI": refusing.uri})
    assert "Madrid" in answer["choices"][0]["message"]["content"]

    # Run again: every step is reused (run searches by one unescaped tag, in pages), and the
    # evaluate run already registered is found among the versions listed by name.
    again = run_project("-P", f"model_id={FIXTURE}", "-P", "onnx_source=build", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-6000:]
    assert "reused steps               fetch_model, log_transformers, log_onnx_pyfunc, " \
           "evaluate, register" in again.stdout + again.stderr
    assert not [name for name, _ in refusing.refused if name in ("escaped-keys", "max-results")]
    assert mlflow.MlflowClient().get_run(main_id).info.status == "FINISHED"

"""The store adapter's probes (`phi3flow/core/store.py`), each capability both ways, each probed once.

"Yes" comes from a plain `mlflow server` (and a local sqlite store: tests/unit/test_store.py);
"no" from the same server
behind the refusing proxy stand-in (`tests/refusing_proxy.py`), which answers as an Azure ML
workspace does, under a plain `http://` URI.
"""

from __future__ import annotations

from collections import Counter

import mlflow
import pytest

from phi3flow.core import names, store
from phi3flow.core.errors import StepError
from tests.refusing_proxy import ALL, refusing_server
from tests.unit.test_store import CAPABILITIES, ask_each

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    with refusing_server(tmp_path_factory.mktemp("refusing")) as handler:
        yield handler


@pytest.fixture
def refusing(proxy, monkeypatch):
    """The refusing server stand-in, refusing everything it can; reset after the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    proxy.refusing, proxy.refused[:] = frozenset(ALL), []
    yield proxy
    proxy.refusing = frozenset(ALL)


def test_a_plain_mlflow_server_has_every_capability(refusing):
    refusing.refusing = frozenset()
    experiment = mlflow.MlflowClient().create_experiment("plain")
    assert ask_each(experiment) == dict.fromkeys(CAPABILITIES, True)
    assert refusing.refused == []


def test_the_refusing_server_stand_in_is_learned_from_its_answers_once_each(refusing):
    experiment = mlflow.MlflowClient().create_experiment("refused")
    assert ask_each(experiment) == {
        "traces": False, "logged_models": False, "registry": True,
        "registry_tag_filters": False, "aliases": False, "escaped_keys": False}
    # Asked twice, refused once each: the answer is kept for the process.
    assert Counter(name for name, _ in refusing.refused) == {
        "traces": 1, "logged-models": 1, "registry-tag-filters": 1, "aliases": 1,
        "escaped-keys": 1}
    why = store.current().registry_tag_filters("probed")
    assert why.error_code == "INVALID_PARAMETER_VALUE" and "unsupported filter" in why.how


def test_searches_page_and_filter_where_the_store_will_not(refusing, monkeypatch):
    """Runs by one unescaped tag and versions by name, in pages of `store.PAGE` (2 here), the
    tag checked here where the registry refuses tag clauses: the same answers as a plain
    server gives, and nothing refused but the probe."""
    monkeypatch.setattr(store, "PAGE", 2)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("pages")
    made = {client.create_run(experiment, tags={names.TAG_STEP: "x"}).info.run_id
            for _ in range(5)}
    client.create_run(experiment, tags={names.TAG_STEP: "y"})
    client.create_registered_model("paged")
    for i in range(5):
        client.create_model_version("paged", f"runs:/r{i}/m", tags={"k": "yes" if i % 2 else "no"})
    for refusing.refusing in (frozenset(ALL), frozenset()):
        store.forget()
        current = store.current()
        assert {r.info.run_id for r in current.runs_tagged(experiment, names.TAG_STEP, "x")} == made
        assert sorted(v.version for v in current.versions("paged")) == ["1", "2", "3", "4", "5"]
        assert sorted(v.version for v in current.versions("paged", ("k", "yes"))) == ["2", "4"]
        assert current.versions("never-registered") == []
    assert [name for name, _ in refusing.refused] == ["registry-tag-filters"]


def test_a_key_that_needs_backticks_is_refused_by_name_where_the_store_takes_none(refusing):
    experiment = mlflow.MlflowClient().create_experiment("escaped")
    with pytest.raises(ValueError, match="needs backticks, which this store does not search "
                                         r"\(a run search with an escaped tag key answered"):
        store.current().runs_tagged(experiment, "key with spaces", "v")


def test_a_server_without_a_registry_gets_the_servers_fix(refusing):
    refusing.refusing = frozenset({"registry"})
    with pytest.raises(StepError, match="has no usable model registry .*404.*: the server has no "
                                        "Model Registry API: point MLFLOW_REGISTRY_URI"):
        store.require_registry("any")

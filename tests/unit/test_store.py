"""The store adapter (`phi3flow/core/store.py`) on a local sqlite store: every capability there, each
probed once per process. The other answers, from servers: tests/e2e/test_store.py."""

from __future__ import annotations

import mlflow
import pytest

from phi3flow.core import store

CAPABILITIES = ("traces", "logged_models", "registry", "registry_tag_filters", "aliases",
                "escaped_keys")


def ask_each(experiment_id: str) -> dict[str, bool]:
    """Each capability of the current store, asked twice (the answers must not change)."""
    current = store.current()
    asks = {"traces": lambda: current.traces(experiment_id),
            "logged_models": lambda: current.logged_models(experiment_id),
            "registry": lambda: current.registry("probed"),
            "registry_tag_filters": lambda: current.registry_tag_filters("probed"),
            "aliases": lambda: current.aliases("probed", "champion"),
            "escaped_keys": lambda: current.escaped_keys(experiment_id)}
    first = {name: bool(ask()) for name, ask in asks.items()}
    second = {name: bool(ask()) for name, ask in asks.items()}
    assert first == second
    return first


def test_a_local_sqlite_store_has_every_capability_each_probed_once(tracking):
    experiment = mlflow.MlflowClient().create_experiment("probes")
    assert ask_each(experiment) == dict.fromkeys(CAPABILITIES, True)
    assert store.current().probes == list(CAPABILITIES)


def test_a_file_registry_is_no_registry_and_the_fix_is_a_database(tracking, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"file://{tmp_path / 'no-registry'}")
    found = store.current().registry("any")
    assert not found and found.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(store.StepError, match="has no usable model registry .*: use a "
                                              "database-backed store"):
        store.require_registry("any")


def test_keys_are_searched_unescaped_and_backticks_never(tracking):
    experiment = mlflow.MlflowClient().create_experiment("keys")
    run = mlflow.MlflowClient().create_run(experiment, tags={"phi3flow.step": "x"})
    found = store.current().runs_tagged(experiment, "phi3flow.step", "x")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    assert store.current().probes == []  # a bare key needs no probe
    with pytest.raises(ValueError, match="backticks cannot be searched for"):
        store.current().runs_tagged(experiment, "a`b", "x")
    with pytest.raises(ValueError, match="quotes cannot be searched for"):
        store.current().runs_tagged(experiment, "phi3flow.step", "it's")

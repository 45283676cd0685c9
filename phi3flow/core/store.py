"""What the tracking store in use can do: the one place every step asks.

MLflow's client looks the same whatever store is behind it, but stores answer different parts of
its API: a local sqlite store answers all of it, a tracking server may lack MLflow 3's endpoints,
and an Azure ML workspace answers a documented subset (docs/decisions.md, "One store adapter").
Each capability below is learned once per process and store, the first time a step asks:

| capability | how it is learned |
|---|---|
| `traces` | probe: one trace search in the experiment |
| `logged_models` | probe: one logged-model search in the experiment |
| `registry` | probe: `get_registered_model` of the model being registered |
| `registry_tag_filters` | probe: a search of its versions by name and a tag nobody sets |
| `aliases` | probe: `get_model_version_by_alias` for it |
| `escaped_keys` | probe (only if a tag key needs backticks): a run search with one |
| `PAGE` | fact: an Azure ML workspace answers "MaxResults must be less than 1000" |

A probe counts as answered when the call returns, or when the store answers in MLflow's own
error shape that the thing asked for does not exist (`RESOURCE_DOES_NOT_EXIST`). Anything else (a
refusal, an empty 404, a 403, a timeout) means the store does not offer the capability, and the
answer keeps the store's reply so the user is told why. Only error codes and statuses are read:
never an error's words, never the URI's scheme. A store is what it answers, whatever it is called.

Behaviour that belongs to Azure ML's own client (run tokens, upload timeouts, where its artifacts
live) is in `phi3flow/core/azureml_store.py`; the steps reach it through the functions here.

MLflow adds a filter of its own to every registered-model search (``tag.`mlflow.prompt.is_prompt`
!= 'true'``, on every registry but Databricks'), which a workspace refuses (Azure/azure-sdk-for-
python issue 42155). So nothing in this project calls `search_registered_models`: a registry is
checked with `get_registered_model`, and its versions are listed by name (`versions`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3flow.core import azureml_store, names, redact
from phi3flow.core.errors import StepError

logger = logging.getLogger(__name__)

# The largest page a search asks for. An Azure ML workspace refused MLflow's metric-history page
# with "MaxResults = 25000 is invalid: MaxResults must be less than 1000" (mlflow/mlflow issue
# 10694); MLflow's own defaults ask for 1,000 runs, 10,000 model versions and 25,000 metric
# values. 500 is under the limit whether or not 1,000 itself is allowed.
PAGE = 500
# The most runs one tag search reads (in pages): a host's step runs pile up over a long time.
MAX_TAGGED_RUNS = 10_000
# A tag nobody sets: the tag-filter probes search for it and find nothing. The registry probes
# read the model the step works on (a name the user's registry accepts: Unity Catalog, for one,
# wants three-part names).
PROBE_TAG = names.TAG_PREFIX + "probe"
# A tag key that every store's search parses without backticks (MLflow's grammar takes dotted
# identifiers; a workspace documents only unescaped keys, e.g. `tags.mlflow.parentRunId`).
_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class Capability:
    """One answer of the store, and how it was learned (shown in logs and errors)."""

    available: bool
    how: str
    error_code: str = ""  # the store's MLflow error code, when it refused

    def __bool__(self) -> bool:
        return self.available


# MLflow's own answers that a thing asked for does not exist: a registered model (or version),
# and an alias of a registered model (sqlalchemy store: "Registered model alias ... not found").
_NOT_THERE = ("RESOURCE_DOES_NOT_EXIST",)
_NO_ALIAS = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _answered(call: Callable[[], object], what: str, *, missing_counts: bool = True,
              missing_codes: tuple[str, ...] = _NOT_THERE) -> Capability:
    """Run a probe: available if it returns (or, with `missing_counts`, if the store says in
    MLflow's own error shape that the probed thing does not exist)."""
    try:
        call()
    except MlflowException as exc:
        if missing_counts and exc.error_code in missing_codes:
            return Capability(True, f"{what} answered: nothing there")
        return Capability(False, f"{what} answered {redact.error_text(exc, 300)}",
                          exc.error_code)
    return Capability(True, f"{what} answered")


@dataclass
class Store:
    """The capabilities of one tracking store (and its registry), each probed at most once."""

    tracking_uri: str
    registry_uri: str
    probes: list[str] = field(default_factory=list)  # the capabilities probed, in order
    _known: dict[str, Capability] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.tracking_uri, self.registry_uri)

    def _learn(self, name: str, probe: Callable[[], Capability]) -> Capability:
        with self._lock:
            if name not in self._known:
                self.probes.append(name)
                answer = self._known[name] = probe()
                logger.info("tracking store %s: %s %s (%s)", self.tracking_uri, name,
                            "available" if answer else "not available", answer.how)
            return self._known[name]

    # -- the capabilities ----------------------------------------------------------------------
    def traces(self, experiment_id: str) -> Capability:
        """Whether the store keeps traces (evaluate scores without them where it does not)."""
        return self._learn("traces", lambda: _answered(
            lambda: self.client.search_traces(locations=[experiment_id], max_results=1,
                                              include_spans=False),
            "a trace search", missing_counts=False))

    def logged_models(self, experiment_id: str) -> Capability:
        """Whether MLflow 3's logged-model API is there (the log steps save the model as run
        artifacts where it is not)."""
        return self._learn("logged_models", lambda: _answered(
            lambda: self.client.search_logged_models(experiment_ids=[experiment_id],
                                                     max_results=1),
            "a logged-model search", missing_counts=False))

    def registry(self, name: str) -> Capability:
        """Whether there is a model registry (asked with the registered model `name`)."""
        return self._learn("registry", lambda: _answered(
            lambda: self.client.get_registered_model(name), f"get_registered_model({name!r})"))

    def registry_tag_filters(self, name: str) -> Capability:
        """Whether model-version searches take a tag clause beside the name."""
        return self._learn("registry_tag_filters", lambda: _answered(
            lambda: self.client.search_model_versions(
                f"name = '{name}' and tag.{PROBE_TAG} = 'x'", max_results=1),
            "a model-version search by name and tag"))

    def aliases(self, name: str, alias: str) -> Capability:
        """Whether the registry's alias API answers (aliases are version tags where not)."""
        return self._learn("aliases", lambda: _answered(
            lambda: self.client.get_model_version_by_alias(name, alias),
            f"get_model_version_by_alias({name!r}, {alias!r})", missing_codes=_NO_ALIAS))

    def escaped_keys(self, experiment_id: str) -> Capability:
        """Whether run searches take backtick-escaped tag keys (a workspace documents none)."""
        return self._learn("escaped_keys", lambda: _answered(
            lambda: self.client.search_runs([experiment_id], f"tags.`{PROBE_TAG}` = 'x'",
                                            max_results=1),
            "a run search with an escaped tag key", missing_counts=False))

    # -- searches every store answers ----------------------------------------------------------
    def _tag_key(self, key: str, experiment_id: str) -> str:
        if _BARE_KEY.fullmatch(key):
            return key
        if "`" in key:
            raise ValueError(f"tag key {key!r}: backticks cannot be searched for")
        escaped = self.escaped_keys(experiment_id)
        if not escaped:
            raise ValueError(f"tag key {key!r} needs backticks, which this store does not "
                             f"search ({escaped.how})")
        return f"`{key}`"

    def runs_tagged(self, experiment_id: str, key: str, value: str) -> list[Run]:
        """The runs of an experiment whose tag `key` is `value`, in no particular order: one tag
        compared with `=`, the run search every store answers (status and order are checked by
        the caller: a workspace filters on neither)."""
        if "'" in value:
            raise ValueError(f"tag {key}={value!r}: quotes cannot be searched for")
        query = f"tags.{self._tag_key(key, experiment_id)} = '{value}'"
        return list(_pages(lambda token: self.client.search_runs(
            [experiment_id], query, max_results=PAGE, page_token=token), MAX_TAGGED_RUNS))

    def versions(self, name: str, tag: tuple[str, str] | None = None) -> list[ModelVersion]:
        """The versions of registered model `name` (with tag `tag[0]` = `tag[1]`, if given);
        none if it is not registered. Searched by name, in pages; the tag goes into the search
        where the registry takes tag clauses, else it is checked here."""
        if "'" in name or (tag and "'" in tag[1]):
            raise ValueError(f"{name!r}, {tag!r}: quotes cannot be searched for")
        query = f"name = '{name}'"
        filter_here = tag is not None
        if tag and _BARE_KEY.fullmatch(tag[0]) and self.registry_tag_filters(name):
            query += f" and tag.{tag[0]} = '{tag[1]}'"
            filter_here = False
        try:
            found = list(_pages(lambda token: self.client.search_model_versions(
                query, max_results=PAGE, page_token=token)))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        if filter_here:
            found = [v for v in found if v.tags.get(tag[0]) == tag[1]]
        return found

    # -- artifacts -----------------------------------------------------------------------------
    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """`mlflow.log_artifacts` into the active run, with the upload timeout sized for the
        folder where the run's artifacts go to an Azure ML workspace."""
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        logger.info("uploading %s/: %d files, %.1f MB", artifact_path, len(files), size / 1e6)
        with azureml_store.upload_timeout(mlflow.active_run().info.artifact_uri, size):
            mlflow.log_artifacts(str(folder), artifact_path)

    def artifacts_are_uploaded(self, artifact_uri: str | None = None) -> bool:
        """Whether every artifact byte of a run (by default the active one) is uploaded to a
        workspace's storage, which bills and times it: fetch_model then leaves hub files out."""
        uri = artifact_uri or mlflow.active_run().info.artifact_uri
        return azureml_store.is_workspace_artifact_uri(uri)


def _pages(search: Callable[[str | None], list], limit: int | None = None) -> Iterator:
    """Every item of a paged MLflow search, following its page tokens (up to `limit`)."""
    token, count = None, 0
    while True:
        page = search(token)
        for item in page:
            yield item
            count += 1
            if limit is not None and count >= limit:
                return
        token = getattr(page, "token", None)
        if not token:
            return


_stores: dict[tuple[str, str], Store] = {}
_stores_lock = threading.Lock()


def current() -> Store:
    """The store MLflow tracks to now (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI), with what
    this process has learned of it."""
    key = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Store(*key)
        return _stores[key]


def forget() -> None:
    """Forget what was learned (tests change what a stand-in answers within one process)."""
    with _stores_lock:
        _stores.clear()


def require_registry(name: str) -> None:
    """A StepError naming the fix when the store has no usable model registry (asked with the
    registered model `name`)."""
    store = current()
    found = store.registry(name)
    if found:
        return
    if found.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
        fix = ("it refused this identity: sign in again, or ask the registry's owner for a role "
               "that can read and register models")
    elif found.error_code in ("ENDPOINT_NOT_FOUND", "NOT_FOUND"):
        fix = ("the server has no Model Registry API: point MLFLOW_REGISTRY_URI (or "
               "MLFLOW_TRACKING_URI) at a tracking server or database that has one")
    else:
        fix = ("use a database-backed store (the default sqlite:///mlflow.db, or "
               "MLFLOW_TRACKING_URI=sqlite:///path/mlflow.db) or a tracking server")
    raise StepError(f"the tracking store {store.tracking_uri} has no usable model registry "
                    f"({found.how}): {fix}.")


# What the steps need of the Azure ML client, through this adapter.
refresh_token = azureml_store.refresh_token
child_environment = azureml_store.child_environment
job_run_for_tokens = azureml_store.job_run_for_tokens

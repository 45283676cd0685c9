"""register's work: publish evaluate's chosen model under a stable name, with its lineage.

Champion/challenger with aliases (registry stages are deprecated): the chosen model takes the
alias (default `champion`) only if it passed evaluate's gate and beats the current holder on the
same eval set (same sha256): higher quality, or equal quality and lower p95 latency. Otherwise it
is registered as `challenger`, and the reason is written down. Registering the same evaluate run
twice returns the version made the first time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3flow.core import model_uris, names, redact, store
from phi3flow.core.errors import StepError
from phi3flow.core.record import Record, record
from phi3flow.evaluation import metrics
from phi3flow.evaluation.decision import GATED_ON, Decision
from phi3flow.evaluation.metrics import Metric
from phi3flow.registry.config import CHALLENGER, RegisterConfig

logger = logging.getLogger(__name__)

# The chosen model's metrics that its version carries as tags and in its description: the
# gate's, and what a user compares versions by.
KEY_METRICS: tuple[Metric, ...] = (*GATED_ON, metrics.EXACT, metrics.OUTPUT_TOKENS_PER_S,
                                   metrics.PEAK_RSS_MB)


@record
class Registration(Record):
    """What register did: `registration.json`, read back by main."""

    ARTIFACT = names.REGISTRATION
    PRODUCER = names.REGISTER

    model_name: str
    version: str
    alias: str  # "" when a re-registered version holds no alias any more
    reason: str
    reused: bool  # this evaluate run was registered before: nothing was done
    alias_by_tag: bool  # the alias API did not answer: the alias is a tag (see set_alias)
    model_uri: str  # models:/NAME/VERSION
    serve_uri: str  # models:/NAME@ALIAS, or models:/NAME/VERSION where the alias is a tag
    # What the alias API answered instead, when it could not be used ("" when it was)
    alias_api_error: str = ""


def registration(model_name: str, version: str, alias: str, reason: str, reused: bool,
                 by_tag: bool = False, alias_api_error: str = "") -> Registration:
    where = f"@{alias}" if alias and not by_tag else f"/{version}"
    return Registration(model_name, str(version), alias, reason, reused, by_tag,
                        f"models:/{model_name}/{version}", f"models:/{model_name}{where}",
                        alias_api_error)


def _existing_version(name: str, evaluate_run_id: str) -> ModelVersion | None:
    try:
        found = store.current().versions(name, (names.TAG_EVALUATE_RUN_ID, evaluate_run_id))
    except MlflowException:
        return None
    return found[0] if found else None


# Where the registry's alias API does not answer (nothing documents whether an Azure ML
# workspace has it; `store.aliases` probes it), the alias is kept as a tag of the model version
# holding it (`phi3flow.alias.champion = true`; serve it as models:/NAME/VERSION): version tags
# are among the registry operations Azure ML documents, registered-model tags are not
# (docs/decisions.md). Whatever the alias endpoints answer instead (an empty 404, a 403, an
# Azure-shaped error body, a timeout), it is never read as "no champion": the tags are read
# instead, and if that fails too, register stops.
HOLDS, MOVED = "true", "moved"  # a version's alias tag: holds the alias, or held it once


def alias_missing(exc: MlflowException) -> bool:
    """The alias API answered that this alias (or the model) does not exist: MLflow's stores say
    INVALID_PARAMETER_VALUE (no such alias) or RESOURCE_DOES_NOT_EXIST (no such model)."""
    return exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


@dataclass(frozen=True)
class Holder:
    """Who holds an alias, and how that was found out."""

    version: ModelVersion | None
    alias_api_error: str = ""  # why the alias API could not be used ("": it answered)


def _tagged_holders(name: str, alias: str) -> list[ModelVersion]:
    """The versions whose tag says they hold `alias`, newest first (one, unless a register was
    stopped between tagging the new holder and untagging the old)."""
    return sorted(store.current().versions(name, (names.TAG_ALIAS_PREFIX + alias, HOLDS)),
                  key=lambda v: int(v.version), reverse=True)


def current_holder(client, name: str, alias: str) -> Holder:
    """The version holding `alias`: from the alias API where the store has one, else (or if it
    has none yet) from the version tags."""
    aliases = store.current().aliases(name, alias)
    api_error = "" if aliases else aliases.how
    if aliases:
        try:
            return Holder(client.get_model_version_by_alias(name, alias))
        except MlflowException as exc:
            if not alias_missing(exc):
                api_error = redact.error_text(exc, 300)
    if api_error:
        logger.warning("the registry's alias API did not answer for %s@%s (%s): reading the "
                       "version tags %s%s instead", name, alias, api_error,
                       names.TAG_ALIAS_PREFIX, alias)
    # No alias, or no usable alias API: an earlier register may have kept it as a tag.
    try:
        tagged = _tagged_holders(name, alias)
    except MlflowException as exc:
        raise StepError(
            f"cannot tell which version of {name} holds @{alias}: the alias API answered "
            f"{api_error or 'no alias'} and searching its versions failed with "
            f"{redact.error_text(exc, 300)}. Nothing was registered; re-run register when the "
            "registry answers.") from None
    return Holder(tagged[0] if tagged else None, api_error)


def aliases_of(client, name: str, version: ModelVersion) -> list[str]:
    if version.aliases:
        return list(version.aliases)
    return [k[len(names.TAG_ALIAS_PREFIX):] for k, v in version.tags.items()
            if k.startswith(names.TAG_ALIAS_PREFIX) and v == HOLDS]


def set_alias(client, name: str, alias: str, version: str) -> str:
    """Give `alias` to `version`. Returns "" if the alias API did it; otherwise why it could
    not, and the alias is then the version's tag (read back by `current_holder`)."""
    tag = names.TAG_ALIAS_PREFIX + alias
    aliases = store.current().aliases(name, alias)
    error = "" if aliases else aliases.how
    if aliases:
        try:
            client.set_registered_model_alias(name, alias, version)
        except MlflowException as exc:
            error = redact.error_text(exc, 300)
    if error:
        logger.warning("the registry's alias API refused @%s (%s): it is recorded as the tag "
                       "%s=%s of %s version %s; serve models:/%s/%s", alias, error, tag, HOLDS,
                       name, version, name, version)
        client.set_model_version_tag(name, str(version), tag, HOLDS)
    # Earlier holders by tag give it up (also after the API worked, so no tag outlives the alias).
    for held in _tagged_holders(name, alias):
        if held.version != str(version):
            client.set_model_version_tag(name, held.version, tag, MOVED)
    return error


def _beats(candidate: dict[str, float], holder: ModelVersion) -> tuple[bool, str]:
    """Better on the gate's first metric where the two differ (GATED_ON: quality, then p95
    latency), in the gate's direction for it."""
    for metric in GATED_ON:
        ours = candidate[metric.name]
        theirs = float(holder.tags[names.TAG_METRIC_PREFIX + metric.name])
        if ours != theirs or metric == GATED_ON[-1]:
            better = ours > theirs if metric.higher_is_better else ours < theirs
            same = "".join(f"equal {m.label}; " for m in GATED_ON[:GATED_ON.index(metric)])
            unit = metric.unit
            return better, (f"{same}{metric.label} {ours:.3f}{unit} vs {theirs:.3f}{unit} of "
                            f"version {holder.version}")
    raise AssertionError("GATED_ON is empty")


def decide_alias(cfg: RegisterConfig, decision: Decision,
                 holder: ModelVersion | None) -> tuple[str, str]:
    chosen = decision.chosen
    measured = decision.metrics[chosen]
    if cfg.allow_unvalidated:
        return cfg.alias, "allow_unvalidated=true: alias given without the gate (recorded)"
    if not decision.chosen_passed:
        reasons = "; ".join(decision.verdicts[chosen].reasons)
        return CHALLENGER, f"the {chosen} model failed the gate: {reasons}"
    if holder is None:
        return cfg.alias, f"passed the gate; no current {cfg.alias}"
    if holder.tags.get(names.TAG_EVAL_DATA_SHA256) != decision.eval_data_sha256:
        return CHALLENGER, (
            f"the current {cfg.alias} (version {holder.version}) was evaluated on other eval data "
            f"(sha256 {holder.tags.get(names.TAG_EVAL_DATA_SHA256)}), so the two cannot be "
            "compared: evaluate on the same data, or pass allow_unvalidated=true."
        )
    better, why = _beats(measured, holder)
    if better:
        return cfg.alias, f"passed the gate and beats the current {cfg.alias}: {why}"
    return CHALLENGER, f"passed the gate but does not beat the current {cfg.alias}: {why}"


def lineage_tags(cfg: RegisterConfig, decision: Decision, evaluate_run) -> dict[str, str]:
    chosen = decision.chosen
    log_run = mlflow.get_run(decision.models[chosen].run_id)
    tags = log_run.data.tags
    git_commit = (evaluate_run.data.tags.get(names.MLFLOW_GIT_COMMIT_TAG)
                  or tags.get(names.MLFLOW_GIT_COMMIT_TAG) or _main_commit(evaluate_run)
                  or "unknown")
    lineage = {
        names.TAG_EVALUATE_RUN_ID: cfg.evaluate_run_id,
        names.TAG_LOG_RUN_ID: log_run.info.run_id,
        names.TAG_FETCH_RUN_ID: tags.get(names.TAG_FETCH_RUN_ID, ""),
        names.TAG_MODEL_ID: tags.get(names.TAG_MODEL_ID, ""),
        names.TAG_REVISION: tags.get(names.TAG_REVISION, ""),
        names.TAG_MANIFEST_SHA256: tags.get(names.TAG_MANIFEST_SHA256, ""),
        names.TAG_ONNX_PRECISION: tags.get(names.TAG_ONNX_PRECISION, "n/a (transformers)"),
        names.TAG_CHOSEN: chosen,
        names.TAG_EVAL_DATA_SHA256: decision.eval_data_sha256,
        names.TAG_GIT_COMMIT: git_commit,
    }
    measured = decision.metrics[chosen]
    lineage.update({names.TAG_METRIC_PREFIX + m.name: repr(float(measured[m.name]))
                    for m in KEY_METRICS})
    return lineage


def _main_commit(run) -> str | None:
    """The commit on the main run above `run`: an Azure ML job runs a git project from an
    uploaded copy (no .git), and only the job's run carries the commit it was made from."""
    parent = run.data.tags.get("mlflow.parentRunId")
    return mlflow.get_run(parent).data.tags.get(names.MLFLOW_GIT_COMMIT_TAG) if parent else None


def _register_model(client, model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
    """A new version of `name` from a models:/m-... or runs:/<run>/<path> URI.

    A runs:/ URI (the log steps' fallback where the store has no logged-model API) is registered
    from the run's artifact URI, still linked to the run: `mlflow.register_model` would list the
    run's artifacts and then ask the logged-model API, which such a store answers with 404
    (docs/decisions.md, "Models and the registry in a workspace").
    """
    if not model_uri.startswith("runs:/"):
        return mlflow.register_model(model_uri, name, tags=tags)
    run_id = model_uri[len("runs:/"):].partition("/")[0]
    source = model_uris.model_location(model_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source, run_id=run_id, tags=tags)


def register(cfg: RegisterConfig, decision: Decision, evaluate_run) -> Registration:
    client = mlflow.MlflowClient()
    store.require_registry(cfg.model_name)
    existing = _existing_version(cfg.model_name, cfg.evaluate_run_id)
    if existing is not None:
        existing = client.get_model_version(cfg.model_name, existing.version)  # with aliases
        aliases = aliases_of(client, cfg.model_name, existing)
        alias = aliases[0] if aliases else ""
        logger.info("evaluate run %s is already registered as %s version %s (@%s): nothing to do",
                    cfg.evaluate_run_id, cfg.model_name, existing.version, alias or "none")
        return registration(cfg.model_name, existing.version, alias,
                            "already registered by an earlier register run", reused=True,
                            by_tag=bool(alias) and not existing.aliases)

    holder = current_holder(client, cfg.model_name, cfg.alias)
    alias, reason = decide_alias(cfg, decision, holder.version)
    tags = lineage_tags(cfg, decision, evaluate_run)
    if alias == cfg.alias and cfg.allow_unvalidated:
        tags[names.TAG_UNVALIDATED] = "true"
    chosen = decision.chosen
    version = _register_model(client, decision.models[chosen].model_uri, cfg.model_name, tags)
    description = (
        f"{chosen} model of {tags[names.TAG_MODEL_ID]}@{tags[names.TAG_REVISION]} "
        f"(manifest sha256 {tags[names.TAG_MANIFEST_SHA256][:12]}), logged by run "
        f"{tags[names.TAG_LOG_RUN_ID]}, evaluated by run {cfg.evaluate_run_id}: "
        + ", ".join(f"{m.name} {float(decision.metrics[chosen][m.name]):.4g}"
                    for m in KEY_METRICS)
        + f". Alias {alias}: {reason}."
    )
    client.update_model_version(cfg.model_name, version.version, description=description)
    refused = set_alias(client, cfg.model_name, alias, version.version)
    api_error = refused or holder.alias_api_error
    if refused:
        reason += (f" (the alias API refused it: {refused}; the alias is the tag "
                   f"{names.TAG_ALIAS_PREFIX}{alias}={HOLDS} of version {version.version})")
    elif holder.alias_api_error:
        reason += (f" (the current {cfg.alias} was read from the version tags "
                   f"{names.TAG_ALIAS_PREFIX}{cfg.alias}: the alias API answered "
                   f"{holder.alias_api_error})")
    logger.info("registered %s version %s as @%s: %s", cfg.model_name, version.version, alias,
                reason)
    return registration(cfg.model_name, version.version, alias, reason, reused=False,
                        by_tag=bool(refused), alias_api_error=api_error)

"""register's work: publish evaluate's chosen model under a stable name, with its lineage.

Champion/challenger with aliases (registry stages are deprecated): the chosen model takes the
alias (default `champion`) only if it passed evaluate's gate and beats the current holder on the
same eval set (same sha256): higher quality, or equal quality and lower p95 latency. Otherwise it
is registered as `challenger`, and the reason is written down. Registering the same evaluate run
twice returns the version made the first time.
"""

from __future__ import annotations

import logging

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3flow import names
from phi3flow.config import CHALLENGER, RegisterConfig
from phi3flow.decision import Decision
from phi3flow.errors import StepError
from phi3flow.record import Record, record

logger = logging.getLogger(__name__)

KEY_METRICS = ("quality_contains", "quality_exact", "latency_p95_s", "output_tokens_per_s",
               "peak_rss_mb")


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
    alias_by_tag: bool  # the registry has no alias API: the alias is a tag (see set_alias)
    model_uri: str  # models:/NAME/VERSION
    serve_uri: str  # models:/NAME@ALIAS, or models:/NAME/VERSION where the alias is a tag


def registration(model_name: str, version: str, alias: str, reason: str, reused: bool,
                 by_tag: bool = False) -> Registration:
    where = f"@{alias}" if alias and not by_tag else f"/{version}"
    return Registration(model_name, str(version), alias, reason, reused, by_tag,
                        f"models:/{model_name}/{version}", f"models:/{model_name}{where}")


def check_registry(client: mlflow.MlflowClient) -> None:
    try:
        client.search_registered_models(max_results=1)
    except Exception as exc:
        raise StepError(
            f"the tracking store {mlflow.get_tracking_uri()} has no usable model registry "
            f"({type(exc).__name__}: {str(exc)[:200]}). Use a database-backed store (the default "
            "sqlite:///mlflow.db, or MLFLOW_TRACKING_URI=sqlite:///path/mlflow.db) or a tracking "
            "server."
        ) from None


def _existing_version(client, name: str, evaluate_run_id: str) -> ModelVersion | None:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(names.TAG_EVALUATE_RUN_ID) == evaluate_run_id:
            return version
    return None


# Where a registry has no alias API, the alias is kept as a tag of the registered model, whose
# value is the version holding it (`phi3flow.alias.champion = 3`); serve it as models:/NAME/3.
def _no_alias_api(exc: MlflowException) -> bool:
    """The registry lacks the alias endpoints (an empty 404), as opposed to a missing alias."""
    return exc.error_code in ("ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED", "FEATURE_DISABLED")


def _holder(client, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not _no_alias_api(exc):
            return None
    try:
        version = client.get_registered_model(name).tags.get(names.TAG_ALIAS_PREFIX + alias)
    except MlflowException:
        return None
    return client.get_model_version(name, version) if version else None


def _aliases_of(client, name: str, version: ModelVersion) -> list[str]:
    if version.aliases:
        return list(version.aliases)
    tags = client.get_registered_model(name).tags
    return [k[len(names.TAG_ALIAS_PREFIX):] for k, v in tags.items()
            if k.startswith(names.TAG_ALIAS_PREFIX) and v == str(version.version)]


def set_alias(client, name: str, alias: str, version: str) -> bool:
    """Give `alias` to `version`; True if by MLflow alias, False if by tag (no alias API)."""
    try:
        client.set_registered_model_alias(name, alias, version)
        return True
    except MlflowException as exc:
        if not _no_alias_api(exc):
            raise
    logger.warning("the registry has no alias API: %s is recorded as the tag %s%s=%s of %s; "
                   "use models:/%s/%s", alias, names.TAG_ALIAS_PREFIX, alias, version, name, name,
                   version)
    client.set_registered_model_tag(name, names.TAG_ALIAS_PREFIX + alias, str(version))
    return False


def _beats(candidate: dict[str, float], holder: ModelVersion) -> tuple[bool, str]:
    theirs = {k: float(holder.tags[names.TAG_METRIC_PREFIX + k])
              for k in ("quality_contains", "latency_p95_s")}
    if candidate["quality_contains"] != theirs["quality_contains"]:
        better = candidate["quality_contains"] > theirs["quality_contains"]
        return better, (f"quality {candidate['quality_contains']:.3f} vs "
                        f"{theirs['quality_contains']:.3f} of version {holder.version}")
    better = candidate["latency_p95_s"] < theirs["latency_p95_s"]
    return better, (f"equal quality; p95 latency {candidate['latency_p95_s']:.3f} s vs "
                    f"{theirs['latency_p95_s']:.3f} s of version {holder.version}")


def decide_alias(cfg: RegisterConfig, decision: Decision,
                 holder: ModelVersion | None) -> tuple[str, str]:
    chosen = decision.chosen
    metrics = decision.metrics[chosen]
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
    better, why = _beats(metrics, holder)
    if better:
        return cfg.alias, f"passed the gate and beats the current {cfg.alias}: {why}"
    return CHALLENGER, f"passed the gate but does not beat the current {cfg.alias}: {why}"


def lineage_tags(cfg: RegisterConfig, decision: Decision, evaluate_run) -> dict[str, str]:
    chosen = decision.chosen
    log_run = mlflow.get_run(decision.models[chosen].run_id)
    tags = log_run.data.tags
    git_commit = (evaluate_run.data.tags.get(names.MLFLOW_GIT_COMMIT_TAG)
                  or tags.get(names.MLFLOW_GIT_COMMIT_TAG) or "unknown")
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
        "git_commit": git_commit,
    }
    lineage.update({names.TAG_METRIC_PREFIX + k: repr(float(decision.metrics[chosen][k]))
                    for k in KEY_METRICS})
    return lineage


def _register_model(client, model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
    """A new version of `name` from a models:/m-... or runs:/<run>/<path> URI.

    A runs:/ URI (the log steps' fallback where the store has no logged-model API) is registered
    from the run's artifact URI, still linked to the run: `mlflow.register_model` would list the
    run's artifacts and then ask the logged-model API, which azureml-mlflow's listing sends to
    the run's root and the Azure ML workspace answers with 404 (docs/decisions.md).
    """
    if not model_uri.startswith("runs:/"):
        return mlflow.register_model(model_uri, name, tags=tags)
    run_id, _, path = model_uri[len("runs:/"):].partition("/")
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{path}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source, run_id=run_id, tags=tags)


def register(cfg: RegisterConfig, decision: Decision, evaluate_run) -> Registration:
    client = mlflow.MlflowClient()
    check_registry(client)
    existing = _existing_version(client, cfg.model_name, cfg.evaluate_run_id)
    if existing is not None:
        existing = client.get_model_version(cfg.model_name, existing.version)  # with aliases
        aliases = _aliases_of(client, cfg.model_name, existing)
        alias = aliases[0] if aliases else ""
        logger.info("evaluate run %s is already registered as %s version %s (@%s): nothing to do",
                    cfg.evaluate_run_id, cfg.model_name, existing.version, alias or "none")
        return registration(cfg.model_name, existing.version, alias,
                            "already registered by an earlier register run", reused=True,
                            by_tag=bool(alias) and not existing.aliases)

    holder = _holder(client, cfg.model_name, cfg.alias)
    alias, reason = decide_alias(cfg, decision, holder)
    tags = lineage_tags(cfg, decision, evaluate_run)
    if alias == cfg.alias and cfg.allow_unvalidated:
        tags[names.TAG_UNVALIDATED] = "true"
    chosen = decision.chosen
    version = _register_model(client, decision.models[chosen].model_uri, cfg.model_name, tags)
    description = (
        f"{chosen} model of {tags[names.TAG_MODEL_ID]}@{tags[names.TAG_REVISION]} "
        f"(manifest sha256 {tags[names.TAG_MANIFEST_SHA256][:12]}), logged by run "
        f"{tags[names.TAG_LOG_RUN_ID]}, evaluated by run {cfg.evaluate_run_id}: "
        + ", ".join(f"{k} {float(decision.metrics[chosen][k]):.4g}" for k in KEY_METRICS)
        + f". Alias {alias}: {reason}."
    )
    client.update_model_version(cfg.model_name, version.version, description=description)
    by_alias = set_alias(client, cfg.model_name, alias, version.version)
    logger.info("registered %s version %s as @%s: %s", cfg.model_name, version.version, alias,
                reason)
    return registration(cfg.model_name, version.version, alias, reason, reused=False,
                        by_tag=not by_alias)

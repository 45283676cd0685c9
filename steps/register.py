"""register: put evaluate's chosen model in the Model Registry, as champion or challenger.

Inputs: `evaluate_run_id` (a FINISHED evaluate run), `model_name`, `alias` (default champion),
`allow_unvalidated`.
Outputs: a model version of `model_name` with lineage tags (fetch, log and evaluate run IDs,
model id, revision, manifest sha256, ONNX precision, git commit, key metrics) and a description;
the alias (`champion`) or `challenger`; `registration.json` and tags on this run saying which and
why. Idempotent: the same evaluate run registered twice makes one version.
"""

from __future__ import annotations

import mlflow

from phi3flow.core import names, store, tracking
from phi3flow.core.config import parse_config
from phi3flow.evaluation.decision import Decision
from phi3flow.registry import register as registry
from phi3flow.registry.config import RegisterConfig
from phi3flow.registry.register import Registration


def main(argv: list[str] | None = None) -> Registration:
    with tracking.step_run(names.REGISTER):
        cfg = parse_config(RegisterConfig, argv)
        tracking.log_config(cfg)
        store.require_registry(cfg.model_name)
        evaluate_run = tracking.upstream_run("evaluate_run_id", cfg.evaluate_run_id,
                                             names.EVALUATE)
        registered = registry.register(cfg, Decision.read(evaluate_run), evaluate_run)
        registered.log()
        mlflow.set_tags({names.TAG_REGISTERED_VERSION: registered.version,
                         names.TAG_ALIAS: registered.alias,
                         names.TAG_EVALUATE_RUN_ID: cfg.evaluate_run_id})
        return registered


if __name__ == "__main__":
    tracking.run_cli(names.REGISTER, main)

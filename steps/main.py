"""main: fetch_model -> log_transformers -> log_onnx_pyfunc -> evaluate -> register, by run IDs.

Inputs: every parameter of the steps it runs (see MLproject), plus `force`.
Outputs: one child run per step (or a reused finished one), tagged with this run as parent;
tags on this run naming each step's run ID and which were reused; a summary in the log with the
run IDs, the model URI and how to look at them.
Reuse: a step is re-run when its parameters, its upstream run, the project's code (uncommitted
changes too) or a local input folder changed; `force=true` re-runs everything. The stages are
declared in phi3flow/pipeline/stages.py, the reuse policy in phi3flow/pipeline/reuse.py.
"""

from __future__ import annotations

import logging

import mlflow

from phi3flow.core import names, stale, tracking
from phi3flow.core.config import parse_config
from phi3flow.core.model_uris import logged_model_uri
from phi3flow.pipeline.config import MainConfig
from phi3flow.pipeline.stages import Produced, StepRunner, run_pipeline, summary
from phi3flow.registry.register import Registration

logger = logging.getLogger("steps.main")


def main(argv: list[str] | None = None) -> Produced:
    with tracking.step_run(names.MAIN) as run:
        cfg = parse_config(MainConfig, argv)
        tracking.log_config(cfg)
        stale.mark_stale_runs(run.info.experiment_id)  # runs of killed earlier attempts
        commit = mlflow.get_run(run.info.run_id).data.tags.get(names.MLFLOW_GIT_COMMIT_TAG)
        steps = StepRunner(experiment_id=run.info.experiment_id, force=cfg.force,
                           git_commit=commit)
        run_ids = run_pipeline(cfg, steps)
        registered = Registration.read(mlflow.get_run(run_ids["register_run_id"]))
        produced = Produced(
            **run_ids,
            transformers_model_uri=logged_model_uri(run_ids["transformers_run_id"]),
            onnx_model_uri=logged_model_uri(run_ids["onnx_run_id"]),
            registered_model_uri=registered.model_uri,
            registered_alias=registered.alias or "none",
            alias_reason=registered.reason,
            serve_uri=registered.serve_uri,
        )
        mlflow.set_tags({names.TAG_PREFIX + k: v for k, v in produced.to_dict().items()})
        mlflow.set_tag(names.TAG_REUSED, ",".join(steps.reused) or "none")
        produced.log()
        logger.info(summary(run.info.run_id, run.info.experiment_id, produced, steps.reused))
        return produced


if __name__ == "__main__":
    tracking.run_cli(names.MAIN, main)

"""main: fetch_model -> log_transformers -> log_onnx_pyfunc -> evaluate -> register, by run IDs.

Inputs: every parameter of the steps it runs (see MLproject), plus `force`.
Outputs: one child run per step (or a reused finished one), tagged with this run as parent;
tags on this run naming each step's run ID and which were reused; a summary in the log with the
run IDs, the model URI and how to look at them.
Reuse: a step is re-run when its parameters, its upstream run, the project's code (uncommitted
changes too) or a local input folder changed; `force=true` re-runs everything. See
phi3flow/reuse.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from phi3flow import config, names, tracking
from phi3flow.config import COMMIT_PATTERN, MainConfig, parse_config
from phi3flow.pipeline import StepRunner
from phi3flow.tracking import logged_model_uri

logger = logging.getLogger("steps.main")


def main(argv: list[str] | None = None) -> dict[str, str]:
    with tracking.step_run(names.MAIN) as run:
        cfg = parse_config(MainConfig, argv)
        tracking.log_config(cfg)
        tracking.mark_stale_runs(run.info.experiment_id)  # runs of killed earlier attempts
        commit = mlflow.get_run(run.info.run_id).data.tags.get("mlflow.source.git.commit")
        steps = StepRunner(experiment_id=run.info.experiment_id, force=cfg.force,
                           git_commit=commit)

        fetch_cfg = cfg.fetch_model_config()
        fetch_run_id = steps.run(
            names.FETCH_MODEL,
            config.parameters(fetch_cfg),
            inputs=[Path(p) for p in (cfg.model_id, cfg.onnx_source) if Path(p).is_dir()],
            reusable=_pinned(fetch_cfg),
        )
        log_run_id = steps.run(
            names.LOG_TRANSFORMERS,
            config.parameters(cfg.log_transformers_config(fetch_run_id)),
        )
        onnx_run_id = steps.run(
            names.LOG_ONNX_PYFUNC,
            config.parameters(cfg.log_onnx_pyfunc_config(fetch_run_id)),
        )
        evaluate_run_id = steps.run(
            names.EVALUATE,
            config.parameters(cfg.evaluate_config(log_run_id, onnx_run_id)),
            inputs=[cfg.eval_data_path],
        )
        register_run_id = steps.run(
            names.REGISTER, config.parameters(cfg.register_config(evaluate_run_id))
        )
        registration = mlflow.artifacts.load_dict(
            f"{mlflow.get_run(register_run_id).info.artifact_uri}/registration.json")
        produced = {
            "fetch_model_run_id": fetch_run_id,
            "log_transformers_run_id": log_run_id,
            "log_onnx_pyfunc_run_id": onnx_run_id,
            "evaluate_run_id": evaluate_run_id,
            "register_run_id": register_run_id,
            "transformers_model_uri": logged_model_uri(log_run_id),
            "onnx_model_uri": logged_model_uri(onnx_run_id),
            "registered_model_uri": registration["model_uri"],
            "registered_alias": registration["alias"] or "none",
            "alias_reason": registration["reason"],
            "serve_uri": registration["serve_uri"],
        }
        mlflow.set_tags({names.TAG_PREFIX + k: v for k, v in produced.items()})
        mlflow.set_tag(names.TAG_REUSED, ",".join(steps.reused) or "none")
        mlflow.log_dict(produced, "produced.json")
        _summarise(run.info.run_id, run.info.experiment_id, produced, steps.reused)
        return produced


def _pinned(cfg: config.FetchModelConfig) -> bool:
    """Hub inputs named by a branch can move under us: only pinned commits are reusable."""
    model_pinned = cfg.is_local_model or bool(COMMIT_PATTERN.match(cfg.revision))
    onnx_pinned = cfg.onnx_source != "hub" or bool(COMMIT_PATTERN.match(cfg.onnx_revision))
    return model_pinned and onnx_pinned


def _summarise(run_id: str, experiment_id: str, produced: dict[str, str], reused: list[str]):
    lines = [f"main run {run_id} (experiment {experiment_id}) finished:"]
    lines += [f"  {key:<26} {value}" for key, value in produced.items()]
    lines.append(f"  {'reused steps':<26} {', '.join(reused) or 'none'}")
    lines.append("Look at it with:")
    lines.append(f"  mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")
    lines.append(f"  mlflow models serve -m {produced['serve_uri']} --env-manager local -p 5000")
    lines.append(
        "  curl -s localhost:5000/invocations -H 'Content-Type: application/json' -d "
        "'{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of "
        "Spain?\"}]}'"
    )
    logger.info("\n".join(lines))


if __name__ == "__main__":
    tracking.run_cli(names.MAIN, main)

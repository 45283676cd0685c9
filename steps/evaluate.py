"""evaluate: run both logged models on the same rows, measure them, gate them, decide.

Inputs: `transformers_run_id` (log_transformers) and `onnx_run_id` (log_onnx_pyfunc), both
FINISHED and made from the same fetch run; `eval_data` (JSONL of messages + expected);
`max_new_tokens`; thresholds `min_quality`, `max_quality_drop`, `max_p95_latency_s`; an
optional LLM judge `judge_model_uri`.
Outputs: metrics `<model>_<metric>` and `agreement` on this run, and each model's metrics on its
logged model (so `mlflow.search_logged_models` can rank them); artifacts `eval_table.json`
(per row), `comparison.png`, `decision.json` (thresholds, verdicts with reasons, the chosen
model); tags: eval data sha256, chosen model.
Each model is evaluated in a fresh process, so load time and peak memory are its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from phi3flow import evaluation, manifest, model_uris, names, tracking
from phi3flow.config import EvaluateConfig, parse_config
from phi3flow.decision import Decision, ModelRef, decide
from phi3flow.errors import StepError


def main(argv: list[str] | None = None) -> Decision:
    with tracking.step_run(names.EVALUATE):
        cfg = parse_config(EvaluateConfig, argv)
        tracking.log_config(cfg)
        rows = evaluation.load_eval_data(cfg.eval_data_path)
        runs = {
            "transformers": tracking.upstream_run(
                "transformers_run_id", cfg.transformers_run_id, names.LOG_TRANSFORMERS),
            "onnx": tracking.upstream_run("onnx_run_id", cfg.onnx_run_id, names.LOG_ONNX_PYFUNC),
        }
        fetches = {name: run.data.tags.get(names.TAG_FETCH_RUN_ID) for name, run in runs.items()}
        if len(set(fetches.values())) != 1:
            raise StepError(f"the two models come from different fetch runs {fetches}: compare "
                            "models of one checkpoint (log both from the same fetch_run_id).")
        uris = {name: model_uris.logged_model_uri(run.info.run_id) for name, run in runs.items()}
        eval_data_sha256 = manifest.sha256_file(cfg.eval_data_path)
        mlflow.set_tags({names.TAG_EVAL_DATA_SHA256: eval_data_sha256,
                         names.TAG_FETCH_RUN_ID: fetches["onnx"]})

        results = {name: evaluation.evaluate_in_fresh_process(uri, rows, cfg.max_new_tokens)
                   for name, uri in uris.items()}
        metrics = {}
        for name, uri in uris.items():
            stored = Path(mlflow.artifacts.download_artifacts(model_uris.model_location(uri)))
            metrics[name] = evaluation.model_metrics(rows, results[name],
                                                     evaluation.folder_size_mb(stored))
        grades = (evaluation.judge_answers(cfg.judge_model_uri, rows, results)
                  if cfg.judge_model_uri else {})
        for name, graded in grades.items():
            metrics[name]["judge_correct"] = sum(graded) / len(graded)
        agree = evaluation.agreement(results["transformers"], results["onnx"])
        for name, uri in uris.items():  # on each logged model too, so they can be ranked
            if uri.startswith("models:/m-"):  # (a runs:/ fallback model has no such record)
                mlflow.log_metrics(metrics[name], model_id=uri.split("/")[-1])
        mlflow.log_metrics({f"{name}_{key}": value for name, values in metrics.items()
                            for key, value in values.items()} | {"agreement": agree})

        mlflow.log_table(evaluation.eval_table(rows, results, grades), names.EVAL_TABLE)

        models = {name: ModelRef(uris[name], runs[name].info.run_id) for name in uris}
        decided = decide(metrics, cfg.thresholds(), models, agree, str(cfg.eval_data_path),
                         eval_data_sha256)
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / names.EVAL_CHART
            passed = ", ".join(f"{v.model} {'passed' if v.passed else 'failed'}"
                               for v in decided.verdicts.values())
            evaluation.chart(metrics, agree, f"gate: {passed}; chosen: {decided.chosen}", chart)
            mlflow.log_artifact(str(chart))
        decided.log()
        mlflow.set_tag(names.TAG_CHOSEN, decided.chosen)
        return decided


if __name__ == "__main__":
    tracking.run_cli(names.EVALUATE, main)

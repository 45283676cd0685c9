"""evaluate: run both logged models on the same rows, measure them, score them with MLflow's
GenAI evaluation, gate them, decide.

Inputs: `transformers_run_id` (log_transformers) and `onnx_run_id` (log_onnx_pyfunc), both
FINISHED and made from the same fetch run; `eval_data` (a JSONL file, an MLflow evaluation
dataset's name or ID, or `auto`: the set that fits the checkpoint's size); `max_new_tokens`;
thresholds `min_quality`, `max_quality_drop`, `max_p95_latency_s`; an optional LLM judge
`judge_model_uri`.
Outputs: one child run per model (`evaluate/<model>`), an MLflow GenAI evaluation run: a trace
per answer with its assessments (quality_contains, quality_exact, agreement, judge_correct) and
the model's metrics, linked to its logged model (on a store without a trace API, probed once:
the same scorers' per-row table `eval_results.json` and `<scorer>/mean` metrics); on this run, metrics `<model>_<metric>` (and per
category `<model>_quality_contains_<category>`) and `agreement`; artifacts `eval_table.json` (per
row), `comparison.png`, `decision.json` (thresholds, verdicts with reasons, the chosen model, the
metrics gated on); tags: the eval set read and its sha256, the chosen model.
Each model answers in a fresh process, so load time and peak memory are its own.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Run

from phi3flow import (
    eval_data,
    evaluation,
    manifest,
    model_uris,
    names,
    redact,
    scorers,
    stale,
    tracking,
)
from phi3flow.config import EvaluateConfig, parse_config
from phi3flow.decision import MODELS, Decision, ModelRef, decide, first_token_lengths
from phi3flow.errors import StepError

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> Decision:
    with tracking.step_run(names.EVALUATE) as active:
        cfg = parse_config(EvaluateConfig, argv)
        tracking.log_config(cfg)
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
        # Everything that can be wrong with the inputs is found before a model is loaded.
        judge = scorers.load_judge(cfg.judge_model_uri) if cfg.judge_model_uri else None
        rows, read, eval_data_sha256 = eval_data.load(resolve_eval_data(cfg, fetches["onnx"]))
        logger.info("eval set: %d rows of %s (%s)", len(rows), read, ", ".join(
            f"{c} {sum(r['category'] == c for r in rows)}" for c in eval_data.CATEGORIES
            if any(r["category"] == c for r in rows)))
        mlflow.set_tags({names.TAG_EVAL_DATA_SHA256: eval_data_sha256,
                         names.TAG_EVAL_DATA: read[:5000],
                         names.TAG_FETCH_RUN_ID: fetches["onnx"]})
        tracing, scoring_reason = evaluation.trace_api(active.info.experiment_id)
        logger.info("scoring: %s", scoring_reason)

        with eval_runs(active.info.run_id, uris) as children:
            results = {name: evaluation.evaluate_in_fresh_process(
                name, uri, rows, cfg.max_new_tokens, children[name], tracing)
                for name, uri in uris.items()}
            answers = {name: [a["answer"] for a in result["rows"]]
                       for name, result in results.items()}
            scores, metrics, categories = {}, {}, {}
            for name, uri in uris.items():
                other = next(m for m in MODELS if m != name)
                quality = [scorers.quality_contains, scorers.quality_exact,
                           scorers.agreement(other, dict(enumerate(answers[other])))]
                quality += [scorers.judge(judge)] if judge else []
                scores[name] = (
                    evaluation.score(name, uri, rows, results[name], children[name], quality)
                    if tracing else evaluation.score_without_traces(
                        name, rows, results[name], children[name], cfg.max_new_tokens, quality))
                metrics[name] = evaluation.model_metrics(results[name], scores[name])
                categories[name] = evaluation.by_category(rows, scores[name])
                # On its evaluation run beside the scores, and on its logged model (so models
                # can be ranked with mlflow.search_logged_models; a runs:/ fallback has none).
                mlflow.log_metrics(metrics[name], run_id=children[name],
                                   model_id=model_uris.logged_model_id(uri))
            agree = metrics[MODELS[0]][scorers.AGREEMENT]
        mlflow.log_metrics({f"{name}_{key}": value for name, values in metrics.items()
                            for key, value in values.items() if key != scorers.AGREEMENT}
                           | {f"{name}_{scorers.CONTAINS}_{category}": value[scorers.CONTAINS]
                              for name, per in categories.items()
                              for category, value in per.items()}
                           | {scorers.AGREEMENT: agree})
        mlflow.log_table(evaluation.eval_table(rows, results, scores), names.EVAL_TABLE)

        models = {name: ModelRef(uris[name], runs[name].info.run_id) for name in uris}
        decided = decide(metrics, cfg.thresholds(), models, agree, read, eval_data_sha256,
                         categories, children,
                         evaluation.WITH_TRACES if tracing else evaluation.WITHOUT_TRACES,
                         scoring_reason)
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / names.EVAL_CHART
            passed = ", ".join(f"{v.model} {'passed' if v.passed else 'failed'}"
                               for v in decided.verdicts.values())
            evaluation.chart(metrics, categories, agree,
                             f"gate: {passed}; chosen: {decided.chosen}", chart)
            mlflow.log_artifact(str(chart))
        decided.log()
        mlflow.set_tag(names.TAG_CHOSEN, decided.chosen)
        for name in MODELS:
            logger.info("%s: %s %.3f over %d rows (%s); %s", name, scorers.CONTAINS,
                        metrics[name][scorers.CONTAINS], len(rows), ", ".join(
                            f"{c} {v[scorers.CONTAINS]:.2f}" for c, v in categories[name].items()),
                        decided.verdicts[name].reasons[0])
        for length, ttft in first_token_lengths(metrics).items():
            logger.info("first token at %s-token prompts: %s (%s first)", length, ", ".join(
                f"{m} {metrics[m][ttft]:.2f} s" for m in MODELS), decided.faster_first_token[length])
        logger.info("answer by answer: the experiment's Evaluations tab, runs %s", ", ".join(
            f"{names.EVALUATE}/{name} ({run_id})" for name, run_id in children.items()))
        return decided


def resolve_eval_data(cfg: EvaluateConfig, fetch_run_id: str) -> str:
    """eval_data as given, or for `auto` the set that fits the checkpoint's size."""
    if cfg.eval_data != eval_data.AUTO:
        return cfg.eval_data
    fetched = manifest.Manifest.read(mlflow.get_run(fetch_run_id))
    weights = sum(entry.size for key, entry in fetched.files.items()
                  if key.startswith(names.CHECKPOINT_DIR + "/"))
    chosen, why = eval_data.choose_auto(weights)
    logger.info(why)
    return chosen


@contextlib.contextmanager
def eval_runs(parent_run_id: str, uris: dict[str, str]):
    """One child run per model, `evaluate/<model>`: where its answers' traces and scores go.

    Made with the client (not the fluent stack) so both can stay open while the worker processes
    write traces to them; ended FAILED with the evaluate run if anything fails, so no
    half-scored evaluation looks finished.
    """
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    children: dict[str, str] = {}
    try:
        for name, uri in uris.items():
            run: Run = client.create_run(experiment_id, run_name=f"{names.EVALUATE}/{name}", tags={
                "mlflow.parentRunId": parent_run_id, names.TAG_EVALUATES: name,
                names.TAG_MODEL_URI: uri, **stale.this_process()})
            children[name] = run.info.run_id
        yield children
    except BaseException as exc:
        for run_id in children.values():
            with contextlib.suppress(Exception):
                client.set_tag(run_id, names.TAG_ERROR, redact.error_text(exc))
                client.set_terminated(run_id, "FAILED")
        raise
    for run_id in children.values():
        client.set_terminated(run_id, "FINISHED")


if __name__ == "__main__":
    tracking.run_cli(names.EVALUATE, main)

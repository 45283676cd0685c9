"""evaluate's measurements: both models on the same rows, measured the same way (the gate and the
written decision are phi3flow/evaluation/decision.py).

Each model answers every row in a fresh Python process (phi3flow/evaluation/eval_worker.py), so its load
time and peak memory are its own and not the other model's leftovers; each answer is a trace in
that model's evaluation run. Quality is then scored on those traces by MLflow's GenAI evaluation
(`mlflow.genai.evaluate`) with the scorers of phi3flow/evaluation/scorers.py, so every answer's assessments
and rationales are in the MLflow UI, where the two models' runs compare answer by answer.

A tracking store without a trace API (an Azure ML workspace answers 403 on MLflow's trace
endpoints: docs/decisions.md) gets the same scorers on the same rows without traces
(`score_without_traces`): each model's evaluation run then holds a per-row table of answers and
assessments (`eval_results.json`) and the same `<scorer>/mean` metrics. `trace_api` probes which
of the two a store gets, once, before any model runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Run

from phi3flow.core import model_uris, names, redact, stale, store, tracking
from phi3flow.core.errors import StepError
from phi3flow.core.names import PROJECT_ROOT
from phi3flow.evaluation import eval_data, metrics, scorers
from phi3flow.evaluation.config import EvaluateConfig
from phi3flow.evaluation.decision import (
    MODELS,
    ONNX,
    TRANSFORMERS,
    Decision,
    ModelRef,
    decide,
    first_token_lengths,
)
from phi3flow.evaluation.eval_data import EvalRow
from phi3flow.evaluation.records import ModelMetrics, WorkerResult, WorkerSpec, share
from phi3flow.fetching import manifest

logger = logging.getLogger(__name__)

# How the answers were scored: `decision.json`'s `scoring`.
WITH_TRACES = "mlflow.genai.evaluate on answer traces"
WITHOUT_TRACES = "the same scorers without traces"


def trace_api(experiment_id: str) -> tuple[bool, str]:
    """Whether the tracking store keeps traces, and why (`store.traces`: one trace search).

    Any failure counts as no trace API (Azure ML answers 403; a server without MLflow 3's
    endpoints, 404): evaluate then scores without traces, and the decision says why.
    """
    found = store.current().traces(experiment_id)
    if not found:
        return False, (f"the tracking store has no usable trace API ({found.how}): answers "
                       f"scored {WITHOUT_TRACES}, tables {names.EVAL_RESULTS} and <scorer>/mean "
                       "metrics on each model's evaluation run")
    return True, "the tracking store keeps traces: a trace per answer, scored by MLflow"


def evaluate_in_fresh_process(spec: WorkerSpec) -> WorkerResult:
    """Answer every row with one model in a process of its own; the answers' traces go to
    `spec.run_id` (the model's evaluation run), or, with tracing off, only into the result."""
    with tempfile.TemporaryDirectory(prefix="phi3flow-eval-") as tmp:
        spec_file, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(spec.to_json())
        command = [sys.executable, "-m", "phi3flow.evaluation.eval_worker", str(spec_file), str(out)]
        logger.info("evaluating %s (%s) on %d rows in a fresh process", spec.name,
                    spec.model_uri, len(spec.rows))
        env = {
            **store.child_environment(),
            # The same store as ours, even when ours is MLflow's relative default.
            "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
            "PYTHONPATH": os.pathsep.join(
                [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            # Each trace is written when its answer's span ends, outside the timed calls, not by
            # a background thread that would compete with the next answer for the CPU.
            "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false",
        }
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            raise StepError(f"evaluating {spec.model_uri} failed (exit code {done.returncode}); "
                            "its log is above.")
        result = WorkerResult.from_json(out.read_text(), f"the worker's result for {spec.name}")
    if all(answer.failed for answer in result.answers):
        raise StepError(f"{spec.name} ({spec.model_uri}) failed on every row, e.g. "
                        f"{result.answers[0].error}: fix the model or the eval set.")
    return result


# --- scoring, with MLflow's GenAI evaluation ----------------------------------------------------


def score(spec: WorkerSpec, result: WorkerResult,
          quality_scorers: list) -> dict[str, list[bool | None]]:
    """Score one model's answer traces with `mlflow.genai.evaluate` in its evaluation run.

    Each trace gets one assessment per scorer (and the expected answer as an expectation), shown
    in the MLflow UI. Returns {scorer: [value per row]}, None where the scorer raised on a row
    (MLflow records the error on that trace and goes on with the other rows).
    """
    name, rows = spec.name, spec.rows
    found = mlflow.search_traces(locations=[spec.experiment_id], run_id=spec.run_id)
    ids = [answer.trace_id for answer in result.answers]
    missing = set(ids) - set(found["trace_id"])
    if missing:
        raise StepError(f"{name}: {len(missing)} of {len(ids)} answer traces are not in the "
                        f"tracking store {mlflow.get_tracking_uri()} (e.g. {sorted(missing)[0]}):"
                        " the worker could not write them (its log above says why; a tracking "
                        "server without MLflow 3's trace API cannot store them). Point "
                        "MLFLOW_TRACKING_URI at an MLflow 3 server or database and re-run.")
    data = found.set_index("trace_id").loc[ids].reset_index()
    data["expectations"] = [{"expected_response": row.expected} for row in rows]
    with mlflow.start_run(run_id=spec.run_id, nested=True):
        evaluated = mlflow.genai.evaluate(data=data, scorers=quality_scorers,
                                          model_id=spec.model_id)
    by_trace = evaluated.result_df.set_index("trace_id")
    values: dict[str, list[bool | None]] = {}
    for scorer in quality_scorers:
        column = by_trace.get(f"{scorer.name}/value")
        errors = by_trace.get(f"{scorer.name}/error_message")
        values[scorer.name] = []
        for index, trace_id in enumerate(ids):
            error = errors[trace_id] if errors is not None else None
            if isinstance(error, str) and error:
                logger.warning("%s row %d (%s): scorer %s raised: %s; the row counts as wrong "
                               "(the trace shows the error)", name, index, rows[index].category,
                               scorer.name, error.splitlines()[0][:300])
                values[scorer.name].append(None)
            else:
                values[scorer.name].append(bool(column[trace_id]))
    return values


def score_without_traces(spec: WorkerSpec, result: WorkerResult,
                         quality_scorers: list) -> dict[str, list[bool | None]]:
    """The scorers of `score`, called on each row as MLflow would call them, for a store without
    traces; the answers and assessments are logged as a table on the evaluation run, with the
    `<scorer>/mean` metrics MLflow's evaluation would log. Same return value as `score`.

    Each scorer gets what it gets from a trace: the request as `inputs`, the chat.completion as
    `outputs` (None where the model raised), the expected answer, and an unlogged `Trace` that
    carries the row's tags (the agreement scorer reads the row from them).
    """
    from mlflow.entities import Trace, TraceData, TraceInfo, TraceLocation, TraceState

    name, rows, run_id = spec.name, spec.rows, spec.run_id
    values: dict[str, list[bool | None]] = {scorer.name: [] for scorer in quality_scorers}
    table: dict[str, list] = {"row": [], "category": [], "question": [], "expected": [],
                              "answer": [], "error": []}
    for scorer in quality_scorers:
        table |= {f"{scorer.name}/value": [], f"{scorer.name}/rationale": []}
    for index, (row, answer) in enumerate(zip(rows, result.answers, strict=True)):
        trace = Trace(TraceInfo(
            trace_id=f"{run_id}-row-{index}", request_time=0,
            trace_location=TraceLocation.from_experiment_id(spec.experiment_id),
            state=TraceState.ERROR if answer.failed else TraceState.OK,
            tags={names.TRACE_TAG_ROW: str(index), names.TRACE_TAG_CATEGORY: row.category}),
            TraceData(spans=[]))
        request = {"messages": list(row.messages), "max_tokens": spec.max_new_tokens}
        for key, value in (("row", index), ("category", row.category),
                           ("question", row.question), ("expected", row.expected),
                           ("answer", answer.answer), ("error", answer.error or "")):
            table[key].append(value)
        for scorer in quality_scorers:
            try:
                feedback = scorer.run(inputs=request, outputs=answer.response,
                                      expectations={"expected_response": row.expected},
                                      trace=trace)
                value = bool(getattr(feedback, "value", feedback))
                rationale = getattr(feedback, "rationale", "") or ""
            except Exception as exc:  # noqa: BLE001 - as MLflow's evaluation: that row, that scorer
                logger.warning("%s row %d (%s): scorer %s raised: %s; the row counts as wrong",
                               name, index, row.category, scorer.name,
                               redact.error_text(exc, 300))
                value, rationale = None, f"the scorer raised {redact.error_text(exc, 300)}"
            values[scorer.name].append(value)
            table[f"{scorer.name}/value"].append(value)
            table[f"{scorer.name}/rationale"].append(rationale)
    mlflow.log_table(table, names.EVAL_RESULTS, run_id=run_id)
    # MLflow's aggregate: the mean over the rows a scorer did not fail on.
    mlflow.log_metrics({f"{scorer}/mean": sum(scored) / len(scored)
                        for scorer, column in values.items()
                        if (scored := [float(v) for v in column if v is not None])},
                       run_id=run_id)
    return values


# --- the whole of evaluate ---------------------------------------------------------------------


def evaluate(cfg: EvaluateConfig, active: mlflow.ActiveRun) -> Decision:
    """evaluate's whole work in its run `active`: both models on the same rows, measured,
    scored, gated and decided; the decision logged and returned (steps/evaluate.py)."""
    log_runs, fetch_run_id = upstream_runs(cfg)
    uris = {name: model_uris.logged_model_uri(run.info.run_id) for name, run in log_runs.items()}
    # Everything that can be wrong with the inputs is found before a model is loaded.
    judge = scorers.load_judge(cfg.judge_model_uri) if cfg.judge_model_uri else None
    rows, read, eval_data_sha256 = eval_data.load(resolve_eval_data(cfg, fetch_run_id))
    logger.info("eval set: %d rows of %s (%s)", len(rows), read, ", ".join(
        f"{c} {n}" for c in eval_data.CATEGORIES if (n := sum(r.category == c for r in rows))))
    mlflow.set_tags({names.TAG_EVAL_DATA_SHA256: eval_data_sha256,
                     names.TAG_EVAL_DATA: read[:5000], names.TAG_FETCH_RUN_ID: fetch_run_id})
    tracing, scoring_reason = trace_api(active.info.experiment_id)
    logger.info("scoring: %s", scoring_reason)

    with eval_runs(active.info.run_id, uris) as children:
        specs = {name: WorkerSpec(
            name=name, model_uri=uri, model_id=model_uris.logged_model_id(uri),
            model_location=model_uris.model_location(uri),
            experiment_id=active.info.experiment_id, run_id=children[name],
            max_new_tokens=cfg.max_new_tokens, rows=tuple(rows), tracing=tracing)
            for name, uri in uris.items()}
        results = {name: evaluate_in_fresh_process(spec) for name, spec in specs.items()}
        scores = score_models(specs, results, judge)
        measured = {name: ModelMetrics.of(results[name], scores[name]).logged()
                    for name in MODELS}
        for name, spec in specs.items():
            # On its evaluation run beside the scores, and on its logged model (so models
            # can be ranked with mlflow.search_logged_models; a runs:/ fallback has none).
            mlflow.log_metrics(measured[name], run_id=spec.run_id, model_id=spec.model_id)
    categories = {name: by_category(rows, scores[name]) for name in MODELS}
    quality, agreement = metrics.QUALITY.name, metrics.AGREEMENT.name
    agree = measured[MODELS[0]][agreement]
    mlflow.log_metrics({f"{name}_{key}": value for name, values in measured.items()
                        for key, value in values.items() if key != agreement}
                       | {f"{name}_{quality}_{category}": value[quality]
                          for name, per in categories.items()
                          for category, value in per.items()}
                       | {agreement: agree})
    mlflow.log_table(eval_table(rows, results, scores), names.EVAL_TABLE)

    refs = {name: ModelRef(uris[name], run.info.run_id) for name, run in log_runs.items()}
    decided = decide(measured, cfg.thresholds(), refs, agree, read, eval_data_sha256, categories,
                     children, WITH_TRACES if tracing else WITHOUT_TRACES, scoring_reason)
    with tempfile.TemporaryDirectory() as tmp:
        drawn = Path(tmp) / names.EVAL_CHART
        chart(decided, drawn)
        mlflow.log_artifact(str(drawn))
    decided.log()
    mlflow.set_tag(names.TAG_CHOSEN, decided.chosen)
    report(decided, len(rows))
    return decided


def upstream_runs(cfg: EvaluateConfig) -> tuple[dict[str, Run], str]:
    """The two log steps' runs, checked, and the fetch run both models come from."""
    runs = {
        TRANSFORMERS: tracking.upstream_run(
            "transformers_run_id", cfg.transformers_run_id, names.LOG_TRANSFORMERS),
        ONNX: tracking.upstream_run("onnx_run_id", cfg.onnx_run_id, names.LOG_ONNX_PYFUNC),
    }
    fetches = {name: run.data.tags.get(names.TAG_FETCH_RUN_ID) for name, run in runs.items()}
    if len(set(fetches.values())) != 1:
        raise StepError(f"the two models come from different fetch runs {fetches}: compare "
                        "models of one checkpoint (log both from the same fetch_run_id).")
    return runs, fetches[ONNX]


def score_models(specs: dict[str, WorkerSpec], results: dict[str, WorkerResult],
                 judge) -> dict[str, dict[str, list[bool | None]]]:
    """{model: {scorer: value per row}}: each model's answers by every scorer, with traces where
    the store keeps them; agreement compares a model's answers with the other model's."""
    answers = {name: dict(enumerate(a.answer for a in result.answers))
               for name, result in results.items()}
    scores = {}
    for name, spec in specs.items():
        other = next(m for m in MODELS if m != name)
        quality = [scorers.quality_contains, scorers.quality_exact,
                   scorers.agreement(other, answers[other])]
        quality += [scorers.judge(judge)] if judge else []
        scored = score if spec.tracing else score_without_traces
        scores[name] = scored(spec, results[name], quality)
    return scores


def report(decided: Decision, rows: int) -> None:
    """What evaluate found, in a few log lines: quality, the gate, first tokens, where to look."""
    measured, quality = decided.metrics, metrics.QUALITY.name
    for name in MODELS:
        logger.info("%s: %s %.3f over %d rows (%s); %s", name, quality,
                    measured[name][quality], rows, ", ".join(
                        f"{c} {v[quality]:.2f}"
                        for c, v in decided.quality_by_category[name].items()),
                    decided.verdicts[name].reasons[0])
    for length, ttft in first_token_lengths(measured).items():
        logger.info("first token at %s-token prompts: %s (%s first)", length, ", ".join(
            f"{m} {measured[m][ttft]:.2f} s" for m in MODELS), decided.faster_first_token[length])
    logger.info("answer by answer: the experiment's Evaluations tab, runs %s", ", ".join(
        f"{names.EVALUATE}/{name} ({run_id})" for name, run_id in decided.eval_runs.items()))


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


# --- per category and per row -------------------------------------------------------------------


def by_category(rows: list[EvalRow], scores: dict[str, list]) -> dict[str, dict[str, float]]:
    """{category: {"rows": n, quality_contains: share, quality_exact: share}}, in CATEGORIES
    order, for the categories the eval set has."""
    report = {}
    for category in eval_data.CATEGORIES:
        picked = [i for i, row in enumerate(rows) if row.category == category]
        if picked:
            report[category] = {"rows": float(len(picked))} | {
                name: share([scores[name][i] for i in picked])
                for name in (metrics.QUALITY.name, metrics.EXACT.name)}
    return report


def eval_table(rows: list[EvalRow], results: dict[str, WorkerResult],
               scores: dict[str, dict]) -> dict:
    """Per row: the question, its category, the expected answer, and each model's answer, scores,
    timings and trace."""
    table = {
        "question": [r.question for r in rows],
        "category": [r.category for r in rows],
        "expected": [r.expected for r in rows],
    }
    for name, result in results.items():
        answers = result.answers
        table[f"{name}_answer"] = [a.answer for a in answers]
        for scorer, values in scores[name].items():
            if scorer != metrics.AGREEMENT.name:
                table[f"{name}_{scorer}"] = values
        for key in ("latency_s", "ttft_s", "completion_tokens"):
            table[f"{name}_{key}"] = [getattr(a, key) for a in answers]
        table[f"{name}_error"] = [a.error or "" for a in answers]
        table[f"{name}_trace_id"] = [a.trace_id for a in answers]
    table[metrics.AGREEMENT.name] = scores[MODELS[0]][metrics.AGREEMENT.name]
    return table


# --- chart ------------------------------------------------------------------------------------


def chart(decided: Decision, path: Path) -> None:
    """The two models side by side: quality per category, latency, throughput, footprint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured, categories = decided.metrics, decided.quality_by_category
    agree, gated = decided.agreement, metrics.QUALITY.name
    verdict = "gate: " + ", ".join(f"{v.model} {'passed' if v.passed else 'failed'}"
                                   for v in decided.verdicts.values())
    verdict += f"; chosen: {decided.chosen}"
    # Quality: every category and all rows, under the metric the gate uses.
    quality = {name: {**{c: v[gated] for c, v in categories[name].items()},
                      "all rows": measured[name][gated]} for name in MODELS}
    panels = [
        (f"Quality per category ({gated})", quality, "{:.0%}"),
        ("Latency (s)", _pick(measured, [metrics.TTFT_P50, metrics.LATENCY_P50,
                                         metrics.LATENCY_P95]), "{:.3g}"),
        ("Throughput (output tokens/s)", _pick(measured, [metrics.OUTPUT_TOKENS_PER_S]),
         "{:.3g}"),
        ("Footprint (MB)", _pick(measured, [metrics.PEAK_RSS_MB, metrics.SIZE_MB]), "{:.0f}"),
    ]
    colors = {TRANSFORMERS: "#4c72b0", ONNX: "#dd8452"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), gridspec_kw={"width_ratios": [2, 1.2, 0.7, 1]})
    for ax, (title, values, fmt) in zip(axes, panels):
        keys, width = list(values[MODELS[0]]), 0.38
        for i, name in enumerate(MODELS):
            xs = [k + (i - 0.5) * width for k in range(len(keys))]
            heights = [values[name][key] for key in keys]
            bars = ax.bar(xs, heights, width, label=name, color=colors[name])
            ax.bar_label(bars, labels=[fmt.format(v) for v in heights], fontsize=7)
        ax.set_xticks(range(len(keys)), [k.replace("_", " ") for k in keys], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.2)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"transformers vs onnx on the same rows — answers agree on {agree:.0%}\n"
                 f"{verdict}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pick(measured: dict[str, dict[str, float]],
          picked: list[metrics.Metric]) -> dict[str, dict[str, float]]:
    """{model: {label: value}} of the `picked` metrics, for a chart's panel."""
    return {name: {m.label: measured[name][m.name] for m in picked} for name in MODELS}

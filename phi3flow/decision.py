"""evaluate's gate and its written decision, the one record register acts on.

The gate checks each model's metrics against the thresholds; the decision picks among those that
passed the fastest (p95 latency), or, if none passed, the best quality (which register will not
make champion). `decision.json` is the `Decision` record, written once by evaluate and read back,
validated, by register.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from phi3flow import names
from phi3flow.record import Record, record

TRANSFORMERS, ONNX = "transformers", "onnx"
MODELS = (TRANSFORMERS, ONNX)
# The two metrics the gate and register judge a model by; each model's metrics (evaluation.
# model_metrics) have these keys.
QUALITY, LATENCY_P95 = names.CONTAINS, names.LATENCY_P95


@dataclass(frozen=True)
class Threshold:
    """One bound of the gate: `param` (evaluate's parameter that sets it) on `metric`, which
    way is better, and, for a drop, the model it is measured against (`relative_to`, applied to
    the other model only)."""

    param: str
    metric: str
    higher_is_better: bool
    label: str  # how a reason names the metric
    shown: str = "{:.3f}"  # how a reason shows its value
    unit: str = ""
    relative_to: str | None = None

    def fails(self, metrics: dict[str, dict[str, float]], model: str,
              bound: float) -> str | None:
        """Why `model` fails this bound, or None if it meets it (or it does not apply)."""
        value, label, lower_is_better = metrics[model][self.metric], self.label, not (
            self.higher_is_better)
        if self.relative_to:
            if model == self.relative_to:
                return None
            value = metrics[self.relative_to][self.metric] - value
            label, lower_is_better = f"{label} drop vs {self.relative_to}", True  # a drop
        if not (value > bound if lower_is_better else value < bound):
            return None
        sign = ">" if lower_is_better else "<"
        return f"{label} {self.shown.format(value)} {sign} {self.param} {bound}"


# The gate, in one list; register compares a candidate with the champion on the same metrics,
# in this order and direction (GATED_ON).
THRESHOLDS = (
    Threshold("min_quality", QUALITY, higher_is_better=True, label="quality"),
    Threshold("max_quality_drop", QUALITY, higher_is_better=True, label="quality",
              relative_to=TRANSFORMERS),
    Threshold("max_p95_latency_s", LATENCY_P95, higher_is_better=False, label="p95 latency",
              shown="{:.2f} s", unit=" s"),
)
GATED_ON = tuple(dict.fromkeys(t.metric for t in THRESHOLDS))
HIGHER_IS_BETTER = {t.metric: t.higher_is_better for t in THRESHOLDS}
LABEL = {t.metric: (t.label, t.unit) for t in THRESHOLDS}


@record
class Verdict:
    model: str
    passed: bool
    reasons: tuple[str, ...]


@record
class ModelRef:
    model_uri: str  # models:/m-... or runs:/<run>/<name>
    run_id: str  # the log step's run that logged it


@record
class Decision(Record):
    ARTIFACT = names.DECISION
    PRODUCER = names.EVALUATE

    thresholds: dict[str, float]
    verdicts: dict[str, Verdict]
    chosen: str
    chosen_passed: bool
    why: str
    models: dict[str, ModelRef]
    metrics: dict[str, dict[str, float]]
    agreement: float  # share of rows where both models gave the same answer
    eval_data: str  # the file or MLflow evaluation dataset read (eval_data=auto resolved)
    eval_data_sha256: str
    gated_on: tuple[str, ...] = GATED_ON
    # {model: {category: {"rows": n, QUALITY: share, scorers.EXACT: share}}}
    quality_by_category: dict[str, dict[str, dict[str, float]]] = dataclasses.field(
        default_factory=dict)
    # {model: run ID of its MLflow GenAI evaluation run, a child of the evaluate run}
    eval_runs: dict[str, str] = dataclasses.field(default_factory=dict)
    # {prompt tokens: the model whose first token came first}, at the eval rows' median prompt
    # and at a long one: which model answers a long (RAG-style) prompt sooner is not the gate's
    # latency winner on every CPU
    faster_first_token: dict[str, str] = dataclasses.field(default_factory=dict)
    # How the answers were scored (phi3flow/evaluation.py: WITH_TRACES, or WITHOUT_TRACES on a
    # store without a trace API), and why: what evaluate's probe of the store found
    scoring: str = ""
    scoring_reason: str = ""

    def __post_init__(self) -> None:
        for part in ("verdicts", "models", "metrics"):
            missing = set(MODELS) - getattr(self, part).keys()
            if missing:
                raise ValueError(f"{part} has no {sorted(missing)[0]!r} model")
        if self.chosen not in MODELS:
            raise ValueError(f"chosen {self.chosen!r} is not one of {', '.join(MODELS)}")


def gate(metrics: dict[str, dict[str, float]], thresholds: dict[str, float]) -> list[Verdict]:
    """Each model against every bound of THRESHOLDS (values by parameter name)."""
    verdicts = []
    for name in MODELS:
        reasons = [why for t in THRESHOLDS
                   if (why := t.fails(metrics, name, thresholds[t.param])) is not None]
        verdicts.append(Verdict(name, not reasons, tuple(reasons or ["all thresholds met"])))
    return verdicts


def choose(verdicts: list[Verdict], metrics: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Among models that passed, the fastest (p95); if none passed, the best quality."""
    passed = [v.model for v in verdicts if v.passed]
    if passed:
        best = min(passed, key=lambda n: metrics[n][LATENCY_P95])
        return best, f"passed the gate with the lowest p95 latency among {passed}"
    best = max(MODELS, key=lambda n: (metrics[n][QUALITY], -metrics[n][LATENCY_P95]))
    return best, "no model passed the gate; best quality chosen, it will not become champion"


# (TTFT metric, its prompt length metric): the eval rows' median, and the long prompt
FIRST_TOKEN = (("ttft_p50_s", "prompt_tokens_p50"), ("ttft_long_prompt_s", "long_prompt_tokens"))


def first_token_lengths(metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    """{prompt tokens: its TTFT metric}, for the lengths both models were timed at."""
    return {str(int(metrics[MODELS[0]][tokens])): ttft for ttft, tokens in FIRST_TOKEN
            if all(ttft in metrics[m] and tokens in metrics[m] for m in MODELS)}


def faster_first_token(metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    return {length: min(MODELS, key=lambda m: metrics[m][ttft])
            for length, ttft in first_token_lengths(metrics).items()}


def decide(metrics: dict[str, dict[str, float]], thresholds: dict[str, float],
           models: dict[str, ModelRef], agreement: float, eval_data: str,
           eval_data_sha256: str, quality_by_category: dict | None = None,
           eval_runs: dict[str, str] | None = None, scoring: str = "",
           scoring_reason: str = "") -> Decision:
    verdicts = gate(metrics, thresholds)
    chosen, why = choose(verdicts, metrics)
    return Decision(
        thresholds=thresholds,
        verdicts={v.model: v for v in verdicts},
        chosen=chosen,
        chosen_passed=next(v.passed for v in verdicts if v.model == chosen),
        why=why,
        models=models,
        metrics=metrics,
        agreement=agreement,
        eval_data=eval_data,
        eval_data_sha256=eval_data_sha256,
        gated_on=GATED_ON,
        quality_by_category=quality_by_category or {},
        eval_runs=eval_runs or {},
        faster_first_token=faster_first_token(metrics),
        scoring=scoring,
        scoring_reason=scoring_reason,
    )

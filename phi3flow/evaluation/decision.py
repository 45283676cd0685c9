"""evaluate's gate and its written decision, the one record register acts on.

The gate checks each model's metrics against the thresholds; the decision picks among those that
passed the fastest (p95 latency), or, if none passed, the best quality (which register will not
make champion). `decision.json` is the `Decision` record, written once by evaluate and read back,
validated, by register.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from phi3flow.core import names
from phi3flow.core.record import Record, record
from phi3flow.evaluation import metrics
from phi3flow.evaluation.metrics import Metric

TRANSFORMERS, ONNX = "transformers", "onnx"
MODELS = (TRANSFORMERS, ONNX)


@dataclass(frozen=True)
class Threshold:
    """One bound of the gate: `param` (evaluate's parameter that sets it) on `metric` (which
    says how a reason names it and which way is better), and, for a drop, the model it is
    measured against (`relative_to`, applied to the other model only)."""

    param: str
    metric: Metric
    relative_to: str | None = None

    def fails(self, measured: dict[str, dict[str, float]], model: str,
              bound: float) -> str | None:
        """Why `model` fails this bound, or None if it meets it (or it does not apply)."""
        name, label = self.metric.name, self.metric.label
        value, lower_is_better = measured[model][name], not self.metric.higher_is_better
        if self.relative_to:
            if model == self.relative_to:
                return None
            value = measured[self.relative_to][name] - value
            label, lower_is_better = f"{label} drop vs {self.relative_to}", True  # a drop
        if not (value > bound if lower_is_better else value < bound):
            return None
        sign = ">" if lower_is_better else "<"
        return f"{label} {self.metric.shown.format(value)} {sign} {self.param} {bound}"


# The gate, in one list; register compares a candidate with the champion on the same metrics,
# in this order and direction (GATED_ON).
THRESHOLDS = (
    Threshold("min_quality", metrics.QUALITY),
    Threshold("max_quality_drop", metrics.QUALITY, relative_to=TRANSFORMERS),
    Threshold("max_p95_latency_s", metrics.LATENCY_P95),
)
GATED_ON: tuple[Metric, ...] = tuple(dict.fromkeys(t.metric for t in THRESHOLDS))


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
    gated_on: tuple[str, ...] = tuple(m.name for m in GATED_ON)  # GATED_ON's names
    # {model: {category: {"rows": n, quality_contains: share, quality_exact: share}}}
    quality_by_category: dict[str, dict[str, dict[str, float]]] = dataclasses.field(
        default_factory=dict)
    # {model: run ID of its MLflow GenAI evaluation run, a child of the evaluate run}
    eval_runs: dict[str, str] = dataclasses.field(default_factory=dict)
    # {prompt tokens: the model whose first token came first}, at the eval rows' median prompt
    # and at a long one: which model answers a long (RAG-style) prompt sooner is not the gate's
    # latency winner on every CPU
    faster_first_token: dict[str, str] = dataclasses.field(default_factory=dict)
    # How the answers were scored (phi3flow/evaluation/evaluate.py: WITH_TRACES, or WITHOUT_TRACES on a
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


def gate(measured: dict[str, dict[str, float]], thresholds: dict[str, float]) -> list[Verdict]:
    """Each model against every bound of THRESHOLDS (values by parameter name)."""
    verdicts = []
    for name in MODELS:
        reasons = [why for t in THRESHOLDS
                   if (why := t.fails(measured, name, thresholds[t.param])) is not None]
        verdicts.append(Verdict(name, not reasons, tuple(reasons or ["all thresholds met"])))
    return verdicts


def choose(verdicts: list[Verdict], measured: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Among models that passed, the fastest (p95); if none passed, the best quality."""
    passed = [v.model for v in verdicts if v.passed]
    quality, p95 = metrics.QUALITY.name, metrics.LATENCY_P95.name
    if passed:
        best = min(passed, key=lambda n: measured[n][p95])
        return best, f"passed the gate with the lowest p95 latency among {passed}"
    best = max(MODELS, key=lambda n: (measured[n][quality], -measured[n][p95]))
    return best, "no model passed the gate; best quality chosen, it will not become champion"


# (TTFT metric, its prompt length metric): the eval rows' median, and the long prompt
FIRST_TOKEN = ((metrics.TTFT_P50, metrics.PROMPT_TOKENS_P50),
               (metrics.TTFT_LONG_PROMPT, metrics.LONG_PROMPT_TOKENS))


def first_token_lengths(measured: dict[str, dict[str, float]]) -> dict[str, str]:
    """{prompt tokens: its TTFT metric's name}, for the lengths both models were timed at."""
    return {str(int(measured[MODELS[0]][tokens.name])): ttft.name for ttft, tokens in FIRST_TOKEN
            if all(ttft.name in measured[m] and tokens.name in measured[m] for m in MODELS)}


def faster_first_token(measured: dict[str, dict[str, float]]) -> dict[str, str]:
    return {length: min(MODELS, key=lambda m: measured[m][ttft])
            for length, ttft in first_token_lengths(measured).items()}


def decide(measured: dict[str, dict[str, float]], thresholds: dict[str, float],
           models: dict[str, ModelRef], agreement: float, eval_data: str,
           eval_data_sha256: str, quality_by_category: dict | None = None,
           eval_runs: dict[str, str] | None = None, scoring: str = "",
           scoring_reason: str = "") -> Decision:
    verdicts = gate(measured, thresholds)
    chosen, why = choose(verdicts, measured)
    return Decision(
        thresholds=thresholds,
        verdicts={v.model: v for v in verdicts},
        chosen=chosen,
        chosen_passed=next(v.passed for v in verdicts if v.model == chosen),
        why=why,
        models=models,
        metrics=measured,
        agreement=agreement,
        eval_data=eval_data,
        eval_data_sha256=eval_data_sha256,
        gated_on=tuple(m.name for m in GATED_ON),
        quality_by_category=quality_by_category or {},
        eval_runs=eval_runs or {},
        faster_first_token=faster_first_token(measured),
        scoring=scoring,
        scoring_reason=scoring_reason,
    )

"""evaluate's gate and its written decision, the one record register acts on.

The gate checks each model's metrics against the thresholds; the decision picks among those that
passed the fastest (p95 latency), or, if none passed, the best quality (which register will not
make champion). `decision.json` is the `Decision` record, written once by evaluate and read back,
validated, by register.
"""

from __future__ import annotations

import dataclasses

from phi3flow import names
from phi3flow.record import Record, record

MODELS = ("transformers", "onnx")
# The metrics the gate reads (thresholds min_quality, max_quality_drop, max_p95_latency_s).
GATED_ON = ("quality_contains", "latency_p95_s")


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
    # {model: {category: {"rows": n, "quality_contains": share, "quality_exact": share}}}
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
    verdicts = []
    reference = metrics["transformers"]["quality_contains"]
    for name in MODELS:
        m, reasons = metrics[name], []
        if m["quality_contains"] < thresholds["min_quality"]:
            reasons.append(f"quality {m['quality_contains']:.3f} < min_quality "
                           f"{thresholds['min_quality']}")
        if name == "onnx" and reference - m["quality_contains"] > thresholds["max_quality_drop"]:
            reasons.append(f"quality drop vs transformers {reference - m['quality_contains']:.3f}"
                           f" > max_quality_drop {thresholds['max_quality_drop']}")
        if m["latency_p95_s"] > thresholds["max_p95_latency_s"]:
            reasons.append(f"p95 latency {m['latency_p95_s']:.2f} s > max_p95_latency_s "
                           f"{thresholds['max_p95_latency_s']}")
        verdicts.append(Verdict(name, not reasons, tuple(reasons or ["all thresholds met"])))
    return verdicts


def choose(verdicts: list[Verdict], metrics: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Among models that passed, the fastest (p95); if none passed, the best quality."""
    passed = [v.model for v in verdicts if v.passed]
    if passed:
        best = min(passed, key=lambda n: metrics[n]["latency_p95_s"])
        return best, f"passed the gate with the lowest p95 latency among {passed}"
    best = max(MODELS, key=lambda n: (metrics[n]["quality_contains"],
                                      -metrics[n]["latency_p95_s"]))
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

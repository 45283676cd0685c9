"""Every metric evaluate logs, one record each: its name, how it reads, which way is better.

evaluate logs a model's metrics (phi3flow/evaluation/records.py, `ModelMetrics.logged`), the gate
judges them and `decision.json` holds them (phi3flow/evaluation/decision.py), register compares
and tags them (phi3flow/registry/register.py): all of them read the same `Metric` here, so a
metric has one name, one label and one direction, and none is spelled out twice.

The names are what MLflow runs, logged models, model version tags and `decision.json` already
hold: renaming one breaks every earlier run's comparison with a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # the MLflow metric's name, and its key in decision.json
    label: str  # how a reason or a chart names it
    unit: str  # after a value: "" for a share or a count, " s", " MB", " tokens/s"
    higher_is_better: bool
    shown: str = "{:.3f}"  # how a reason writes a value, unit included


# The scorers' shares of rows scored true (phi3flow/evaluation/scorers.py names each scorer by
# one): `ModelMetrics.quality`'s keys.
QUALITY = Metric("quality_contains", "quality", "", higher_is_better=True)  # the gate's
EXACT = Metric("quality_exact", "exact quality", "", higher_is_better=True)
AGREEMENT = Metric("agreement", "agreement", "", higher_is_better=True)  # with the other model
JUDGE = Metric("judge_correct", "judged correct", "", higher_is_better=True)
SCORES = (QUALITY, EXACT, AGREEMENT, JUDGE)

# The other fields of `ModelMetrics`, in its order.
FAILED_ROWS = Metric("failed_rows", "failed rows", "", higher_is_better=False, shown="{:.0f}")
SCORER_ERRORS = Metric("scorer_errors", "scorer errors", "", higher_is_better=False,
                       shown="{:.0f}")
LATENCY_P50 = Metric("latency_p50_s", "p50 latency", " s", higher_is_better=False,
                     shown="{:.2f} s")
LATENCY_P95 = Metric("latency_p95_s", "p95 latency", " s", higher_is_better=False,
                     shown="{:.2f} s")  # over the rows a model answered
TTFT_P50 = Metric("ttft_p50_s", "p50 first token", " s", higher_is_better=False,
                  shown="{:.2f} s")
# Prompt lengths are where a first token was timed, not a score: neither way is better, and
# nothing compares them (higher_is_better=False only fills the field).
PROMPT_TOKENS_P50 = Metric("prompt_tokens_p50", "p50 prompt length", " tokens",
                           higher_is_better=False, shown="{:.0f} tokens")
OUTPUT_TOKENS_PER_S = Metric("output_tokens_per_s", "throughput", " tokens/s",
                             higher_is_better=True, shown="{:.1f} tokens/s")
LOAD_S = Metric("load_s", "load time", " s", higher_is_better=False, shown="{:.2f} s")
PEAK_RSS_MB = Metric("peak_rss_mb", "peak memory", " MB", higher_is_better=False,
                     shown="{:.0f} MB")
SIZE_MB = Metric("size_mb", "size", " MB", higher_is_better=False, shown="{:.0f} MB")
LONG_PROMPT_TOKENS = Metric("long_prompt_tokens", "long prompt length", " tokens",
                            higher_is_better=False, shown="{:.0f} tokens")
TTFT_LONG_PROMPT = Metric("ttft_long_prompt_s", "long prompt first token", " s",
                          higher_is_better=False, shown="{:.2f} s")

ALL = (*SCORES, FAILED_ROWS, SCORER_ERRORS, LATENCY_P50, LATENCY_P95, TTFT_P50,
       PROMPT_TOKENS_P50, OUTPUT_TOKENS_PER_S, LOAD_S, PEAK_RSS_MB, SIZE_MB, LONG_PROMPT_TOKENS,
       TTFT_LONG_PROMPT)
BY_NAME = {metric.name: metric for metric in ALL}

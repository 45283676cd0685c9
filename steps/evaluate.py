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

from phi3flow.core import names, tracking
from phi3flow.core.config import parse_config
from phi3flow.evaluation import evaluate as evaluation
from phi3flow.evaluation.config import EvaluateConfig
from phi3flow.evaluation.decision import Decision


def main(argv: list[str] | None = None) -> Decision:
    with tracking.step_run(names.EVALUATE) as active:
        cfg = parse_config(EvaluateConfig, argv)
        tracking.log_config(cfg)
        return evaluation.evaluate(cfg, active)


if __name__ == "__main__":
    tracking.run_cli(names.EVALUATE, main)

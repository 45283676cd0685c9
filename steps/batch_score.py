"""batch_score: a chat model (default: register's champion) over every row of a dataset, on Spark.

Inputs: `model_uri` (default models:/phi3-mini-4k-instruct-chat@champion; an alias is resolved
once, to a version), `input` (a JSONL, Parquet or CSV file or folder, or table:NAME; each row
with `messages` or `prompt`), `input_format`, `output` (a new Parquet folder; default the run's
artifact `scored/`), `spark_master` (default local[*]), `max_new_tokens`, `temperature`,
`batch_size` (rows per model call), `executor_env_manager`, `cores_per_model`.
Outputs: every input row with `answer`, `finish_reason`, `prompt_tokens`, `completion_tokens`,
`latency_s` and `error` (a bad row's reason; it does not fail the job); metrics rows,
failed_rows, prompt_tokens, completion_tokens, tokens_per_s, score_s, wall_s; tags
`phi3flow.scored_model_uri`, `phi3flow.scored_model_version`, `phi3flow.input`,
`phi3flow.output`; `batch_score.json`; a summary with the command that reads the output.
A bad parameter, input or model URI stops it before any row is scored, and the run ends FAILED.
Needs pyspark and Java 17 (not in requirements.txt: docs/batch-scoring.md).
"""

from __future__ import annotations

from phi3flow.batch import score as batch_score
from phi3flow.batch.config import BatchScoreConfig
from phi3flow.core import names, tracking
from phi3flow.core.config import parse_config


def main(argv: list[str] | None = None) -> batch_score.BatchScored:
    with tracking.step_run(names.BATCH_SCORE) as run:
        cfg = parse_config(BatchScoreConfig, argv)
        tracking.log_config(cfg)
        return batch_score.score(cfg, run)


if __name__ == "__main__":
    tracking.run_cli(names.BATCH_SCORE, main)

"""log_transformers: log the fetched checkpoint as an MLflow transformers chat model.

Inputs: `fetch_run_id` (a FINISHED fetch_model run); generation defaults (`max_new_tokens`,
`temperature`, `top_p`), `torch_dtype`, `trust_remote_code`, `save_pretrained`.
Outputs: a logged model `phi3-transformers` (task `llm/v1/chat`, pinned pip requirements, an
input example) linked to this run; `config.json`.
Tags (run and logged model): the fetch run, model id, revision, manifest sha256.
Refuses, before loading anything: a missing/wrong/unfinished fetch run, and any fetched file
whose size or sha256 differs from the fetch manifest.
"""

from __future__ import annotations

import mlflow

from phi3flow.core import names, tracking
from phi3flow.core.config import parse_config
from phi3flow.fetching.fetch import consume
from phi3flow.models import transformers_model
from phi3flow.models.config import LogTransformersConfig


def main(argv: list[str] | None = None) -> str:
    with tracking.step_run(names.LOG_TRANSFORMERS):
        cfg = parse_config(LogTransformersConfig, argv)
        tracking.log_config(cfg)
        fetched = consume(cfg.fetch_run_id, names.CHECKPOINT_DIR)
        tags = {
            **fetched.lineage,
            names.TAG_TRUST_REMOTE_CODE: str(cfg.trust_remote_code).lower(),
            names.TAG_SAVE_PRETRAINED: str(cfg.save_pretrained).lower(),
        }
        mlflow.set_tags(tags)
        return transformers_model.log(cfg, fetched.folder, fetched.manifest, tags)


if __name__ == "__main__":
    tracking.run_cli(names.LOG_TRANSFORMERS, main)

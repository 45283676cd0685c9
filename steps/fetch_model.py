"""fetch_model: resolve a Phi-3 checkpoint and its ONNX model, and record exactly what was fetched.

Inputs: `model_id` (hub id or local checkpoint folder) and `revision`; `onnx_source` (`hub`,
`build` with `precision`/`execution_provider`, or a local onnxruntime-genai folder).
Outputs (artifacts of this run): `manifest.json` (every file with size and sha256, source ids,
resolved commits); `checkpoint/` and `onnx/` (unless `log_weights=false`); `config.json`.
Tags: model id, resolved revision, manifest sha256, ONNX source, trust_remote_code.
Side effects: hub downloads go to the Hugging Face cache (`HF_HOME`); `HF_TOKEN` is read from the
environment and never logged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from phi3flow.core import names, tracking
from phi3flow.core.config import parse_config
from phi3flow.fetching.config import FetchModelConfig
from phi3flow.fetching.fetch import fetch, log_fetched


def main(argv: list[str] | None = None) -> str:
    with tracking.step_run(names.FETCH_MODEL) as run:
        cfg = parse_config(FetchModelConfig, argv)
        tracking.log_config(cfg)
        with tempfile.TemporaryDirectory(prefix="phi3flow-fetch-") as workdir:
            fetched = fetch(cfg, Path(workdir))
            manifest_sha256 = log_fetched(fetched)
        mlflow.set_tags({
            names.TAG_MODEL_ID: cfg.model_id,
            names.TAG_REVISION: fetched.manifest.revision,
            names.TAG_MANIFEST_SHA256: manifest_sha256,
            names.TAG_ONNX_SOURCE: fetched.manifest.sources[names.ONNX_DIR].kind,
            names.TAG_TRUST_REMOTE_CODE: str(cfg.trust_remote_code).lower(),
        })
        return run.info.run_id


if __name__ == "__main__":
    tracking.run_cli(names.FETCH_MODEL, main)

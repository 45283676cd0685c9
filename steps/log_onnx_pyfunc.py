"""log_onnx_pyfunc: log the fetched ONNX model as an onnxruntime-genai chat pyfunc, from code.

Inputs: `fetch_run_id` (a FINISHED fetch_model run); `interface` (chat|prompt); generation
defaults (`max_new_tokens`, `temperature`, `top_p`, `top_k`).
Outputs: a logged model `phi3-onnx` whose code is phi3flow/chat/onnx_runtime.py and the chat
contract it imports (no pickle), whose
artifact is the fetched ONNX folder (verified against the manifest before and after logging),
with pinned requirements and no torch; `config.json`.
Tags (run and logged model): fetch run, model id, revision, manifest sha256, ONNX source,
precision and execution provider, interface.
"""

from __future__ import annotations

import mlflow

from phi3flow.core import names, tracking
from phi3flow.core.config import parse_config
from phi3flow.fetching.fetch import consume
from phi3flow.models import onnx_model
from phi3flow.models.config import LogOnnxPyfuncConfig


def main(argv: list[str] | None = None) -> str:
    with tracking.step_run(names.LOG_ONNX_PYFUNC):
        cfg = parse_config(LogOnnxPyfuncConfig, argv)
        tracking.log_config(cfg)
        fetched = consume(cfg.fetch_run_id, names.ONNX_DIR)
        onnx = fetched.manifest.sources[names.ONNX_DIR]
        tags = {
            **fetched.lineage,
            names.TAG_ONNX_SOURCE: onnx.kind,
            names.TAG_ONNX_PRECISION: onnx.precision or "unknown",
            names.TAG_ONNX_EXECUTION_PROVIDER: onnx.execution_provider or "unknown",
            names.TAG_INTERFACE: cfg.interface,
        }
        mlflow.set_tags(tags)
        return onnx_model.log(cfg, fetched.folder, fetched.manifest, tags)


if __name__ == "__main__":
    tracking.run_cli(names.LOG_ONNX_PYFUNC, main)

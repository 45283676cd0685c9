"""Logging the onnxruntime-genai chat model: from code, with only what it needs.

The model's code is phi3flow/chat/onnx_runtime.py, logged as a file (`python_model=` a path,
models-from-code): nothing is pickled, and the logged model carries that file and the chat
core it is part of (the `chat` folder, as `code_paths`), the ONNX folder as its artifact, and
pinned requirements without torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec

from phi3flow.chat import system_messages
from phi3flow.chat.onnx_runtime import ONNX_ARTIFACT
from phi3flow.core import model_uris, names
from phi3flow.fetching import manifest
from phi3flow.fetching.manifest import Manifest
from phi3flow.models.config import LogOnnxPyfuncConfig
from phi3flow.models.model_logging import CHAT_EXAMPLE, pinned_requirements

logger = logging.getLogger(__name__)

CHAT_CORE = Path(__file__).parent.parent / "chat"
# The model's code, and the one package of this project it imports (shipped beside it).
MODEL_CODE = CHAT_CORE / "onnx_runtime.py"
RUNTIME_DISTRIBUTIONS = ("mlflow", "onnxruntime-genai", "onnxruntime", "tokenizers", "llguidance",
                         "numpy", "pandas")
PROMPT_EXAMPLE = {"prompt": "What is the capital of Spain?", "max_tokens": 8}

# Per-request generation options, as MLflow params (in-process `params=`, and over REST the
# top-level keys named here). `stop` is left out on purpose: a params schema must fix it as a
# string or a list, while OpenAI clients send either; as a payload field both are accepted.
PARAMS = ParamSchema([
    ParamSpec("max_tokens", "long", None),
    ParamSpec("temperature", "double", None),
    ParamSpec("top_p", "double", None),
    ParamSpec("top_k", "long", None),
    ParamSpec("n", "long", None),
])


def model_config(cfg: LogOnnxPyfuncConfig, model_id: str) -> dict[str, Any]:
    return {
        "interface": cfg.interface,
        "max_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "model_id": model_id,  # the hub id, answered as a completion's `model`
    }


def model_options(cfg: LogOnnxPyfuncConfig, onnx_folder: Path, model_id: str) -> dict[str, Any]:
    """Arguments of mlflow.pyfunc.log_model/save_model (shared with benchmarks/)."""
    return dict(
        python_model=str(MODEL_CODE),
        code_paths=[str(CHAT_CORE)],
        artifacts={ONNX_ARTIFACT: str(onnx_folder)},
        model_config=model_config(cfg, model_id),
        signature=ModelSignature(params=PARAMS),
        input_example=CHAT_EXAMPLE if cfg.interface == "chat" else PROMPT_EXAMPLE,
        pip_requirements=pinned_requirements(RUNTIME_DISTRIBUTIONS),
    )


def log(cfg: LogOnnxPyfuncConfig, onnx_folder: Path, fetch_manifest: Manifest,
        tags: dict[str, str]) -> str:
    logger.info("logging the ONNX %s model from %s", cfg.interface, MODEL_CODE.name)
    system = _probe_system_messages(onnx_folder, fetch_manifest.model_id)
    tags = {**tags, names.TAG_SYSTEM_MESSAGES: system}
    mlflow.set_tag(names.TAG_SYSTEM_MESSAGES, system)
    options = model_options(cfg, onnx_folder, fetch_manifest.model_id)
    uri = model_uris.log_model_or_fallback(
        lambda: mlflow.pyfunc.log_model(name=names.ONNX_MODEL_NAME, tags=tags, **options),
        lambda path: mlflow.pyfunc.save_model(path=path, **options),
        names.ONNX_MODEL_NAME,
    )
    verify_logged(uri, fetch_manifest)
    return uri


def _probe_system_messages(onnx_folder: Path, what: str) -> str:
    """system_messages.probe with onnxruntime-genai's own tokenizer and the folder's template
    (the model is loaded for its tokenizer, then let go before the model is logged)."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(onnx_folder)))

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    return system_messages.probe(render, what)  # the model goes with this frame


def verify_logged(model_uri: str, fetch_manifest: Manifest) -> None:
    """The ONNX files inside the logged model are the fetched ones, byte for byte."""
    location = model_uris.model_location(model_uri)
    stored = Path(mlflow.artifacts.download_artifacts(f"{location}/artifacts/{ONNX_ARTIFACT}"))
    manifest.verify(fetch_manifest, names.ONNX_DIR, stored)

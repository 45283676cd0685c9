"""The transformers chat model: a text-generation pipeline logged with task `llm/v1/chat`.

MLflow's `llm/v1/chat` task gives the OpenAI chat contract for free: `{"messages": [...],
"max_tokens": ...}` in, a `chat.completion` with `choices` and `usage` out, the prompt built with
the checkpoint's own chat template.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml

from phi3flow.chat import system_messages
from phi3flow.core import model_uris, names
from phi3flow.core.errors import StepError
from phi3flow.fetching.manifest import Manifest
from phi3flow.models.config import LogTransformersConfig
from phi3flow.models.model_logging import CHAT_EXAMPLE, pinned_requirements

logger = logging.getLogger(__name__)

# What the logged model needs at load time, pinned to the versions that logged it. torchvision is
# not among them: MLflow's default inference would import it (docs/decisions.md), so we list
# them ourselves.
RUNTIME_DISTRIBUTIONS = (
    "mlflow", "transformers", "tokenizers", "huggingface_hub", "safetensors", "torch",
    "numpy", "pandas",
)


def load_pipeline(checkpoint: Path, torch_dtype: str, trust_remote_code: bool) -> Any:
    import torch
    import transformers

    dtype = "auto" if torch_dtype == "auto" else getattr(torch, torch_dtype)
    logger.info("loading %s (dtype=%s)", checkpoint, torch_dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        checkpoint, trust_remote_code=trust_remote_code
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if tokenizer.chat_template is None:
        raise StepError(
            f"the tokenizer in {checkpoint} has no chat template, so chat messages cannot be "
            "turned into a prompt: use an instruct/chat checkpoint."
        )
    return transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)


def model_options(cfg: LogTransformersConfig, pipeline: Any) -> dict[str, Any]:
    """Arguments of mlflow.transformers.log_model/save_model (shared with benchmarks/)."""
    return dict(
        transformers_model=pipeline,
        task="llm/v1/chat",
        model_config=cfg.generation_defaults(),
        pip_requirements=pinned_requirements(RUNTIME_DISTRIBUTIONS),
        input_example=CHAT_EXAMPLE,
        save_pretrained=cfg.save_pretrained,
    )


def _name(pipeline: Any, model_id: str) -> None:
    """Name the pipeline after the checkpoint it came from. MLflow records this name as the
    model's source and answers it as a chat completion's `model`; left alone it would be the
    temporary folder the checkpoint was staged in. (The ONNX model answers the same model_id.)"""
    pipeline.model.name_or_path = model_id
    pipeline.model.config.name_or_path = model_id
    pipeline.tokenizer.name_or_path = model_id


@contextlib.contextmanager
def _pinned_hub_reference(repo_id: str, commit: str, pipeline: Any) -> Iterator[None]:
    """Make MLflow's by-reference logging record `commit`, not the hub's current HEAD.

    With save_pretrained=False MLflow stores the model's name_or_path and asks the hub for the
    repository's *latest* commit (docs/decisions.md), which is not the revision we fetched and
    verified. We point name_or_path at the hub id and answer that lookup with the fetched commit;
    `log()` then checks the written MLmodel to prove the pin took.
    """
    from mlflow.transformers import flavor_config

    _name(pipeline, repo_id)
    latest = flavor_config.get_latest_commit_for_repo  # restored however logging ends
    flavor_config.get_latest_commit_for_repo = lambda repo, *args, **kwargs: commit
    try:
        yield
    finally:
        flavor_config.get_latest_commit_for_repo = latest


def log(cfg: LogTransformersConfig, checkpoint: Path, fetch_manifest: Manifest,
        tags: dict) -> str:
    source = fetch_manifest.sources[names.CHECKPOINT_DIR]
    if not cfg.save_pretrained and source.kind != "hub":
        raise StepError(
            "save_pretrained=false logs a reference to a hub repository, but this checkpoint came "
            f"from a local folder ({source.path}): use save_pretrained=true."
        )
    pipeline = load_pipeline(checkpoint, cfg.torch_dtype, cfg.trust_remote_code)
    _name(pipeline, fetch_manifest.model_id)
    system = system_messages.probe(lambda messages: pipeline.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True), fetch_manifest.model_id)
    tags = {**tags, names.TAG_SYSTEM_MESSAGES: system}
    mlflow.set_tag(names.TAG_SYSTEM_MESSAGES, system)
    reference = (
        _pinned_hub_reference(source.repo_id, source.revision, pipeline)
        if not cfg.save_pretrained
        else contextlib.nullcontext()
    )
    logger.info("logging the chat model (%s)", "weights copied" if cfg.save_pretrained else
                f"by reference to {source.repo_id}@{source.revision}")
    options = model_options(cfg, pipeline)
    with reference:
        uri = model_uris.log_model_or_fallback(
            lambda: mlflow.transformers.log_model(
                name=names.TRANSFORMERS_MODEL_NAME, tags=tags, **options),
            lambda path: mlflow.transformers.save_model(path=path, **options),
            names.TRANSFORMERS_MODEL_NAME,
        )
    if not cfg.save_pretrained:
        _check_pinned(uri, source.revision)
    return uri


def _check_pinned(model_uri: str, commit: str) -> None:
    location = model_uris.model_location(model_uri)
    mlmodel = yaml.safe_load(mlflow.artifacts.load_text(f"{location}/MLmodel"))
    recorded = mlmodel["flavors"]["transformers"].get("source_model_revision")
    if recorded != commit:
        raise StepError(
            f"the logged model references revision {recorded}, not the fetched commit {commit}; "
            "this MLflow version changed how it records revisions: use save_pretrained=true."
        )

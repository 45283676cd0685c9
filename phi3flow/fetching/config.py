"""fetch_model's config: what to fetch, from where, and how to build its ONNX model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from phi3flow.core import names
from phi3flow.core.config import ConfigError, choice, param, parse_bool

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")

ONNX_SOURCES = ("hub", "build")  # or a local directory
PRECISIONS = ("int4", "int8", "fp16", "fp32")
QUANTIZED_PRECISIONS = ("int4", "int8")  # the ones with quantization blocks
EXECUTION_PROVIDERS = ("cpu", "cuda")
KV_CACHES = ("fp32", "int8")
LOG_WEIGHTS = ("auto", "true", "false")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits supports


@dataclass
class FetchModelConfig:
    """fetch_model's options; it has no upstream run, so they are its whole config."""

    model_id: str = param(
        names.DEFAULT_MODEL_ID,
        "Hugging Face hub id (owner/name) or a local checkpoint directory.",
    )
    revision: str = param(
        "",
        "Hub revision to fetch. Empty: the pinned commit for the default model, `main` otherwise. "
        "Ignored for a local directory.",
    )
    onnx_source: str = param(
        "hub",
        "Where the ONNX model comes from: `hub` (Microsoft's published int4 CPU build, default "
        "model only), `build` (convert the fetched weights), or a local onnxruntime-genai folder.",
    )
    onnx_revision: str = param(
        "", f"Revision of {names.ONNX_HUB_REPO} for onnx_source=hub. Empty: the pinned commit."
    )
    precision: str = param("int4",
                            "Builder precision for onnx_source=build: int4|int8|fp16|fp32.")
    execution_provider: str = param(
        "cpu", "Builder execution provider for onnx_source=build: cpu|cuda."
    )
    kv_cache: str = param(
        "fp32", "KV cache dtype for onnx_source=build: fp32|int8. int8 (scales calibrated by "
        "the builder's own tool) reads less per decode step at long contexts but prefills more "
        "slowly: docs/speed.md.",
    )
    block_size: int = param(
        32, "Weights per quantization block for onnx_source=build with int4/int8: 16|32|64|128|"
        "256. 32 is Microsoft's published CPU build; 128 prefilled a third faster on the "
        "benchmark machine (docs/onnx-options.md), accuracy untested here: let evaluate's "
        "max_quality_drop judge it on the real checkpoint.",
    )
    log_weights: str = param(
        "auto",
        "Copy the fetched files into the run's artifacts: `true`; `false` (record only the "
        "manifest; later steps re-resolve the files from the hub cache or the local path, "
        "verified against it); or `auto`: false for files from the hub when the run's artifacts go "
        "to an Azure ML workspace (every byte is uploaded there, and each log step uploads its "
        "model's files anyway: docs/, the Azure ML guide), true otherwise.",
    )
    trust_remote_code: bool = param(
        False, "Fetch the checkpoint's own Python code (*.py) and let the ONNX builder run it. "
        "Off by default; tagged on the run either way.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.log_weights, bool):
            self.log_weights = str(self.log_weights).lower()
        choice("log_weights", self.log_weights, LOG_WEIGHTS)
        self.trust_remote_code = parse_bool("trust_remote_code", self.trust_remote_code)
        if not self.model_id:
            raise ConfigError("model_id is empty: pass a hub id (owner/name) or a local directory.")
        if not self.is_local_model and not HUB_ID_PATTERN.match(self.model_id):
            raise ConfigError(
                f"model_id={self.model_id!r} is neither an existing local directory nor a Hugging "
                "Face hub id (owner/name). Check the path (relative paths are relative to the "
                "project directory) or the hub id."
            )
        if not self.revision and not self.is_local_model:
            self.revision = (
                names.DEFAULT_MODEL_REVISION if self.model_id == names.DEFAULT_MODEL_ID else "main"
            )
        if self.onnx_source not in ONNX_SOURCES and not Path(self.onnx_source).is_dir():
            raise ConfigError(
                f"onnx_source={self.onnx_source!r} is not `hub`, `build` or an existing "
                "directory: pass -P onnx_source=build to convert the fetched weights."
            )
        if self.onnx_source == "hub" and self.model_id != names.DEFAULT_MODEL_ID:
            raise ConfigError(
                f"onnx_source=hub provides the ONNX build of {names.DEFAULT_MODEL_ID} only, not of "
                f"{self.model_id!r}: pass -P onnx_source=build to convert these weights, or a "
                "local onnxruntime-genai folder."
            )
        self.onnx_revision = self.onnx_revision or names.DEFAULT_ONNX_REVISION
        choice("precision", self.precision, PRECISIONS)
        choice("execution_provider", self.execution_provider, EXECUTION_PROVIDERS)
        choice("kv_cache", self.kv_cache, KV_CACHES)
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size={self.block_size} is not one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}.")
        if self.block_size != 32 and (self.onnx_source != "build" or not self.quantized):
            raise ConfigError(
                f"block_size={self.block_size} needs onnx_source=build with precision int4 or "
                "int8: only a quantized build of ours has blocks to size. Pass -P "
                "onnx_source=build, or leave block_size=32."
            )
        if self.kv_cache != "fp32" and self.onnx_source != "build":
            raise ConfigError(
                f"kv_cache={self.kv_cache} needs onnx_source=build: a published or local ONNX "
                "model keeps the KV cache it was built with. Pass -P onnx_source=build, or "
                "leave kv_cache=fp32."
            )

    @property
    def quantized(self) -> bool:
        """A build of ours with quantization blocks (what block_size sizes)."""
        return self.precision in QUANTIZED_PRECISIONS

    @property
    def is_local_model(self) -> bool:
        return Path(self.model_id).is_dir()

    @property
    def pinned(self) -> bool:
        """Hub inputs named by a branch can move under us: only pinned commits are reusable."""
        model_pinned = self.is_local_model or bool(COMMIT_PATTERN.match(self.revision))
        onnx_pinned = self.onnx_source != "hub" or bool(COMMIT_PATTERN.match(self.onnx_revision))
        return model_pinned and onnx_pinned

    @property
    def local_inputs(self) -> list[Path]:
        """The local folders this fetch reads: reuse keys on their contents."""
        return [Path(p) for p in (self.model_id, self.onnx_source) if Path(p).is_dir()]


"""The log steps' configs: log_transformers and log_onnx_pyfunc, and the generation defaults both log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phi3flow.core import names
from phi3flow.core.config import (
    ConfigError,
    Inputs,
    at_least_one,
    choice,
    param,
    parse_bool,
    run_id_of,
)

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
INTERFACES = ("chat", "prompt")


@dataclass
class GenerationOptions:
    """Generation defaults shared by both logged models, so they are compared like for like."""

    max_new_tokens: int = param(256, "Default cap on generated tokens (a request's max_tokens).")
    temperature: float = param(
        0.0, "Default sampling temperature; 0 means greedy decoding (deterministic)."
    )
    top_p: float = param(1.0, "Default nucleus-sampling probability mass (used when sampling).")
    top_k: int = param(50, "Default top-k cut-off (used when sampling).")

    def validate_generation(self) -> None:
        at_least_one("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1].")
        at_least_one("top_k", self.top_k)


@dataclass
class LogTransformersOptions(GenerationOptions):
    torch_dtype: str = param(
        "auto", "Weights dtype when loading: auto (the checkpoint's)|float32|bfloat16|float16."
    )
    trust_remote_code: bool = param(
        False, "Let transformers run the checkpoint's own Python code (fetched only with "
        "fetch_model's trust_remote_code=true). Off by default; tagged on the run either way."
    )
    save_pretrained: bool = param(
        True,
        "Copy the weights into the logged model (true) or log a reference to the hub repo pinned "
        "to the fetched commit (false; hub models only).",
    )

    def __post_init__(self) -> None:
        self.trust_remote_code = parse_bool("trust_remote_code", self.trust_remote_code)
        self.save_pretrained = parse_bool("save_pretrained", self.save_pretrained)
        self.validate_generation()
        choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)

    def generation_defaults(self) -> dict[str, Any]:
        """The logged model's default generation options (a request may override them)."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass
class LogTransformersConfig(Inputs, LogTransformersOptions):
    fetch_run_id: str = run_id_of(names.FETCH_MODEL)


@dataclass
class LogOnnxPyfuncOptions(GenerationOptions):
    interface: str = param(
        "chat",
        "Request contract: chat (OpenAI messages in, chat.completion out) or prompt "
        "({\"prompt\": ...} in, a string out).",
    )

    def __post_init__(self) -> None:
        self.validate_generation()
        choice("interface", self.interface, INTERFACES)


@dataclass
class LogOnnxPyfuncConfig(Inputs, LogOnnxPyfuncOptions):
    fetch_run_id: str = run_id_of(names.FETCH_MODEL)


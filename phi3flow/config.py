"""Typed step configurations: one dataclass per entry point, one name per parameter.

The MLproject parameter, the command-line flag and the dataclass field share one snake_case name;
`tests/test_project_files.py` parses every MLproject command with its step's parser to keep them
in step. Validation lives in `__post_init__`, so a bad value fails before any heavy work, with a
message that names the parameter and the fix.

MLflow passes every parameter as a string and validates none of them (docs/decisions.md), so every
MLproject parameter has a default here and in MLproject: a missing required value is our error
message and a FAILED run, not an MLflow exception that leaves the run RUNNING.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from phi3flow import names
from phi3flow.errors import StepError
from phi3flow.names import PROJECT_ROOT

CHALLENGER = "challenger"
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")

ONNX_SOURCES = ("hub", "build")  # or a local directory
PRECISIONS = ("int4", "fp16", "fp32")
EXECUTION_PROVIDERS = ("cpu", "cuda")
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
INTERFACES = ("chat", "prompt")


class ConfigError(StepError):
    """A parameter is missing or invalid; the message names it and says what to pass."""


def _param(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def parse_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: pass true or false.")


def require_run_id(name: str, value: str, producer: str) -> None:
    if not value:
        raise ConfigError(
            f"{name} is required: pass -P {name}=<run ID of a finished {producer} run> "
            f"(find it with `mlflow runs list --experiment-id <id>` or in the MLflow UI)."
        )
    if not RUN_ID_PATTERN.match(value):
        raise ConfigError(
            f"{name}={value!r} is not an MLflow run ID (32 lowercase hex characters); "
            f"pass the run ID of a finished {producer} run."
        )


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}.")


def _at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}={value} must be at least 1.")


@dataclass
class FetchModelConfig:
    model_id: str = _param(
        names.DEFAULT_MODEL_ID,
        "Hugging Face hub id (owner/name) or a local checkpoint directory.",
    )
    revision: str = _param(
        "",
        "Hub revision to fetch. Empty: the pinned commit for the default model, `main` otherwise. "
        "Ignored for a local directory.",
    )
    onnx_source: str = _param(
        "hub",
        "Where the ONNX model comes from: `hub` (Microsoft's published int4 CPU build, default "
        "model only), `build` (convert the fetched weights), or a local onnxruntime-genai folder.",
    )
    onnx_revision: str = _param(
        "", f"Revision of {names.ONNX_HUB_REPO} for onnx_source=hub. Empty: `main`, recorded."
    )
    precision: str = _param("int4", "Builder precision for onnx_source=build: int4|fp16|fp32.")
    execution_provider: str = _param(
        "cpu", "Builder execution provider for onnx_source=build: cpu|cuda."
    )
    log_weights: bool = _param(
        True,
        "Copy the fetched files into the run's artifacts (true) or record only the manifest and "
        "re-resolve the files from the hub cache or local path later (false).",
    )
    trust_remote_code: bool = _param(
        False, "Fetch the checkpoint's own Python code (*.py) and let the ONNX builder run it. "
        "Off by default; tagged on the run either way.",
    )

    def __post_init__(self) -> None:
        self.log_weights = parse_bool("log_weights", self.log_weights)
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
        _choice("precision", self.precision, PRECISIONS)
        _choice("execution_provider", self.execution_provider, EXECUTION_PROVIDERS)

    @property
    def is_local_model(self) -> bool:
        return Path(self.model_id).is_dir()


@dataclass
class GenerationConfig:
    """Generation defaults shared by both logged models, so they are compared like for like."""

    max_new_tokens: int = _param(256, "Default cap on generated tokens (a request's max_tokens).")
    temperature: float = _param(
        0.0, "Default sampling temperature; 0 means greedy decoding (deterministic)."
    )
    top_p: float = _param(1.0, "Default nucleus-sampling probability mass (used when sampling).")
    top_k: int = _param(50, "Default top-k cut-off (used when sampling).")

    def validate_generation(self) -> None:
        _at_least_one("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1].")
        _at_least_one("top_k", self.top_k)


@dataclass
class LogTransformersConfig(GenerationConfig):
    fetch_run_id: str = _param("", "Run ID of a finished fetch_model run (required).")
    torch_dtype: str = _param(
        "auto", "Weights dtype when loading: auto (the checkpoint's)|float32|bfloat16|float16."
    )
    trust_remote_code: bool = _param(
        False, "Allow code shipped in the checkpoint to run. Off by default; tagged when on."
    )
    save_pretrained: bool = _param(
        True,
        "Copy the weights into the logged model (true) or log a reference to the hub repo pinned "
        "to the fetched commit (false; hub models only).",
    )

    def __post_init__(self) -> None:
        require_run_id("fetch_run_id", self.fetch_run_id, names.FETCH_MODEL)
        self.trust_remote_code = parse_bool("trust_remote_code", self.trust_remote_code)
        self.save_pretrained = parse_bool("save_pretrained", self.save_pretrained)
        self.validate_generation()
        _choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)

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
class LogOnnxPyfuncConfig(GenerationConfig):
    fetch_run_id: str = _param("", "Run ID of a finished fetch_model run (required).")
    interface: str = _param(
        "chat",
        "Request contract: chat (OpenAI messages in, chat.completion out) or prompt "
        "({\"prompt\": ...} in, a string out).",
    )

    def __post_init__(self) -> None:
        require_run_id("fetch_run_id", self.fetch_run_id, names.FETCH_MODEL)
        self.validate_generation()
        _choice("interface", self.interface, INTERFACES)


@dataclass
class EvaluateConfig:
    transformers_run_id: str = _param("", "Run ID of a finished log_transformers run (required).")
    onnx_run_id: str = _param("", "Run ID of a finished log_onnx_pyfunc run (required).")
    eval_data: str = _param(
        "data/eval.jsonl",
        "JSONL eval set, one {\"messages\": [...], \"expected\": \"...\"} per line; relative "
        "paths are relative to the project directory.",
    )
    max_new_tokens: int = _param(256, "Cap on generated tokens per answer, for both models.")
    # The gate. Defaults suit Phi-3-mini on a CPU; see README, "The decision file".
    min_quality: float = _param(0.8, "Minimum share of answers containing the expected text.")
    max_quality_drop: float = _param(
        0.05, "Largest quality drop of the ONNX model against the transformers model."
    )
    max_p95_latency_s: float = _param(120.0, "Largest 95th-percentile answer latency, seconds.")
    judge_model_uri: str = _param(
        "",
        "Optional LLM judge: an MLflow chat model URI that grades each answer against the "
        "expected one (reported as <model>_judge_correct, not gated). Empty: no judge.",
    )

    def __post_init__(self) -> None:
        require_run_id("transformers_run_id", self.transformers_run_id, names.LOG_TRANSFORMERS)
        require_run_id("onnx_run_id", self.onnx_run_id, names.LOG_ONNX_PYFUNC)
        self.validate_evaluation()

    def validate_evaluation(self) -> None:
        _at_least_one("max_new_tokens", self.max_new_tokens)
        for name in ("min_quality", "max_quality_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be between 0 and 1.")
        if not self.max_p95_latency_s > 0:
            raise ConfigError(f"max_p95_latency_s={self.max_p95_latency_s} must be > 0 seconds.")
        if self.judge_model_uri and not re.match(r"^(models|runs):/.+", self.judge_model_uri):
            raise ConfigError(f"judge_model_uri={self.judge_model_uri!r} is not a models:/ or "
                              "runs:/ URI of an MLflow chat model.")
        if not self.eval_data_path.is_file():
            raise ConfigError(f"eval_data={self.eval_data!r} does not exist (resolved to "
                              f"{self.eval_data_path}): pass a JSONL file.")

    @property
    def eval_data_path(self) -> Path:
        path = Path(self.eval_data)
        return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path

    def thresholds(self) -> dict[str, float]:
        return {"min_quality": self.min_quality, "max_quality_drop": self.max_quality_drop,
                "max_p95_latency_s": self.max_p95_latency_s}


@dataclass
class RegisterConfig:
    evaluate_run_id: str = _param("", "Run ID of a finished evaluate run (required).")
    model_name: str = _param(names.DEFAULT_REGISTERED_MODEL, "Registered model name.")
    alias: str = _param(
        "champion", "Alias the chosen model competes for; a loser is aliased `challenger`."
    )
    allow_unvalidated: bool = _param(
        False, "Give the alias even if the gate failed or the champion is better (recorded)."
    )

    def __post_init__(self) -> None:
        require_run_id("evaluate_run_id", self.evaluate_run_id, names.EVALUATE)
        self.validate_registration()

    def validate_registration(self) -> None:
        self.allow_unvalidated = parse_bool("allow_unvalidated", self.allow_unvalidated)
        for name in ("model_name", "alias"):
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,99}", getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be letters, digits, "
                                  "'_', '-' or '.', starting with a letter or digit.")
        if self.alias == CHALLENGER or re.fullmatch(r"v\d+", self.alias):
            raise ConfigError(f"alias={self.alias!r} is reserved: `{CHALLENGER}` marks losers "
                              "and v<N> names versions.")


@dataclass
class MainConfig(FetchModelConfig, LogTransformersConfig, LogOnnxPyfuncConfig, EvaluateConfig,
                 RegisterConfig):
    """`main` takes every step's parameters (minus the run IDs it wires itself) plus `force`."""

    # Not main parameters: main wires the run IDs itself.
    fetch_run_id: str = field(default="", metadata={"help": "", "cli": False})
    transformers_run_id: str = field(default="", metadata={"help": "", "cli": False})
    onnx_run_id: str = field(default="", metadata={"help": "", "cli": False})
    evaluate_run_id: str = field(default="", metadata={"help": "", "cli": False})
    force: bool = _param(False, "Re-run every step even when a finished run can be reused.")

    def __post_init__(self) -> None:
        self.force = parse_bool("force", self.force)
        FetchModelConfig.__post_init__(self)
        # Validate the log steps' options now, before the first step spends minutes fetching.
        self.log_transformers_config()
        self.log_onnx_pyfunc_config()
        self.validate_evaluation()
        self.validate_registration()

    def fetch_model_config(self) -> FetchModelConfig:
        return _subset(FetchModelConfig, self)

    def log_transformers_config(self, fetch_run_id: str = "0" * 32) -> LogTransformersConfig:
        return _subset(LogTransformersConfig, self, fetch_run_id=fetch_run_id)

    def log_onnx_pyfunc_config(self, fetch_run_id: str = "0" * 32) -> LogOnnxPyfuncConfig:
        return _subset(LogOnnxPyfuncConfig, self, fetch_run_id=fetch_run_id)

    def evaluate_config(self, transformers_run_id: str, onnx_run_id: str) -> EvaluateConfig:
        return _subset(EvaluateConfig, self, transformers_run_id=transformers_run_id,
                       onnx_run_id=onnx_run_id)

    def register_config(self, evaluate_run_id: str) -> RegisterConfig:
        return _subset(RegisterConfig, self, evaluate_run_id=evaluate_run_id)


C = TypeVar("C")


def _subset(cls: type[C], source: Any, **overrides: Any) -> C:
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
    values.update(overrides)
    return cls(**values)


def parameters(config: Any) -> dict[str, str]:
    """The config as MLflow run parameters (the strings `mlflow run -P` would pass)."""
    return {f.name: _to_param(getattr(config, f.name)) for f in cli_fields(type(config))}


def _to_param(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is a ConfigError naming it (one line, exit code 2)."""

    def error(self, message: str):
        raise ConfigError(f"bad command line: {message}. Pass each parameter as -P name=value "
                          "with a value of its type (see MLproject, or --help for the flags).")


def build_parser(cls: type) -> argparse.ArgumentParser:
    """An argparse parser whose flags are exactly the dataclass fields (`--model_id`, ...)."""
    parser = _Parser(description=(cls.__doc__ or "").strip() or None)
    for f in cli_fields(cls):
        kind = {int: int, float: float}.get(_field_type(f), str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return parser


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool}.get(str(f.type), str)


def parse_config(cls: type[C], argv: list[str] | None) -> C:
    namespace = build_parser(cls).parse_args(argv)
    return cls(**vars(namespace))

"""Typed step configurations: one dataclass per entry point, one name per parameter.

A step's config is its inputs (the run IDs of its upstream steps, `Inputs`) plus its options
(`LogTransformersOptions`, ...); `MainConfig` contains every step's options and wires the run IDs
itself (phi3flow/pipeline.py). The MLproject parameter, the command-line flag and the dataclass
field share one snake_case name; `tests/unit/test_project_files.py` parses every MLproject
command with its step's parser to keep them in step. Validation lives in `__post_init__`, so a
bad value fails before any heavy work, with a message that names the parameter and the fix.

MLflow passes every parameter as a string and validates none of them (docs/decisions.md), so every
MLproject parameter has a default here and in MLproject: a missing required value is our error
message and a FAILED run, not an MLflow exception that leaves the run RUNNING.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from phi3flow import eval_data, names
from phi3flow.errors import StepError

CHALLENGER = "challenger"
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")

ONNX_SOURCES = ("hub", "build")  # or a local directory
PRECISIONS = ("int4", "int8", "fp16", "fp32")
QUANTIZED_PRECISIONS = ("int4", "int8")  # the ones with quantization blocks
EXECUTION_PROVIDERS = ("cpu", "cuda")
KV_CACHES = ("fp32", "int8")
LOG_WEIGHTS = ("auto", "true", "false")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits supports
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
INTERFACES = ("chat", "prompt")
# batch_score's input formats, each with the file name suffixes that name it (compressed files
# keep theirs before the compression's: rows.jsonl.gz).
INPUT_FORMATS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",), "csv": (".csv",)}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".snappy", ".deflate")
TABLE_PREFIX = "table:"
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")  # what mlflow.pyfunc.spark_udf takes
ACTIVE_SESSION = "active"  # spark_master: the SparkSession this process already has
SPARK_MASTER_PATTERN = re.compile(
    r"^(local(\[(\*|[1-9]\d*)(,[1-9]\d*)?\])?|local-cluster\[\d+,\d+,\d+\]"
    r"|(spark|k8s|mesos)://\S+|yarn|" + ACTIVE_SESSION + ")$")
URI_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:/")  # s3://, abfss://, dbfs:/, file:/ ...


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


def _run_id_of(producer: str) -> Any:
    """An input of a step: the run ID of a finished `producer` run (checked by Inputs)."""
    return field(default="", metadata={
        "help": f"Run ID of a finished {producer} run (required).", "upstream": producer})


class Inputs:
    """A step config's first base: its run-ID inputs are checked, then its options."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if producer := f.metadata.get("upstream"):
                require_run_id(f.name, getattr(self, f.name), producer)
        super().__post_init__()


@dataclass
class FetchModelConfig:
    """fetch_model's options; it has no upstream run, so they are its whole config."""

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
        "", f"Revision of {names.ONNX_HUB_REPO} for onnx_source=hub. Empty: the pinned commit."
    )
    precision: str = _param("int4",
                            "Builder precision for onnx_source=build: int4|int8|fp16|fp32.")
    execution_provider: str = _param(
        "cpu", "Builder execution provider for onnx_source=build: cpu|cuda."
    )
    kv_cache: str = _param(
        "fp32", "KV cache dtype for onnx_source=build: fp32|int8. int8 (scales calibrated by "
        "the builder's own tool) reads less per decode step at long contexts but prefills more "
        "slowly: docs/speed.md.",
    )
    block_size: int = _param(
        32, "Weights per quantization block for onnx_source=build with int4/int8: 16|32|64|128|"
        "256. 32 is Microsoft's published CPU build; 128 prefilled a third faster on the "
        "benchmark machine (docs/onnx-options.md), accuracy untested here: let evaluate's "
        "max_quality_drop judge it on the real checkpoint.",
    )
    log_weights: str = _param(
        "auto",
        "Copy the fetched files into the run's artifacts: `true`; `false` (record only the "
        "manifest; later steps re-resolve the files from the hub cache or the local path, "
        "verified against it); or `auto`: false for files from the hub when the run's artifacts go "
        "to an Azure ML workspace (every byte is uploaded there, and each log step uploads its "
        "model's files anyway: docs/, the Azure ML guide), true otherwise.",
    )
    trust_remote_code: bool = _param(
        False, "Fetch the checkpoint's own Python code (*.py) and let the ONNX builder run it. "
        "Off by default; tagged on the run either way.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.log_weights, bool):
            self.log_weights = str(self.log_weights).lower()
        _choice("log_weights", self.log_weights, LOG_WEIGHTS)
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
        _choice("kv_cache", self.kv_cache, KV_CACHES)
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


@dataclass
class GenerationOptions:
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
class LogTransformersOptions(GenerationOptions):
    torch_dtype: str = _param(
        "auto", "Weights dtype when loading: auto (the checkpoint's)|float32|bfloat16|float16."
    )
    trust_remote_code: bool = _param(
        False, "Let transformers run the checkpoint's own Python code (fetched only with "
        "fetch_model's trust_remote_code=true). Off by default; tagged on the run either way."
    )
    save_pretrained: bool = _param(
        True,
        "Copy the weights into the logged model (true) or log a reference to the hub repo pinned "
        "to the fetched commit (false; hub models only).",
    )

    def __post_init__(self) -> None:
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
class LogTransformersConfig(Inputs, LogTransformersOptions):
    fetch_run_id: str = _run_id_of(names.FETCH_MODEL)


@dataclass
class LogOnnxPyfuncOptions(GenerationOptions):
    interface: str = _param(
        "chat",
        "Request contract: chat (OpenAI messages in, chat.completion out) or prompt "
        "({\"prompt\": ...} in, a string out).",
    )

    def __post_init__(self) -> None:
        self.validate_generation()
        _choice("interface", self.interface, INTERFACES)


@dataclass
class LogOnnxPyfuncConfig(Inputs, LogOnnxPyfuncOptions):
    fetch_run_id: str = _run_id_of(names.FETCH_MODEL)


@dataclass
class EvaluateOptions:
    eval_data: str = _param(
        eval_data.AUTO,
        "The eval set: a JSONL file, one {\"messages\": [...], \"expected\": \"...\", "
        "\"category\": \"...\"} per line (relative paths are relative to the project "
        "directory); or the name or ID (d-...) of an MLflow evaluation dataset; or auto: "
        f"{eval_data.FULL_SET} for a checkpoint of 1 GB or more, {eval_data.SMOKE_SET} for a "
        "smaller (test-sized) one.",
    )
    max_new_tokens: int = _param(256, "Cap on generated tokens per answer, for both models.")
    # The gate. Defaults suit Phi-3-mini on a CPU; see docs/parameters.md, "The decision file".
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
        _at_least_one("max_new_tokens", self.max_new_tokens)
        for name in ("min_quality", "max_quality_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be between 0 and 1.")
        if not self.max_p95_latency_s > 0:
            raise ConfigError(f"max_p95_latency_s={self.max_p95_latency_s} must be > 0 seconds.")
        if self.judge_model_uri and not re.match(r"^(models|runs):/.+", self.judge_model_uri):
            raise ConfigError(f"judge_model_uri={self.judge_model_uri!r} is not a models:/ or "
                              "runs:/ URI of an MLflow chat model.")
        if (self.eval_data != eval_data.AUTO and eval_data.is_file_value(self.eval_data)
                and not self.eval_data_path.is_file()):
            raise ConfigError(f"eval_data={self.eval_data!r} does not exist (resolved to "
                              f"{self.eval_data_path}): pass a JSONL file, the name or ID of an "
                              f"MLflow evaluation dataset, or {eval_data.AUTO}.")

    @property
    def eval_data_path(self) -> Path:
        return eval_data.resolve_path(self.eval_data)

    @property
    def eval_data_files(self) -> list[Path]:
        """The local files evaluate may read: main's reuse keys on their contents."""
        if self.eval_data == eval_data.AUTO:
            return [eval_data.resolve_path(p) for p in (eval_data.SMOKE_SET, eval_data.FULL_SET)]
        return [self.eval_data_path] if eval_data.is_file_value(self.eval_data) else []

    @property
    def eval_data_is_dataset(self) -> bool:
        """An MLflow evaluation dataset can gain records under the same name: never reused."""
        return self.eval_data != eval_data.AUTO and not eval_data.is_file_value(self.eval_data)

    def thresholds(self) -> dict[str, float]:
        """The gate's bounds by parameter name (decision.THRESHOLDS says what each bounds)."""
        from phi3flow.decision import THRESHOLDS

        return {t.param: getattr(self, t.param) for t in THRESHOLDS}


@dataclass
class EvaluateConfig(Inputs, EvaluateOptions):
    transformers_run_id: str = _run_id_of(names.LOG_TRANSFORMERS)
    onnx_run_id: str = _run_id_of(names.LOG_ONNX_PYFUNC)


@dataclass
class RegisterOptions:
    model_name: str = _param(names.DEFAULT_REGISTERED_MODEL, "Registered model name.")
    alias: str = _param(
        "champion", "Alias the chosen model competes for; a loser is aliased `challenger`."
    )
    allow_unvalidated: bool = _param(
        False, "Give the alias even if the gate failed or the champion is better (recorded)."
    )

    def __post_init__(self) -> None:
        self.allow_unvalidated = parse_bool("allow_unvalidated", self.allow_unvalidated)
        for name in ("model_name", "alias"):
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,99}", getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be letters, digits, "
                                  "'_', '-' or '.', starting with a letter or digit.")
        if self.alias == CHALLENGER or re.fullmatch(r"v\d+", self.alias):
            raise ConfigError(f"alias={self.alias!r} is reserved: `{CHALLENGER}` marks losers "
                              "and v<N> names versions.")


@dataclass
class RegisterConfig(Inputs, RegisterOptions):
    evaluate_run_id: str = _run_id_of(names.EVALUATE)


def _format_of(name: str) -> str | None:
    """The input format a file name's suffix names (rows.jsonl.gz -> jsonl), or None."""
    suffixes = [x.lower() for x in Path(name).suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    return next((fmt for fmt, names_ in INPUT_FORMATS.items() if suffix in names_), None)


def _data_files(folder: Path) -> list[Path]:
    """The files Spark reads in a folder: not those whose name (or folder) starts with _ or ."""
    return [p for p in folder.rglob("*") if p.is_file()
            and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)]


@dataclass
class BatchScoreConfig:
    """batch_score: a chat model over every row of a dataset, on Apache Spark."""

    model_uri: str = _param(
        f"models:/{names.DEFAULT_REGISTERED_MODEL}@champion",
        "The chat model to run: models:/NAME@ALIAS (the run records the version the alias "
        "pointed to and uses that version throughout), models:/NAME/VERSION, models:/m-..., "
        "runs:/RUN/PATH or a local model folder. Default: register's champion.",
    )
    input: str = _param(
        "",
        "The rows to score (required): a JSONL, Parquet or CSV file or folder (a local path, "
        "relative to the current directory, else to the project directory; or a URI the Spark "
        "cluster reads, such as s3a://, abfss://, dbfs:/), or table:NAME for a table of the "
        "Spark catalog. Each row needs `messages` (OpenAI chat messages; in CSV, as JSON text) "
        "or `prompt` (plain text, sent as one user turn); other columns pass through.",
    )
    input_format: str = _param(
        "auto", "jsonl|parquet|csv, or auto: from the file names' suffixes (.jsonl/.json/"
        ".ndjson, .parquet, .csv, optionally compressed: .gz ...).",
    )
    output: str = _param(
        "",
        "Where the scored rows go: a new Parquet folder (local, or a URI every Spark node "
        "writes to). Empty: the run's artifact `scored/` (written on the driver's disk first, "
        "so on a cluster whose nodes do not share it, pass a shared folder).",
    )
    spark_master: str = _param(
        "local[*]",
        "Spark master URL: local[*] (every core of this machine), local[N], spark://HOST:PORT "
        "(a standalone cluster), yarn, k8s://..., or `active`: the SparkSession this process "
        "already has (a notebook, spark-submit, a Databricks job).",
    )
    max_new_tokens: int = _param(256, "Cap on generated tokens per row (every row's max_tokens).")
    temperature: float = _param(0.0, "Sampling temperature for every row; 0 means greedy.")
    batch_size: int = _param(
        16, "Rows per model call (spark.sql.execution.arrow.maxRecordsPerBatch). The ONNX "
        "model's scheduler shares decode steps between a call's rows; each row holds a KV cache "
        "of (prompt + max_new_tokens) tokens meanwhile.",
    )
    executor_env_manager: str = _param(
        "local",
        "How the executors get the model's Python environment (mlflow.pyfunc.spark_udf's "
        "env_manager): local (their Python already has the model's requirements: this machine, "
        "or a cluster set up for it), or virtualenv|uv|conda (build the model's pinned "
        "environment on each executor; needs the package index there): docs/batch-scoring.md.",
    )
    cores_per_model: int = _param(
        0, "Cores each copy of the model uses (spark.task.cpus, and the model's threads): an "
        "executor with C cores runs C / cores_per_model copies side by side. 0: every core for "
        "a local master (one copy, like in-process predict); spark.task.cpus as the cluster "
        "sets it (Spark's default 1) otherwise.",
    )

    def __post_init__(self) -> None:
        if not self.model_uri.strip():
            raise ConfigError("model_uri is empty: pass a models:/NAME@ALIAS, models:/NAME/VERSION "
                              "or runs:/ URI, or leave the default (register's champion).")
        if not self.input.strip():
            raise ConfigError("input is required: pass -P input=<a JSONL, Parquet or CSV file or "
                              "folder, or table:NAME> whose rows have `messages` or `prompt`.")
        if self.input_format != "auto":
            _choice("input_format", self.input_format, ("auto", *INPUT_FORMATS))
        _at_least_one("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        _at_least_one("batch_size", self.batch_size)
        _choice("executor_env_manager", self.executor_env_manager, ENV_MANAGERS)
        if self.cores_per_model < 0:
            raise ConfigError(f"cores_per_model={self.cores_per_model} must be >= 0 (0: auto).")
        if not SPARK_MASTER_PATTERN.match(self.spark_master):
            raise ConfigError(
                f"spark_master={self.spark_master!r} is not a Spark master URL: pass local[*], "
                "local[N], spark://HOST:PORT, yarn, k8s://HOST:PORT or active.")
        if self.input_table is None:
            self._check_input_path()
        elif not re.fullmatch(r"[A-Za-z_][\w.`-]*", self.input_table):
            raise ConfigError(f"input={self.input!r} does not name a table: pass "
                              f"{TABLE_PREFIX}NAME (or {TABLE_PREFIX}DATABASE.NAME).")
        if self.output and self.local_output is not None and self.local_output.exists():
            raise ConfigError(f"output={self.output!r} already exists ({self.local_output}): "
                              "batch_score never overwrites. Pass a new folder, or remove it.")

    def _check_input_path(self) -> None:
        path = self.local_input
        if path is None:  # a URI only the cluster can read: Spark checks it
            if self.input_format == "auto" and _format_of(self.input.rstrip("/")) is None:
                raise ConfigError(
                    f"input={self.input!r}: its format cannot be told from its name; pass "
                    f"-P input_format=jsonl, parquet or csv.")
            return
        if not path.exists():
            raise ConfigError(f"input={self.input!r} does not exist (resolved to {path}): pass a "
                              "JSONL, Parquet or CSV file or folder, or table:NAME.")
        if self.input_format != "auto":
            return
        files = [path] if path.is_file() else _data_files(path)
        if not files:
            raise ConfigError(f"input={self.input!r} is a folder with no data files: pass a "
                              "folder of JSONL, Parquet or CSV files.")
        found = {_format_of(p.name) for p in files}
        if None in found or len(found) > 1:
            names_ = sorted({p.name for p in files if _format_of(p.name) is None})[:3] or sorted(
                {p.suffix for p in files})
            raise ConfigError(
                f"input={self.input!r}: cannot tell its format ({', '.join(names_)}): name the "
                "files .jsonl, .parquet or .csv (all one format), or pass -P input_format=jsonl, "
                "parquet or csv.")

    @property
    def input_table(self) -> str | None:
        """NAME of input=table:NAME, else None."""
        return self.input[len(TABLE_PREFIX):] if self.input.startswith(TABLE_PREFIX) else None

    @property
    def local_input(self) -> Path | None:
        """The input as a local path (None for a table or a URI the cluster reads)."""
        if self.input_table is not None or (URI_SCHEME.match(self.input)
                                            and not self.input.startswith("file:")):
            return None
        return eval_data.resolve_path(self.input.removeprefix("file:").removeprefix("//"))

    @property
    def local_output(self) -> Path | None:
        """The output as a local folder (None for a URI, or the default: the run's artifacts)."""
        if not self.output or (URI_SCHEME.match(self.output)
                               and not self.output.startswith("file:")):
            return None
        return Path(self.output.removeprefix("file:").removeprefix("//")).resolve()

    @property
    def resolved_format(self) -> str:
        """jsonl, parquet or csv: input_format, or what the input's file names say."""
        if self.input_format != "auto" or self.input_table is not None:
            return self.input_format
        path = self.local_input
        if path is None:
            return _format_of(self.input.rstrip("/"))
        return _format_of((path if path.is_file() else _data_files(path)[0]).name)


# main's flags that feed options of several steps, with what they mean for main as a whole.
# Each step's own help says what the option does there; here it says which steps it feeds.
MAIN_SHARED_HELP = {
    "max_new_tokens": "Cap on generated tokens: the logged models' default (a request's "
                      "max_tokens may change it) and evaluate's cap per answer.",
    "temperature": "Default sampling temperature of both logged models; 0 means greedy.",
    "top_p": "Default nucleus-sampling probability mass of both logged models.",
    "top_k": "Default top-k cut-off of both logged models.",
    "trust_remote_code": "Trust the checkpoint's own Python code: fetch_model fetches its *.py "
                         "files (and the ONNX builder may run them) and log_transformers lets "
                         "transformers run them. Off by default; tagged on the runs either way.",
}


@dataclass
class MainConfig:
    """`main`: every step's options (not their run IDs, which main wires itself), plus `force`.

    Its flags are the union of the steps' option fields; a flag that several steps take (see
    MAIN_SHARED_HELP) sets it for each of them. Each part is validated as it is built, so a bad
    value stops main before the first step spends minutes fetching.
    """

    # One part per step, named after its entry point, in pipeline order.
    fetch_model: FetchModelConfig
    log_transformers: LogTransformersOptions
    log_onnx_pyfunc: LogOnnxPyfuncOptions
    evaluate: EvaluateOptions
    register: RegisterOptions
    force: bool = _param(False, "Re-run every step even when a finished run can be reused.")

    def __post_init__(self) -> None:
        self.force = parse_bool("force", self.force)

    @classmethod
    def from_flags(cls, values: dict[str, Any]) -> MainConfig:
        parts = {name: part(**{f.name: values[f.name] for f in dataclasses.fields(part)})
                 for name, part in main_parts().items()}
        return cls(**parts, force=values["force"])

    def flag_values(self) -> dict[str, Any]:
        """The value of each of main's flags (a shared flag has one value in every part)."""
        values = {"force": self.force}
        for name in main_parts():
            part = getattr(self, name)
            values = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)} | values
        return values


def main_parts() -> dict[str, type]:
    """{"fetch_model": FetchModelConfig, ...}: main's parts and their options classes."""
    hints = typing.get_type_hints(MainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(MainConfig) if f.name != "force"}


def main_fields() -> list[dataclasses.Field]:
    """main's flags: each step option once (first in pipeline order), then `force`."""
    flags: dict[str, dataclasses.Field] = {}
    for part in main_parts().values():
        for f in dataclasses.fields(part):
            if f.name not in flags:
                flags[f.name] = _with_help(f, MAIN_SHARED_HELP.get(f.name, f.metadata["help"]))
    (force,) = [f for f in dataclasses.fields(MainConfig) if f.name == "force"]
    return [*flags.values(), force]


def _with_help(f: dataclasses.Field, help: str) -> dataclasses.Field:
    copy = field(default=f.default, metadata={**f.metadata, "help": help})
    copy.name, copy.type = f.name, f.type
    return copy


C = TypeVar("C")


def parameters(config: Any) -> dict[str, str]:
    """The config as MLflow run parameters (the strings `mlflow run -P` would pass)."""
    if isinstance(config, MainConfig):
        values = config.flag_values()
        return {f.name: _to_param(values[f.name]) for f in main_fields()}
    return {f.name: _to_param(getattr(config, f.name)) for f in dataclasses.fields(config)}


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
    """A config's flags: its fields; for main, its parts' fields (main_fields)."""
    return main_fields() if cls is MainConfig else list(dataclasses.fields(cls))


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool}.get(str(f.type), str)


def parse_config(cls: type[C], argv: list[str] | None) -> C:
    values = vars(build_parser(cls).parse_args(argv))
    return MainConfig.from_flags(values) if cls is MainConfig else cls(**values)


# Each entry point's config, by MLproject name.
STEP_CONFIGS: dict[str, type] = {
    names.FETCH_MODEL: FetchModelConfig,
    names.LOG_TRANSFORMERS: LogTransformersConfig,
    names.LOG_ONNX_PYFUNC: LogOnnxPyfuncConfig,
    names.EVALUATE: EvaluateConfig,
    names.REGISTER: RegisterConfig,
    names.MAIN: MainConfig,
    names.BATCH_SCORE: BatchScoreConfig,
}

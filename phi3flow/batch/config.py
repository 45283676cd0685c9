"""batch_score's config: the model, the input (its format detected from its name), the output and Spark."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from phi3flow.core import names
from phi3flow.core.config import ConfigError, at_least_one, choice, param
from phi3flow.evaluation import eval_data

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

    model_uri: str = param(
        f"models:/{names.DEFAULT_REGISTERED_MODEL}@champion",
        "The chat model to run: models:/NAME@ALIAS (the run records the version the alias "
        "pointed to and uses that version throughout), models:/NAME/VERSION, models:/m-..., "
        "runs:/RUN/PATH or a local model folder. Default: register's champion.",
    )
    input: str = param(
        "",
        "The rows to score (required): a JSONL, Parquet or CSV file or folder (a local path, "
        "relative to the current directory, else to the project directory; or a URI the Spark "
        "cluster reads, such as s3a://, abfss://, dbfs:/), or table:NAME for a table of the "
        "Spark catalog. Each row needs `messages` (OpenAI chat messages; in CSV, as JSON text) "
        "or `prompt` (plain text, sent as one user turn); other columns pass through.",
    )
    input_format: str = param(
        "auto", "jsonl|parquet|csv, or auto: from the file names' suffixes (.jsonl/.json/"
        ".ndjson, .parquet, .csv, optionally compressed: .gz ...).",
    )
    output: str = param(
        "",
        "Where the scored rows go: a new Parquet folder (local, or a URI every Spark node "
        "writes to). Empty: the run's artifact `scored/` (written on the driver's disk first, "
        "so on a cluster whose nodes do not share it, pass a shared folder).",
    )
    spark_master: str = param(
        "local[*]",
        "Spark master URL: local[*] (every core of this machine), local[N], spark://HOST:PORT "
        "(a standalone cluster), yarn, k8s://..., or `active`: the SparkSession this process "
        "already has (a notebook, spark-submit, a Databricks job).",
    )
    max_new_tokens: int = param(256, "Cap on generated tokens per row (every row's max_tokens).")
    temperature: float = param(0.0, "Sampling temperature for every row; 0 means greedy.")
    batch_size: int = param(
        16, "Rows per model call (spark.sql.execution.arrow.maxRecordsPerBatch). The ONNX "
        "model's scheduler shares decode steps between a call's rows; each row holds a KV cache "
        "of (prompt + max_new_tokens) tokens meanwhile.",
    )
    executor_env_manager: str = param(
        "local",
        "How the executors get the model's Python environment (mlflow.pyfunc.spark_udf's "
        "env_manager): local (their Python already has the model's requirements: this machine, "
        "or a cluster set up for it), or virtualenv|uv|conda (build the model's pinned "
        "environment on each executor; needs the package index there): docs/batch-scoring.md.",
    )
    cores_per_model: int = param(
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
            choice("input_format", self.input_format, ("auto", *INPUT_FORMATS))
        at_least_one("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        at_least_one("batch_size", self.batch_size)
        choice("executor_env_manager", self.executor_env_manager, ENV_MANAGERS)
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


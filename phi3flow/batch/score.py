"""batch_score's work: a chat model over every row of a dataset, on Apache Spark.

In: a BatchScoreConfig. The model: a registered alias (resolved once, to the version it names
at the start, which is then scored throughout), a registered version, a logged model or a
local folder; it must answer OpenAI chat `messages`. The rows: JSONL, Parquet, CSV or a Spark
table, each with `messages` or `prompt`.
Out: every input row, in input order, with its columns as they were, plus `answer`,
`finish_reason`, `prompt_tokens`, `completion_tokens`, `latency_s` and `error` (a bad row's
reason; the other columns of that row are then null), as Parquet in `output` or in the run's
artifact `scored/`; metrics (rows, failed_rows, prompt_tokens, completion_tokens, tokens_per_s,
score_s, wall_s; also on the logged model, where there is one); tags naming the model version,
the input and the output; `batch_score.json` (BatchScored). The summary it logs at the end says
how to read the output.
Side effects: starts a SparkSession and stops it at the end (unless spark_master=active, or a
session with the same master is already running in this process); a temporary folder for the
scoring model (and for the output, by default, until it is logged).

How Spark runs the model: `mlflow.pyfunc.spark_udf` over phi3flow/batch/udf_model.py, a wrapper
saved around the chosen model that turns a bad row into that row's error. spark_udf hands the
wrapper `batch_size` rows per call (spark.sql.execution.arrow.maxRecordsPerBatch) and loads it
in each executor's Python worker; the chat model inside is loaded once per worker process and
kept for the next tasks (udf_model.py). With executor_env_manager=local a task is one batch,
so progress can be counted in tasks; with virtualenv/uv/conda spark_udf starts a model server
for every task, so tasks are as few as the cluster has task slots. Each model copy gets
`cores_per_model` cores (spark.task.cpus): a local master runs one copy with every core, as
in-process predict does, since decode steps are shared between a batch's rows, not between
copies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.pyfunc import MODEL_CONFIG

from phi3flow.batch.config import ACTIVE_SESSION, BatchScoreConfig
from phi3flow.batch.result import RESULT_FIELDS, RESULT_SCHEMA
from phi3flow.core import names, store, tracking
from phi3flow.core.errors import StepError
from phi3flow.core.record import Record, record
from phi3flow.registry import register as registry

logger = logging.getLogger(__name__)
logging.getLogger("py4j").setLevel(logging.WARNING)  # a line per closed connection otherwise

# The one pin of the optional dependency (pyproject.toml's extra `spark` and
# requirements-test.txt say the same: tests/unit/test_batch_score.py checks).
PYSPARK_PIN = "pyspark==4.3.0"
MIN_JAVA = 17  # pyspark 4 runs on Java 17 or newer (pyspark 3 on 8, 11 or 17)
INSTALL = (f"pip install {PYSPARK_PIN} (or pip install -e '.[spark]') and Java {MIN_JAVA} "
           "(Debian 12 or 13, Ubuntu 24.04: apt-get update && apt-get install -y "
           "default-jre-headless, as root: Java 17 on Debian 12, 21 on Debian 13; Ubuntu 22.04: "
           "openjdk-17-jre-headless)")
BATCH_MODEL_CODE = Path(__file__).with_name("udf_model.py")
# What the UDF's model carries besides its own file (it is loaded where this repository is not).
BATCH_MODEL_CODE_PATHS = (str(Path(__file__).parent.parent / "chat"),
                          str(Path(__file__).with_name("result.py")))
INPUT_COLUMNS = ("messages", "prompt")
CORRUPT_RECORD = "_corrupt_record"  # Spark's column for a JSON line it could not parse
ROW = "_phi3flow_row"  # the input order, while Spark shuffles rows into tasks
MAX_TASKS = 10_000  # beyond this, tasks grow past one batch (a driver tracks every task)
PROGRESS_EVERY_S = 10.0  # seconds between progress lines
# spark_udf's model server (executor_env_manager other than local) answers a call within this
# many seconds or fails the task; MLflow's default, 60 s, is less than one batch can take.
SERVER_TIMEOUT_S = "86400"
JOB_GROUP = "phi3flow-batch-score"


@record
class BatchScored(Record):
    """What batch_score did: `batch_score.json`."""

    ARTIFACT = names.BATCH_SCORE_RESULT
    PRODUCER = names.BATCH_SCORE

    model_uri: str  # the model scored: an alias pinned to models:/NAME/VERSION
    model_version: str  # "" for a model that is not a registered version
    input: str
    output: str  # where the scored rows are (an artifact URI by default)
    rows: int
    failed_rows: int  # rows whose `error` is set
    prompt_tokens: int
    completion_tokens: int
    score_s: float  # the Spark job that scored and wrote the rows (model loading included)
    wall_s: float  # the whole step
    tokens_per_s: float  # completion tokens / score_s, over every model copy


@dataclass(frozen=True)
class ScoredModel:
    uri: str  # what is scored: models:/NAME/VERSION for an alias, else model_uri as given
    version: str  # "" unless a registered version
    model_id: str | None  # the logged model (m-...), where there is one


_ALIAS = re.compile(r"^models:/([^/@]+)@([^/]+)$")
_VERSION = re.compile(r"^models:/([^/@]+)/(\d+)$")


def resolve_model(model_uri: str) -> ScoredModel:
    """The model `model_uri` names, pinned to a version; a StepError if it does not resolve."""
    client = mlflow.MlflowClient()
    fix = ("Pass the URI of a chat model this tracking store has (models:/NAME@ALIAS, "
           "models:/NAME/VERSION, models:/m-..., runs:/RUN/PATH or a model folder), and check "
           f"MLFLOW_TRACKING_URI (now {mlflow.get_tracking_uri()}).")
    version = None
    try:
        if match := _ALIAS.match(model_uri):
            name, alias = match.groups()
            version = registry.current_holder(client, name, alias).version
            if version is None:
                raise StepError(f"model_uri={model_uri}: no version of {name} holds @{alias} "
                                f"(is {name} registered? `register` gives the alias). {fix}")
        elif match := _VERSION.match(model_uri):
            version = client.get_model_version(*match.groups())
        pinned = f"models:/{version.name}/{version.version}" if version else model_uri
        info = mlflow.models.get_model_info(pinned)
    except StepError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to resolve is the URI's
        raise StepError(f"model_uri={model_uri} does not resolve ({type(exc).__name__}: "
                        f"{str(exc)[:200]}). {fix}") from None
    if "python_function" not in info.flavors:
        raise StepError(f"model_uri={model_uri} is not an MLflow pyfunc model (flavors: "
                        f"{', '.join(info.flavors)}): pass a chat model.")
    inputs = info.signature.inputs if info.signature else None
    names_ = [str(n) for n in inputs.input_names()] if inputs else []
    # the model_config it was logged with: an ONNX model of ours says its interface there
    interface = (info.flavors["python_function"].get(MODEL_CONFIG) or {}).get("interface")
    if (names_ and "messages" not in names_) or interface not in (None, "chat"):
        raise StepError(f"model_uri={model_uri} is not a chat model (it takes "
                        f"{interface or ', '.join(names_)}, not messages): pass a chat model, "
                        "such as one logged by log_transformers or log_onnx_pyfunc "
                        "(interface=chat).")
    source = version.source if version else model_uri
    model_id = (source.split("/")[-1] if source.startswith("models:/m-")
                else getattr(info, "model_id", None))
    return ScoredModel(pinned, str(version.version) if version else "", model_id)


def require_spark(starts_jvm: bool = True) -> None:
    """pyspark importable and, where this process is to start Spark's JVM, a Java it runs on;
    else a StepError that says how to get them. (A session already running, such as a
    Databricks or Azure ML one, brings its own JVM and pyspark version.)"""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise StepError(f"batch_score needs pyspark, which requirements.txt leaves out: "
                        f"{INSTALL}.") from None
    if starts_jvm:
        _require_java()


def _require_java() -> None:
    import pyspark

    needed = MIN_JAVA if int(pyspark.__version__.split(".")[0]) >= 4 else 8
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        where = f"JAVA_HOME={home} has no bin/java" if home else "JAVA_HOME unset, none on PATH"
        raise StepError(f"batch_score needs Java {needed} or newer for Spark, and found no "
                        f"java ({where}): {INSTALL}.")
    shown = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(\d+)(?:\.(\d+))?', shown)
    major = int(found.group(1)) if found else 0
    major = int(found.group(2)) if major == 1 and found.group(2) else major  # "1.8" is Java 8
    if major < needed:
        raise StepError(f"batch_score needs Java {needed} or newer for Spark; {java} is "
                        f"{shown.splitlines()[0] if shown else 'unknown'}: {INSTALL}, and set "
                        "JAVA_HOME to it.")


def _session_running(cfg: BatchScoreConfig) -> bool:
    """Spark is up in this process already, or spark_master=active asks for the one that is."""
    if cfg.spark_master == ACTIVE_SESSION:
        return True
    with contextlib.suppress(ImportError):
        from pyspark.sql import SparkSession

        return SparkSession.getActiveSession() is not None
    return False


def local_cores(master: str) -> int | None:
    """The cores of a local[...] master (local[*]: every core this process may use)."""
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master)
    if not match:
        return None
    if match.group(1) is None:  # plain "local": one core
        return 1
    if match.group(1) == "*":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(match.group(1))


def _check_reachable(master: str) -> None:
    """A spark:// master (or any of an HA list) answers on its port, before Spark waits a
    minute of retries on it."""
    if not master.startswith("spark://"):
        return
    hosts = master[len("spark://"):].split(",")
    for host in hosts:
        address, _, port = host.rpartition(":")
        with contextlib.suppress(OSError, ValueError):
            socket.create_connection((address, int(port)), timeout=5).close()
            return
    raise StepError(f"spark_master={master}: nothing answers at {', '.join(hosts)}. Start the "
                    "master (spark-class org.apache.spark.deploy.master.Master) or check the URL.")


@contextlib.contextmanager
def spark_session(cfg: BatchScoreConfig) -> Iterator[tuple[Any, int]]:
    """(the SparkSession, cores per model copy); a session this starts is stopped on exit."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if cfg.spark_master == ACTIVE_SESSION or active is not None:
        spark = active or SparkSession.builder.getOrCreate()
        master = spark.sparkContext.master
        if cfg.spark_master not in (ACTIVE_SESSION, master):
            raise StepError(f"spark_master={cfg.spark_master}, but this process already runs a "
                            f"SparkSession with master {master}: pass spark_master={master} (or "
                            f"{ACTIVE_SESSION}), or stop that session first.")
        logger.info("using this process's SparkSession (master %s)", master)
        yield spark, int(spark.conf.get("spark.task.cpus", "1"))
        return
    local = local_cores(cfg.spark_master)
    cores = cfg.cores_per_model or local
    if local is not None and cores > local:
        raise StepError(f"cores_per_model={cores} is more than {cfg.spark_master}'s {local} "
                        f"cores: pass at most {local}, or 0 for all of them.")
    builder = (SparkSession.builder.master(cfg.spark_master).appName("phi3flow batch_score")
               .config("spark.ui.showConsoleProgress", "false"))  # progress is logged instead
    if cores:
        builder = builder.config("spark.task.cpus", str(cores))
    if local is not None and "PYSPARK_PYTHON" not in os.environ:
        builder = builder.config("spark.pyspark.python", sys.executable)  # this environment's
    logger.info("starting Spark (master %s)", cfg.spark_master)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - Spark's own reason, in one line
        raise StepError(f"spark_master={cfg.spark_master}: Spark did not start "
                        f"({_first_line(exc)}).") from None
    try:
        yield spark, cores or int(spark.conf.get("spark.task.cpus", "1"))
    finally:
        spark.stop()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def read_input(spark, cfg: BatchScoreConfig):
    """The input as a DataFrame with `messages` or `prompt`; a StepError otherwise."""
    from pyspark.errors import AnalysisException

    table = cfg.input_table
    source = str(cfg.local_input) if cfg.local_input is not None else cfg.input
    try:
        if table is not None:
            df = spark.table(table)
        elif cfg.resolved_format == "parquet":
            df = spark.read.parquet(source)
        elif cfg.resolved_format == "csv":
            # A CSV cell holds a conversation as JSON text, with quotes doubled and newlines
            df = (spark.read.option("header", True).option("multiLine", True)
                  .option("escape", '"').csv(source))
        else:
            df = spark.read.json(source)
    except AnalysisException as exc:
        raise StepError(f"input={cfg.input}: Spark cannot read it ({_first_line(exc)}). Pass a "
                        "path (or table) that exists and that every Spark node can read.") from None
    columns = list(df.columns)
    if not columns:  # an empty file has no schema to infer
        raise StepError(f"input={cfg.input} holds no rows: pass a file or table with at least "
                        "one.")
    if columns == [CORRUPT_RECORD]:
        raise StepError(f"input={cfg.input}: no line is a JSON object. JSONL holds one object "
                        "per line, such as {\"messages\": [{\"role\": \"user\", \"content\": "
                        "\"...\"}]}; for another format pass -P input_format=...")
    if not set(INPUT_COLUMNS) & set(columns):
        raise StepError(f"input={cfg.input} has neither a `messages` nor a `prompt` column (it "
                        f"has {', '.join(columns) or 'none'}): give each row OpenAI chat "
                        "`messages` or a plain-text `prompt`.")
    taken = sorted(set(columns) & {*RESULT_FIELDS, ROW})
    if taken:
        raise StepError(f"input={cfg.input} already has column(s) {', '.join(taken)}, which "
                        "batch_score adds: rename or drop them in the input.")
    return df


def save_scoring_model(model: ScoredModel, folder: Path, cfg: BatchScoreConfig,
                       threads: int) -> Path:
    """udf_model.py saved around the model (downloaded into it), with the model's own
    pinned requirements (what virtualenv/uv/conda executors install)."""
    logger.info("preparing %s for Spark", model.uri)
    mlflow.pyfunc.save_model(
        str(folder), python_model=str(BATCH_MODEL_CODE), code_paths=list(BATCH_MODEL_CODE_PATHS),
        artifacts={"model": model.uri},
        pip_requirements=mlflow.pyfunc.get_model_dependencies(model.uri),
        model_config={"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                      "threads": threads})
    return folder


class Progress(threading.Thread):
    """Logs rows scored so far, from Spark's count of finished tasks of the scoring stage."""

    def __init__(self, sc, rows: int, tasks: int):
        super().__init__(daemon=True, name="batch-score-progress")
        self.sc, self.rows, self.tasks = sc, rows, tasks
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def done_tasks(self) -> int:
        tracker = self.sc.statusTracker()
        done = 0
        for job_id in tracker.getJobIdsForGroup(JOB_GROUP):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else ():
                stage = tracker.getStageInfo(stage_id)
                if stage and stage.numTasks == self.tasks:
                    done = max(done, stage.numCompletedTasks)
        return done

    def run(self) -> None:
        last = -1
        while not self.stopped.wait(PROGRESS_EVERY_S):
            with contextlib.suppress(Exception):  # progress must never fail the step
                done = self.done_tasks()
                if done != last:
                    rows = min(self.rows, round(done * self.rows / self.tasks))
                    logger.info("scored about %d of %d rows (%d of %d tasks, %.0f s)", rows,
                                self.rows, done, self.tasks, time.monotonic() - self.started_at)
                    last = done


def score(cfg: BatchScoreConfig, run) -> BatchScored:
    """Everything batch_score does inside its run (see the module docstring)."""
    started = time.perf_counter()
    require_spark(starts_jvm=not _session_running(cfg))
    _check_reachable(cfg.spark_master)
    model = resolve_model(cfg.model_uri)
    mlflow.set_tags({names.TAG_SCORED_MODEL_URI: model.uri,
                     names.TAG_SCORED_MODEL_VERSION: model.version or "none",
                     names.TAG_INPUT: cfg.input})
    logger.info("scoring %s%s", model.uri,
                f" (model_uri={cfg.model_uri})" if model.uri != cfg.model_uri else "")
    with spark_session(cfg) as (spark, cores), \
            tempfile.TemporaryDirectory(prefix="phi3flow-batch-") as tmp:
        df = read_input(spark, cfg)
        rows = df.count()
        if rows == 0:
            raise StepError(f"input={cfg.input} holds no rows: pass a file or table with at "
                            "least one.")
        output = str(cfg.local_output) if cfg.local_output else cfg.output
        output = output or str(Path(tmp) / names.SCORED_DIR)
        scoring_model = save_scoring_model(model, Path(tmp) / "model", cfg, cores)
        score_s = _score(spark, cfg, df, rows, scoring_model, output, cores)
        totals = _totals(spark, output, rows)
        if not cfg.output:
            for crc in Path(output).rglob(".*.crc"):  # Hadoop's checksums of each file
                crc.unlink()
            store.current().log_artifacts(Path(output), names.SCORED_DIR)
            output = mlflow.get_artifact_uri(names.SCORED_DIR)
    mlflow.set_tag(names.TAG_OUTPUT, output)
    scored = BatchScored(
        model_uri=model.uri, model_version=model.version, input=cfg.input, output=output,
        rows=rows, failed_rows=totals["failed_rows"], prompt_tokens=totals["prompt_tokens"],
        completion_tokens=totals["completion_tokens"], score_s=round(score_s, 3),
        wall_s=round(time.perf_counter() - started, 3),
        tokens_per_s=round(totals["completion_tokens"] / score_s, 3) if score_s else 0.0)
    metrics = {k: float(getattr(scored, k)) for k in (
        "rows", "failed_rows", "prompt_tokens", "completion_tokens", "tokens_per_s", "score_s",
        "wall_s")}
    mlflow.log_metrics(metrics)
    if model.model_id:  # the logged model's page lists what it scored
        with contextlib.suppress(Exception):
            mlflow.log_metrics(metrics, model_id=model.model_id)
    scored.log()
    logger.info(summary(run, scored))
    return scored


def _score(spark, cfg: BatchScoreConfig, df, rows: int, model_dir: Path, output: str,
           cores: int) -> float:
    """Score every row and write them to `output`; the seconds that took."""
    from pyspark.sql import functions as F

    if cfg.executor_env_manager == "local":
        per_task = cfg.batch_size
    else:  # a model server per task: one task per slot
        slots = max(1, spark.sparkContext.defaultParallelism // max(cores, 1))
        per_task = math.ceil(rows / slots)
    tasks = min(MAX_TASKS, math.ceil(rows / per_task))
    udf = mlflow.pyfunc.spark_udf(
        spark, str(model_dir), result_type="string", env_manager=cfg.executor_env_manager,
        extra_env={"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": os.environ.get(
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", SERVER_TIMEOUT_S)})
    question = F.struct(*[c for c in (*INPUT_COLUMNS, CORRUPT_RECORD) if c in df.columns])
    # In input order: tasks take consecutive rows, and write their part files in task order.
    # spark_udf's own struct results would turn a null into the string "None" and cannot cast
    # an int column holding nulls (mlflow.pyfunc._convert_struct_values), so each row's result
    # comes back as JSON text, typed by from_json.
    scored = (df.withColumn(ROW, F.monotonically_increasing_id())
              .repartitionByRange(tasks, ROW).sortWithinPartitions(ROW)
              .withColumn("_result", F.from_json(udf(question), RESULT_SCHEMA))
              .select(*df.columns, *[F.col(f"_result.{c}").alias(c) for c in RESULT_FIELDS]))
    sc = spark.sparkContext
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.batch_size))
    sc.setJobGroup(JOB_GROUP, f"batch_score {cfg.input}", interruptOnCancel=True)
    progress = Progress(sc, rows, tasks)
    logger.info("scoring %d rows in %d tasks of about %d rows, %d per model call, %d core(s) "
                "per model copy, with %s executors", rows, tasks, math.ceil(rows / tasks),
                cfg.batch_size, cores, cfg.executor_env_manager)
    begun = time.perf_counter()
    progress.start()
    try:
        scored.write.parquet(output)
    except Exception as exc:  # noqa: BLE001 - a failed Spark job: its reason in one line
        leftover = (f" Remove {output} (it holds no complete result) before running again."
                    if cfg.output and cfg.local_output and cfg.local_output.exists() else "")
        raise StepError(f"the Spark job failed: {_job_error(exc)}. With "
                        f"executor_env_manager=local every executor's Python needs the model's "
                        f"requirements; see docs/batch-scoring.md.{leftover}") from None
    finally:
        progress.stopped.set()
        progress.join()
        for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
            sc.setLocalProperty(key, None)  # setJobGroup's, so later jobs are not counted
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)
    seconds = time.perf_counter() - begun
    logger.info("scored %d of %d rows (%d tasks, %.1f s)", rows, rows, tasks, seconds)
    return seconds


def _job_error(exc: BaseException) -> str:
    """The Python exception a failed task raised (its last traceback line), else Spark's
    first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    return (raised[-1] if raised else _first_line(exc))[:400]


def _totals(spark, output: str, rows: int) -> dict[str, int]:
    """What the output holds, read back: every row must be there, or nothing is trusted."""
    from pyspark.sql import functions as F

    found = spark.read.parquet(output).agg(
        F.count(F.lit(1)).alias("rows"), F.count("error").alias("failed_rows"),
        F.sum("prompt_tokens").alias("prompt_tokens"),
        F.sum("completion_tokens").alias("completion_tokens")).first()
    if found["rows"] != rows:
        raise StepError(f"the output {output} holds {found['rows']} rows of {rows}: it is "
                        "incomplete and not trusted. On a cluster, pass an output folder every "
                        "node writes to (-P output=...).")
    return {k: int(found[k] or 0) for k in ("failed_rows", "prompt_tokens",
                                            "completion_tokens")}


def summary(run, scored: BatchScored) -> str:
    """batch_score's closing lines: what it scored, and the command that reads the output."""
    lines = [f"batch_score run {run.info.run_id} (experiment {run.info.experiment_id}) finished:"]
    shown = {**scored.to_dict(), "failed_rows": f"{scored.failed_rows} (see the error column)"}
    lines += [f"  {key:<18} {value}" for key, value in shown.items()]
    python = shlex.quote(sys.executable)
    location = urlparse(scored.output)
    if location.scheme in ("", "file"):
        path = location.path if location.scheme else scored.output
        read = f"import pandas; print(pandas.read_parquet({json.dumps(path)}))"
        lines.append("Read it with:")
        lines.append(f"  {python} -c {shlex.quote(read)}")
    elif scored.output.startswith(mlflow.get_artifact_uri()):
        lines.append("Read it with:")
        store_uri = shlex.quote(tracking.absolute_uri(mlflow.get_tracking_uri()))
        lines.append(f"  MLFLOW_TRACKING_URI={store_uri} {python} -m mlflow "
                     f"artifacts download -r {run.info.run_id} -a {names.SCORED_DIR} -d .")
        read = f"import pandas; print(pandas.read_parquet({json.dumps(names.SCORED_DIR)}))"
        lines.append(f"  {python} -c {shlex.quote(read)}")
    else:
        lines.append(f"Read it with Spark (spark.read.parquet({scored.output!r})) or pandas.")
    return "\n".join(lines)


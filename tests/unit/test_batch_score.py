"""Unit tests of batch_score's parts that need no Spark: its config, input formats, the pyspark
pin, and the one-line errors of a failed Spark job."""

from __future__ import annotations

import os
import re
import tomllib

import pytest

from phi3flow.batch import score as batch_score
from phi3flow.batch.config import BatchScoreConfig
from phi3flow.core.config import ConfigError, parse_config
from tests.helpers import EVAL_DATA, ROOT


def _config(*argv: str) -> BatchScoreConfig:
    return parse_config(BatchScoreConfig, ["--input", str(EVAL_DATA), *argv])


def test_defaults_score_the_champion_on_every_local_core_into_the_runs_artifacts():
    cfg = _config()
    assert cfg.model_uri == "models:/phi3-mini-4k-instruct-chat@champion"
    assert (cfg.spark_master, cfg.output, cfg.executor_env_manager) == ("local[*]", "", "local")
    assert cfg.resolved_format == "jsonl" and cfg.local_input == EVAL_DATA


@pytest.mark.parametrize(("name", "found"), [
    ("rows.jsonl", "jsonl"), ("rows.JSON", "jsonl"), ("rows.ndjson.gz", "jsonl"),
    ("part-0.snappy.parquet", "parquet"), ("rows.csv.bz2", "csv"), ("rows.txt", None),
    ("rows", None)])
def test_the_format_comes_from_the_file_name(tmp_path, name, found):
    (tmp_path / name).write_text("x")
    if found is None:
        with pytest.raises(ConfigError, match="cannot tell its format"):
            _config("--input", str(tmp_path / name))
    else:
        assert parse_config(BatchScoreConfig, ["--input", str(tmp_path / name)]
                            ).resolved_format == found


def test_a_folder_is_read_by_its_data_files_as_spark_reads_them(tmp_path):
    folder = tmp_path / "written-by-spark"
    folder.mkdir()
    for name in ("_SUCCESS", ".part-0.parquet.crc", "part-0.parquet", "part-1.parquet"):
        (folder / name).write_text("x")
    cfg = parse_config(BatchScoreConfig, ["--input", str(folder)])
    assert cfg.resolved_format == "parquet"
    # a named format wins over the names
    (folder / "notes.txt").write_text("x")
    assert parse_config(BatchScoreConfig, ["--input", str(folder), "--input_format", "parquet"]
                        ).resolved_format == "parquet"


def test_tables_and_cluster_uris_are_left_to_spark():
    table = parse_config(BatchScoreConfig, ["--input", "table:db.questions"])
    assert table.input_table == "db.questions" and table.local_input is None
    remote = parse_config(BatchScoreConfig, ["--input", "s3a://bucket/rows.parquet",
                                             "--output", "s3a://bucket/scored"])
    assert remote.local_input is None and remote.local_output is None
    assert remote.resolved_format == "parquet"


@pytest.mark.parametrize(("argv", "named"), [
    (["--input", ""], "input is required: pass -P input="),
    (["--input", "/no/such/rows.jsonl"], "input='/no/such/rows.jsonl' does not exist"),
    (["--input", "s3a://bucket/folder/"], "pass -P input_format=jsonl, parquet or csv"),
    (["--input", "table:not a name"], "does not name a table"),
    (["--input_format", "xlsx"], "input_format='xlsx' is not one of auto, jsonl, parquet, csv"),
    (["--spark_master", "localhost"], "spark_master='localhost' is not a Spark master URL"),
    (["--spark_master", "local[0]"], "spark_master='local[0]' is not a Spark master URL"),
    (["--batch_size", "0"], "batch_size=0 must be at least 1"),
    (["--max_new_tokens", "0"], "max_new_tokens=0 must be at least 1"),
    (["--temperature", "-0.5"], "temperature=-0.5 must be >= 0"),
    (["--executor_env_manager", "docker"], "executor_env_manager='docker' is not one of local"),
    (["--cores_per_model", "-1"], "cores_per_model=-1 must be >= 0"),
    (["--model_uri", " "], "model_uri is empty"),
    (["--batch_size", "many"], "argument --batch_size: invalid int value: 'many'"),
])
def test_bad_values_are_named_with_the_fix(argv, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        _config(*argv)


def test_mixed_and_empty_folders_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "b.csv").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot tell its format \(\.csv, \.jsonl\)"):
        _config("--input", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="is a folder with no data files"):
        _config("--input", str(empty))


def test_an_existing_output_is_never_overwritten(tmp_path):
    with pytest.raises(ConfigError, match="already exists .* never overwrites"):
        _config("--output", str(tmp_path))
    assert _config("--output", str(tmp_path / "new")).local_output == tmp_path / "new"


@pytest.mark.parametrize(("master", "cores"), [
    ("local", 1), ("local[3]", 3), ("local[2,4]", 2), ("spark://h:7077", None), ("yarn", None)])
def test_local_masters_cores(master, cores):
    assert batch_score.local_cores(master) == cores
    assert batch_score.local_cores("local[*]") == len(os.sched_getaffinity(0))


def test_pyspark_is_pinned_once_as_an_extra_and_for_tests_but_not_for_the_quickstart():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["spark"] == [batch_score.PYSPARK_PIN]
    assert batch_score.PYSPARK_PIN in (ROOT / "requirements-test.txt").read_text().splitlines()
    assert "pyspark" not in (ROOT / "requirements.txt").read_text()


def test_a_failed_jobs_error_is_the_tasks_python_exception():
    spark_says = ("An error occurred while calling o123.parquet.\n: org.apache.spark.SparkException:"
                  " Job aborted due to stage failure: Task 0 in stage 3.0 failed 1 times\n"
                  "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                  "ModuleNotFoundError: No module named 'onnxruntime_genai'\n\tat org.apache...")
    assert (batch_score._job_error(RuntimeError(spark_says))
            == "ModuleNotFoundError: No module named 'onnxruntime_genai'")
    assert batch_score._job_error(RuntimeError("plain\nsecond")) == "RuntimeError: plain"

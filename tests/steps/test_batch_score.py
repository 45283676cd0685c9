"""batch_score in-process on a local Spark (local[2], one session for the module) with the
session's fixture champions: both models answer as their own in-process predict, bad rows are
reported in `error` without failing the job, every format and a catalog table are read, and
bad inputs that only Spark can see stop it with one line and a FAILED run."""

from __future__ import annotations

import importlib
import json
import logging
import sys

import mlflow
import pandas as pd
import pytest

from phi3flow.batch import score as batch_score
from phi3flow.core import names, tracking
from steps import batch_score as step
from tests.helpers import batch_questions, ensure_java, write_jsonl

pytestmark = pytest.mark.e2e

MASTER = "local[2]"
BAD_ROWS = [
    {"id": 900, "messages": []},
    {"id": 901, "messages": [{"role": "bot", "content": "hi"}]},
    {"id": 902, "messages": [{"role": "user", "content": "Spain " * 4600}]},
]


@pytest.fixture(scope="module")
def spark():
    """local[2] with one core per task, so two Python workers score side by side."""
    ensure_java()
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master(MASTER).config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.pyspark.python", sys.executable).getOrCreate())
    yield session
    session.stop()


def _run(*argv: str) -> batch_score.BatchScored:
    return step.main(["--spark_master", MASTER, "--max_new_tokens", "32", *argv])


def _expected(model_uri: str, rows: list[dict]) -> dict[str, str]:
    """Each distinct question's answer from the model's own predict, in this process."""
    model = mlflow.pyfunc.load_model(model_uri)
    answers = {}
    for row in rows:
        key = json.dumps(row["messages"])
        if key not in answers:
            (response,) = model.predict([{"messages": row["messages"], "max_tokens": 32}])
            answers[key] = response["choices"][0]["message"]["content"]
    return answers


def _read(scored: batch_score.BatchScored) -> pd.DataFrame:
    return pd.read_parquet(mlflow.artifacts.download_artifacts(scored.output))


def test_onnx_champion_answers_200_rows_as_its_own_predict_and_reports_bad_rows(
        spark, champions, tmp_path, monkeypatch, caplog):
    questions = batch_questions(200)
    rows = questions + BAD_ROWS + [{"id": 903, "prompt": "What is the capital of Spain?"}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows, extra_lines=("{not json",))
    monkeypatch.setattr(batch_score, "PROGRESS_EVERY_S", 0.5)
    caplog.set_level(logging.INFO, logger="phi3flow.batch.score")

    scored = _run("--model_uri", champions["onnx"], "--input", str(source), "--batch_size", "8")

    run = mlflow.last_active_run()
    assert run.info.status == "FINISHED"
    out = _read(scored)
    assert len(out) == len(rows) + 1 == scored.rows
    assert out["id"].iloc[:-1].astype(int).tolist() == [r["id"] for r in rows]  # input order
    expected = _expected(champions["onnx"], questions)
    answered = out.iloc[:200]
    assert answered["error"].isna().all()
    assert answered["answer"].tolist() == [expected[json.dumps(q["messages"])] for q in questions]
    assert all(e in a for e, a in zip(answered["expected"], answered["answer"]))
    assert (answered["finish_reason"] == "stop").all() and (answered["prompt_tokens"] > 0).all()
    errors = out.set_index(out["id"].fillna(-1).astype(int))["error"]
    assert errors[900].startswith("BadRequest: messages must be a non-empty list")
    assert "messages[0].role must be one of system, user, assistant" in errors[901]
    assert "more than the context window of 4096" in errors[902]
    assert out.loc[out["id"] == 903, "answer"].item() == "The capital of Spain is Madrid."
    assert errors[-1] == "the line is not a JSON object: '{not json'"
    assert scored.failed_rows == 4 and scored.completion_tokens == int(
        out["completion_tokens"].sum())
    metrics = run.data.metrics
    assert metrics["rows"] == 205 and metrics["failed_rows"] == 4
    assert metrics["completion_tokens"] > 0 and metrics["tokens_per_s"] > 0
    name = champions["onnx"].removeprefix("models:/").split("@")[0]
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    assert run.data.tags[names.TAG_SCORED_MODEL_URI] == (
        f"models:/{version.name}/{version.version}") == scored.model_uri
    assert run.data.tags[names.TAG_SCORED_MODEL_VERSION] == str(version.version)
    assert batch_score.BatchScored.read(run) == scored
    logged = mlflow.get_logged_model(version.source.split("/")[-1])
    assert logged.metrics and {m.key for m in logged.metrics} >= {"rows", "failed_rows"}
    progress = [r.getMessage() for r in caplog.records if "scored about" in r.getMessage()]
    assert progress and all(" of 205 rows (" in line for line in progress), progress
    assert any("finished:" in r.getMessage() and "read_parquet" in r.getMessage()
               for r in caplog.records)


def test_transformers_model_answers_as_its_own_predict(spark, champions, tmp_path):
    questions = batch_questions(24)
    source = write_jsonl(tmp_path / "rows.jsonl", questions + BAD_ROWS)

    scored = _run("--model_uri", champions["transformers"], "--input", str(source),
                  "--batch_size", "8")

    out = _read(scored)
    expected = _expected(champions["transformers"], questions)
    assert out["answer"].iloc[:24].tolist() == [
        expected[json.dumps(q["messages"])] for q in questions]
    errors = out["error"].iloc[24:].tolist()
    # MLflow's transformers flavor answers these (or fails in its own words); batch_score
    # refuses them with the chat core's checks, in the words the ONNX model uses (errors[900:])
    assert errors[0].startswith("messages must be a non-empty list")
    assert errors[1] == "messages[0].role must be one of system, user, assistant, tool, got \"bot\"."
    assert "more than the context window of 4096" in errors[2]
    assert scored.failed_rows == 3


def test_csv_parquet_and_a_catalog_table_into_a_given_folder(spark, champions, tmp_path):
    questions = batch_questions(12)
    csv = tmp_path / "rows.csv"
    pd.DataFrame([{"id": q["id"], "messages": json.dumps(q["messages"]) if q["id"] % 2 else None,
                   "prompt": None if q["id"] % 2 else q["messages"][0]["content"]}
                  for q in questions]).to_csv(csv, index=False)
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(questions).to_parquet(parquet)
    spark.read.parquet(str(parquet)).createOrReplaceTempView("questions")
    expected = [q["expected"] for q in questions]

    for source, extra in ((csv, ()), (parquet, ()), ("table:questions",
                                                     ("--spark_master", "active"))):
        output = tmp_path / f"scored-{len(list(tmp_path.iterdir()))}"
        scored = _run("--model_uri", champions["onnx"], "--input", str(source),
                      "--output", str(output), *extra)
        out = pd.read_parquet(output)
        assert scored.output == str(output) and scored.failed_rows == 0, source
        assert all(e in a for e, a in zip(expected, out["answer"])), (source, out["answer"])
        assert mlflow.last_active_run().data.tags[names.TAG_OUTPUT] == str(output)


# (class of bad input, what the input holds, a fragment of the one-line message)
SPARK_CASES = [
    ("neither column", [{"question": "What is the capital of Spain?"}],
     "has neither a `messages` nor a `prompt` column (it has question)"),
    ("column it would overwrite", [{"messages": [{"role": "user", "content": "hi"}],
                                    "answer": "x"}],
     "already has column(s) answer, which batch_score adds: rename or drop them"),
    ("no JSON object", ["[1, 2]", "not json"], "no line is a JSON object"),
    ("no rows", [], "holds no rows"),
    ("no such table", None, "Spark cannot read it"),
    ("another master", [{"prompt": "hi"}], "already runs a SparkSession with master local[2]"),
]


@pytest.mark.parametrize(("kind", "content", "fragment"), SPARK_CASES,
                         ids=[c[0] for c in SPARK_CASES])
def test_bad_input_spark_sees_stops_before_scoring_with_one_line(
        spark, champions, tmp_path, monkeypatch, caplog, kind, content, fragment):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                              for line in content or []))
    argv = ["--model_uri", champions["onnx"], "--spark_master", MASTER,
            "--input", "table:no_such_table" if content is None else str(source)]
    if kind == "another master":
        argv[3] = "local[1]"
    monkeypatch.setattr(sys, "argv", ["steps/batch_score.py", *argv])
    caplog.set_level(logging.ERROR, logger="phi3flow.core.tracking")
    scoring = importlib.import_module("phi3flow.batch.score")
    monkeypatch.setattr(scoring, "save_scoring_model",  # never reached: nothing is scored
                        lambda *a: pytest.fail("the model was prepared for a bad input"))
    with pytest.raises(SystemExit) as exited:
        tracking.run_cli(names.BATCH_SCORE, step.main)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    run = mlflow.last_active_run()
    assert exited.value.code == 2 and len(lines) == 1 and "\n" not in lines[0], lines
    assert fragment in lines[0]
    assert run.info.status == "FAILED" and fragment in run.data.tags[names.TAG_ERROR]

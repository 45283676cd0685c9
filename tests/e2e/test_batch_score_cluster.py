"""batch_score as users run it, `mlflow run . -e batch_score`: on a real Spark standalone cluster
on loopback (a master and a worker started from pyspark's own launcher, stopped afterwards), and
with a bad input that stops it before Spark starts."""

from __future__ import annotations

import json
import re
import socket

import mlflow
import pandas as pd
import pytest

from phi3flow.batch import score as batch_score
from phi3flow.core import names
from tests.helpers import (
    batch_questions,
    run_project,
    spark_env,
    standalone_cluster,
    write_jsonl,
)

pytestmark = pytest.mark.e2e

LOADED = re.compile(r"loaded the chat model in Python worker process (\d+)")


def _run_id(output: str) -> str:
    found = re.findall(r"=== Run \(ID '([0-9a-f]{32})'\) (?:succeeded|failed) ===", output)
    assert found, output[-4000:]
    return found[-1]


def test_mlflow_run_on_a_standalone_cluster_answers_as_predict(champions, tmp_path):
    questions = batch_questions(40)
    source = write_jsonl(tmp_path / "rows.jsonl", questions)
    with standalone_cluster(tmp_path / "cluster", cores=2) as (master, work):
        done = run_project("-e", "batch_score", "-P", f"model_uri={champions['onnx']}",
                           "-P", f"input={source}", "-P", f"spark_master={master}",
                           "-P", "batch_size=8", "-P", "max_new_tokens=32", cwd=tmp_path,
                           env=spark_env())
        executor_logs = "".join(p.read_text() for p in work.rglob("stderr"))
    assert done.returncode == 0, done.stderr[-6000:]
    port = int(master.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the cluster is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    run = mlflow.get_run(_run_id(done.stderr + done.stdout))
    assert run.info.status == "FINISHED"
    assert run.data.params["spark_master"] == master
    scored = batch_score.BatchScored.read(run)
    assert (scored.rows, scored.failed_rows) == (40, 0)
    out = pd.read_parquet(mlflow.artifacts.download_artifacts(scored.output))
    model = mlflow.pyfunc.load_model(champions["onnx"])
    expected = {}
    for q in questions[:12]:  # the 12 distinct questions, in turn
        (response,) = model.predict([{"messages": q["messages"], "max_tokens": 32}])
        expected[json.dumps(q["messages"])] = response["choices"][0]["message"]["content"]
    assert out["answer"].tolist() == [expected[json.dumps(q["messages"])] for q in questions]
    assert out["id"].tolist() == list(range(40))
    # Five tasks on two executor cores: each Python worker loaded the model once.
    pids = LOADED.findall(executor_logs)
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids), executor_logs[-3000:]
    assert "finished:" in done.stderr and "Read it with:" in done.stderr


def test_mlflow_run_with_a_bad_input_fails_in_one_line_before_spark(champions, tmp_path):
    done = run_project("-e", "batch_score", "-P", f"model_uri={champions['onnx']}",
                       "-P", f"input={tmp_path / 'missing.jsonl'}", cwd=tmp_path)
    assert done.returncode != 0
    step_output = done.stderr.split("mlflow.cli")[0]
    assert "does not exist (resolved to" in step_output
    assert "Traceback" not in step_output and "Spark" not in step_output.split("batch_score")[-1]
    run = mlflow.get_run(_run_id(done.stderr))
    assert run.info.status == "FAILED"
    assert "does not exist" in run.data.tags[names.TAG_ERROR]

"""The model batch_score's Spark UDF runs (phi3flow/batch/udf_model.py), in-process without Spark,
around the session's ONNX fixture model: answers as the model's own, a bad row's error in its
result while the good rows of the same call are still answered together, the chat model loaded
once per process."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from phi3flow.batch import score as batch_score
from phi3flow.batch.config import BatchScoreConfig
from phi3flow.core.config import parse_config
from tests.helpers import EVAL_DATA, eval_rows

ROWS = eval_rows()
BAD = {"empty": {"messages": []},
       "role": {"messages": [{"role": "bot", "content": "hi"}]},
       "long": {"messages": [{"role": "user", "content": "Spain " * 4600}]}}


@pytest.fixture(scope="module")
def scoring_model_dir(onnx_model_uri, tmp_path_factory) -> Path:
    cfg = parse_config(BatchScoreConfig, ["--input", str(EVAL_DATA), "--max_new_tokens", "32"])
    model = batch_score.ScoredModel(onnx_model_uri, "", None)
    return batch_score.save_scoring_model(model, tmp_path_factory.mktemp("batch") / "model",
                                          cfg, threads=2)


@pytest.fixture(scope="module")
def scorer(scoring_model_dir):
    return mlflow.pyfunc.load_model(str(scoring_model_dir))


def _score(scorer, rows: list[dict]) -> list[dict]:
    return [json.loads(result) for result in scorer.predict(pd.DataFrame(rows))]


def test_answers_are_the_models_own_and_bad_rows_get_their_error(scorer, onnx_model_uri):
    model = mlflow.pyfunc.load_model(onnx_model_uri)
    good = [{"messages": row["messages"]} for row in ROWS[:8]]
    rows = good + [BAD["empty"], BAD["role"], BAD["long"]]
    results = _score(scorer, rows)
    expected = [model.predict([{**row, "max_tokens": 32}])[0] for row in good]
    answered = [r for r in results if r["error"] is None]
    assert [r["answer"] for r in answered] == [
        e["choices"][0]["message"]["content"] for e in expected]
    assert [r["completion_tokens"] for r in answered] == [
        e["usage"]["completion_tokens"] for e in expected]
    assert all(r["finish_reason"] == "stop" and r["prompt_tokens"] > 0 for r in answered)
    assert results[8]["error"] == ("BadRequest: messages must be a non-empty list of "
                                   "{\"role\": ..., \"content\": ...} objects.")
    assert "messages[0].role must be one of system, user, assistant" in results[9]["error"]
    assert "more than the context window of 4096" in results[10]["error"]
    for bad in results[8:]:
        assert bad["answer"] is None and bad["completion_tokens"] is None
    # The failed call was split in halves, and halves without a bad row were answered whole:
    # rows 0-4 in one call, rows 5-7 in another (a call's rows share its latency).
    assert len({r["latency_s"] for r in results[:5]}) == 1
    assert len({r["latency_s"] for r in results[5:8]}) == 1


def test_prompts_json_text_and_lines_spark_could_not_parse(scorer):
    question = ROWS[0]["messages"]
    results = _score(scorer, [
        {"prompt": question[0]["content"], "messages": None, "_corrupt_record": None},
        {"prompt": None, "messages": json.dumps(question), "_corrupt_record": None},
        # Spark gives every message every key of the column: the unset ones are null
        {"prompt": None, "messages": [{**question[0], "name": None}], "_corrupt_record": None},
        {"prompt": None, "messages": "[{\"role\": ", "_corrupt_record": None},
        {"prompt": None, "messages": None, "_corrupt_record": "{broken"},
        {"prompt": float("nan"), "messages": None, "_corrupt_record": None}])
    assert [r["answer"] for r in results[:3]] == ["The capital of Spain is Madrid."] * 3
    assert results[3]["error"].startswith("messages is not JSON (Expecting value)")
    assert results[4]["error"] == "the line is not a JSON object: '{broken'"
    assert results[5]["error"] == "the row has neither messages nor prompt."


def test_the_chat_model_is_loaded_once_per_process(scorer, scoring_model_dir):
    again = mlflow.pyfunc.load_model(str(scoring_model_dir))
    assert again.unwrap_python_model().model is scorer.unwrap_python_model().model


def test_the_onnx_model_is_loaded_with_the_scoring_settings_and_the_environment_kept(scorer):
    """The worker's ONNX model prefills SCORING_BATCH_PREFILL tokens of a batch in one call (a
    server's default is 256) on the cores it was given; the variables that said so are gone."""
    import os

    from phi3flow.batch import udf_model as batch_model

    chat = scorer.unwrap_python_model().model.unwrap_python_model()
    assert chat.batch_prefill == batch_model.SCORING_BATCH_PREFILL != 256
    assert batch_model.BATCH_PREFILL_ENV not in os.environ

"""End to end: the project run exactly as users run it, `mlflow run ... --env-manager local`."""

from __future__ import annotations

import re
import shutil

import mlflow
import pytest

from phi3flow import names, pipeline
from phi3flow.pipeline import Produced
from tests.conftest import (
    FIXTURE,
    QUESTION,
    ROOT,
    predict_in_fresh_process,
    run_project,
)

pytestmark = pytest.mark.e2e

FIXTURE_PARAMS = ["-P", f"model_id={FIXTURE}", "-P", "onnx_source=build", "-P", "precision=fp32"]


def _run_id(output: str) -> str:
    """The run ID of the top-level run that `mlflow run` reports as succeeded."""
    found = re.findall(r"=== Run \(ID '([0-9a-f]{32})'\) succeeded ===", output)
    assert found, output[-4000:]
    return found[-1]


def _ok(done) -> str:
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stderr + done.stdout


def test_fetch_then_log_transformers_as_separate_mlflow_runs(tracking, tmp_path):
    fetch = _run_id(_ok(run_project("-e", "fetch_model", *FIXTURE_PARAMS, cwd=tmp_path)))
    fetch_run = mlflow.get_run(fetch)
    assert fetch_run.info.status == "FINISHED"
    assert fetch_run.data.tags["mlflow.project.entryPoint"] == "fetch_model"
    assert fetch_run.data.params["model_id"] == str(FIXTURE)

    log = _run_id(_ok(run_project("-e", "log_transformers", "-P", f"fetch_run_id={fetch}",
                                  "-P", "max_new_tokens=32", cwd=tmp_path)))
    log_run = mlflow.get_run(log)
    assert log_run.data.tags[names.TAG_FETCH_RUN_ID] == fetch
    model_id = log_run.outputs.model_outputs[0].model_id
    answer = predict_in_fresh_process(f"models:/{model_id}", QUESTION)
    assert "Madrid" in answer["choices"][0]["message"]["content"]


def test_bad_parameter_ends_the_run_failed_not_running(tracking, tmp_path):
    done = run_project("-e", "log_transformers", "-P", "fetch_run_id=nope", cwd=tmp_path)
    assert done.returncode != 0
    assert "fetch_run_id='nope' is not an MLflow run ID" in done.stderr
    assert "Traceback" not in done.stderr.split("mlflow.cli")[0]  # one clear line, no stack
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


def _main(project, tmp_path, *extra):
    output = _ok(run_project("-e", "main", *FIXTURE_PARAMS, "-P", "max_new_tokens=32", *extra,
                             cwd=tmp_path, project=project))
    run = mlflow.get_run(_run_id(output))
    return run, output


def test_main_chains_reuses_and_reruns_on_code_change(tracking, tmp_path):
    # A copy outside git: reuse must key on the files themselves, not on a commit.
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "mlruns", "mlflow.db", ".pytest_cache"))

    first, output = _main(project, tmp_path)
    tags = first.data.tags
    fetch_id, log_id = tags["phi3flow.fetch_run_id"], tags["phi3flow.transformers_run_id"]
    assert tags[names.TAG_REUSED] == "none"
    # The names main's run-ID tags had before they were named after their consumers still work.
    for old, new in pipeline.DEPRECATED_OUTPUTS.items():
        assert tags[f"phi3flow.{old}"] == tags[f"phi3flow.{new}"]
    produced = Produced.read(first)  # produced.json, the typed record
    assert (produced.fetch_run_id, produced.transformers_run_id) == (fetch_id, log_id)
    for child in (fetch_id, log_id):  # each step is a child run of main
        assert mlflow.get_run(child).data.tags["mlflow.parentRunId"] == first.info.run_id
    for key in ("onnx_run_id", "evaluate_run_id", "register_run_id"):
        assert mlflow.get_run(tags[f"phi3flow.{key}"]).data.tags["mlflow.parentRunId"] == (
            first.info.run_id)
    assert "mlflow ui --backend-store-uri" in output
    assert tags["phi3flow.registered_alias"] == "champion"
    assert f"mlflow models serve -m models:/{names.DEFAULT_REGISTERED_MODEL}@champion" in output
    champion = predict_in_fresh_process(f"models:/{names.DEFAULT_REGISTERED_MODEL}@champion",
                                        QUESTION)
    assert "Madrid" in champion["choices"][0]["message"]["content"]
    for key in ("transformers_model_uri", "onnx_model_uri"):
        model_uri = tags[f"phi3flow.{key}"]
        assert model_uri in output
        answer = predict_in_fresh_process(model_uri, QUESTION)
        assert "Madrid" in answer["choices"][0]["message"]["content"]

    second, _ = _main(project, tmp_path)
    assert second.data.tags["phi3flow.fetch_run_id"] == fetch_id
    assert second.data.tags["phi3flow.transformers_run_id"] == log_id
    assert second.data.tags["phi3flow.onnx_run_id"] == tags[
        "phi3flow.onnx_run_id"]
    assert second.data.tags[names.TAG_REUSED] == (
        "fetch_model,log_transformers,log_onnx_pyfunc,evaluate,register")

    changed, _ = _main(project, tmp_path, "-P", "torch_dtype=float32")  # log_transformers only
    assert changed.data.tags["phi3flow.fetch_run_id"] == fetch_id
    assert changed.data.tags["phi3flow.onnx_run_id"] == tags[
        "phi3flow.onnx_run_id"]
    assert changed.data.tags["phi3flow.transformers_run_id"] != log_id
    # ... and what consumes it runs again (new upstream run ID)
    assert changed.data.tags["phi3flow.evaluate_run_id"] != tags["phi3flow.evaluate_run_id"]

    with open(project / "phi3flow" / "names.py", "a") as f:  # an uncommitted code change
        f.write("\n# a change to the project's code\n")
    third, _ = _main(project, tmp_path)
    assert third.data.tags["phi3flow.fetch_run_id"] != fetch_id
    assert third.data.tags["phi3flow.transformers_run_id"] != log_id
    assert third.data.tags[names.TAG_REUSED] == "none"

    forced, _ = _main(project, tmp_path, "-P", "force=true")
    assert forced.data.tags["phi3flow.fetch_run_id"] != third.data.tags[
        "phi3flow.fetch_run_id"]

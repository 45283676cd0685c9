"""End to end: the project run exactly as users run it, `mlflow run ... --env-manager local`."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.pipeline import stages as pipeline
from phi3flow.pipeline.stages import Produced
from tests.helpers import (
    FIXTURE,
    QUESTION,
    ROOT,
    free_port,
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
    # Each run ID under one name: the parameter that consumes it.
    assert not {key for key in tags if key.endswith("_run_id")} - {
        f"phi3flow.{stage.output}" for stage in pipeline.PIPELINE}
    produced = Produced.read(first)  # produced.json, the typed record
    assert (produced.fetch_run_id, produced.transformers_run_id) == (fetch_id, log_id)
    for child in (fetch_id, log_id):  # each step is a child run of main
        assert mlflow.get_run(child).data.tags["mlflow.parentRunId"] == first.info.run_id
    for key in ("onnx_run_id", "evaluate_run_id", "register_run_id"):
        assert mlflow.get_run(tags[f"phi3flow.{key}"]).data.tags["mlflow.parentRunId"] == (
            first.info.run_id)
    _printed_commands_work_as_printed(output, tmp_path)
    assert tags["phi3flow.registered_alias"] == "champion"
    assert f"front_door --model {names.DEFAULT_REGISTERED_MODEL}@champion" in output
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


def _printed_commands_work_as_printed(output: str, tmp_path) -> None:
    """The commands main prints, run as a new user would: each in its own process, side by
    side, from another folder and without MLFLOW_TRACKING_URI (the commands name the store).
    Only the ports are swapped for free ones, so the test does not depend on 5000/5001."""
    from phi3flow.pipeline import stages as main_step  # where main's printed commands are made

    block = output.split("Look at it with")[1].splitlines()[1:4]
    ui, serve, curl = (line.strip() for line in block)
    # The environment's own interpreter by absolute path: a new terminal's PATH has no venv.
    python = shlex.quote(sys.executable)
    assert ui.startswith(f"{python} -m mlflow ui --backend-store-uri sqlite:////"), ui
    assert serve.startswith("MLFLOW_TRACKING_URI=sqlite:////") and (
        f" {python} -m phi3flow.front_door " in serve), serve
    assert main_step.UI_PORT != main_step.SERVE_PORT
    ports = {main_step.UI_PORT: free_port(), main_step.SERVE_PORT: free_port()}
    ui, serve = (ui.replace(f"-p {main_step.UI_PORT}", f"-p {ports[main_step.UI_PORT]}"),
                 serve.replace(f"--port {main_step.SERVE_PORT}",
                               f"--port {ports[main_step.SERVE_PORT]}"))
    curl = curl.replace(f"localhost:{main_step.SERVE_PORT}",
                        f"localhost:{ports[main_step.SERVE_PORT]}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a new terminal's: no venv, no `python`
    started = time.monotonic()
    procs = [subprocess.Popen(["bash", "-c", command], cwd=elsewhere, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True) for command in (ui, serve)]
    try:
        ui_up = _wait_for(f"http://127.0.0.1:{ports[main_step.UI_PORT]}/health", procs[0])
        print(f"mlflow ui answered after {ui_up - started:.1f} s")
        _wait_for(f"http://127.0.0.1:{ports[main_step.SERVE_PORT]}/health", procs[1])
        answered = subprocess.run(["bash", "-c", curl], cwd=elsewhere, env=env,
                                  capture_output=True, text=True, timeout=120)
        assert "Madrid" in answered.stdout, answered.stdout + answered.stderr
    finally:
        for proc in procs:  # each runs in a session of its own: stop it and its children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 180) -> float:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return time.monotonic()
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds:.0f} s"
            time.sleep(0.5)

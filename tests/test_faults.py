"""Faults: damaged fetch outputs; runs left RUNNING by killed processes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest

from phi3flow import names
from phi3flow import tracking as step_tracking
from phi3flow.errors import StepError
from steps import fetch_model, log_onnx_pyfunc, log_transformers
from tests.conftest import FIXTURE

FETCH_ARGS = ["--model_id", str(FIXTURE), "--onnx_source", "build", "--precision", "fp32"]
MAIN = ["-e", "main", "-P", f"model_id={FIXTURE}", "-P", "onnx_source=build",
        "-P", "precision=fp32", "-P", "max_new_tokens=32"]


# --- A damaged fetch run is refused by every step that consumes one ---------------------------

def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _onnx_file(store: Path) -> Path:
    return next(p for p in sorted((store / "onnx").iterdir()) if p.suffix == ".onnx")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _edit_manifest(store: Path) -> None:
    path = store / names.MANIFEST
    text = path.read_text()
    path.write_text(text.replace('"size": ', '"size": 1', 1))


# (what is done to the fetch run's stored artifacts, the file it concerns per consumer, message)
DAMAGE = {
    "tampered file": (lambda store, f: _flip_last_byte(store / f), "does not match its sha256"),
    "truncated file": (lambda store, f: _truncate(store / f), "bytes, the fetch manifest says"),
    "missing file": (lambda store, f: (store / f).unlink(), "listed in the fetch manifest but "
                                                          "missing"),
    "extra file": (lambda store, f: (store / f).with_name("injected.py").write_text("x = 1\n"),
                   "injected.py is not in the fetch manifest"),
    "missing manifest": (lambda store, f: (store / names.MANIFEST).unlink(),
                         f"has no {names.MANIFEST} artifact; re-run fetch_model"),
    "edited manifest": (lambda store, f: _edit_manifest(store),
                        "manifest was changed after the run; re-run fetch_model"),
}
CONSUMERS = {  # every step that reads a fetch run, and the file of it that it needs
    names.LOG_TRANSFORMERS: (log_transformers, lambda store: "checkpoint/model.safetensors"),
    names.LOG_ONNX_PYFUNC: (log_onnx_pyfunc,
                            lambda store: f"onnx/{_onnx_file(store).name}"),
}


@pytest.fixture(scope="module")
def pristine_fetch():
    """One fetch run, and a copy of its stored artifacts to restore after each test."""
    run_id = fetch_model.main(FETCH_ARGS)
    store = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=""))
    backup = Path(str(store) + ".pristine")
    shutil.copytree(store, backup, symlinks=True)
    yield run_id, store, backup
    shutil.rmtree(backup, ignore_errors=True)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_fetch_run_is_refused_by_name_by_every_consumer(pristine_fetch, damage, consumer):
    run_id, store, backup = pristine_fetch
    module, needed = CONSUMERS[consumer]
    name = needed(store)
    do, message = DAMAGE[damage]
    try:
        do(store, name)
        with pytest.raises(StepError) as refused:
            module.main(["--fetch_run_id", run_id])
    finally:
        shutil.rmtree(store)
        shutil.copytree(backup, store, symlinks=True)
    assert message in str(refused.value)
    if "manifest" not in damage:
        assert name.split("/")[0] in str(refused.value)  # names the file it refused
        if damage != "extra file":
            assert name in str(refused.value)
    run = mlflow.last_active_run()
    assert run.info.status == "FAILED" and run.data.tags[step_tracking.TAG_STEP] == consumer
    assert message in run.data.tags[step_tracking.TAG_ERROR]


# --- Runs left RUNNING by a killed process (SIGKILL, OOM) -------------------------------------

def _runs(client=None, **filters) -> list:
    client = client or mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    clauses = [f"tags.`{step_tracking.TAG_STEP}` = '{v}'" if k == "step" else
               f"attributes.status = '{v}'" for k, v in filters.items()]
    return client.search_runs(experiments, " and ".join(clauses))


def test_stale_runs_are_marked_failed_but_live_and_foreign_ones_are_left_alone(tracking):
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        experiment = mlflow.create_experiment("stale")
        client = mlflow.MlflowClient()

        def running(host: str, pid: int, start: str | None) -> str:
            run = client.create_run(experiment)
            start = start or step_tracking._process_start(pid)
            tags = {step_tracking.TAG_STEP: names.EVALUATE, names.TAG_HOST: host,
                    names.TAG_PID: str(pid), names.TAG_PROCESS_START: start}
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
            return run.info.run_id

        here = socket.gethostname()
        killed = running(here, dead.pid, "12345")
        reused_pid = running(here, alive.pid, "1")  # same pid, another process start: stale
        live = running(here, alive.pid, None)
        foreign = running("another-host", dead.pid, "12345")
        assert sorted(step_tracking.mark_stale_runs(experiment)) == sorted([killed, reused_pid])
        for run_id in (killed, reused_pid):
            run = client.get_run(run_id)
            assert run.info.status == "FAILED"
            assert f"process {run.data.tags[names.TAG_PID]} on {here}" in run.data.tags[
                names.TAG_STALE]
        assert client.get_run(live).info.status == "RUNNING"
        assert client.get_run(foreign).info.status == "RUNNING"
    finally:
        alive.kill()
        alive.wait()

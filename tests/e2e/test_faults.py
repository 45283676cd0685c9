"""Faults: damaged fetch outputs, `main` killed mid-step, the tracking server restarted mid-run.

Nothing is mocked: real `mlflow run` processes are killed with real signals, and a real
`mlflow server` (sqlite backend, artifacts proxied) is stopped and started again on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from phi3flow.core import names, stale
from phi3flow.core.errors import StepError
from phi3flow.pipeline import stages as pipeline
from steps import fetch_model, log_onnx_pyfunc, log_transformers
from tests.helpers import FIXTURE, ROOT, free_port, run_project, tracking_server

# All of it: each test damages, kills or restarts what whole steps and servers depend on.
pytestmark = pytest.mark.e2e
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
    assert run.info.status == "FAILED" and run.data.tags[names.TAG_STEP] == consumer
    assert message in run.data.tags[names.TAG_ERROR]


# --- main killed with SIGTERM and with SIGKILL in the middle of a step -------------------------

def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants at once, as `kill -<sig>` of a job or the OOM
    killer of a container would: stop them all first, so none spawns or reaps unseen."""
    frozen: set[int] = set()
    while new := {pid, *_descendants(pid)} - frozen:
        for p in new:
            _kill(p, signal.SIGSTOP)
        frozen |= new
    for p in frozen:
        _kill(p, sig)
    for p in frozen:
        _kill(p, signal.SIGCONT)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _project(tmp_path: Path) -> Path:
    """A copy of the project outside git: reuse keys on its files, so a commit made in the
    repository while the test runs cannot change what is reused."""
    project = tmp_path / "project"
    if not project.exists():
        shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "mlruns", "mlflow.db", ".pytest_cache", "benchmarks",
            "docs"))
    return project


def _start_main(tmp_path: Path, log: str, env: dict | None = None) -> subprocess.Popen:
    """`mlflow run <project> -e main ...` in the background, output to a file (as run_project)."""
    command = [sys.executable, "-m", "mlflow", "run", str(_project(tmp_path)), "--env-manager",
               "local", *MAIN]
    full_env = {**os.environ, **(env or {}),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / log, "w") as out:
        return subprocess.Popen(command, cwd=tmp_path, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT)


def _runs(client=None, **filters) -> list:
    client = client or mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    clauses = [f"tags.`{names.TAG_STEP}` = '{v}'" if k == "step" else
               f"attributes.status = '{v}'" for k, v in filters.items()]
    return client.search_runs(experiments, " and ".join(clauses))


# A line each step logs in the middle of its work, with seconds of work still after it.
MID_STEP = {names.LOG_TRANSFORMERS: "logging the chat model",
            names.EVALUATE: "in a fresh process"}  # then two models load, answer and are scored


def _wait_for_step(step: str, proc: subprocess.Popen, tmp_path: Path, log: str,
                   client=None) -> None:
    """Until `step`'s process has started its run (it tags it as it starts) and logged its
    mid-work line, so the kill lands in the middle of the step's work: a fixed wait after the
    run started sometimes landed after a fast step had already finished."""
    deadline = time.monotonic() + 600
    while not _runs(client, step=step, status="RUNNING") or (
            MID_STEP[step] not in (tmp_path / log).read_text()):
        if proc.poll() is not None:
            pytest.fail(f"main ended before {step} started: {(tmp_path / log).read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"{step} did not start in 600 s"
        time.sleep(0.2)


def _wait_until_no_run_is_running(seconds: float = 60) -> list:
    deadline = time.monotonic() + seconds
    while (running := _runs(status="RUNNING")) and time.monotonic() < deadline:
        time.sleep(0.5)
    return running


def test_stale_runs_are_marked_failed_but_live_and_foreign_ones_are_left_alone(tracking):
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    zombie = subprocess.Popen(["sleep", "60"])  # killed but not reaped: /proc still lists it
    zombie_start = stale.process_start(zombie.pid)
    zombie.kill()
    time.sleep(0.2)
    try:
        experiment = mlflow.create_experiment("stale")
        client = mlflow.MlflowClient()

        def running(host: str, pid: int, start: str | None) -> str:
            run = client.create_run(experiment)
            start = start or stale.process_start(pid)
            tags = {names.TAG_STEP: names.EVALUATE, names.TAG_HOST: host,
                    names.TAG_PID: str(pid), names.TAG_PROCESS_START: start}
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
            return run.info.run_id

        here = socket.gethostname()
        killed = running(here, dead.pid, "12345")
        reused_pid = running(here, alive.pid, "1")  # same pid, another process start: stale
        live = running(here, alive.pid, None)
        unreaped = running(here, zombie.pid, zombie_start)
        foreign = running("another-host", dead.pid, "12345")
        expected = [killed, reused_pid, unreaped]
        assert sorted(stale.mark_stale_runs(experiment)) == sorted(expected)
        for run_id in expected:
            run = client.get_run(run_id)
            assert run.info.status == "FAILED"
            assert f"process {run.data.tags[names.TAG_PID]} on {here}" in run.data.tags[
                names.TAG_STALE]
        assert client.get_run(live).info.status == "RUNNING"
        assert client.get_run(foreign).info.status == "RUNNING"
    finally:
        for proc in (alive, zombie):
            proc.kill()
            proc.wait()


def test_main_killed_mid_step_leaves_no_run_running_and_a_rerun_completes(tracking, tmp_path):
    # 1. SIGTERM while evaluate works (its longest step on the fixture: log_transformers was
    # sometimes done before the signal landed): every run it touched ends FAILED at once, the
    # evaluate run and its two evaluation runs included.
    proc = _start_main(tmp_path, "sigterm.log")
    _wait_for_step(names.EVALUATE, proc, tmp_path, "sigterm.log")
    _signal_tree(proc.pid, signal.SIGTERM)
    proc.wait(120)
    running = _wait_until_no_run_is_running()
    assert not running, ([(r.info.run_name, r.data.tags.get(names.TAG_STEP)) for r in running],
                         (tmp_path / "sigterm.log").read_text()[-3000:])
    (terminated,) = _runs(step=names.EVALUATE)
    assert terminated.info.status == "FAILED"
    children = mlflow.search_runs(
        [terminated.info.experiment_id], output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{terminated.info.run_id}'")
    assert len(children) == 2 and {run.info.status for run in children} == {"FAILED"}
    assert _runs(step=names.MAIN)[0].info.status == "FAILED"

    # 2. SIGKILL while evaluate works: nothing can end those runs now...
    proc = _start_main(tmp_path, "sigkill.log")
    _wait_for_step(names.EVALUATE, proc, tmp_path, "sigkill.log")
    _signal_tree(proc.pid, signal.SIGKILL)
    proc.wait(120)
    killed = {r.info.run_id: r for r in _runs(status="RUNNING")}
    assert {r.data.tags.get(names.TAG_STEP) for r in killed.values()} >= {
        names.MAIN, names.EVALUATE}
    pids = {int(r.data.tags[names.TAG_PID]) for r in killed.values()}
    # SIGKILL is delivered at once, but a process holding a loaded model takes a moment to
    # release its memory and leave /proc: wait for that, not for anything to end the runs.
    deadline = time.monotonic() + 60
    while (alive := {p for p in pids if stale.process_start(p) is not None}):
        assert time.monotonic() < deadline, f"processes {alive} outlived SIGKILL by 60 s"
        time.sleep(0.2)

    # 3. ...until the next main marks them FAILED (their processes are gone) and completes,
    # reusing the three steps that finished.
    done = run_project(*MAIN, cwd=tmp_path, project=_project(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    assert not _runs(status="RUNNING")
    for run_id in killed:
        run = mlflow.get_run(run_id)
        assert run.info.status == "FAILED"
        assert "SIGKILL" in run.data.tags[names.TAG_STALE]
    (final,) = [r for r in _runs(step=names.MAIN, status="FINISHED")]
    assert final.data.tags[names.TAG_REUSED] == "fetch_model,log_transformers,log_onnx_pyfunc"
    # The registered result is what an uninterrupted run gives: one version, champion.
    client = mlflow.MlflowClient()
    model_name = names.DEFAULT_REGISTERED_MODEL
    (version,) = client.search_model_versions(f"name = '{model_name}'")
    assert client.get_model_version_by_alias(model_name, "champion").version == version.version
    assert final.data.tags[names.TAG_PREFIX + "registered_alias"] == "champion"


# --- The tracking server restarted while main runs ---------------------------------------------

def test_tracking_server_restarted_mid_run_then_main_completes(tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    with tracking_server(tmp_path, port):
        proc = _start_main(tmp_path, "first.log")
        _wait_for_step(names.LOG_TRANSFORMERS, proc, tmp_path, "first.log", client)
    # The server is down for a while, in the middle of log_transformers...
    time.sleep(5)
    with tracking_server(tmp_path, port):
        # ...and back: main either goes on (the client retries) or fails saying so.
        first = proc.wait(900)
        output = (tmp_path / "first.log").read_text()
        print(f"main across the restart: exit code {first}\n{output[-1500:]}")
        if first != 0:
            assert uri in output or "tracking" in output.lower(), output[-3000:]
        done = run_project(*MAIN, cwd=tmp_path, project=_project(tmp_path))
        assert done.returncode == 0, done.stderr[-4000:]
        assert not _runs(client, status="RUNNING")
        (final, *_) = _runs(client, step=names.MAIN, status="FINISHED")
        assert final.data.tags[names.TAG_PREFIX + "registered_alias"] == "champion"
        versions = client.search_model_versions(f"name = '{names.DEFAULT_REGISTERED_MODEL}'")
        assert len(versions) == 1
        for stage in pipeline.PIPELINE:  # each step's run, by the name of its output
            run_id = final.data.tags[f"{names.TAG_PREFIX}{stage.output}"]
            assert client.get_run(run_id).info.status == "FINISHED"

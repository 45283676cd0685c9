"""Hermetic test setup: a temporary tracking store, a redirected Hugging Face cache, no network.

Environment variables that libraries read at import time (huggingface_hub reads HF_HUB_OFFLINE
and HF_HOME once) are set here, before any test module imports them. Subprocesses inherit them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ports import free_port  # noqa: F401 (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-phi3"
EVAL_DATA = ROOT / "data" / "eval.jsonl"

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="phi3flow-tests-"))
# Hermetic whatever the caller exports: no tracking store, run, experiment, registry, token or
# hub setting of theirs (MLFLOW_*, HF_*) leaks in; the suite sets the few it needs below.
for _name in [n for n in os.environ if n.startswith(("MLFLOW_", "HF_"))]:
    del os.environ[_name]
os.environ.update({
    "HF_HUB_OFFLINE": "1",  # tests never reach a model hub; hub tests use a local stand-in
    "HF_HOME": str(_SESSION_DIR / "hf-home"),
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_DIR / 'mlflow.db'}",
})
# huggingface_hub reads TRANSFORMERS_OFFLINE as HF_HUB_OFFLINE: a caller who exports it would
# turn the hub stand-in tests offline. HF_HUB_OFFLINE above is the one switch the tests set.
os.environ.pop("TRANSFORMERS_OFFLINE", None)


def pytest_configure(config):
    # The sqlite store puts artifacts under ./mlruns of the directory it is first used from,
    # which can be before any per-test chdir (session fixtures): make that directory the
    # session's. Here, not at import: pytest resolves `testpaths` after importing this file.
    os.chdir(_SESSION_DIR)


def _git_status() -> str | None:
    """`git status --porcelain` of the checkout (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def pytest_sessionstart(session):
    session.config._phi3flow_git_status = _git_status()


def pytest_sessionfinish(session, exitstatus):
    from tests import bad_input_table

    if bad_input_table.write_if_complete():
        print(f"\nwrote {bad_input_table.DOC} from this session's bad-input results")
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    # Running the tests leaves the checkout as it was (generated docs are rewritten only with
    # PHI3FLOW_WRITE_DOCS=1): a change to it fails the session, naming what changed.
    before, after = getattr(session.config, "_phi3flow_git_status", None), _git_status()
    if (before is not None and after is not None and before != after
            and not bad_input_table.writing_docs()):
        changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
        print("\nthe test run changed the checkout (git status):\n  " + "\n  ".join(changed))
        if session.exitstatus == 0:
            session.exitstatus = 1


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Each test runs in its own directory: stray mlflow.db / mlruns land there, not in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh, empty tracking store for tests that count runs or check reuse."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri



@contextmanager
def tracking_server(root: Path, port: int):
    """`mlflow server` with a sqlite backend and proxied artifacts on 127.0.0.1:port, until exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=open(root / f"server-{time.monotonic_ns()}.log", "w"),
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def run_project(*args: str, cwd: Path, env: dict[str, str] | None = None,
                project: Path | str = ROOT, env_manager: str = "local",
                timeout: int = 1200) -> subprocess.CompletedProcess:
    """`mlflow run <project> --env-manager <manager> ...` in a subprocess, as a user types it."""
    command = [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", env_manager,
               *args]
    full_env = {**os.environ, **(env or {})}
    # The steps run `python -m ...`: make `python` this interpreter.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


QUESTION = {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}


def predict_in_fresh_process(model_uri: str, payload: dict, env: dict | None = None) -> dict:
    """Load the model in a new interpreter (no state shared with the test) and predict."""
    code = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(json.loads(sys.argv[2]))\n"
        "print('RESULT=' + json.dumps(out[0] if isinstance(out, list) else out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, model_uri, json.dumps(payload)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT="))
    return json.loads(line[len("RESULT="):])


def eval_rows() -> list[dict]:
    return [json.loads(line) for line in EVAL_DATA.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def fetch_run_id():
    """One fetch of the fixture with an fp32 ONNX build, shared by the tests that only read it."""
    from steps import fetch_model

    return fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", "build",
                             "--precision", "fp32"])


@pytest.fixture(scope="session")
def transformers_model_uri(fetch_run_id):
    from steps import log_transformers

    return log_transformers.main(["--fetch_run_id", fetch_run_id, "--max_new_tokens", "32"])


@pytest.fixture(scope="session")
def onnx_model_uri(fetch_run_id):
    from steps import log_onnx_pyfunc

    return log_onnx_pyfunc.main(["--fetch_run_id", fetch_run_id, "--max_new_tokens", "32"])


def post(url: str, body: bytes | dict | list, timeout: float = 120,
         path: str = "/invocations") -> tuple[int, bytes]:
    """POST to a served model (MLflow's /invocations by default); (HTTP status, raw body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def ping(url: str, timeout: float = 30) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as response:
        return response.status


@contextmanager
def serve(model_uri: str, *args: str):
    """`mlflow models serve -m <uri> --env-manager local` on 127.0.0.1; yields (url, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ping(url)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    pytest.fail(f"the model server exited: {proc.stdout.read()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("the model server did not come up in 180 s")
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHAMPIONS = {"transformers": "phi3-transformers-chat", "onnx": "phi3-onnx-chat"}
FRONT_DOOR_NAMES = {kind: f"{name}@champion" for kind, name in CHAMPIONS.items()}


@contextmanager
def front_door(*args: str):
    """`python -m phi3flow.front_door ARGS` on a free port; yields (base URL, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3flow.front_door", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
             f"{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    pytest.fail(f"the front door exited: {proc.stdout.read()[-3000:]}")
                assert time.monotonic() < deadline, "the front door did not come up in 180 s"
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def champions(transformers_model_uri, onnx_model_uri) -> dict[str, str]:
    """Both logged models registered, each with alias champion: {kind: models:/NAME@champion}."""
    import mlflow

    client = mlflow.MlflowClient()
    for kind, uri in (("transformers", transformers_model_uri), ("onnx", onnx_model_uri)):
        version = mlflow.register_model(uri, CHAMPIONS[kind])
        client.set_registered_model_alias(CHAMPIONS[kind], "champion", version.version)
    return {kind: f"models:/{name}@champion" for kind, name in CHAMPIONS.items()}


@pytest.fixture(scope="session")
def served(champions):
    """Both champions served at once (one worker each) for the session: {kind: (url, process)}."""
    with serve(champions["transformers"]) as transformers, serve(champions["onnx"]) as onnx:
        yield {"transformers": transformers, "onnx": onnx}


def created_run():
    """The run that the in-process step call just before made, by its ID: this process's last
    run (MLflow keeps it), never a search of the shared store for "the newest run of step X"."""
    import mlflow

    run = mlflow.last_active_run()
    assert run is not None, "no run was started in this process"
    return run


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def git_server(tmp_path):
    """A clone of this repository's committed HEAD, served read-only by `git daemon` on
    127.0.0.1: yields its git:// URL, the bare repository and a working clone that can push."""
    import socket

    served = tmp_path / "served"
    served.mkdir()
    bare = served / "phi3-mlflow.git"
    git("clone", "--bare", "--quiet", str(ROOT), str(bare), cwd=tmp_path)
    work = tmp_path / "work"
    git("clone", "--quiet", str(bare), str(work), cwd=tmp_path)
    git("config", "user.email", "test@example.invalid", cwd=work)
    git("config", "user.name", "test", cwd=work)
    port = free_port()
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1",
         f"--port={port}", f"--base-path={served}", str(served)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"git://127.0.0.1:{port}/phi3-mlflow.git", bare, work
    daemon.terminate()
    daemon.wait(10)

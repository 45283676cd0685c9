"""Hermetic test setup: a temporary tracking store, a redirected Hugging Face cache, no network.

Environment variables that libraries read at import time (huggingface_hub reads HF_HUB_OFFLINE
and HF_HOME once) are set here, before any test module imports them. Subprocesses inherit them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import CHAMPIONS, FIXTURE, ROOT, free_port, git, serve

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


def pytest_collection_finish(session):
    # The sqlite store puts artifacts under ./mlruns of the directory it is first used from,
    # which can be before any per-test chdir (session fixtures): make that directory the
    # session's. After collection, not before: pytest (and each pytest-xdist worker) finds
    # `testpaths` relative to the directory it was started in.
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
    """Each test runs in its own directory: stray mlflow.db / mlruns land there, not in the repo.
    And each starts knowing nothing of any store (what the store adapter learned in this process
    under an earlier test's stand-in may not hold now)."""
    from phi3flow.core import store

    monkeypatch.chdir(tmp_path)
    store.forget()


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh, empty tracking store for tests that count runs or check reuse.

    Its tables are created here, before the test starts anything: two processes that create
    a new sqlite store at once (a test polling while the `mlflow run` it started does the
    same) can both run MLflow's migrations, and one fails with alembic's
    CircularDependencyError (seen in CI: `main` died before its first step)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.MlflowClient(uri).search_experiments()
    return uri



@pytest.fixture(scope="session")
def fetch_run_id():
    """One fetch of the fixture with an fp32 ONNX build, shared by the tests that only read it."""
    from steps import fetch_model

    return fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", "build",
                             "--precision", "fp32"])


@pytest.fixture(scope="session")
def fp32_onnx(fetch_run_id) -> Path:
    """That fetch's fp32 ONNX build as a local folder, for a test that needs a fetch run of its
    own (to damage it) without building again: `--onnx_source <folder>` copies it into the run."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=fetch_run_id, artifact_path="onnx"))


@pytest.fixture(scope="session")
def int4_onnx(tmp_path_factory) -> Path:
    """One int4 build of the fixture (fetch_model's default precision) per test run; read-only:
    a test that must change it copies it (fetch_model's `--onnx_source <folder>` does)."""
    from phi3flow.fetching import onnx_build

    return onnx_build.build(FIXTURE, tmp_path_factory.mktemp("int4") / "onnx", "int4", "cpu")


@pytest.fixture(scope="session")
def transformers_model_uri(fetch_run_id):
    from steps import log_transformers

    return log_transformers.main(["--fetch_run_id", fetch_run_id, "--max_new_tokens", "32"])


@pytest.fixture(scope="session")
def onnx_model_uri(fetch_run_id):
    from steps import log_onnx_pyfunc

    return log_onnx_pyfunc.main(["--fetch_run_id", fetch_run_id, "--max_new_tokens", "32"])


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

"""Hermetic test setup: a temporary tracking store, a redirected Hugging Face cache, no network.

Environment variables that libraries read at import time (huggingface_hub reads HF_HUB_OFFLINE
and HF_HOME once) are set here, before any test module imports them. Subprocesses inherit them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-phi3"
EVAL_DATA = ROOT / "data" / "eval.jsonl"

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="phi3flow-tests-"))
os.environ.update({
    "HF_HUB_OFFLINE": "1",  # tests never reach a model hub; hub tests use a local stand-in
    "HF_HOME": str(_SESSION_DIR / "hf-home"),
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_DIR / 'mlflow.db'}",
})
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


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


def run_project(*args: str, cwd: Path, env: dict[str, str] | None = None,
                project: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`mlflow run <project> --env-manager local ...` in a subprocess, as a user would type it."""
    command = [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", "local", *args]
    full_env = {**os.environ, **(env or {})}
    # The steps run `python -m ...`: make `python` this interpreter.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)

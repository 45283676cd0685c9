"""batch_score's refusals before Spark starts, beyond the bad-input matrix (test_bad_input.py):
no pyspark, no Java or an old one, a model that is not a chat model. Each is one line, exit 2,
a FAILED run, and no Spark."""

from __future__ import annotations

import logging
import sys

import mlflow
import pytest

from phi3flow.core import names, tracking
from steps import batch_score as step
from steps import log_onnx_pyfunc
from tests.helpers import EVAL_DATA


def _refused(monkeypatch, caplog, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", ["steps/batch_score.py", "--input", str(EVAL_DATA), *argv])
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="phi3flow.core.tracking")
    with pytest.raises(SystemExit) as exited:
        tracking.run_cli(names.BATCH_SCORE, step.main)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    run = mlflow.last_active_run()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert run.info.status == "FAILED" and run.data.tags[names.TAG_STEP] == names.BATCH_SCORE
    return lines[0]


def test_without_pyspark_it_says_how_to_install_it(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # `import pyspark` raises ImportError
    message = _refused(monkeypatch, caplog)
    assert "needs pyspark, which requirements.txt leaves out: pip install pyspark==4.3.0" in message
    assert "apt-get install -y default-jre-headless" in message


def test_without_java_or_with_an_old_one_it_says_which_java(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert (f"needs Java 17 or newer for Spark, and found no java (JAVA_HOME={tmp_path}/no-jdk "
            "has no bin/java)") in _refused(monkeypatch, caplog)
    old = tmp_path / "jdk11" / "bin" / "java"
    old.parent.mkdir(parents=True)
    old.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    old.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(old.parent.parent))
    message = _refused(monkeypatch, caplog)
    assert f'needs Java 17 or newer for Spark; {old} is openjdk version "11.0.2"' in message


def test_a_model_that_is_not_a_chat_model_is_refused(monkeypatch, caplog, fetch_run_id):
    prompt_model = log_onnx_pyfunc.main(["--fetch_run_id", fetch_run_id,
                                         "--interface", "prompt"])
    message = _refused(monkeypatch, caplog, "--model_uri", prompt_model)
    assert f"model_uri={prompt_model} is not a chat model (it takes prompt" in message

"""Reproducible anywhere: an environment MLflow builds itself, and runs from a git URL.

Both are real: `--env-manager virtualenv` creates a new virtual environment from conda.yaml (with
pyenv's Python and packages from the package index), and the git test serves a clone of this
repository with `git daemon` on 127.0.0.1 and runs `mlflow run git://...`.
"""

from __future__ import annotations

import shutil

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.pipeline import stages as pipeline
from tests.e2e.test_mlflow_run import _ok, _run_id
from tests.helpers import QUESTION, git, predict_in_fresh_process, run_project

pytestmark = pytest.mark.e2e

FIXTURE_PARAMS = ["-P", "model_id=tests/fixtures/tiny-phi3", "-P", "onnx_source=build",
                  "-P", "precision=fp32"]


@pytest.mark.skipif(shutil.which("pyenv") is None, reason="MLflow's virtualenv manager needs pyenv")
def test_virtualenv_builds_the_environment_and_runs_the_first_steps(tracking, tmp_path):
    env = {"MLFLOW_ENV_ROOT": str(tmp_path / "envs")}  # a brand-new environment, not a cached one
    done = run_project("-e", "fetch_model", *FIXTURE_PARAMS, cwd=tmp_path, env=env,
                       env_manager="virtualenv")
    output = _ok(done)
    assert "Creating a new environment" in output
    fetch = _run_id(output)
    envs = list((tmp_path / "envs").iterdir())
    assert len(envs) == 1 and (envs[0] / "bin" / "python").exists()

    log = _run_id(_ok(run_project("-e", "log_transformers", "-P", f"fetch_run_id={fetch}",
                                  "-P", "max_new_tokens=32", cwd=tmp_path, env=env,
                                  env_manager="virtualenv")))
    model_id = mlflow.get_run(log).outputs.model_outputs[0].model_id
    answer = predict_in_fresh_process(f"models:/{model_id}", QUESTION)
    assert "Madrid" in answer["choices"][0]["message"]["content"]


def test_main_from_a_git_url_carries_the_commit_and_reuses_on_it(git_server, tracking,
                                                                    tmp_path):
    url, bare, work = git_server
    first_commit = git("rev-parse", "HEAD", cwd=work)
    args = ["-e", "main", *FIXTURE_PARAMS, "-P", "max_new_tokens=32"]

    first = mlflow.get_run(_run_id(_ok(run_project("-v", first_commit, *args, project=url,
                                                   cwd=tmp_path))))
    assert first.data.tags["mlflow.source.git.commit"] == first_commit
    assert first.data.tags["mlflow.source.name"].startswith("git://127.0.0.1")
    children = [first.data.tags[f"phi3flow.{stage.output}"] for stage in pipeline.PIPELINE]
    for child in children:
        assert mlflow.get_run(child).data.tags["mlflow.source.git.commit"] == first_commit
    champion = f"models:/{names.DEFAULT_REGISTERED_MODEL}@champion"
    assert "Madrid" in predict_in_fresh_process(champion, QUESTION)["choices"][0]["message"][
        "content"]

    again = mlflow.get_run(_run_id(_ok(run_project("-v", first_commit, *args, project=url,
                                                   cwd=tmp_path))))
    assert again.data.tags[names.TAG_REUSED] == (
        "fetch_model,log_transformers,log_onnx_pyfunc,evaluate,register")

    # A new commit (even one that leaves the code alone) is a new version of the project.
    (work / "NOTICE.txt").write_text("a later commit\n")
    git("add", "NOTICE.txt", cwd=work)
    git("commit", "--quiet", "-m", "a later commit", cwd=work)
    git("push", "--quiet", "origin", "HEAD", cwd=work)
    second_commit = git("rev-parse", "HEAD", cwd=work)
    later = mlflow.get_run(_run_id(_ok(run_project("-v", second_commit, *args, project=url,
                                                   cwd=tmp_path))))
    assert later.data.tags["mlflow.source.git.commit"] == second_commit
    assert later.data.tags[names.TAG_REUSED] == "none"
    fetch = mlflow.get_run(later.data.tags["phi3flow.fetch_run_id"])
    assert fetch.data.tags["mlflow.source.git.commit"] == second_commit

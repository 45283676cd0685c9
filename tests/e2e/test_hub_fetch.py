"""The real download path, against a local stand-in for the Hugging Face hub on 127.0.0.1.

No mocks: `mlflow run` runs fetch_model with the project's defaults, and the real
huggingface_hub client downloads over HTTP from tests/hub_server.py (HF_ENDPOINT points at it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.fetching import manifest, onnx_build
from tests.e2e.test_mlflow_run import _ok, _run_id
from tests.helpers import (
    FIXTURE,
    QUESTION,
    free_port,
    predict_in_fresh_process,
    run_project,
)
from tests.hub_server import LocalHub

pytestmark = pytest.mark.e2e

TOKEN = "hf_test_secret_token_do_not_log_0123456789"
ONNX_COMMIT = names.DEFAULT_ONNX_REVISION  # the stand-in repo sits at the pinned commit


@pytest.fixture(scope="session")
def onnx_repo(tmp_path_factory) -> Path:
    """A stand-in for microsoft/Phi-3-mini-4k-instruct-onnx: the fixture's int4 build."""
    root = tmp_path_factory.mktemp("onnx-repo")
    onnx_build.build(FIXTURE, root / names.ONNX_HUB_SUBFOLDER, "int4", "cpu")
    (root / "README.md").write_text("other variants live beside the CPU one\n")
    (root / "cuda" / "cuda-fp16").mkdir(parents=True)
    (root / "cuda" / "cuda-fp16" / "model.onnx").write_bytes(b"not for us")
    return root


def _repos(onnx_repo: Path) -> dict:
    """The stand-in's two repositories, at the pinned commits."""
    return {
        names.DEFAULT_MODEL_ID: {"dir": FIXTURE, "commit": names.DEFAULT_MODEL_REVISION},
        names.ONNX_HUB_REPO: {"dir": onnx_repo, "commit": ONNX_COMMIT},
    }


def _snapshot(tmp_path: Path) -> Path:
    """Where the hub cache keeps the default model's files (HF_HOME = tmp_path/hf-home)."""
    return (tmp_path / "hf-home" / "hub" / "models--microsoft--Phi-3-mini-4k-instruct"
            / "snapshots" / names.DEFAULT_MODEL_REVISION)


@pytest.fixture
def hub(onnx_repo):
    with LocalHub(_repos(onnx_repo), require_token=TOKEN) as server:
        yield server


def _hub_env(hub, tmp_path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf-home")}


def test_default_fetch_downloads_pinned_files_with_the_token_and_never_logs_it(
        hub, tracking, tmp_path):
    done = run_project("-e", "fetch_model", cwd=tmp_path, env=_hub_env(hub, tmp_path))
    output = _ok(done)
    run = mlflow.get_run(_run_id(output))
    data = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{names.MANIFEST}"))

    # Pinned: the model and the ONNX build at their pinned commits, nothing moving.
    assert data["revision"] == names.DEFAULT_MODEL_REVISION
    assert run.data.tags[names.TAG_REVISION] == names.DEFAULT_MODEL_REVISION
    assert data["sources"]["onnx"]["revision"] == ONNX_COMMIT
    assert data["sources"]["onnx"]["requested_revision"] == names.DEFAULT_ONNX_REVISION
    assert "moving reference" not in output
    # Every downloaded file was checked against the hub's sizes and hashes.
    assert "against the hub's sizes and hashes" in output
    # Only the CPU int4 subfolder of the ONNX repo was downloaded.
    onnx_files = hub.downloaded(names.ONNX_HUB_REPO)
    assert onnx_files and all(f.startswith(names.ONNX_HUB_SUBFOLDER + "/") for f in onnx_files)
    assert {f"onnx/{Path(f).name}" for f in onnx_files} <= set(data["files"])
    # Every request carried the token; nothing we stored or printed contains it.
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests)
    assert "Fetching" in done.stderr  # huggingface_hub's progress bars
    assert TOKEN not in output
    db = Path(tracking.removeprefix("sqlite:///"))
    assert TOKEN.encode() not in db.read_bytes()
    store = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=""))
    for path in store.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_by_reference_model_is_pinned_to_the_fetched_commit(hub, tracking, tmp_path):
    env = _hub_env(hub, tmp_path)
    fetch = _run_id(_ok(run_project("-e", "fetch_model", "-P", "onnx_source=build",
                                    "-P", "log_weights=false", cwd=tmp_path, env=env)))
    assert not mlflow.MlflowClient().list_artifacts(fetch, "checkpoint")  # manifest only
    log = _run_id(_ok(run_project("-e", "log_transformers", "-P", f"fetch_run_id={fetch}",
                                  "-P", "save_pretrained=false", "-P", "max_new_tokens=32",
                                  cwd=tmp_path, env=env)))
    model_uri = f"models:/{mlflow.get_run(log).outputs.model_outputs[0].model_id}"
    location = mlflow.get_logged_model(model_uri.split("/")[-1]).artifact_location
    mlmodel = mlflow.artifacts.load_text(f"{location}/MLmodel")
    assert f"source_model_revision: {names.DEFAULT_MODEL_REVISION}" in mlmodel
    stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=location))
    assert not list(stored.rglob("*.safetensors"))  # a reference, not a copy

    # A fresh process with an empty cache resolves the weights from the hub at that commit.
    answer = predict_in_fresh_process(model_uri, QUESTION,
                                      env={**env, "HF_HOME": str(tmp_path / "fresh-hf-home")})
    assert "Madrid" in answer["choices"][0]["message"]["content"]
    fetched = [path for method, path, _ in hub.requests if method == "GET"
               and f"/resolve/{names.DEFAULT_MODEL_REVISION}/model.safetensors" in path]
    assert fetched, "the weights were not fetched at the pinned commit"


def test_unreachable_hub_fails_fast_naming_the_model_and_the_offline_fix(tracking, tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home")}
    started = time.monotonic()
    done = run_project("-e", "fetch_model", cwd=tmp_path, env=env)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "cannot reach the Hugging Face hub at http://127.0.0.1" in done.stderr
    assert names.DEFAULT_MODEL_ID in done.stderr and "-P model_id=/path/to/checkpoint" in done.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


def test_offline_mode_with_an_empty_cache_says_what_to_do(tracking, tmp_path):
    done = run_project("-e", "fetch_model", cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")})
    assert done.returncode != 0
    assert "HF_HUB_OFFLINE is set" in done.stderr and "not in the local hub cache" in done.stderr


def test_download_cut_mid_file_fails_cleanly_and_a_rerun_completes_verified(
        onnx_repo, tracking, tmp_path):
    """The hub delivers model.safetensors only partly once (a well-formed but short answer, as a
    dropped proxy would): fetch_model fails naming the download, logs nothing, leaves no partial
    file where a later step could pick it up; the re-run downloads it whole and verifies."""
    repos, snapshot = _repos(onnx_repo), _snapshot(tmp_path)
    weights = FIXTURE / "model.safetensors"
    with LocalHub(repos, require_token=TOKEN, fault="short",
                  fail_after_bytes={"model.safetensors": weights.stat().st_size // 2}) as hub:
        env = _hub_env(hub, tmp_path)
        first = run_project("-e", "fetch_model", cwd=tmp_path, env=env)
        assert first.returncode != 0
        assert f"downloading {names.DEFAULT_MODEL_ID}@" in first.stderr
        assert "re-run to resume" in first.stderr
        (failed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert failed.info.status == "FAILED"
        artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(failed.info.run_id)}
        assert artifacts == {"config.json"}  # its parameters only: no manifest, no files
        assert not (snapshot / "model.safetensors").exists()  # the half file is not in the snapshot

        second = _run_id(_ok(run_project("-e", "fetch_model", cwd=tmp_path, env=env)))
    assert hub.downloaded(names.DEFAULT_MODEL_ID).count("model.safetensors") == 2
    run = mlflow.get_run(second)
    data = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{names.MANIFEST}"))
    assert data["files"]["checkpoint/model.safetensors"] == {
        "sha256": manifest.sha256_file(weights), "size": weights.stat().st_size}
    stored = Path(mlflow.artifacts.download_artifacts(run_id=second, artifact_path="checkpoint"))
    # Every logged file matches the manifest.
    manifest.verify(manifest.Manifest.read(run), "checkpoint", stored)
    assert (snapshot / "model.safetensors").read_bytes() == weights.read_bytes()


def test_a_branch_is_resolved_to_its_commit_and_the_user_told_how_to_pin_it(
        hub, tracking, tmp_path):
    output = _ok(run_project("-e", "fetch_model", "-P", "onnx_revision=main", cwd=tmp_path,
                             env=_hub_env(hub, tmp_path)))
    run = mlflow.get_run(_run_id(output))
    data = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{names.MANIFEST}"))
    assert data["sources"]["onnx"]["requested_revision"] == "main"
    assert data["sources"]["onnx"]["revision"] == ONNX_COMMIT
    assert "moving reference" in output and ONNX_COMMIT in output


def test_a_corrupted_download_of_the_right_size_fails_named_and_a_rerun_completes(
        onnx_repo, tracking, tmp_path):
    """The stand-in serves model.safetensors once with one byte flipped (same size, as a
    corrupting proxy or a swapped file would): huggingface_hub accepts it, fetch_model does not.
    It names the file, logs nothing, drops the bad copy from the cache; the re-run completes."""
    repos, snapshot = _repos(onnx_repo), _snapshot(tmp_path)
    weights = FIXTURE / "model.safetensors"
    with LocalHub(repos, require_token=TOKEN, corrupt={"model.safetensors": 1000}) as hub:
        env = _hub_env(hub, tmp_path)
        first = run_project("-e", "fetch_model", cwd=tmp_path, env=env)
        assert first.returncode != 0
        assert "model.safetensors does not match the hub's record of it" in first.stderr
        assert "re-run to download it again" in first.stderr
        (failed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert failed.info.status == "FAILED"
        artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(failed.info.run_id)}
        assert artifacts == {"config.json"}  # no manifest, no files
        assert not (snapshot / "model.safetensors").exists()

        second = _run_id(_ok(run_project("-e", "fetch_model", cwd=tmp_path, env=env)))
    assert hub.downloaded(names.DEFAULT_MODEL_ID).count("model.safetensors") == 2
    assert (snapshot / "model.safetensors").read_bytes() == weights.read_bytes()
    assert mlflow.get_run(second).info.status == "FINISHED"

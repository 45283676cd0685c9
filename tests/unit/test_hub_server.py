"""Prove tests/hub_server.LocalHub is good enough for the real huggingface_hub client (no mocks, 127.0.0.1 only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import LocalHub

REPO = "microsoft/Phi-3-mini-4k-instruct"
COMMIT = "0a67737cc96d2554230f90338b163bc6380a2a85"
SUB = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    (d / SUB).mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "phi3"}')
    (d / "model.bin").write_bytes(os.urandom(1_000_000))  # >= lfs_threshold -> served as an LFS file
    (d / SUB / "genai_config.json").write_text('{"model": {"type": "phi3"}}')
    (d / SUB / "model.onnx.data").write_bytes(os.urandom(200_000))
    return d


@pytest.fixture(autouse=True)
def online(monkeypatch):
    # HF_HUB_OFFLINE is read once at import: unset the env var *and* the cached constant.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def repo_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def no_incomplete(cache: Path) -> bool:
    return not [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]


def test_snapshot_at_commit_is_byte_identical(repo_dir, tmp_path):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as hub:
        path = snapshot_download(REPO, revision=COMMIT, cache_dir=tmp_path / "hub", endpoint=hub.endpoint)
    assert Path(path).name == COMMIT
    assert repo_files(Path(path)) == repo_files(repo_dir)
    assert sorted(hub.downloaded()) == sorted(repo_files(repo_dir))
    assert not any("/revision/" in p for _, p, _ in hub.requests)  # a full sha skips repo_info


def test_allow_patterns_fetches_only_subfolder(repo_dir, tmp_path):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as hub:
        path = snapshot_download(REPO, revision="main", allow_patterns=[f"{SUB}/*"],
                                 cache_dir=tmp_path / "hub", endpoint=hub.endpoint)
    assert sorted(hub.downloaded()) == [f"{SUB}/genai_config.json", f"{SUB}/model.onnx.data"]
    heads = [p for m, p, _ in hub.requests if m == "HEAD"]
    assert heads and all(SUB in p for p in heads)
    assert repo_files(Path(path)) == {k: v for k, v in repo_files(repo_dir).items() if k.startswith(SUB)}
    assert (tmp_path / "hub" / "models--microsoft--Phi-3-mini-4k-instruct" / "refs" / "main").read_text() == COMMIT


def test_model_info_resolves_branch(repo_dir):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as hub:
        info = HfApi(endpoint=hub.endpoint).model_info(REPO, revision="main")
        full = HfApi(endpoint=hub.endpoint).model_info(REPO, files_metadata=True)
    assert info.sha == COMMIT and info.id == REPO
    assert {s.rfilename for s in info.siblings} == set(repo_files(repo_dir))
    assert {s.rfilename: s.size for s in full.siblings}["model.bin"] == 1_000_000


def test_errors_use_hub_error_codes(repo_dir, tmp_path):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as hub:
        api = HfApi(endpoint=hub.endpoint)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("nobody/nothing")
        with pytest.raises(RevisionNotFoundError):
            snapshot_download(REPO, revision="nope", cache_dir=tmp_path / "hub", endpoint=hub.endpoint)
        with pytest.raises(RemoteEntryNotFoundError):
            hf_hub_download(REPO, "missing.txt", cache_dir=tmp_path / "hub", endpoint=hub.endpoint)


def test_token_from_env_reaches_server(repo_dir, tmp_path, monkeypatch):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}, require_token="hf_good") as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_good")
        path = snapshot_download(REPO, revision="main", cache_dir=tmp_path / "a", endpoint=hub.endpoint)
        assert repo_files(Path(path)) == repo_files(repo_dir)
        assert all(h.get("authorization") == "Bearer hf_good" for _, _, h in hub.requests)

        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(HfHubHTTPError, match="Invalid credentials") as exc:
            snapshot_download(REPO, revision="main", cache_dir=tmp_path / "b", endpoint=hub.endpoint)
        assert exc.value.response.status_code == 401

        monkeypatch.delenv("HF_TOKEN")  # no token at all: the Hub answers like for a private repo
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=hub.endpoint).model_info(REPO, token=False)


def test_dropped_connection_is_retried_by_client(repo_dir, tmp_path):
    # "drop": full Content-Length promised, connection closed after 1000 bytes. huggingface_hub
    # catches the RemoteProtocolError, sleeps 1 s and re-GETs: the first call already succeeds.
    cache = tmp_path / "hub"
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}, fail_after_bytes={"model.bin": 1000}) as hub:
        path = snapshot_download(REPO, revision=COMMIT, cache_dir=cache, endpoint=hub.endpoint)
    assert hub.downloaded().count("model.bin") == 2
    assert repo_files(Path(path)) == repo_files(repo_dir)
    assert no_incomplete(cache)


def test_interrupted_download_fails_then_recovers(repo_dir, tmp_path):
    # "short": HEAD announces 1 MB, GET delivers a well-formed 1000-byte body -> OSError on first attempt.
    cache = tmp_path / "hub"
    snap = cache / "models--microsoft--Phi-3-mini-4k-instruct" / "snapshots" / COMMIT
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}, fail_after_bytes={"model.bin": 1000},
                  fault="short") as hub:
        with pytest.raises(OSError, match="Consistency check failed"):
            snapshot_download(REPO, revision=COMMIT, cache_dir=cache, endpoint=hub.endpoint)
        assert not (snap / "model.bin").exists() and no_incomplete(cache)
        n_before = len(hub.requests)
        path = snapshot_download(REPO, revision=COMMIT, cache_dir=cache, endpoint=hub.endpoint)
        second = [p for m, p, _ in hub.requests[n_before:] if m == "GET"]
    assert any(p.endswith("/model.bin") for p in second)
    assert repo_files(Path(path)) == repo_files(repo_dir)
    assert no_incomplete(cache)


def test_point_client_without_endpoint_argument(repo_dir, tmp_path, monkeypatch):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as hub:
        hub.point_client(monkeypatch)
        path = snapshot_download(REPO, revision="main", cache_dir=tmp_path / "hub")
        assert HfApi().model_info(REPO).sha == COMMIT
    assert repo_files(Path(path)) == repo_files(repo_dir)


def test_hf_endpoint_env_set_before_import(repo_dir, tmp_path):
    # What production code relies on: no endpoint= argument, HF_ENDPOINT exported before the import.
    code = ("import sys; from huggingface_hub import snapshot_download as s; "
            "print(s(sys.argv[1], revision='main', allow_patterns=['config.json']))")
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_DISABLE_PROGRESS_BARS="1")
        out = subprocess.run([sys.executable, "-c", code, REPO], env=env, capture_output=True, text=True,
                             timeout=60, check=True)
    assert Path(out.stdout.strip(), "config.json").read_bytes() == (repo_dir / "config.json").read_bytes()
    assert hub.downloaded() == ["config.json"]

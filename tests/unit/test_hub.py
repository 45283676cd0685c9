"""phi3flow.fetching.hub against the local hub stand-in (tests/hub_server.py): downloads are checked
against the hub's own sizes and hashes, and a bad file is refused by name and evicted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phi3flow.fetching import hub
from tests.hub_server import LocalHub

REPO = "org/model"
COMMIT = "c" * 40


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "phi3"}')  # small: a git blob id
    (d / "model.safetensors").write_bytes(os.urandom(300_000))  # large: an LFS sha256
    return d


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def test_an_intact_download_passes_every_file_checked(repo_dir, online, monkeypatch):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}) as server:
        server.point_client(monkeypatch)
        path, commit = hub.download(REPO, "main", ["*.json", "*.safetensors"])
        assert commit == COMMIT
        assert hub.verify_snapshot(REPO, COMMIT, path, ["*.json", "*.safetensors"]) == 2


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"], ids=["lfs", "git-blob"])
def test_a_corrupted_file_of_the_right_size_is_refused_by_name_and_evicted(
        repo_dir, online, monkeypatch, name):
    with LocalHub({REPO: {"dir": repo_dir, "commit": COMMIT}}, corrupt={name: 3}) as server:
        server.point_client(monkeypatch)
        with pytest.raises(hub.HubError, match=f"{name} does not match the hub's record") as bad:
            hub.download(REPO, COMMIT, ["*.json", "*.safetensors"])
        assert "re-run to download it again" in str(bad.value)
        path, _ = hub.download(REPO, COMMIT, ["*.json", "*.safetensors"])  # fetched again, whole
    assert (path / name).read_bytes() == (repo_dir / name).read_bytes()
    assert server.downloaded(REPO).count(name) == 2

"""Unit tests of main's reuse key: what must change it, and what must not."""

from __future__ import annotations

import shutil

from phi3flow.pipeline import reuse
from tests.helpers import FIXTURE, ROOT

PARAMS = {"model_id": "x", "max_new_tokens": "32"}


def key(**changes):
    args = {"entry_point": "fetch_model", "params": PARAMS, "code": "c" * 64,
            "inputs": [], "git_commit": None, **changes}
    return reuse.cache_key(**args)


def test_every_input_of_the_key_changes_it(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.json").write_text("1")
    base = key(inputs=[folder])
    assert key(inputs=[folder]) == base
    assert key(entry_point="log_transformers", inputs=[folder]) != base
    assert key(params={**PARAMS, "max_new_tokens": "16"}, inputs=[folder]) != base
    assert key(code="d" * 64, inputs=[folder]) != base
    assert key(git_commit="a" * 40, inputs=[folder]) != base
    (folder / "a.json").write_text("2")  # same size, new content
    assert key(inputs=[folder]) != base


def test_two_checkouts_of_the_same_files_share_a_key(tmp_path, monkeypatch):
    """Inputs inside the project are named relative to it and identified by content."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "tests" / "fixtures", copy / "tests" / "fixtures")
    here = key(inputs=[FIXTURE])
    monkeypatch.setattr(reuse, "PROJECT_ROOT", copy)
    assert key(inputs=[copy / "tests" / "fixtures" / "tiny-phi3"]) == here


def test_code_hash_follows_the_code_on_disk(tmp_path):
    for name in ("MLproject", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "phi3flow", tmp_path / "phi3flow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = reuse.code_sha256(tmp_path)
    (tmp_path / "README.md").write_text("docs do not count")
    assert reuse.code_sha256(tmp_path) == before
    with open(tmp_path / "phi3flow" / "names.py", "a") as f:
        f.write("\n# an edit\n")
    assert reuse.code_sha256(tmp_path) != before

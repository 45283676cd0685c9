"""Unit tests of the fetch manifest: any change to a fetched file is caught and named."""

from __future__ import annotations

import pytest

from phi3flow import manifest


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "checkpoint"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "phi3"}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 10)
    return root


def test_manifest_lists_every_file_with_size_and_sha256(folder):
    data = manifest.build({"model_id": "x"}, {"checkpoint": folder})
    assert set(data["files"]) == {"checkpoint/config.json", "checkpoint/sub/weights.bin"}
    entry = data["files"]["checkpoint/sub/weights.bin"]
    assert entry["size"] == 2560
    assert entry["sha256"] == manifest.sha256_file(folder / "sub" / "weights.bin")
    manifest.verify(data, "checkpoint", folder)  # an untouched copy passes


def test_digest_is_stable_and_content_sensitive(folder):
    first = manifest.build({"model_id": "x"}, {"checkpoint": folder})
    assert manifest.digest(first) == manifest.digest(manifest.build({"model_id": "x"},
                                                                     {"checkpoint": folder}))
    assert manifest.digest(first) != manifest.digest({**first, "model_id": "y"})


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda r: (r / "sub" / "weights.bin").write_bytes(bytes(range(255, -1, -1)) * 10),
         "checkpoint/sub/weights.bin does not match its sha256"),
        (lambda r: (r / "sub" / "weights.bin").write_bytes(b"short"),
         "checkpoint/sub/weights.bin has 5 bytes, the fetch manifest says 2560"),
        (lambda r: (r / "config.json").unlink(), "checkpoint/config.json is listed .* but missing"),
        (lambda r: (r / "extra.py").write_text("import os"),
         "checkpoint/extra.py is not in the fetch manifest"),
    ],
    ids=["same-size-edit", "truncated", "missing", "unexpected"],
)
def test_every_kind_of_tampering_is_refused_by_file_name(folder, tamper, message):
    data = manifest.build({}, {"checkpoint": folder})
    tamper(folder)
    with pytest.raises(manifest.ManifestMismatch, match=message):
        manifest.verify(data, "checkpoint", folder)

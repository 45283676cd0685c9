"""Unit tests of the fetch manifest: any change to a fetched file is caught and named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from phi3flow.core.record import RecordError
from phi3flow.fetching import manifest
from phi3flow.fetching.manifest import Manifest, Source

SOURCES = {"checkpoint": Source("local", True, path="/x"), "onnx": Source("build", True)}


def _build(folder):
    return manifest.build("x", "local", SOURCES, {"checkpoint": folder})


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "checkpoint"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "phi3"}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 10)
    return root


def test_manifest_lists_every_file_with_size_and_sha256(folder):
    data = _build(folder)
    assert set(data.files) == {"checkpoint/config.json", "checkpoint/sub/weights.bin"}
    entry = data.files["checkpoint/sub/weights.bin"]
    assert entry.size == 2560
    assert entry.sha256 == manifest.sha256_file(folder / "sub" / "weights.bin")
    manifest.verify(data, "checkpoint", folder)  # an untouched copy passes


def test_digest_is_stable_and_content_sensitive(folder):
    first = _build(folder)
    assert first.sha256() == _build(folder).sha256()
    assert first.sha256() != dataclasses.replace(first, model_id="y").sha256()


def test_manifest_round_trips_and_keeps_the_format_older_runs_wrote(folder):
    data = _build(folder)
    assert Manifest.from_json(data.to_json(), "m") == data
    written = json.loads(data.to_json())
    # The layout fetch runs have always written: their recorded sha256 still matches.
    assert set(written) == {"format", "model_id", "revision", "sources", "files"}
    assert written["sources"]["checkpoint"] == {"kind": "local", "logged": True, "path": "/x"}
    assert written["files"]["checkpoint/sub/weights.bin"]["size"] == 2560


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "m is not valid JSON"),
        ('{"model_id": "x"}', "revision: Field required"),
        ('{"model_id": "x", "revision": "r", "sources": {}, "files": {}, "extra": 1}',
         "extra: not a field of this record"),
        ('{"model_id": 3, "revision": "r", "sources": {}, "files": {}}',
         "model_id: Input should be a valid string"),
        ('{"model_id": "x", "revision": "r", "sources": {}, "files": {}}', "no 'checkpoint'"),
        ('{"model_id": "x", "revision": "r", "files": {}, "format": 9, "sources": {}}',
         "format 9"),
        ('[1, 2]', "Input should be an object"),
    ],
    ids=["not-json", "missing-field", "unknown-field", "wrong-type", "no-source", "format",
         "not-object"],
)
def test_a_malformed_or_foreign_manifest_is_refused_by_name(text, message):
    with pytest.raises(RecordError, match=message) as raised:
        Manifest.from_json(text, "m")
    assert "re-run fetch_model" in str(raised.value)


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
    data = _build(folder)
    tamper(folder)
    with pytest.raises(manifest.ManifestMismatch, match=message):
        manifest.verify(data, "checkpoint", folder)

"""The fetch manifest: what fetch_model fetched, file by file, so later steps can prove it.

A manifest lists every file under the fetched folders (`checkpoint/...`, `onnx/...`) with its size
and sha256, plus where it came from (hub id and resolved commit, or local path). Consumers verify
their copy against it before use and refuse any difference by file name: a tampered, truncated,
missing or unexpected file is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from phi3flow.errors import StepError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


class ManifestMismatch(StepError):
    """A consumed file differs from what the fetch run recorded."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path) -> list[Path]:
    """Regular files under root, sorted, skipping caches that tools drop beside checkpoints."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    )


def describe_files(folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """{"checkpoint/config.json": {"size": ..., "sha256": ...}, ...} for each named folder."""
    files = {}
    for prefix, root in folders.items():
        for path in list_files(root):
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            files[key] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            logger.debug("hashed %s", key)
    return files


def build(source: dict[str, Any], folders: dict[str, Path]) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, **source, "files": describe_files(folders)}


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON, so the same manifest always has the same sha256."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(manifest).encode()).hexdigest()


def verify(manifest: dict[str, Any], prefix: str, root: Path) -> None:
    """Check root against the manifest's `prefix/...` entries; raise naming the first problem."""
    expected = {
        key[len(prefix) + 1 :]: entry
        for key, entry in manifest["files"].items()
        if key.startswith(prefix + "/")
    }
    if not expected:
        raise ManifestMismatch(f"the manifest lists no {prefix}/ files; re-run fetch_model.")
    actual = {p.relative_to(root).as_posix(): p for p in list_files(root)}
    for name in sorted(expected.keys() - actual.keys()):
        raise ManifestMismatch(
            f"{prefix}/{name} is listed in the fetch manifest but missing from {root}; "
            "re-run fetch_model to fetch it again."
        )
    for name in sorted(actual.keys() - expected.keys()):
        raise ManifestMismatch(
            f"{prefix}/{name} is not in the fetch manifest (unexpected file in {root}); "
            "re-run fetch_model rather than adding files to its output."
        )
    for name, entry in sorted(expected.items()):
        path = actual[name]
        size = path.stat().st_size
        if size != entry["size"]:
            raise ManifestMismatch(
                f"{prefix}/{name} has {size} bytes, the fetch manifest says {entry['size']}: the "
                "file was truncated or changed; re-run fetch_model."
            )
        if sha256_file(path) != entry["sha256"]:
            raise ManifestMismatch(
                f"{prefix}/{name} does not match its sha256 in the fetch manifest: the file was "
                "changed after fetching; re-run fetch_model."
            )
    logger.info("verified %d %s/ files against the fetch manifest", len(expected), prefix)

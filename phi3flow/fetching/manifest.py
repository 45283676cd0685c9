"""The fetch manifest: what fetch_model fetched, file by file, so later steps can prove it.

A manifest lists every file under the fetched folders (`checkpoint/...`, `onnx/...`) with its size
and sha256, plus where it came from (hub id and resolved commit, or local path). Consumers verify
their copy against it before use and refuse any difference by file name: a tampered, truncated,
missing or unexpected file is never loaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from phi3flow.core import names
from phi3flow.core.errors import StepError
from phi3flow.core.record import Record, record

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


def describe_files(folders: dict[str, Path]) -> dict[str, FileEntry]:
    """{"checkpoint/config.json": FileEntry(size, sha256), ...} for each named folder."""
    files = {}
    for prefix, root in folders.items():
        for path in list_files(root):
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            files[key] = FileEntry(path.stat().st_size, sha256_file(path))
            logger.debug("hashed %s", key)
    return files


@record
class FileEntry:
    size: int
    sha256: str


@record
class Source:
    """Where one fetched folder came from: a hub repo at a commit, a local path, or a build."""

    kind: str  # hub | local | build
    logged: bool  # the files are in the fetch run's artifacts (else re-resolved and verified)
    repo_id: str | None = None
    requested_revision: str | None = None
    revision: str | None = None  # the resolved commit
    subfolder: str | None = None
    patterns: tuple[str, ...] | None = None  # the files taken from the repo or folder
    path: str | None = None
    precision: str | None = None
    execution_provider: str | None = None
    kv_cache: str | None = None  # for kind=build: fp32 | int8 (None: built before it was a choice)
    block_size: int | None = None  # for kind=build: weights per quantization block
    builder: str | None = None  # onnxruntime-genai version, for kind=build

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source kind {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")


SOURCE_KINDS = ("hub", "local", "build")


@record
class Manifest(Record):
    """fetch_model's record of what it fetched: sources, and every file with size and sha256."""

    ARTIFACT = names.MANIFEST
    PRODUCER = names.FETCH_MODEL

    model_id: str
    revision: str  # the checkpoint's resolved commit, or "local"
    sources: dict[str, Source]  # {names.CHECKPOINT_DIR: ..., names.ONNX_DIR: ...}
    files: dict[str, FileEntry]  # {"checkpoint/config.json": ..., "onnx/model.onnx": ...}
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT_VERSION:
            raise ValueError(f"format {self.format}, this code reads format {FORMAT_VERSION}")
        missing = {names.CHECKPOINT_DIR, names.ONNX_DIR} - self.sources.keys()
        if missing:
            raise ValueError(f"no {sorted(missing)[0]!r} source")

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def build(model_id: str, revision: str, sources: dict[str, Source],
          folders: dict[str, Path]) -> Manifest:
    return Manifest(model_id, revision, sources, describe_files(folders))


def verify(manifest: Manifest, prefix: str, root: Path) -> None:
    """Check root against the manifest's `prefix/...` entries; raise naming the first problem."""
    expected = {
        key[len(prefix) + 1 :]: entry
        for key, entry in manifest.files.items()
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
        if size != entry.size:
            raise ManifestMismatch(
                f"{prefix}/{name} has {size} bytes, the fetch manifest says {entry.size}: the "
                "file was truncated or changed; re-run fetch_model."
            )
        if sha256_file(path) != entry.sha256:
            raise ManifestMismatch(
                f"{prefix}/{name} does not match its sha256 in the fetch manifest: the file was "
                "changed after fetching; re-run fetch_model."
            )
    logger.info("verified %d %s/ files against the fetch manifest", len(expected), prefix)

"""main's run reuse, the whole policy: a finished step run is reused only when nothing it depends
on changed.

The key of a step run is the sha256 of: the entry point; its parameters (upstream run IDs
included); the sha256 of the project's code, read from the files themselves (so uncommitted
changes count, and it works outside git too); the git commit `mlflow run` recorded, when there is
one (so a run from a git URL at another commit runs again); and, for local inputs (folders or
files), each file's path, size and content hash (modification time for files over 64 MiB). A
step run is reused only if it FINISHED and carries the same key. MLflow's multistep example
keys on the git commit alone, which misses uncommitted edits, inputs and work outside git.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mlflow.entities import Run

from phi3flow.core import names, store
from phi3flow.core.names import PROJECT_ROOT

logger = logging.getLogger(__name__)

# What decides a step's behaviour: its code, its entry points and its pinned environment.
# Tests, docs and the README are left out, so editing them reuses finished runs.
CODE_GLOBS = (
    "MLproject", "conda.yaml", "python_env.yaml", "requirements.txt",
    "steps/**/*.py", "phi3flow/**/*",
)


def code_sha256(root: Path = PROJECT_ROOT) -> str:
    digest = hashlib.sha256()
    files = sorted({p for pattern in CODE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


# Files up to this size are identified by content, bigger ones by size and modification time
# (hashing multi-GB weights on every `main` would cost more than the reuse saves).
HASH_LIMIT_BYTES = 64 * 1024 * 1024


def stamp(path: Path) -> list[tuple[str, int, str]]:
    """What identifies a local input (a folder or one file) for reuse."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamps = []
    for file in files:
        size = file.stat().st_size
        ident = (hashlib.sha256(file.read_bytes()).hexdigest() if size <= HASH_LIMIT_BYTES
                 else f"mtime:{file.stat().st_mtime_ns}")
        stamps.append((file.relative_to(path).as_posix() if file != path else file.name, size,
                       ident))
    return stamps


def _input_name(path: Path, root: Path) -> str:
    """Inside the project: relative, so two checkouts of one commit share their keys."""
    resolved = path.resolve()
    return (resolved.relative_to(root).as_posix() if resolved.is_relative_to(root)
            else str(resolved))


def cache_key(entry_point: str, params: dict[str, str], code: str, inputs: list[Path],
              git_commit: str | None = None) -> str:
    payload = {
        "entry_point": entry_point,
        "params": dict(sorted(params.items())),
        "code_sha256": code,
        "git_commit": git_commit,
        "inputs": {_input_name(p, PROJECT_ROOT): stamp(p) for p in inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def reusable_run(experiment_id: str, entry_point: str, key: str, force: bool,
                 reusable: bool) -> Run | None:
    """The finished run to reuse for this key, or None to run the step (logged either way).

    The whole policy: `force=true` re-runs everything; a step whose inputs may have moved (an
    unpinned hub revision) always runs; otherwise the newest FINISHED run with this key is reused.
    """
    if force:
        logger.info("%s: force=true, running it again", entry_point)
        return None
    if not reusable:
        logger.info("%s: inputs may have moved (unpinned revision), running it again",
                    entry_point)
        return None
    tagged = store.current().runs_tagged(experiment_id, names.TAG_CACHE_KEY, key)
    finished = [run for run in tagged if run.info.status == "FINISHED"]
    if finished:
        newest = max(finished, key=lambda run: run.info.start_time or 0)
        logger.info("%s: reusing finished run %s (same parameters, inputs and code)",
                    entry_point, newest.info.run_id)
        return newest
    return None

"""main's run reuse: a finished step run is reused only when nothing it depends on changed.

The key of a step run is the sha256 of: the entry point; its parameters (upstream run IDs
included); the sha256 of the project's code, read from the files themselves (so uncommitted
changes count, and it works outside git too); the git commit `mlflow run` recorded, when there is
one (so a run from a git URL at another commit runs again); and, for local input folders, each
file's path, size and modification time. A step run is reused only if it FINISHED and carries the same key.
MLflow's multistep example keys on the git commit instead, which misses all of these.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
from mlflow.entities import Run

from phi3flow import names

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


def folder_stamp(folder: Path) -> list[tuple[str, int, int]]:
    """Cheap change detection for a local input folder (no hashing of multi-GB weights)."""
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )


def cache_key(entry_point: str, params: dict[str, str], code: str, inputs: list[Path],
              git_commit: str | None = None) -> str:
    payload = {
        "entry_point": entry_point,
        "params": dict(sorted(params.items())),
        "code_sha256": code,
        "git_commit": git_commit,
        "inputs": {str(p.resolve()): folder_stamp(p) for p in inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def find_reusable(experiment_id: str, entry_point: str, key: str) -> Run | None:
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=(
            f"tags.`{names.TAG_CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None

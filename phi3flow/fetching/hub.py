"""Downloads from the Hugging Face hub, pinned to a commit, with clear errors.

The real client (`huggingface_hub`) does the work: it reads `HF_TOKEN` and `HF_ENDPOINT` from the
environment, shows a progress bar per file, and downloads into its cache atomically (a file only
appears under its final name once complete, so an interrupted download is resumed or redone, never
used half-written). We add: resolving a branch to its commit before downloading (so every file
comes from one commit, which the manifest records); checking every downloaded file against the
hub's own record of that commit (size, and the LFS sha256 or git blob id), which the client does
not do, so a corrupt or swapped download fails at fetch with the file named; a fast failure
naming the model and the offline alternative when the hub cannot be reached; and never passing
the token anywhere we log.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from phi3flow.core.errors import StepError
from phi3flow.fetching.manifest import sha256_file

logger = logging.getLogger(__name__)

# What a transformers checkpoint needs; leaves out remote code (*.py), READMEs and sample scripts.
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "LICENSE*")
# Seconds to wait for the hub's first answer; an unreachable hub should fail in seconds.
HUB_TIMEOUT_S = 15.0

OFFLINE_HINT = (
    "To work offline, pass a local checkpoint directory instead: "
    "-P model_id=/path/to/checkpoint -P onnx_source=build (or a local ONNX folder)."
)


class HubError(StepError):
    """The hub could not give us the files asked for."""


def endpoint() -> str:
    return huggingface_hub.constants.ENDPOINT


def resolve_commit(repo_id: str, revision: str) -> str:
    """The commit sha that `revision` (a branch, tag or sha) points at on the hub."""
    return _model_info(repo_id, revision).sha


def _model_info(repo_id: str, revision: str, files_metadata: bool = False):
    where = f"{repo_id}@{revision}"
    try:
        return HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S,
                                  files_metadata=files_metadata)
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its terms on the hub, then set HF_TOKEN to a token of "
            "that account (the token is read from the environment and never logged)."
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"revision {revision!r} does not exist in {repo_id}: pass a branch, tag or commit of "
            "that repository."
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id} was not found on {endpoint()} (or it is private: set HF_TOKEN). "
            f"Check the id. {OFFLINE_HINT}"
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(f"the hub answered an error for {where}: {exc}. {OFFLINE_HINT}") from None
    except Exception as exc:  # connection refused, DNS, timeout, proxy: all mean "unreachable"
        raise HubError(
            f"cannot reach the Hugging Face hub at {endpoint()} to fetch {where} "
            f"({type(exc).__name__}: {exc}). {OFFLINE_HINT}"
        ) from None


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def verify_snapshot(repo_id: str, commit: str, snapshot: Path, allow_patterns: list[str]) -> int:
    """Check each downloaded file against the hub's record of it; return how many were checked.

    The hub lists, per file of a commit, its size and either its LFS sha256 (weights) or its git
    blob sha1 (small files). huggingface_hub checks only the size of a download, so a corrupted
    or swapped file of the right size would pass: here it fails, named, and is removed from the
    cache so that a re-run downloads it again.
    """
    siblings = {s.rfilename: s for s in _model_info(repo_id, commit, files_metadata=True).siblings}
    wanted = filter_repo_objects(list(siblings), allow_patterns=allow_patterns)
    checked = 0
    for name in sorted(wanted):
        path, sibling = snapshot / name, siblings[name]
        if not path.is_file():
            continue  # not downloaded (snapshot_download skips nothing it was asked for)
        size = path.stat().st_size
        if sibling.lfs is not None:
            expected, actual = (sibling.lfs.size, sibling.lfs.sha256), (size, sha256_file(path))
        elif sibling.blob_id is not None:
            expected, actual = (sibling.size, sibling.blob_id), (size, _git_blob_sha1(path))
        else:
            continue  # the hub gave no hash for it
        if expected != actual:
            _evict(path)
            raise HubError(
                f"{repo_id}@{commit}: {name} does not match the hub's record of it (size "
                f"{actual[0]} vs {expected[0]}, hash {actual[1][:12]}… vs {expected[1][:12]}…): "
                "the download was corrupted or swapped on the way. It was removed from the hub "
                "cache; re-run to download it again.")
        checked += 1
    return checked


def _evict(path: Path) -> None:
    """Remove a cached file: the snapshot's link and the blob it points at."""
    target = path.resolve()
    path.unlink(missing_ok=True)
    if target != path and target.is_file():
        os.remove(target)


def download(repo_id: str, revision: str, allow_patterns: list[str]) -> tuple[Path, str]:
    """Download the files matching allow_patterns at one commit; return (snapshot dir, commit)."""
    if huggingface_hub.constants.is_offline_mode():
        try:
            path = snapshot_download(
                repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True
            )
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            raise HubError(
                f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not in the local hub cache. "
                f"Unset HF_HUB_OFFLINE to download it. {OFFLINE_HINT}"
            ) from None
        commit = Path(path).name  # the cache keeps each snapshot under its commit sha
        logger.info("using cached %s@%s (offline mode: not checked against the hub; the manifest "
                    "records every file's sha256)", repo_id, commit)
        return Path(path), commit
    commit = resolve_commit(repo_id, revision)
    if commit != revision:
        logger.warning(
            "%s@%s is a moving reference; it resolved to commit %s (recorded in the manifest). "
            "Pass that commit as the revision to pin it.",
            repo_id, revision, commit,
        )
    logger.info("downloading %s@%s (%s) from %s", repo_id, commit, allow_patterns, endpoint())
    try:
        path = snapshot_download(repo_id, revision=commit, allow_patterns=allow_patterns)
    except HfHubHTTPError as exc:
        raise HubError(f"downloading {repo_id}@{commit} failed: {exc}. Re-run to resume.") from None
    except OSError as exc:  # connection lost mid-file, disk full
        raise HubError(
            f"downloading {repo_id}@{commit} failed: {type(exc).__name__}: {exc}. Completed files "
            "stay in the hub cache; re-run to resume."
        ) from None
    checked = verify_snapshot(repo_id, commit, Path(path), allow_patterns)
    logger.info("checked %d files of %s@%s against the hub's sizes and hashes", checked, repo_id,
                commit)
    return Path(path), commit

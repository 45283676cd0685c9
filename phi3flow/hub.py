"""Downloads from the Hugging Face hub, pinned to a commit, with clear errors.

The real client (`huggingface_hub`) does the work: it reads `HF_TOKEN` and `HF_ENDPOINT` from the
environment, shows a progress bar per file, and downloads into its cache atomically (a file only
appears under its final name once complete, so an interrupted download is resumed or redone, never
used half-written). We add: resolving a branch to its commit before downloading (so every file
comes from one commit, which the manifest records), a fast failure naming the model and the
offline alternative when the hub cannot be reached, and never passing the token anywhere we log.
"""

from __future__ import annotations

import logging
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

from phi3flow.errors import StepError

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
    where = f"{repo_id}@{revision}"
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
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
    return info.sha


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
        logger.info("using cached %s@%s (offline mode)", repo_id, commit)
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
    return Path(path), commit

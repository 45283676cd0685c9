"""fetch_model's work, and how later steps get verified copies of what it fetched.

`fetch()` resolves the checkpoint and the ONNX model into two staged folders and a manifest.
`fetched_folder()` gives a consumer a local folder for `checkpoint` or `onnx` from a fetch run:
the run's artifacts when they were logged, otherwise the hub cache or the original local path,
and in every case verified file by file against the manifest before it is returned.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run

from phi3flow.core import names, store, tracking
from phi3flow.core.errors import StepError
from phi3flow.fetching import hub, manifest, onnx_build
from phi3flow.fetching.config import FetchModelConfig
from phi3flow.fetching.manifest import Manifest, Source

logger = logging.getLogger(__name__)


@dataclass
class Fetched:
    folders: dict[str, Path]  # {"checkpoint": ..., "onnx": ...}, staged for logging
    manifest: Manifest


def check_checkpoint(folder: Path) -> None:
    """Fail fast, before any heavy work, when a folder is not a Hugging Face checkpoint."""
    config = folder / "config.json"
    if not config.is_file():
        raise StepError(
            f"{folder} is not a Hugging Face checkpoint: it has no config.json. Pass the folder "
            "that `save_pretrained` wrote (config.json, *.safetensors, tokenizer files)."
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise StepError(f"{config} is not valid JSON ({exc}); the checkpoint is damaged.") from None
    if not model_type:
        raise StepError(f"{config} has no model_type: it is not a transformers model config.")
    if not list(folder.glob("*.safetensors")):
        raise StepError(
            f"{folder} has no *.safetensors weights. This project loads safetensors only (no "
            "pickled .bin weights); convert the checkpoint with save_pretrained."
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise StepError(f"{folder} has no tokenizer_config.json: save the tokenizer beside it.")


def stage(source: Path, target: Path, patterns: tuple[str, ...] | None = None) -> Path:
    """Symlink source's files (matching patterns, if given) into target: no copy of big weights."""
    target.mkdir(parents=True, exist_ok=True)
    for path in manifest.list_files(source):
        rel = path.relative_to(source)
        if patterns and not any(fnmatch.fnmatch(rel.as_posix(), p) for p in patterns):
            continue
        link = target / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return target


def logs_weights(cfg: FetchModelConfig, kind: str, artifact_uri: str | None = None) -> bool:
    """Whether files of this source kind ("hub", "local") go into the run's artifacts (those of
    the active run, or at `artifact_uri`).

    `auto` leaves out hub files where the run's artifacts are uploaded to a workspace's storage
    (an Azure ML workspace, `store.artifacts_are_uploaded`): every byte is uploaded there
    (Phi-3-mini's checkpoint and ONNX model are 10 GB), each log step uploads its model's own
    copy anyway, and the pinned commit re-resolves them, checked against the manifest
    (`fetched_folder`). Local folders and builds exist nowhere else: logged.
    """
    if cfg.log_weights != "auto":
        return cfg.log_weights == "true"
    return not (kind == "hub" and store.current().artifacts_are_uploaded(artifact_uri))


def fetch(cfg: FetchModelConfig, workdir: Path) -> Fetched:
    checkpoint, checkpoint_source = _fetch_checkpoint(cfg, workdir)
    onnx, onnx_source = _fetch_onnx(cfg, checkpoint, workdir)
    logger.info("hashing the fetched files for the manifest")
    folders = {names.CHECKPOINT_DIR: checkpoint, names.ONNX_DIR: onnx}
    sources = {names.CHECKPOINT_DIR: checkpoint_source, names.ONNX_DIR: onnx_source}
    return Fetched(folders, manifest.build(cfg.model_id, checkpoint_source.revision or "local",
                                           sources, folders))


def _fetch_checkpoint(cfg: FetchModelConfig, workdir: Path) -> tuple[Path, Source]:
    # Remote code (*.py) is fetched only when the user trusts it.
    patterns = hub.CHECKPOINT_PATTERNS + (("*.py",) if cfg.trust_remote_code else ())
    if cfg.is_local_model:
        path = Path(cfg.model_id).resolve()
        check_checkpoint(path)
        source = Source("local", logs_weights(cfg, "local"), path=str(path), patterns=patterns)
    else:
        path, commit = hub.download(cfg.model_id, cfg.revision, list(patterns))
        check_checkpoint(path)
        source = Source("hub", logs_weights(cfg, "hub"), repo_id=cfg.model_id,
                        requested_revision=cfg.revision, revision=commit, patterns=patterns)
    return stage(path, workdir / names.CHECKPOINT_DIR, patterns), source


def _fetch_onnx(cfg: FetchModelConfig, checkpoint: Path, workdir: Path) -> tuple[Path, Source]:
    target = workdir / names.ONNX_DIR
    if cfg.onnx_source == "build":
        onnx_build.build(checkpoint, workdir / "onnx-build", cfg.precision, cfg.execution_provider,
                         cfg.trust_remote_code, cfg.kv_cache,
                         extra_options=(f"block_size={cfg.block_size}",) if cfg.quantized else ())
        # A build exists nowhere else: always logged.
        source = Source("build", True, precision=cfg.precision,
                        execution_provider=cfg.execution_provider, kv_cache=cfg.kv_cache,
                        block_size=cfg.block_size if cfg.quantized else None,
                        builder=f"onnxruntime-genai {onnx_build.genai_version()}")
        return stage(workdir / "onnx-build", target), source
    if cfg.onnx_source == "hub":
        snapshot, commit = hub.download(
            names.ONNX_HUB_REPO, cfg.onnx_revision, [f"{names.ONNX_HUB_SUBFOLDER}/*"]
        )
        path = snapshot / names.ONNX_HUB_SUBFOLDER
        source = Source("hub", logs_weights(cfg, "hub"), repo_id=names.ONNX_HUB_REPO,
                        requested_revision=cfg.onnx_revision, revision=commit,
                        subfolder=names.ONNX_HUB_SUBFOLDER, precision="int4",
                        execution_provider="cpu")
    else:
        path = Path(cfg.onnx_source).resolve()
        source = Source("local", logs_weights(cfg, "local"), path=str(path))
    onnx_build.check_onnx_folder(path)
    return stage(path, target), source


def log_fetched(fetched: Fetched) -> str:
    """Log the files (where asked) and then the manifest, last: no manifest, no usable run."""
    for prefix, folder in fetched.folders.items():
        if fetched.manifest.sources[prefix].logged:
            store.current().log_artifacts(folder, prefix)
    fetched.manifest.log()
    return fetched.manifest.sha256()


# --- Consumers -------------------------------------------------------------------------------


@dataclass
class Consumed:
    folder: Path  # verified local copy of the fetch run's `checkpoint/` or `onnx/`
    manifest: Manifest
    lineage: dict[str, str]  # tags every consuming run and model carries


def consume(fetch_run_id: str, prefix: str) -> Consumed:
    """What a log step needs from its fetch run, checked: run kind and status, manifest, files."""
    run = tracking.upstream_run("fetch_run_id", fetch_run_id, names.FETCH_MODEL)
    data, digest = read_manifest(run)
    lineage = {
        names.TAG_FETCH_RUN_ID: fetch_run_id,
        names.TAG_MODEL_ID: data.model_id,
        names.TAG_REVISION: data.revision,
        names.TAG_MANIFEST_SHA256: digest,
    }
    return Consumed(fetched_folder(run, data, prefix), data, lineage)


def read_manifest(run: Run) -> tuple[Manifest, str]:
    """The fetch run's manifest and its sha256 (checked against the run's tag)."""
    data = Manifest.read(run)
    digest = data.sha256()
    recorded = run.data.tags.get(names.TAG_MANIFEST_SHA256)
    if digest != recorded:
        raise manifest.ManifestMismatch(
            f"{names.MANIFEST} of fetch run {run.info.run_id} has sha256 {digest}, but the run "
            f"recorded {recorded}: the manifest was changed after the run; re-run fetch_model."
        )
    return data, digest


def fetched_folder(run: Run, data: Manifest, prefix: str) -> Path:
    """A verified local folder holding the fetch run's `prefix` files."""
    source = data.sources[prefix]
    if source.logged:
        # A local copy of the stored files; whatever the store holds is verified below. Read at
        # the run's artifact URI, not as runs:/ (MLflow would ask the logged-model API first).
        path = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{run.info.artifact_uri.rstrip('/')}/{prefix}"))
    elif source.kind == "hub":
        snapshot, _ = hub.download(
            source.repo_id,
            source.revision,
            [f"{source.subfolder}/*"] if source.subfolder else list(source.patterns),
        )
        path = snapshot / source.subfolder if source.subfolder else snapshot
    else:
        path = Path(source.path)
        if not path.is_dir():
            raise StepError(
                f"fetch run {run.info.run_id} recorded {prefix} files at {path} (log_weights=false),"
                " which no longer exists: re-run fetch_model."
            )
    if not source.logged and source.patterns:
        path = _filtered_view(path, source.patterns, prefix)
    manifest.verify(data, prefix, path)
    return path


def _filtered_view(path: Path, patterns: tuple[str, ...], prefix: str) -> Path:
    """The files of path that fetch_model took (a hub cache or local folder may hold more)."""
    view = Path(tempfile.mkdtemp(prefix=f"phi3flow-{prefix}-"))
    return stage(path, view / prefix, patterns)


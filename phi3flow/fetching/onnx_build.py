"""Convert a Hugging Face checkpoint to an onnxruntime-genai model with its model builder.

The builder runs as a subprocess (`python -m onnxruntime_genai.models.builder`): it is the
documented interface, and its peak memory (about 23 GB for Phi-3-mini int4) is returned to the
system when it exits. Its output is streamed to our log as it goes, so a long conversion shows
progress.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from phi3flow.core.errors import StepError

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


class BuildError(StepError):
    """The model builder failed or produced no onnxruntime-genai model."""


def build(checkpoint: Path, output: Path, precision: str, execution_provider: str,
          trust_remote_code: bool = False, kv_cache: str = "fp32",
          baseline: Path | None = None, extra_options: tuple[str, ...] = ()) -> Path:
    """Build `checkpoint` into `output`. kv_cache=int8: a KV cache quantized per channel.

    extra_options: more of the builder's `--extra_options key=value` (benchmarks/onnx_options.py
    compares some); the builder ignores keys it does not know, so check what a build has.

    int8 takes three builder runs' worth of work: the fp32-cache build (or `baseline`, one that
    exists already), the builder's own calibration of per-layer scales over that build's KV
    values (onnxruntime_genai.models.quantization.kv_cache_calibration, its default corpus),
    then the build with those scales.
    """
    output.mkdir(parents=True, exist_ok=True)
    options = list(extra_options) + (["hf_remote=true"] if trust_remote_code else [])
    if kv_cache == "fp32":
        _builder(checkpoint, output, precision, execution_provider, options)
        check_onnx_folder(output)
        return output
    with tempfile.TemporaryDirectory(prefix="onnx-kv-calibration-") as tmp:
        if baseline is None:
            baseline = Path(tmp) / "fp32-kv"
            _builder(checkpoint, baseline, precision, execution_provider, options)
        scales = Path(tmp) / "kv_scales.json"
        _run([sys.executable, "-m", "onnxruntime_genai.models.quantization.kv_cache_calibration",
              "--model", str(baseline), "--tokenizer", str(checkpoint), "--out", str(scales)],
             "the KV-cache calibration")
        _builder(checkpoint, output, precision, execution_provider, options + [
            f"kv_cache_quant_scheme={kv_cache}_per_channel", f"kv_cache_scale_file={scales}"])
    check_onnx_folder(output)
    # The builder turns the shared past/present buffer off for a quantized cache; onnxruntime's
    # CPU attention supports it, and without it every decode step copies the whole cache.
    path = output / GENAI_CONFIG
    genai_config = json.loads(path.read_text())
    genai_config["search"]["past_present_share_buffer"] = True
    path.write_text(json.dumps(genai_config, indent=4))
    found = kv_cache_dtype(output)
    if found != kv_cache:  # the builder ignores options it does not know, silently
        raise BuildError(f"asked the builder for a {kv_cache} KV cache, got {found}: this "
                         f"onnxruntime-genai ({genai_version()}) does not support it here.")
    return output


def _graph(folder: Path):
    """A build's decoder graph, without its weights."""
    import onnx

    genai_config = json.loads((folder / GENAI_CONFIG).read_text())
    return onnx.load(str(folder / genai_config["model"]["decoder"]["filename"]),
                     load_external_data=False).graph


def kv_cache_numpy_dtype(folder: Path):
    """The numpy dtype of a build's KV cache, from its graph's past_key_values inputs."""
    import onnx

    past = next(i for i in _graph(folder).input if i.name.startswith("past_key_values"))
    return onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)


def kv_cache_dtype(folder: Path) -> str:
    """The KV cache's dtype as kv_cache names it: fp32, int8, ..."""
    return kv_cache_numpy_dtype(folder).name.replace("float", "fp")


def quantization(folder: Path) -> dict[str, int]:
    """bits, block_size and accuracy_level of a build's MatMulNBits nodes ({}: not quantized)."""
    import onnx

    node = next((n for n in _graph(folder).node if n.op_type == "MatMulNBits"), None)
    if node is None:
        return {}
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
            if a.name in ("bits", "block_size", "accuracy_level")}


def block_size(folder: Path) -> int | None:
    """Weights per quantization block of a build's MatMulNBits nodes (None: not quantized)."""
    return quantization(folder).get("block_size")


def _builder(checkpoint: Path, output: Path, precision: str, execution_provider: str,
             extra_options: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="onnx-builder-cache-") as cache:
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(checkpoint),
            "-o", str(output),
            "-p", precision,
            "-e", execution_provider,
            "-c", cache,
        ]
        if extra_options:
            command += ["--extra_options", *extra_options]
        _run(command, f"the onnxruntime-genai model builder (precision={precision}, "
             f"execution_provider={execution_provider})")


def _run(command: list[str], what: str) -> None:
    """Run a converter, its output streamed to our log as it goes (a long build shows progress)."""
    logger.info("running %s: %s", what, " ".join(command))
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            logger.info("builder: %s", line)
            tail = (tail + [line])[-20:]
    if proc.returncode != 0:
        raise BuildError(f"{what} exited with code {proc.returncode}. Its last lines:\n"
                         + "\n".join(tail))


def genai_version() -> str:
    import onnxruntime_genai

    return onnxruntime_genai.__version__


def check_onnx_folder(folder: Path) -> None:
    if not (folder / GENAI_CONFIG).is_file():
        raise BuildError(
            f"{folder} is not an onnxruntime-genai model folder: it has no {GENAI_CONFIG}. Pass "
            "the folder that holds genai_config.json and the .onnx files, or onnx_source=build."
        )

"""Convert a Hugging Face checkpoint to an onnxruntime-genai model with its model builder.

The builder runs as a subprocess (`python -m onnxruntime_genai.models.builder`): it is the
documented interface, and its peak memory (about 23 GB for Phi-3-mini int4) is returned to the
system when it exits. Its output is streamed to our log as it goes, so a long conversion shows
progress.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from phi3flow.errors import StepError

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


class BuildError(StepError):
    """The model builder failed or produced no onnxruntime-genai model."""


def build(checkpoint: Path, output: Path, precision: str, execution_provider: str,
          trust_remote_code: bool = False) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-builder-cache-") as cache:
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(checkpoint),
            "-o", str(output),
            "-p", precision,
            "-e", execution_provider,
            "-c", cache,
        ]
        if trust_remote_code:  # the builder's own switch; off unless asked
            command += ["--extra_options", "hf_remote=true"]
        logger.info("building the ONNX model: %s", " ".join(command))
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
            raise BuildError(
                f"the onnxruntime-genai model builder exited with code {proc.returncode} "
                f"(precision={precision}, execution_provider={execution_provider}). Its last "
                "lines:\n" + "\n".join(tail)
            )
    check_onnx_folder(output)
    return output


def check_onnx_folder(folder: Path) -> None:
    if not (folder / GENAI_CONFIG).is_file():
        raise BuildError(
            f"{folder} is not an onnxruntime-genai model folder: it has no {GENAI_CONFIG}. Pass "
            "the folder that holds genai_config.json and the .onnx files, or onnx_source=build."
        )

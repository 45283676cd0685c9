"""main's config, composed of every step's options, and every entry point's config by name."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from phi3flow.batch.config import BatchScoreConfig
from phi3flow.core import names
from phi3flow.core.config import param, parse_bool
from phi3flow.evaluation.config import EvaluateConfig, EvaluateOptions
from phi3flow.fetching.config import FetchModelConfig
from phi3flow.models.config import (
    LogOnnxPyfuncConfig,
    LogOnnxPyfuncOptions,
    LogTransformersConfig,
    LogTransformersOptions,
)
from phi3flow.registry.config import RegisterConfig, RegisterOptions

# main's flags that feed options of several steps, with what they mean for main as a whole.
# Each step's own help says what the option does there; here it says which steps it feeds.
MAIN_SHARED_HELP = {
    "max_new_tokens": "Cap on generated tokens: the logged models' default (a request's "
                      "max_tokens may change it) and evaluate's cap per answer.",
    "temperature": "Default sampling temperature of both logged models; 0 means greedy.",
    "top_p": "Default nucleus-sampling probability mass of both logged models.",
    "top_k": "Default top-k cut-off of both logged models.",
    "trust_remote_code": "Trust the checkpoint's own Python code: fetch_model fetches its *.py "
                         "files (and the ONNX builder may run them) and log_transformers lets "
                         "transformers run them. Off by default; tagged on the runs either way.",
}


@dataclass
class MainConfig:
    """`main`: every step's options (not their run IDs, which main wires itself), plus `force`.

    Its flags are the union of the steps' option fields; a flag that several steps take (see
    MAIN_SHARED_HELP) sets it for each of them. Each part is validated as it is built, so a bad
    value stops main before the first step spends minutes fetching.
    """

    # One part per step, named after its entry point, in pipeline order.
    fetch_model: FetchModelConfig
    log_transformers: LogTransformersOptions
    log_onnx_pyfunc: LogOnnxPyfuncOptions
    evaluate: EvaluateOptions
    register: RegisterOptions
    force: bool = param(False, "Re-run every step even when a finished run can be reused.")

    def __post_init__(self) -> None:
        self.force = parse_bool("force", self.force)

    @classmethod
    def from_flags(cls, values: dict[str, Any]) -> MainConfig:
        parts = {name: part(**{f.name: values[f.name] for f in dataclasses.fields(part)})
                 for name, part in main_parts().items()}
        return cls(**parts, force=values["force"])

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        """main's command-line flags (core.config.cli_fields asks for them)."""
        return main_fields()

    def flag_values(self) -> dict[str, Any]:
        """The value of each of main's flags (a shared flag has one value in every part)."""
        values = {"force": self.force}
        for name in main_parts():
            part = getattr(self, name)
            values = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)} | values
        return values


def main_parts() -> dict[str, type]:
    """{"fetch_model": FetchModelConfig, ...}: main's parts and their options classes."""
    hints = typing.get_type_hints(MainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(MainConfig) if f.name != "force"}


def main_fields() -> list[dataclasses.Field]:
    """main's flags: each step option once (first in pipeline order), then `force`."""
    flags: dict[str, dataclasses.Field] = {}
    for part in main_parts().values():
        for f in dataclasses.fields(part):
            if f.name not in flags:
                flags[f.name] = _with_help(f, MAIN_SHARED_HELP.get(f.name, f.metadata["help"]))
    (force,) = [f for f in dataclasses.fields(MainConfig) if f.name == "force"]
    return [*flags.values(), force]


def _with_help(f: dataclasses.Field, help: str) -> dataclasses.Field:
    copy = field(default=f.default, metadata={**f.metadata, "help": help})
    copy.name, copy.type = f.name, f.type
    return copy



# Each entry point's config, by MLproject name.
STEP_CONFIGS: dict[str, type] = {
    names.FETCH_MODEL: FetchModelConfig,
    names.LOG_TRANSFORMERS: LogTransformersConfig,
    names.LOG_ONNX_PYFUNC: LogOnnxPyfuncConfig,
    names.EVALUATE: EvaluateConfig,
    names.REGISTER: RegisterConfig,
    names.MAIN: MainConfig,
    names.BATCH_SCORE: BatchScoreConfig,
}


"""Typed step configurations, the machinery every stage's config shares: one dataclass per entry
point (in its stage's folder: fetching/config.py, models/config.py, ...), one name per parameter.

A step's config is its inputs (the run IDs of its upstream steps, `Inputs`) plus its options
(`LogTransformersOptions`, ...); `MainConfig` (pipeline/config.py) contains every step's options
and wires the run IDs itself (phi3flow/pipeline/stages.py). The MLproject parameter, the command-line flag and the dataclass
field share one snake_case name; `tests/unit/test_project_files.py` parses every MLproject
command with its step's parser to keep them in step. Validation lives in `__post_init__`, so a
bad value fails before any heavy work, with a message that names the parameter and the fix.

MLflow passes every parameter as a string and validates none of them (docs/decisions.md), so every
MLproject parameter has a default here and in MLproject: a missing required value is our error
message and a FAILED run, not an MLflow exception that leaves the run RUNNING.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import field
from typing import Any, TypeVar

from phi3flow.core.errors import StepError

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class ConfigError(StepError):
    """A parameter is missing or invalid; the message names it and says what to pass."""


def param(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def parse_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: pass true or false.")


def require_run_id(name: str, value: str, producer: str) -> None:
    if not value:
        raise ConfigError(
            f"{name} is required: pass -P {name}=<run ID of a finished {producer} run> "
            f"(find it with `mlflow runs list --experiment-id <id>` or in the MLflow UI)."
        )
    if not RUN_ID_PATTERN.match(value):
        raise ConfigError(
            f"{name}={value!r} is not an MLflow run ID (32 lowercase hex characters); "
            f"pass the run ID of a finished {producer} run."
        )


def choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}.")


def at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}={value} must be at least 1.")


def run_id_of(producer: str) -> Any:
    """An input of a step: the run ID of a finished `producer` run (checked by Inputs)."""
    return field(default="", metadata={
        "help": f"Run ID of a finished {producer} run (required).", "upstream": producer})


class Inputs:
    """A step config's first base: its run-ID inputs are checked, then its options."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if producer := f.metadata.get("upstream"):
                require_run_id(f.name, getattr(self, f.name), producer)
        super().__post_init__()


C = TypeVar("C")


def parameters(config: Any) -> dict[str, str]:
    """The config as MLflow run parameters (the strings `mlflow run -P` would pass). A config
    made of parts (main's) gives its flags' values (`flag_values`)."""
    if hasattr(config, "flag_values"):
        values = config.flag_values()
        return {f.name: _to_param(values[f.name]) for f in cli_fields(type(config))}
    return {f.name: _to_param(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _to_param(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is a ConfigError naming it (one line, exit code 2)."""

    def error(self, message: str):
        raise ConfigError(f"bad command line: {message}. Pass each parameter as -P name=value "
                          "with a value of its type (see MLproject, or --help for the flags).")


def build_parser(cls: type) -> argparse.ArgumentParser:
    """An argparse parser whose flags are exactly the dataclass fields (`--model_id`, ...)."""
    parser = _Parser(description=(cls.__doc__ or "").strip() or None)
    for f in cli_fields(cls):
        kind = {int: int, float: float}.get(_field_type(f), str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return parser



def cli_fields(cls: type) -> list[dataclasses.Field]:
    """A config's flags: its fields, or those a config made of parts declares (`flags`)."""
    return cls.flags() if hasattr(cls, "flags") else list(dataclasses.fields(cls))


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool}.get(str(f.type), str)


def parse_config(cls: type[C], argv: list[str] | None) -> C:
    values = vars(build_parser(cls).parse_args(argv))
    return cls.from_flags(values) if hasattr(cls, "from_flags") else cls(**values)

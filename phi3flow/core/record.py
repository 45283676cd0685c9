"""What one step hands the next: frozen dataclasses written as JSON artifacts, checked when read.

Each record is owned by the module that makes it (`manifest.Manifest`, `decision.Decision`,
`registry.Registration`, `pipeline.Produced`); this module holds only what they share. Records
are pydantic dataclasses (pydantic ships with MLflow): strict about types and refusing unknown
fields, so an artifact that is not valid JSON, lacks a field, has one of the wrong type or one
the record does not know (a foreign or hand-edited file) is refused, by artifact name and
producing run, and no step acts on a partial or alien artifact.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, TypeVar

import mlflow
import pydantic
import pydantic.dataclasses
from mlflow.entities import Run

from phi3flow.core.errors import StepError

R = TypeVar("R", bound="Record")
T = TypeVar("T")

_STRICT = pydantic.ConfigDict(extra="forbid", strict=True)


def record(cls: type[T]) -> type[T]:
    """Make cls a frozen dataclass whose values are checked against its type hints."""
    return pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)(cls)


class RecordError(StepError):
    """An artifact a step consumes is missing or malformed; the message names it and the fix."""


class Record:
    """Mixin for a @record dataclass that travels between steps as one JSON artifact."""

    ARTIFACT: ClassVar[str]  # the artifact's file name (names.py)
    PRODUCER: ClassVar[str]  # the entry point that writes it: re-running it is the fix

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so the same record always has the same sha256."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        """Validated in pydantic's JSON mode, which takes JSON's types (a list for a tuple)."""
        return pydantic.TypeAdapter(cls).validate_json(json.dumps(data))

    @classmethod
    def from_json(cls: type[R], text: str, origin: str) -> R:
        """The record in `text`, or a RecordError naming `origin` (which file of which run)."""
        fix = f"re-run {cls.PRODUCER} rather than editing its output"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{origin} is not valid JSON ({exc.msg}); {fix}.") from None
        try:
            return cls.from_dict(data)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            message = ("not a field of this record" if error["type"] ==
                       "unexpected_keyword_argument" else error["msg"])
            problem = f"{where}: {message}" if where else message
            raise RecordError(f"{origin} is not a {cls.ARTIFACT} that {cls.PRODUCER} writes "
                              f"({problem}); {fix}.") from None

    @classmethod
    def read(cls: type[R], run: Run) -> R:
        """The record that `run` logged as its artifact `ARTIFACT`."""
        origin = f"{cls.ARTIFACT} of {cls.PRODUCER} run {run.info.run_id}"
        try:
            text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{cls.ARTIFACT}")
        except Exception:
            raise RecordError(f"{cls.PRODUCER} run {run.info.run_id} has no {cls.ARTIFACT} "
                              f"artifact; re-run {cls.PRODUCER}.") from None
        return cls.from_json(text, origin)

    def log(self) -> None:
        """Log the record on the active run, under its artifact name."""
        mlflow.log_text(self.to_json(), self.ARTIFACT)


def _plain(value: Any) -> Any:
    """JSON-ready copy: records and dicts recursively, tuples as lists, None fields left out
    (so a record's JSON, and its sha256, is what it was before an optional field existed)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

"""evaluate's rows: from a JSONL file or an MLflow evaluation dataset, validated before any work.

A row is a chat (`messages`), the short answer it must contain (`expected`) and its `category`,
one of CATEGORIES. Every malformed row is reported at once, by line (or dataset record), before
a model is loaded: a bad eval set costs seconds, not an evaluation.

`eval_data=auto` picks the set by the checkpoint's size (`choose_auto`): a test-sized checkpoint
cannot learn more than a handful of answers, a real one is gated on the large set.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from phi3flow.core.errors import StepError
from phi3flow.core.names import PROJECT_ROOT
from phi3flow.core.record import record

# The categories a row may name; reports give quality per category in this order.
CATEGORIES = ("facts", "arithmetic", "units", "reasoning", "format")

AUTO = "auto"
SMOKE_SET = "data/eval.jsonl"  # 12 capital cities: what the committed fixture was trained on
FULL_SET = "data/eval-phi3.jsonl"  # 120 rows, 24 per category, for real checkpoints
# Below this many bytes of weights a checkpoint is a test fixture or a toy (the fixture: 1 MB;
# Phi-3-mini: 7.6 GB): it gets the smoke set, everything larger the full set.
AUTO_FULL_SET_MIN_BYTES = 1_000_000_000

DATASET_ID = re.compile(r"^d-[0-9a-f]{32}$")
_SHOWN_ERRORS = 10


class EvalDataError(StepError):
    """The eval set is missing, empty or malformed; the message names each bad row."""


@record
class EvalRow:
    """One row of the eval set, checked: the chat to answer, the text its answer must contain."""

    messages: tuple[dict[str, Any], ...]  # {"role": ..., "content": ...}, strings
    expected: str
    category: str  # one of CATEGORIES

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    def to_dict(self) -> dict[str, Any]:
        return {"messages": list(self.messages), "expected": self.expected,
                "category": self.category}


def is_file_value(value: str) -> bool:
    """A file path (has a folder or a .jsonl suffix), not a dataset name or ID."""
    return "/" in value or value.endswith(".jsonl") or Path(value).is_file()


def resolve_path(value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


def choose_auto(checkpoint_bytes: int) -> tuple[str, str]:
    """(eval set, why) for eval_data=auto, from the size of the checkpoint's weights."""
    gigabytes = checkpoint_bytes / 1e9
    if checkpoint_bytes < AUTO_FULL_SET_MIN_BYTES:
        return SMOKE_SET, (f"eval_data=auto: the checkpoint's weights are {gigabytes:.3f} GB, "
                           f"under {AUTO_FULL_SET_MIN_BYTES / 1e9:.0f} GB, a test-sized model: "
                           f"the smoke set {SMOKE_SET}")
    return FULL_SET, (f"eval_data=auto: the checkpoint's weights are {gigabytes:.1f} GB: the "
                      f"full set {FULL_SET}")


def load(value: str) -> tuple[list[EvalRow], str, str]:
    """(rows, what was read, sha256 of the rows) for a JSONL path or a dataset name or ID."""
    if is_file_value(value):
        path = resolve_path(value)
        rows = load_jsonl(path)
        return rows, str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    rows, described = load_dataset(value)
    canonical = json.dumps([row.to_dict() for row in rows], sort_keys=True,
                           separators=(",", ":")).encode()
    return rows, described, hashlib.sha256(canonical).hexdigest()


def load_jsonl(path: Path) -> list[EvalRow]:
    if not path.is_file():
        raise EvalDataError(f"eval_data {path} does not exist: pass a JSONL file of "
                            "{\"messages\": [...], \"expected\": \"...\", \"category\": \"...\"} "
                            "rows, or the name or ID of an MLflow evaluation dataset.")
    rows, errors = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number} is not valid JSON: {exc.msg}")
            continue
        if not isinstance(parsed, dict):
            errors.append(f"line {number} must be a JSON object")
            continue
        row, problem = parse_row(parsed.get("messages"), parsed.get("expected"),
                                 parsed.get("category"), missing=[
                                     k for k in ("messages", "expected") if k not in parsed])
        if problem:
            errors.append(f"line {number}: {problem}")
        else:
            rows.append(row)
    _raise_if_bad(str(path), "line", errors, rows)
    return rows


def load_dataset(value: str) -> tuple[list[EvalRow], str]:
    """Rows of an MLflow evaluation dataset: inputs.messages, expectations.expected_response
    (MLflow's name; `expected` also accepted), and a `category` tag or expectation."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.genai import datasets

    by = {"dataset_id": value} if DATASET_ID.match(value) else {"name": value}
    try:
        dataset = datasets.get_dataset(**by)
    except MlflowException as exc:
        raise EvalDataError(
            f"eval_data={value!r} is not a file (no {resolve_path(value)}) and no MLflow "
            f"evaluation dataset of that {'ID' if 'dataset_id' in by else 'name'} is in the "
            f"tracking store {mlflow.get_tracking_uri()} ({exc.message.splitlines()[0]}). Pass "
            "a JSONL path, or create the dataset with mlflow.genai.datasets.create_dataset and "
            "merge_records({inputs: {messages}, expectations: {expected_response}, tags: "
            "{category}}).") from None
    records = dataset.to_df().to_dict("records")
    rows, errors = [], []
    for number, found in enumerate(records, start=1):
        inputs = found.get("inputs") or {}
        expectations = found.get("expectations") or {}
        tags = found.get("tags") or {}
        expected = expectations.get("expected_response", expectations.get("expected"))
        category = tags.get("category", expectations.get("category"))
        missing = (["inputs.messages"] if "messages" not in inputs else []) + (
            ["expectations.expected_response"] if expected is None else [])
        row, problem = parse_row(inputs.get("messages"), expected, category, missing)
        if problem:
            errors.append(f"record {number} ({found.get('dataset_record_id')}): {problem}")
        else:
            rows.append(row)
    described = f"MLflow evaluation dataset {dataset.name} ({dataset.dataset_id})"
    _raise_if_bad(described, "record", errors, rows)
    return rows, described


def parse_row(messages: Any, expected: Any, category: Any,
              missing: list[str]) -> tuple[EvalRow | None, str | None]:
    """(row, None) for a good row, or (None, what is wrong with it and how to fix it)."""
    if missing:
        return None, (f"has no {' or '.join(missing)} field; each row needs messages (a chat) and "
                    "expected (a short string the answer must contain)")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        return None, ("messages must be a non-empty list of {\"role\": ..., \"content\": ...} "
                    "objects with string values")
    if not isinstance(expected, str) or not expected.strip():
        return None, "expected must be a non-empty string"
    category = "facts" if category is None else category
    if category not in CATEGORIES:
        return None, (f"unknown category {category!r}: use one of {', '.join(CATEGORIES)} (or "
                    "leave it out for facts)")
    return EvalRow(tuple(messages), expected, category), None


def _raise_if_bad(source: str, unit: str, errors: list[str], rows: list) -> None:
    if errors:
        shown = "; ".join(errors[:_SHOWN_ERRORS])
        more = f"; and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        raise EvalDataError(f"{source}: {len(errors)} malformed {unit}"
                            f"{'s' if len(errors) > 1 else ''}: {shown}{more}. Fix them and "
                            "re-run; nothing was evaluated.")
    if not rows:
        raise EvalDataError(f"{source} holds no rows: an empty eval set cannot judge a model.")

"""evaluate's config: the two log runs it compares, its data, and the gate's bounds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from phi3flow.core import names
from phi3flow.core.config import (
    ConfigError,
    Inputs,
    at_least_one,
    param,
    run_id_of,
)
from phi3flow.evaluation import eval_data


@dataclass
class EvaluateOptions:
    eval_data: str = param(
        eval_data.AUTO,
        "The eval set: a JSONL file, one {\"messages\": [...], \"expected\": \"...\", "
        "\"category\": \"...\"} per line (relative paths are relative to the project "
        "directory); or the name or ID (d-...) of an MLflow evaluation dataset; or auto: "
        f"{eval_data.FULL_SET} for a checkpoint of 1 GB or more, {eval_data.SMOKE_SET} for a "
        "smaller (test-sized) one.",
    )
    max_new_tokens: int = param(256, "Cap on generated tokens per answer, for both models.")
    # The gate. Defaults suit Phi-3-mini on a CPU; see docs/parameters.md, "The decision file".
    min_quality: float = param(0.8, "Minimum share of answers containing the expected text.")
    max_quality_drop: float = param(
        0.05, "Largest quality drop of the ONNX model against the transformers model."
    )
    max_p95_latency_s: float = param(120.0, "Largest 95th-percentile answer latency, seconds.")
    judge_model_uri: str = param(
        "",
        "Optional LLM judge: an MLflow chat model URI that grades each answer against the "
        "expected one (reported as <model>_judge_correct, not gated). Empty: no judge.",
    )

    def __post_init__(self) -> None:
        at_least_one("max_new_tokens", self.max_new_tokens)
        for name in ("min_quality", "max_quality_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be between 0 and 1.")
        if not self.max_p95_latency_s > 0:
            raise ConfigError(f"max_p95_latency_s={self.max_p95_latency_s} must be > 0 seconds.")
        if self.judge_model_uri and not re.match(r"^(models|runs):/.+", self.judge_model_uri):
            raise ConfigError(f"judge_model_uri={self.judge_model_uri!r} is not a models:/ or "
                              "runs:/ URI of an MLflow chat model.")
        if (self.eval_data != eval_data.AUTO and eval_data.is_file_value(self.eval_data)
                and not self.eval_data_path.is_file()):
            raise ConfigError(f"eval_data={self.eval_data!r} does not exist (resolved to "
                              f"{self.eval_data_path}): pass a JSONL file, the name or ID of an "
                              f"MLflow evaluation dataset, or {eval_data.AUTO}.")

    @property
    def eval_data_path(self) -> Path:
        return eval_data.resolve_path(self.eval_data)

    @property
    def eval_data_files(self) -> list[Path]:
        """The local files evaluate may read: main's reuse keys on their contents."""
        if self.eval_data == eval_data.AUTO:
            return [eval_data.resolve_path(p) for p in (eval_data.SMOKE_SET, eval_data.FULL_SET)]
        return [self.eval_data_path] if eval_data.is_file_value(self.eval_data) else []

    @property
    def eval_data_is_dataset(self) -> bool:
        """An MLflow evaluation dataset can gain records under the same name: never reused."""
        return self.eval_data != eval_data.AUTO and not eval_data.is_file_value(self.eval_data)

    def thresholds(self) -> dict[str, float]:
        """The gate's bounds by parameter name (decision.THRESHOLDS says what each bounds)."""
        from phi3flow.evaluation.decision import THRESHOLDS

        return {t.param: getattr(self, t.param) for t in THRESHOLDS}


@dataclass
class EvaluateConfig(Inputs, EvaluateOptions):
    transformers_run_id: str = run_id_of(names.LOG_TRANSFORMERS)
    onnx_run_id: str = run_id_of(names.LOG_ONNX_PYFUNC)


"""The model batch_score's Spark UDF runs: a chat model's rows in, one result per row out.

Saved from this file (models from code, no pickle) around the chat model being scored, which it
carries as its artifact `model`; `mlflow.pyfunc.spark_udf` loads it in each executor's Python
worker. Self-contained on purpose, like the ONNX chat model: it carries the chat core (the
`chat` package: message roles, the ONNX model's settings) and result.py in its `code_paths`, so
an executor needs only mlflow, numpy and pandas besides the chat model's own requirements, not
this repository.

Input: a DataFrame with a `messages` column (OpenAI chat messages: a list of {role, content}, or
that list as JSON text) and/or a `prompt` column (plain text, sent as one user turn); per row,
`messages` wins when both are set. `_corrupt_record` (Spark's column for a JSON line it could
not parse) makes that row's error.
Output: one JSON string per row, {"answer", "finish_reason", "prompt_tokens",
"completion_tokens", "latency_s", "error"}; batch_score parses it with Spark's from_json.
model_config: `max_tokens`, `temperature` (every row's options) and `threads` (cores per model
copy; 0 leaves the model's own default).

Why a wrapper: a pyfunc's predict fails as a whole when one row is bad (the ONNX chat model
refuses an empty conversation, an unknown role or a prompt over the context window with one
exception), and spark_udf would fail the Spark task and then the job. Here a failed call is
split in halves until each bad row fails alone, so good rows still go to the model together
(the ONNX model's scheduler shares decode steps between a call's rows) and a bad row's error is
its result. The ONNX model refuses bad rows while parsing, before generating anything, so a
split costs only the parsing. The ONNX model is loaded with a larger cap on a batch's one-call
prefill than a server's (SCORING_BATCH_PREFILL), so that long prompts share decode steps too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

try:  # inside the saved model: MLflow puts its code/ folder on sys.path
    from chat.onnx_scheduler import BATCH_PREFILL_ENV, THREADS_ENV
    from chat.prompt import check_room
    from chat.request import BadRequest, checked_messages, plain
    from result import RESULT_FIELDS
except ImportError:  # in this repository
    from phi3flow.batch.result import RESULT_FIELDS
    from phi3flow.chat.onnx_scheduler import BATCH_PREFILL_ENV, THREADS_ENV
    from phi3flow.chat.prompt import check_room
    from phi3flow.chat.request import BadRequest, checked_messages, plain

MODEL_ARTIFACT = "model"
CORRUPT_RECORD = "_corrupt_record"
# A scoring worker serves nothing but batches, so a batch's prompts may go in one long call (it
# holds the GIL and the scheduler meanwhile, which would stall a server's other clients): rows
# of 256 tokens then share decode steps instead of running one by one. 2,048 tokens keeps the
# call's attention scores (rows x 32 heads x prompt^2 floats) under 300 MB: 8 x 256, 2 x 1,024.
SCORING_BATCH_PREFILL = 2048
MAX_ERROR_CHARS = 1000  # an error never echoes a huge input back into the output

# spark_udf loads this wrapper once per task where the executors share the driver's disk (local
# masters), and every load runs this file as a new module. The chat model it wraps is loaded
# once per Python worker process instead, kept in a module registered under a fixed name (the
# same idea as MLflow's SparkModelCache), and reused by the tasks that worker runs (Spark
# reuses Python workers: spark.python.worker.reuse, on by default). Only the latest model is
# kept, so a process that scores one model after another holds one at a time.
_CACHE = sys.modules.setdefault("phi3flow_batch_model_cache",
                                types.ModuleType("phi3flow_batch_model_cache"))
if not hasattr(_CACHE, "models"):
    _CACHE.models = {}

logger = logging.getLogger("phi3flow.batch.udf_model")


class RowError(ValueError):
    """A row that cannot be sent to the model (no question in it)."""


def _load_once(path: str, threads: int, sample: bool) -> tuple[Any, Any]:
    """(the chat model, its transformers pipeline or None), loaded once per process."""
    key = (path, threads, sample)
    if key not in _CACHE.models:
        _CACHE.models.clear()
        started = time.perf_counter()
        flavors = mlflow.models.Model.load(path).flavors
        if "transformers" in flavors:
            # MLflow's transformers flavor samples only as its model_config's do_sample says,
            # whatever a request's temperature (docs/decisions.md, "Sampling").
            model = mlflow.pyfunc.load_model(path, model_config={"do_sample": sample})
            pipeline = model._model_impl.pipeline  # its tokenizer counts prompt tokens
            if threads:
                import torch

                torch.set_num_threads(threads)
        else:
            with scoring_settings(threads):
                model, pipeline = mlflow.pyfunc.load_model(path), None
        _CACHE.models[key] = (model, pipeline)
        _log(f"loaded the chat model in Python worker process {os.getpid()} "
             f"({time.perf_counter() - started:.1f} s)")
    return _CACHE.models[key]


@contextlib.contextmanager
def scoring_settings(threads: int = 0) -> Iterator[None]:
    """The environment an ONNX chat model loaded in this block reads its settings from (it
    reads them when it loads): a scoring worker's batch prefill cap and `threads` (0: the
    model's default), each unless the user set it, taken away after the block."""
    settings = {BATCH_PREFILL_ENV: str(SCORING_BATCH_PREFILL),
                **({THREADS_ENV: str(threads)} if threads else {})}
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _log(message: str) -> None:
    # An executor's Python worker has no logging set up: its stderr is the executor's log
    # (the console, for a local master).
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s INFO %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.info(message)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _messages(row: dict[str, Any]) -> list[Any]:
    """The row's conversation; what is wrong with it is for the model to say."""
    if not _missing(row.get(CORRUPT_RECORD)):
        text = str(row[CORRUPT_RECORD])
        raise RowError(f"the line is not a JSON object: {text[:80]!r}"
                       + ("..." if len(text) > 80 else ""))
    messages, prompt = row.get("messages"), row.get("prompt")
    if not _missing(messages):
        messages = plain(messages)
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise RowError(f"messages is not JSON ({exc.msg}): pass a JSON list of "
                               "{\"role\": ..., \"content\": ...} objects.") from None
        if isinstance(messages, list):
            # Spark gives every message every key any message of the column has: drop the
            # keys this message does not set.
            messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict)
                        else m for m in messages]
        return messages
    if not _missing(prompt):
        return [{"role": "user", "content": str(prompt)}]
    raise RowError("the row has neither messages nor prompt.")


def _failed(message: str) -> dict[str, Any]:
    return {**dict.fromkeys(RESULT_FIELDS), "error": message[:MAX_ERROR_CHARS]}


def _error_text(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return message if isinstance(exc, RowError) else f"{type(exc).__name__}: {message}"


class BatchChatModel(PythonModel):
    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.max_tokens = int(config["max_tokens"])
        self.temperature = float(config["temperature"])
        self.model, self.pipeline = _load_once(context.artifacts[MODEL_ARTIFACT],
                                               int(config.get("threads", 0)),
                                               self.temperature > 0)

    def _request(self, row: dict[str, Any]) -> dict[str, Any]:
        request = {"messages": _messages(row), "max_tokens": self.max_tokens}
        if self.pipeline is None or self.temperature > 0:
            # MLflow's transformers flavor refuses temperature 0 (it must be > 0); greedy is
            # its model_config's do_sample=False instead (_load_once).
            request["temperature"] = self.temperature
        if self.pipeline is not None:
            self._check_transformers(request["messages"])
        return request

    def _check_transformers(self, messages: Any) -> None:
        """Refuse what MLflow's transformers flavor answers anyway (an unknown role, a prompt
        over the context window: docs/serving.md) with the chat core's own checks, so a row
        gets the words the ONNX model refuses it in."""
        try:
            checked_messages(messages)
            tokenizer = self.pipeline.tokenizer
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
            except Exception:  # noqa: BLE001 - the model's own call says what is wrong
                return
            check_room(len(ids), self.max_tokens,
                       int(self.pipeline.model.config.max_position_embeddings))
        except BadRequest as refused:
            raise RowError(refused.message) from None

    def predict(self, context, model_input, params=None):  # untyped: MLflow checks no type hints
        rows = model_input.to_dict(orient="records")
        results: list[dict[str, Any] | None] = [None] * len(rows)
        requests = []
        for index, row in enumerate(rows):
            try:
                requests.append((index, self._request(row)))
            except RowError as exc:
                results[index] = _failed(_error_text(exc))
        self._answer(requests, results)
        return [json.dumps(result) for result in results]

    def _answer(self, requests: list[tuple[int, dict]], results: list) -> None:
        """Answer `requests` in one model call; if it fails, each half on its own."""
        if not requests:
            return
        started = time.perf_counter()
        try:
            responses = self.model.predict([request for _, request in requests])
        except Exception as exc:  # noqa: BLE001 - a row's failure is that row's result
            if len(requests) == 1:
                results[requests[0][0]] = _failed(_error_text(exc))
                return
            half = len(requests) // 2
            self._answer(requests[:half], results)
            self._answer(requests[half:], results)
            return
        seconds = time.perf_counter() - started
        for (index, _), response in zip(requests, responses):
            choice, usage = response["choices"][0], response["usage"]
            results[index] = {
                "answer": choice["message"]["content"],
                "finish_reason": choice["finish_reason"],
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "latency_s": seconds,  # the call's: rows answered together share it
                "error": None,
            }


mlflow.models.set_model(BatchChatModel())

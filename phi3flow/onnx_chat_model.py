"""An onnxruntime-genai chat model as an MLflow pyfunc, logged from this file (no pickle).

Self-contained on purpose: MLflow copies this one file into the logged model, which needs nothing
else from this repository (only mlflow, numpy, pandas and onnxruntime-genai).

Contract, `interface=chat` (the default): the OpenAI chat format that MLflow's transformers
`llm/v1/chat` models speak, so a client written for one works against the other:
    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64, "temperature": 0.0,
     "top_p": 1.0, "top_k": 50, "stop": ["..."], "n": 1}
    -> [{"id", "object": "chat.completion", "created", "model",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                      "finish_reason": "stop" | "length"}],
         "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}]
`interface=prompt`: the Phi-3 cookbook's contract, {"prompt": "..."} -> "answer".

Design, for serving (`mlflow models serve` calls predict from several threads at once):
- One `og.Model` and `og.Tokenizer`, loaded once in load_context and only read afterwards. Each
  request gets its own GeneratorParams, Generator and TokenizerStream: no shared mutable
  generation state, so concurrent requests cannot mix.
- The KV cache is sized per request: max_length = prompt tokens + max_tokens (onnxruntime-genai
  allocates it up front; the 4096 default would cost about 3 GiB per request on Phi-3-mini).
- Responsiveness: a Generator call holds the GIL for its whole duration, so a 2,000-token prompt
  fed in one call froze every other thread (the server's /ping included) for seconds. A single
  request's prompt is fed in chunks of PREFILL_CHUNK tokens (same output, checked in the tests),
  so the GIL is released between chunks and between generated tokens. The Engine API releases
  the GIL but must be driven from the thread that created it, which would need a scheduler
  thread between the server's threads and the engine; the chunked Generator gets the same
  responsiveness with less machinery.
- Rows of one call that share generation options run as one batch (onnxruntime-genai batches
  take a single prompt feed, so a batch's prefill is not chunked).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

ONNX_ARTIFACT = "onnx"
PREFILL_CHUNK = 64
ROLES = ("system", "user", "assistant")
OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "stop")
CHAT_FIELDS = ("messages", "n", "stream", *OPTIONS)
PROMPT_FIELDS = ("prompt", *OPTIONS)
DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 50, "stop": None}
MAX_STOP_SEQUENCES = 4


class BadRequest(MlflowException):
    """A request the caller must fix; served as HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (what MLflow makes of {"inputs": ...}) -> plain Python."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        rows = model_input
    else:
        raise BadRequest(
            "the request must be a JSON object such as {\"messages\": [...]} (or a list of them); "
            f"got {type(model_input).__name__}."
        )
    if not rows:
        raise BadRequest("the request holds no rows: send at least one conversation.")
    # DataFrame rows carry NaN/None for fields other rows set: treat as absent.
    return [
        {k: _plain(v) for k, v in row.items() if v is not None and not _is_nan(v)}
        for row in rows
    ]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _number(name: str, value: Any, kind: type, low: float, high: float | None = None,
            low_inclusive: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {json.dumps(value)}.")
    if kind is int:
        if float(value) != int(value):
            raise BadRequest(f"{name} must be an integer, got {value}.")
        value = int(value)
    ok_low = value >= low if low_inclusive else value > low
    if not ok_low or (high is not None and value > high):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        limit = f" and <= {high}" if high is not None else ""
        raise BadRequest(f"{name} must be {bound}{limit}, got {value}.")
    return kind(value)


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of non-empty strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}.")
    return stops or None


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects."
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content.")
        extra = set(message) - {"role", "content"}
        if extra:
            raise BadRequest(f"messages[{i}] has unknown field(s) {sorted(extra)}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                             f"{json.dumps(role)}.")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string, got {json.dumps(content)}.")
        if not content.strip():
            raise BadRequest(f"messages[{i}].content is empty.")
    if value[-1]["role"] == "assistant":
        raise BadRequest("the last message must be from the user (or system), not the assistant.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


class OnnxChatModel(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        config = dict(context.model_config or {})
        self.interface = config.get("interface", "chat")
        self.defaults = {k: config.get(k, v) for k, v in DEFAULTS.items()}
        self.model_name = config.get("model_name", "phi3-onnx")
        folder = Path(context.artifacts[ONNX_ARTIFACT])
        genai_config = json.loads((folder / "genai_config.json").read_text())
        self.context_length = int(genai_config["model"]["context_length"])
        self.pad_token_id = int(genai_config["model"]["pad_token_id"])
        self.og = og
        self.model = og.Model(str(folder))
        self.tokenizer = og.Tokenizer(self.model)

    # --- requests --------------------------------------------------------------------------

    def _parse(self, row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        fields = CHAT_FIELDS if self.interface == "chat" else PROMPT_FIELDS
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; this model accepts {list(fields)}.")
        merged = {**self.defaults, **{k: v for k, v in params.items() if v is not None}, **row}
        if self.interface == "chat":
            if "messages" not in row:
                raise BadRequest("the request has no messages: send {\"messages\": [{\"role\": "
                                 "\"user\", \"content\": \"...\"}]}.")
            if merged.get("n") not in (None, 1):
                raise BadRequest(f"n must be 1 (one answer per request), got {merged['n']}.")
            if merged.get("stream") not in (None, False):
                raise BadRequest("stream=true is not available over predict: use predict_stream "
                                 "in Python (MLflow serving has no streaming over REST).")
            prompt = self.tokenizer.apply_chat_template(
                json.dumps(_messages(row["messages"])), add_generation_prompt=True
            )
        else:
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadRequest("the request needs a non-empty string field prompt: "
                                 "{\"prompt\": \"...\"}.")
            # The cookbook's callers send plain text: wrap it as one user turn with the
            # checkpoint's own template rather than hand-written special tokens.
            prompt = self.tokenizer.apply_chat_template(
                json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
            )
        options = {
            "max_tokens": _number("max_tokens", merged["max_tokens"], int, 1),
            "temperature": _number("temperature", merged["temperature"], float, 0),
            "top_p": _number("top_p", merged["top_p"], float, 0, 1, low_inclusive=False),
            "top_k": _number("top_k", merged["top_k"], int, 1),
            "stop": _stop(merged.get("stop")),
        }
        ids = self.tokenizer.encode(prompt)
        room = self.context_length - len(ids)
        if room <= 0:
            raise BadRequest(f"the prompt has {len(ids)} tokens, more than the context window of "
                             f"{self.context_length}: shorten the conversation.")
        if options["max_tokens"] > room:
            raise BadRequest(
                f"max_tokens={options['max_tokens']} does not fit: the prompt has {len(ids)} "
                f"tokens and the context window is {self.context_length}; pass max_tokens <= "
                f"{room}."
            )
        return {"ids": ids, "options": options}

    def _search_options(self, options: dict[str, Any], max_length: int, batch_size: int):
        params = self.og.GeneratorParams(self.model)
        search = {"max_length": max_length, "batch_size": batch_size}
        if options["temperature"] > 0:
            search.update(do_sample=True, temperature=options["temperature"],
                          top_p=options["top_p"], top_k=options["top_k"])
        else:
            search.update(do_sample=False)
        params.set_search_options(**search)
        return params

    # --- generation ------------------------------------------------------------------------

    def _stream_one(self, request: dict[str, Any]) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text delta, finish reason or None, generated token count) for one request."""
        ids, options = request["ids"], request["options"]
        params = self._search_options(options, len(ids) + options["max_tokens"], 1)
        generator = self.og.Generator(self.model, params)
        for start in range(0, len(ids), PREFILL_CHUNK):  # chunked: frees the GIL in between
            generator.append_tokens(ids[start:start + PREFILL_CHUNK])
        stream = self.tokenizer.create_stream()
        eos = set(self.tokenizer.eos_token_ids)
        stops = options["stop"] or []
        hold = max((len(s) for s in stops), default=1) - 1  # text that may start a stop string
        text, sent, count, ended = "", 0, 0, False
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            count += 1
            if token in eos:
                ended = True
                break
            text += stream.decode(token)
            if not sent:
                text = text.lstrip()  # like the transformers model: no leading space
            cut = _find_stop(text, stops)
            if cut is not None:
                yield text[sent:cut], "stop", count
                return
            safe = len(text) - hold
            if safe > sent:
                yield text[sent:safe], None, count
                sent = safe
        yield text[sent:], "stop" if ended else "length", count

    def _generate_batch(self, requests: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        """Rows sharing options, as one onnxruntime-genai batch (right-padded prompts)."""
        options = requests[0]["options"]
        longest = max(len(r["ids"]) for r in requests)
        params = self._search_options(options, longest + options["max_tokens"], len(requests))
        generator = self.og.Generator(self.model, params)
        padded = np.full((len(requests), longest), self.pad_token_id, dtype=np.int32)
        for row, request in enumerate(requests):
            padded[row, : len(request["ids"])] = request["ids"]
        generator.append_tokens(padded)
        eos = set(self.tokenizer.eos_token_ids)
        generated: list[list[int]] = [[] for _ in requests]
        finished = [False] * len(requests)
        while not generator.is_done():
            generator.generate_next_token()
            for row, token in enumerate(generator.get_next_tokens()):
                if not finished[row]:
                    generated[row].append(int(token))
                    finished[row] = int(token) in eos
        results = []
        for tokens in generated:
            ended = bool(tokens) and tokens[-1] in eos
            text = self.tokenizer.decode(np.array(tokens[:-1] if ended else tokens, np.int32))
            cut = _find_stop(text, options["stop"] or [])
            if cut is not None:
                text, ended = text[:cut], True
            results.append((text, "stop" if ended else "length", len(tokens)))
        return results

    def _complete(self, request: dict[str, Any]) -> tuple[str, str, int]:
        text, finish, count = "", "length", 0
        for delta, reason, count in self._stream_one(request):
            text += delta
            finish = reason or finish
        return text, finish, count

    # --- pyfunc API ------------------------------------------------------------------------

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        requests = [self._parse(row, params or {}) for row in _rows(model_input)]
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request["options"], sort_keys=True), []).append(i)
        results: list[tuple[str, str, int] | None] = [None] * len(requests)
        for indices in groups.values():
            if len(indices) == 1:
                outputs = [self._complete(requests[indices[0]])]
            else:
                outputs = self._generate_batch([requests[i] for i in indices])
            for i, output in zip(indices, outputs):
                results[i] = output
        if self.interface == "prompt":
            texts = [text.strip() for text, _, _ in results]
            return texts[0] if isinstance(model_input, dict) else texts
        return [self._completion(r, out) for r, out in zip(requests, results)]

    def predict_stream(self, context, model_input, params: dict[str, Any] | None = None):
        rows = _rows(model_input)
        if len(rows) != 1:
            raise BadRequest(f"predict_stream takes one request, got {len(rows)} rows.")
        request = self._parse(rows[0], params or {})
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = True
        for delta, finish, _ in self._stream_one(request):
            if not delta and finish is None:
                continue
            if self.interface == "prompt":
                yield delta
                continue
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            first = False
            yield {
                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": message, "finish_reason": finish}],
            }

    def _completion(self, request: dict[str, Any], output: tuple[str, str, int]) -> dict:
        text, finish, completion_tokens = output
        prompt_tokens = len(request["ids"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text.strip()},
                "finish_reason": finish,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _find_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


mlflow.models.set_model(OnnxChatModel())

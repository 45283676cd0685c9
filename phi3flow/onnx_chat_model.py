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
`interface=prompt`: the Phi-3 cookbook's contract, {"prompt": "..."} -> "answer". A prompt that
carries the chat template's tags (<|system|>, <|user|>, <|assistant|>, <|end|>) is tokenized as
it is, as the cookbook does; plain text is wrapped as one user turn.

Design, for serving (`mlflow models serve` calls predict from several threads at once):
- One `og.Model` and `og.Tokenizer`, loaded once in load_context and only read afterwards.
- One scheduler thread runs all generation. predict/predict_stream hand it their rows and read
  the tokens back from a queue per row (decoding text and stop strings in the caller's thread).
  Each turn it starts a batch for the rows that arrived meanwhile (rows sharing generation
  options share one Generator) and advances every active batch by one Generator call. So
  concurrent requests share decode steps, which are memory-bound: on the full-size model a
  batch of 4 costs about one row's step (2.0x, docs/decisions.md). onnxruntime-genai cannot add
  rows to a running Generator, so batches that started apart are stepped in turn, not merged.
- The KV cache is sized per batch: max_length = longest prompt + max_tokens (onnxruntime-genai
  allocates it up front; the 4096 default would cost about 3 GiB per request on Phi-3-mini).
- Responsiveness: a Generator call holds the GIL for its whole duration, so a 2,000-token prompt
  fed in one call froze every other thread (the server's /ping included) for seconds, and in a
  scheduler it would stall every other request too. So a row's prompt goes in chunks, one per
  scheduler turn, sized by who else is there (adaptive prefill): while other requests are active
  or waiting, PREFILL_CHUNK tokens (16: no call over about 0.3 s on the full-size model, so they
  keep decoding); while the row is the scheduler's only work, ALONE_PREFILL_CHUNK (256,
  PHI3FLOW_ONNX_PREFILL_CHUNK overrides). Small chunks are slow: a lone 2,048-token prompt took
  50.7 s in 16- or 64-token calls, 45.9 s in 128, 40.2 s in 256 and 42.4 s in one call (2 AMD
  EPYC cores, full size). The price: between seconds-long calls other threads get the GIL only
  for a switch interval (5 ms) each, so a request arriving beside a long lone prefill reaches
  the scheduler after a few such calls (in process: at the next call; served over HTTP, whose
  parsing takes several turns: 13-29 s into a 2,048-token prefill, against 3.6 s with 16-token
  calls). Set PHI3FLOW_ONNX_PREFILL_CHUNK=16 for a server where newcomers beside long prompts
  matter more than a long prompt's own first token. A batch's prompts must go in one call, so
  a batch's prefill is capped at MAX_BATCH_PREFILL tokens.
- Threads: onnxruntime gets every core this process may use (see _threads). The Engine API releases the GIL but, on the CPU build, runs fixed
  batches that queued requests wait for (docs/decisions.md); this scheduler does not make a
  request wait for an unrelated one to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
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
PREFILL_CHUNK = 16  # prompt tokens per call beside other requests: ~0.3 s, full size, 2 cores
ALONE_PREFILL_CHUNK = 256  # prompt tokens per call while nothing else is queued or running
ALONE_CHUNK_ENV = "PHI3FLOW_ONNX_PREFILL_CHUNK"  # overrides ALONE_PREFILL_CHUNK
THREADS_ENV = "PHI3FLOW_ONNX_THREADS"
MAX_BATCH_PREFILL = 256  # tokens (rows x longest prompt) a batch may prefill in one call
MAX_BATCH_WAIT_S = 0.02  # the longest an idle scheduler waits for a request's batch-mates
ROLES = ("system", "user", "assistant")
TEMPLATE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # Phi-3's chat format
OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "stop")
CHAT_FIELDS = ("messages", "n", "stream", *OPTIONS)
PROMPT_FIELDS = ("prompt", *OPTIONS)
DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 50, "stop": None}
MAX_STOP_SEQUENCES = 4
# A prompt longer than this many characters per token of the context window cannot fit (no
# tokenizer packs more into one token): refused before tokenizing, so a 10 MB body costs nothing.
MAX_CHARS_PER_TOKEN = 16


class BadRequest(MlflowException):
    """A request the caller must fix; served as HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    # MLflow's scoring server rewrites an MlflowException's message to "Failed to predict data
    # '<the whole parsed request>'. \nError: <message>" (mlflow/pyfunc/scoring_server/__init__.py,
    # `invocations`): a 10 MB body would come back as a 10 MB error. Keep our message only.
    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message") or not value.endswith(self._message):
            self._message = value


def _shown(value: Any, limit: int = 60, text: str | None = None) -> str:
    """A value (as JSON) for an error message, cut short: errors never echo a huge input."""
    text = json.dumps(value, default=str) if text is None else text
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


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


def checked_number(name: str, value: Any, kind: type, low: float, high: float | None = None,
            low_inclusive: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {_shown(value)}.")
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def checked_stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of non-empty strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}.")
    return stops or None


def checked_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects."
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content.")
        extra = set(message) - {"role", "content"}
        if extra:
            raise BadRequest(f"messages[{i}] has unknown field(s) "
                             f"{_shown(None, 200, str(sorted(extra)))}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                             f"{_shown(role)}.")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string, got {_shown(content)}.")
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
        # `model_name` in models logged before the key was renamed to model_id.
        self.model_name = config.get("model_id") or config.get("model_name", "phi3-onnx")
        folder = Path(context.artifacts[ONNX_ARTIFACT])
        genai_config = json.loads((folder / "genai_config.json").read_text())
        self.context_length = int(genai_config["model"]["context_length"])
        self.pad_token_id = int(genai_config["model"]["pad_token_id"])
        self.og = og
        og_config = og.Config(str(folder))
        threads = _threads(genai_config)
        if threads:
            og_config.overlay(json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(og_config)
        self.alone_chunk = _alone_chunk()
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self._inbox: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._scheduler: threading.Thread | None = None

    # --- requests --------------------------------------------------------------------------

    def _parse(self, row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        fields = CHAT_FIELDS if self.interface == "chat" else PROMPT_FIELDS
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field(s) {_shown(None, 200, str(unknown))}; this model "
                             f"accepts {list(fields)}.")
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
            messages = checked_messages(row["messages"])
            self._check_size(sum(len(m["content"]) for m in messages))
            prompt = self.tokenizer.apply_chat_template(
                json.dumps(messages), add_generation_prompt=True
            )
        else:
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadRequest("the request needs a non-empty string field prompt: "
                                 "{\"prompt\": \"...\"}.")
            self._check_size(len(prompt))
            # The Phi-3 cookbook's contract: a prompt already in the chat format (its example:
            # "<|system|>...<|end|><|user|>...<|end|><|assistant|>") goes to the tokenizer as it
            # is. Plain text is wrapped as one user turn with the checkpoint's own template.
            if not any(tag in prompt for tag in TEMPLATE_TAGS):
                prompt = self.tokenizer.apply_chat_template(
                    json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
                )
        options = {
            "max_tokens": checked_number("max_tokens", merged["max_tokens"], int, 1),
            "temperature": checked_number("temperature", merged["temperature"], float, 0),
            "top_p": checked_number("top_p", merged["top_p"], float, 0, 1, low_inclusive=False),
            "top_k": checked_number("top_k", merged["top_k"], int, 1),
            "stop": checked_stop(merged.get("stop")),
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

    def _check_size(self, characters: int) -> None:
        limit = self.context_length * MAX_CHARS_PER_TOKEN
        if characters > limit:
            raise BadRequest(
                f"the prompt has {characters} characters, more than the context window of "
                f"{self.context_length} tokens can hold (at most {limit} characters are "
                "tokenized): shorten the conversation."
            )

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

    # --- generation: one scheduler thread batches whatever requests are in flight ------------

    def _submit(self, requests: list[dict[str, Any]]) -> list[_Job]:
        jobs = [_Job(r["ids"], r["options"]) for r in requests]
        with self._lock:  # start the scheduler on first use (and again after a fork)
            if self._scheduler is None or not self._scheduler.is_alive():
                self._scheduler = threading.Thread(target=self._schedule, daemon=True,
                                                   name="onnx-chat-scheduler")
                self._scheduler.start()
        self._inbox.put(jobs)  # one call's rows arrive together, so they can share a batch
        return jobs

    def _schedule(self) -> None:
        """Run every active batch one step at a time, starting new batches as requests come.

        Each step is one Generator call: a prompt chunk or one new token per row. Requests that
        arrive while a step runs are batched together at the next turn, so concurrent clients
        share decode steps (decode is memory-bound: a batch of 4 costs about one row's step),
        and no request waits for an unrelated one to finish before it starts.
        """
        active: list[_Batch] = []
        step_seconds = 0.0  # the last decode step's duration
        while True:
            arrived = _drain(self._inbox, block=not active)
            if not active and step_seconds:
                # Idle until now: clients whose answers ended together send their next requests
                # a few milliseconds apart. Wait a fraction of one step for them, so they share
                # a batch instead of each starting its own (which would share no steps).
                time.sleep(min(step_seconds / 4, MAX_BATCH_WAIT_S))
                arrived += _drain(self._inbox, block=False)
            waiting = [job for jobs in arrived for job in jobs]
            for group in _batches(waiting):
                try:
                    active.append(self._start(group))
                except Exception as exc:  # noqa: BLE001 (handed to the waiting callers)
                    for job in group:
                        job.put(exc)
            for batch in list(active):
                alone = len(active) == 1 and self._inbox.empty()
                try:
                    decoding, started = batch.prompt is None, time.perf_counter()
                    finished = self._step(batch, alone)
                    if decoding:
                        step_seconds = time.perf_counter() - started
                except Exception as exc:  # noqa: BLE001
                    for job in batch.jobs:
                        job.put(exc)
                    finished = True
                if finished:
                    active.remove(batch)

    def _start(self, jobs: list[_Job]) -> _Batch:
        options = jobs[0].options
        longest = max(len(job.ids) for job in jobs)
        params = self._search_options(options, longest + options["max_tokens"], len(jobs))
        generator = self.og.Generator(self.model, params)
        if len(jobs) == 1:  # fed in chunks, one per scheduler turn: other batches go on meanwhile
            return _Batch(jobs, generator, list(jobs[0].ids))
        # onnxruntime-genai takes a batch's prompts in one call (right-padded)
        padded = np.full((len(jobs), longest), self.pad_token_id, dtype=np.int32)
        for row, job in enumerate(jobs):
            padded[row, : len(job.ids)] = job.ids
        return _Batch(jobs, generator, padded)

    def _step(self, batch: _Batch, alone: bool) -> bool:
        """One Generator call for the batch; True when the batch is done.

        `alone`: no other batch is running or waiting, so a row's prompt may go in large chunks.
        """
        if batch.prompt is not None:
            if isinstance(batch.prompt, list):  # one row: the next chunk
                size = self.alone_chunk if alone else PREFILL_CHUNK
                chunk, rest = batch.prompt[:size], batch.prompt[size:]
            else:  # a padded batch: all of it
                chunk, rest = batch.prompt, []
            batch.generator.append_tokens(chunk)
            batch.prompt = rest or None
            return False
        batch.generator.generate_next_token()
        for job, token in zip(batch.jobs, batch.generator.get_next_tokens()):
            if not (job.done or job.cancelled):  # nobody reads a cancelled row's tokens
                job.put(int(token))
                job.done = int(token) in self.eos
        if batch.generator.is_done() or all(job.done or job.cancelled for job in batch.jobs):
            for job in batch.jobs:
                job.put(None)  # end of tokens (after an eos, or at max_tokens)
            return True
        return False

    def _stream_one(self, job: _Job) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text delta, finish reason or None, generated token count) for one request."""
        stream = self.tokenizer.create_stream()
        stops = job.options["stop"] or []
        hold = max((len(s) for s in stops), default=1) - 1  # text that may start a stop string
        text, sent, count, ended = "", 0, 0, False
        try:
            for token in job.tokens():
                count += 1
                if token in self.eos:
                    ended = True
                    break
                text += stream.decode(token)
                if not sent:
                    text = text.lstrip()  # like the transformers model: no leading space
                cut = find_stop(text, stops)
                if cut is not None:
                    yield text[sent:cut], "stop", count
                    return
                safe = len(text) - hold
                if safe > sent:
                    yield text[sent:safe], None, count
                    sent = safe
            yield text[sent:], "stop" if ended else "length", count
        finally:
            job.cancelled = True  # a stop string, a closed stream: the scheduler drops the row

    def _complete(self, job: _Job) -> tuple[str, str, int]:
        text, finish, count = "", "length", 0
        for delta, reason, count in self._stream_one(job):
            text += delta
            finish = reason or finish
        return text, finish, count

    # --- pyfunc API ------------------------------------------------------------------------

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        requests = [self._parse(row, params or {}) for row in _rows(model_input)]
        results = [self._complete(job) for job in self._submit(requests)]
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
        (job,) = self._submit([request])
        for delta, finish, count in self._stream_one(job):
            if not delta and finish is None:
                continue
            if self.interface == "prompt":
                yield delta
                continue
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            first = False
            chunk = {
                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": message, "finish_reason": finish}],
            }
            if finish is not None:  # the last chunk: the request's usage, as OpenAI counts it
                chunk["usage"] = _usage(len(request["ids"]), count)
            yield chunk

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
                # refusal and logprobs: required by OpenAI's schema, null when there are none
                "message": {"role": "assistant", "content": text.strip(), "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": _usage(prompt_tokens, completion_tokens),
        }


def _threads(genai_config: dict[str, Any]) -> int | None:
    """onnxruntime threads per model: PHI3FLOW_ONNX_THREADS, else the model's own setting, else
    every core this process may use.

    onnxruntime-genai's default used one core of two here (prefill is compute-bound: two threads
    halved it, and decode went from 9 to 14 tokens/s on the full-size model). With several
    serving workers (`mlflow models serve -w N`), give each cores / N.
    """
    value = os.environ.get(THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise MlflowException(f"{THREADS_ENV}={value!r} must be a whole number of threads "
                                  ">= 1; unset it to use every core.")
        return int(value)
    session = genai_config["model"]["decoder"].get("session_options", {})
    if "intra_op_num_threads" in session:
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _alone_chunk() -> int:
    """Prompt tokens per call for a request alone: PHI3FLOW_ONNX_PREFILL_CHUNK, else 256."""
    value = os.environ.get(ALONE_CHUNK_ENV, "")
    if not value:
        return ALONE_PREFILL_CHUNK
    if not value.isdigit() or int(value) < 1:
        raise MlflowException(f"{ALONE_CHUNK_ENV}={value!r} must be a whole number of tokens "
                              f">= 1; unset it for {ALONE_PREFILL_CHUNK}.")
    return int(value)


class _Job:
    """One request row on its way through the scheduler: its tokens arrive on a queue."""

    def __init__(self, ids: list[int], options: dict[str, Any]):
        self.ids, self.options = ids, options
        self.done = False  # the scheduler saw its eos
        self.cancelled = False  # the caller stopped reading
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item: int | None | Exception) -> None:
        self._queue.put(item)

    def tokens(self) -> Iterator[int]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


class _Batch:
    def __init__(self, jobs: list[_Job], generator: Any, prompt: list[int] | np.ndarray):
        # prompt: what is still to be fed (a row's token ids, or a padded batch); None once fed.
        self.jobs, self.generator = jobs, generator
        self.prompt: list[int] | np.ndarray | None = prompt


def _drain(inbox: queue.SimpleQueue, block: bool) -> list[Any]:
    items = [inbox.get()] if block else []
    with contextlib.suppress(queue.Empty):
        while True:
            items.append(inbox.get_nowait())
    return items


def _batches(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs that share generation options, in batches whose one-call prefill stays small.

    A batch's prompts go in with one call that holds the GIL (and every other batch) for its
    whole length, so rows x longest prompt is capped at MAX_BATCH_PREFILL tokens; a longer
    prompt runs alone, fed in chunks. Stop strings are applied per row, so they do not split.
    """
    groups: dict[str, list[_Job]] = {}
    for job in jobs:
        key = {k: v for k, v in job.options.items() if k != "stop"}
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(job)
    batches = []
    for group in groups.values():
        batch: list[_Job] = []
        for job in sorted(group, key=lambda j: len(j.ids)):
            longest = max([len(job.ids)] + [len(j.ids) for j in batch])
            if batch and longest * (len(batch) + 1) > MAX_BATCH_PREFILL:
                batches.append(batch)
                batch = []
            batch.append(job)
        batches.append(batch)
    return batches


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of `stops` begins in `text`, or None."""
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


mlflow.models.set_model(OnnxChatModel())

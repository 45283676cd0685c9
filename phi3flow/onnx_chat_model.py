"""An onnxruntime-genai chat model as an MLflow pyfunc, logged from this file (no pickle).

Self-contained on purpose: MLflow copies this file and its companion chat_contract.py (the
request checks, prompt tokens, logprobs and answer assembly both runtimes share) into the logged
model, which needs nothing else from this repository (only mlflow, numpy, pandas, tokenizers,
llguidance and onnxruntime-genai). The front door drives the transformers model with the same
contract, so both runtimes answer alike.

Contract, `interface=chat` (the default): the OpenAI chat format that MLflow's transformers
`llm/v1/chat` models speak, so a client written for one works against the other:
    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64, "temperature": 0.0,
     "top_p": 1.0, "top_k": 50, "stop": ["..."], "n": 1, "seed": 7, "logprobs": true,
     "top_logprobs": 2}
    -> [{"id", "object": "chat.completion", "created", "model",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "...",
                                              "refusal": null},
                      "logprobs": null | {"content": [{"token", "logprob", "bytes",
                                                       "top_logprobs": [...]}], "refusal": null},
                      "finish_reason": "stop" | "length"}],
         "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}]
Message text is only ever text: a message that spells a control tag (`<|end|>`, `<|assistant|>`)
gets the tag's characters as ordinary tokens, never the control token (`chat_ids`), so a user
cannot close their own turn and write the assistant's. `seed` makes sampling repeatable: the
same request with the same seed gets the same answer. `logprobs` reports each answer token's
log-probability under the model (log-softmax of its logits, before temperature), with up to 20
alternatives (`top_logprobs`).
`interface=prompt`: the Phi-3 cookbook's contract, {"prompt": "..."} -> "answer". A prompt that
carries the chat template's tags (<|system|>, <|user|>, <|assistant|>, <|end|>) is tokenized as
it is, as the cookbook does (its contract is pre-formatted prompts); plain text is wrapped as one
user turn.

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
- Threads: onnxruntime gets every core this process may use (see _threads). The Engine API
  releases the GIL but, on the CPU build, runs fixed batches that queued requests wait for (docs/decisions.md); this scheduler does not make a
  request wait for an unrelated one to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

try:  # inside a logged model: MLflow puts its code/ folder, with chat_contract.py, on sys.path
    import chat_contract as contract
except ImportError:  # in this repository
    from phi3flow import chat_contract as contract

# What the chat contract defines and this model answers by (tests and docs read them here too).
BadRequest, DEFAULTS, OPTIONS = contract.BadRequest, contract.DEFAULTS, contract.OPTIONS

ONNX_ARTIFACT = "onnx"
PREFILL_CHUNK = 16  # prompt tokens per call beside other requests: ~0.3 s, full size, 2 cores
ALONE_PREFILL_CHUNK = 256  # prompt tokens per call while nothing else is queued or running
ALONE_CHUNK_ENV = "PHI3FLOW_ONNX_PREFILL_CHUNK"  # overrides ALONE_PREFILL_CHUNK
THREADS_ENV = "PHI3FLOW_ONNX_THREADS"
MAX_BATCH_PREFILL = 256  # tokens (rows x longest prompt) a batch may prefill in one call
MAX_BATCH_WAIT_S = 0.02  # the longest an idle scheduler waits for a request's batch-mates
TEMPLATE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # Phi-3's chat format
CHAT_FIELDS = ("messages", "n", "stream", *OPTIONS, *contract.SHAPE_FIELDS)
PROMPT_FIELDS = ("prompt", *OPTIONS)


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
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
        self.tags = contract.added_tokens(tokenizer_json)
        self.encode_text = contract.plain_text_encoder(tokenizer_json)
        self.pieces = contract.token_bytes(tokenizer_json)
        self.keeps_system = contract.keeps_system(self.render)
        self.grammar_tokenizer = contract.grammar_tokenizer(
            tokenizer_json, int(genai_config["model"]["vocab_size"]), sorted(self.eos))
        self._inbox: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._scheduler: threading.Thread | None = None

    # --- requests --------------------------------------------------------------------------

    def parse(self, row: dict[str, Any], params: dict[str, Any] | None = None) -> contract.Chat:
        """One request row, checked and tokenized (the front door checks requests with it)."""
        fields = CHAT_FIELDS if self.interface == "chat" else PROMPT_FIELDS
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field(s) {contract.shown(None, 200, str(unknown))}; "
                             f"this model accepts {list(fields)}.")
        merged = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None},
                  **row}
        if self.interface == "chat":
            if "messages" not in row:
                raise BadRequest("the request has no messages: send {\"messages\": [{\"role\": "
                                 "\"user\", \"content\": \"...\"}]}.")
            if merged.get("n") not in (None, 1):
                raise BadRequest(f"n must be 1 (one answer per request), got {merged['n']}.")
            if merged.get("stream") not in (None, False):
                raise BadRequest("stream=true is not available over predict: use predict_stream "
                                 "in Python (MLflow serving has no streaming over REST).")
            if isinstance(row["messages"], list):
                self._check_size(sum(len(m.get("content") or "") for m in row["messages"]
                                     if isinstance(m, dict) and isinstance(m.get("content"), str)))
            chat = contract.chat_request(merged, {}, self)
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
                ids = self.chat_ids([{"role": "user", "content": prompt}])
            else:
                ids = self.encode(prompt)
            chat = contract.Chat(ids, contract.checked_options(merged), None, False)
        contract.check_room(len(chat.ids), chat.options["max_tokens"], self.context_length)
        return chat

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def chat_ids(self, messages: list[dict], always: bool = False) -> list[int]:
        """The conversation's prompt ids, its message text read as text (contract.chat_ids)."""
        return contract.chat_ids(messages, self.render, self.encode, self.encode_text, self.tags,
                                 always)

    def _check_size(self, characters: int) -> None:
        limit = self.context_length * contract.MAX_CHARS_PER_TOKEN
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
        if options["seed"] is not None:
            search["random_seed"] = options["seed"] % contract.SEED_RANGE
        params.set_search_options(**search)
        return params

    # --- generation: one scheduler thread batches whatever requests are in flight ------------

    def _submit(self, requests: list[contract.Chat]) -> list[_Job]:
        jobs = [_Job(r.ids, r.options, r.grammar and contract.Guide(self.grammar_tokenizer,
                                                                     r.grammar))
                for r in requests]
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
        logits = None
        live = [not (job.done or job.cancelled) for job in batch.jobs]
        guided = any(job.guide and on for job, on in zip(batch.jobs, live))
        if guided or any(job.options["logprobs"] for job in batch.jobs):
            # The logits the next tokens are chosen from (get_logits after generate_next_token
            # would already run the step after).
            raw = batch.generator.get_logits()
            logits = raw.reshape(len(batch.jobs), -1).copy()
        if guided:  # each guided row's grammar masks its own logits; the others keep theirs
            masked = logits.copy()
            for row, (job, on) in enumerate(zip(batch.jobs, live)):
                if job.guide and on:
                    job.guide.mask(masked[row])
            batch.generator.set_logits(masked.reshape(raw.shape))
        batch.generator.generate_next_token()
        for row, (job, token) in enumerate(zip(batch.jobs, batch.generator.get_next_tokens())):
            if not (job.done or job.cancelled):  # nobody reads a cancelled row's tokens
                token = int(token)
                if job.guide:
                    job.guide.follow(token)
                entry = None if logits is None or not job.options["logprobs"] else (
                    contract.logprob_entry(logits[row], token, job.options["top_logprobs"],
                                           self.pieces))
                job.put((token, entry))
                job.done = token in self.eos
        if batch.generator.is_done() or all(job.done or job.cancelled for job in batch.jobs):
            for job in batch.jobs:
                job.put(None)  # end of tokens (after an eos, or at max_tokens)
            return True
        return False

    def _answer(self, job: _Job) -> Iterator[contract.Delta]:
        """One request's answer as it grows; whatever ends the reading (a stop string, a
        closed stream) marks the row cancelled, so the scheduler drops it at its next token."""
        stream = self.tokenizer.create_stream()
        try:
            yield from contract.deltas(job.tokens(), stream.decode, self.eos,
                                       job.options["stop"] or [])
        finally:
            job.cancelled = True

    # --- pyfunc API ------------------------------------------------------------------------

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        requests = [self.parse(row, params) for row in _rows(model_input)]
        results = [contract.collected(self._answer(job)) for job in self._submit(requests)]
        if self.interface == "prompt":
            texts = [text.strip() for text, *_ in results]
            return texts[0] if isinstance(model_input, dict) else texts
        return [
            contract.completion(self.model_name, text, finish, len(request.ids), count,
                                entries if request.options["logprobs"] else None, request.calls)
            for request, (text, finish, count, entries) in zip(requests, results)
        ]

    def predict_stream(self, context, model_input, params: dict[str, Any] | None = None):
        rows = _rows(model_input)
        if len(rows) != 1:
            raise BadRequest(f"predict_stream takes one request, got {len(rows)} rows.")
        request = self.parse(rows[0], params)
        (job,) = self._submit([request])
        if self.interface == "prompt":
            yield from (piece.text for piece in self._answer(job) if piece.text)
            return
        yield from contract.chunks(self.model_name, self._answer(job), len(request.ids),
                                   request.options["logprobs"], request.calls)


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

    def __init__(self, ids: list[int], options: dict[str, Any], guide: Any = None):
        self.ids, self.options = ids, options
        self.guide = guide  # the grammar the answer follows (contract.Guide), or None
        self.done = False  # the scheduler saw its eos
        self.cancelled = False  # the caller stopped reading
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item: tuple[int, dict | None] | None | Exception) -> None:
        self._queue.put(item)

    def tokens(self) -> Iterator[tuple[int, dict | None]]:
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
    prompt runs alone, fed in chunks. Stop strings and logprobs are applied per row, so they
    do not split. A seeded row runs alone: rows of one batch draw from one random stream, so a
    batch-mate would change what the seed gives.
    """
    groups: dict[str, list[_Job]] = {}
    for job in jobs:
        key = {k: v for k, v in job.options.items() if k not in ("stop", "logprobs",
                                                                   "top_logprobs")}
        if job.options["seed"] is not None:
            key["row"] = id(job)
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


mlflow.models.set_model(OnnxChatModel())

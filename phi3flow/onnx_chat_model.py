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
  a batch's prefill is capped at BATCH_PREFILL tokens (256): rows of 256 tokens or more run
  alone. A process that only scores batches (batch_score's Spark workers) raises the cap with
  PHI3FLOW_ONNX_BATCH_PREFILL: a batch's one-call prefill costs no more per token than a
  row's, and then its rows share every decode step (docs/decisions.md, "Batching").
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
import weakref
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
BATCH_PREFILL = 256  # tokens (rows x longest prompt) a batch may prefill in one call
BATCH_PREFILL_ENV = "PHI3FLOW_ONNX_BATCH_PREFILL"  # overrides BATCH_PREFILL
MAX_BATCH_WAIT_S = 0.02  # the longest an idle scheduler waits for a request's batch-mates
SCHEDULER_IDLE_CHECK_S = 1.0  # how often an idle scheduler checks that its model is still held
PREFIX_CACHE_ENV = "PHI3FLOW_ONNX_PREFIX_CACHE_MB"  # the prefix cache's budget; 0 turns it off
MAX_PREFIX_CACHE_MB = 4096  # the default budget: a quarter of the machine's memory, at most this
# Room a kept request's KV cache holds beyond its prompt and max_tokens, for its conversation's
# next turns: half the prompt, within these bounds. Growing with the conversation, a turn that no
# longer fits starts a generator with room for as many tokens again (as a list doubles), so a long
# conversation re-reads its history a handful of times, not every few turns; and a short request
# does not take (and fault in) memory for a long one: each fresh megabyte costs a page fault.
MIN_PREFIX_HEADROOM = 64  # tokens: a 16-token prompt's room costs 50 MB of fp32 cache, ~1% TTFT
MAX_PREFIX_HEADROOM = 1024  # tokens: 0.8 GB of the full-size model's fp32 cache
# The first token of a stream is handed to its reader before the next Generator call: those calls
# hold the GIL for a whole step (~0.1 s at full size), which would make the reader wait for it.
FIRST_TOKEN_HANDOVER_S = 0.02  # the front door writes the chunk to its client meanwhile
MIN_PREFIX = 16  # the shortest shared prefix worth reusing (a template header alone is 2-4)
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
        self.alone_chunk = _tokens_setting(ALONE_CHUNK_ENV, ALONE_PREFILL_CHUNK)
        self.batch_prefill = _tokens_setting(BATCH_PREFILL_ENV, BATCH_PREFILL)
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
        self.prefix_cache = _PrefixCache(_prefix_cache_bytes(), self._kv_bytes_per_token(
            genai_config))
        self._lock = threading.Lock()
        self._scheduler: threading.Thread | None = None
        self._step_seconds = 0.0  # the last decode step's duration
        self._together = 0  # the most requests in flight at once since the scheduler was idle

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

    def _kv_bytes_per_token(self, genai_config: dict[str, Any]) -> int:
        """Bytes of KV cache a token takes in this build (keys and values of every layer, in the
        cache's dtype: read off a one-token generator's output, as the graph has it)."""
        decoder = genai_config["model"]["decoder"]
        elements = 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder[
            "head_size"]
        try:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=2)
            generator = self.og.Generator(self.model, params)
            generator.append_tokens([self.pad_token_id])
            itemsize = generator.get_output("present.0.key").dtype.itemsize
        except Exception:  # noqa: BLE001 - a graph with other output names: assume fp32, the most
            itemsize = 4
        return elements * itemsize

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

    def _submit(self, requests: list[contract.Chat], streamed: bool = False) -> list[_Job]:
        jobs = [_Job(r.ids, r.options, r.grammar and contract.Guide(self.grammar_tokenizer,
                                                                     r.grammar), streamed)
                for r in requests]
        with self._lock:  # start the scheduler on first use (and again after a fork)
            if self._scheduler is None or not self._scheduler.is_alive():
                # The thread gets a weak reference: a bound method would keep the model (its
                # weights, its kept KV caches) alive for as long as the process lives.
                self._scheduler = threading.Thread(
                    target=_schedule, args=(weakref.ref(self), self._inbox), daemon=True,
                    name="onnx-chat-scheduler")
                self._scheduler.start()
        self._inbox.put(jobs)  # one call's rows arrive together, so they can share a batch
        return jobs

    def _work(self, arrived: list[list[_Job]]) -> None:
        """Run every active batch one step at a time, starting new batches as requests come,
        until none is left (`arrived`: the requests that woke the scheduler).

        Each step is one Generator call: a prompt chunk or one new token per row. Requests that
        arrive while a step runs are batched together at the next turn, so concurrent clients
        share decode steps (decode is memory-bound: a batch of 4 costs about one row's step),
        and no request waits for an unrelated one to finish before it starts.
        """
        active: list[_Batch] = []
        while True:
            if not active:
                if self._step_seconds and self._together > 1:
                    # Idle after concurrent requests: clients whose answers ended together send
                    # their next requests a few milliseconds apart. Wait a fraction of one step
                    # for them, so they share a batch instead of each starting its own (which
                    # would share no steps). A lone client's next request does not wait.
                    time.sleep(min(self._step_seconds / 4, MAX_BATCH_WAIT_S))
                    arrived += _drain(self._inbox)
                self._together = 0
            waiting = [job for jobs in arrived for job in jobs]
            # A request that continues a kept sequence runs alone, on that sequence's generator.
            continuing = [job for job in waiting if self.prefix_cache.fits(job)]
            waiting = [job for job in waiting if job not in continuing]
            for group in [[job] for job in continuing] + _batches(waiting, self.batch_prefill):
                try:
                    active.append(self._start(group))
                except Exception as exc:  # noqa: BLE001 (handed to the waiting callers)
                    for job in group:
                        job.put(exc)
            self._together = max(self._together, sum(len(batch.jobs) for batch in active))
            for batch in list(active):
                alone = len(active) == 1 and self._inbox.empty()
                try:
                    decoding, started = batch.prompt is None, time.perf_counter()
                    finished = self._step(batch, alone)
                    if decoding:
                        self._step_seconds = time.perf_counter() - started
                except Exception as exc:  # noqa: BLE001
                    for job in batch.jobs:
                        job.put(exc)
                    finished = True
                if finished:
                    active.remove(batch)
                    # Its KV cache goes now (unless the prefix cache kept the generator), not
                    # when the loop variable is next overwritten.
                    batch.generator = None
            arrived = _drain(self._inbox)
            if not active and not arrived:
                return

    def _start(self, jobs: list[_Job]) -> _Batch:
        options = jobs[0].options
        longest = max(len(job.ids) for job in jobs)
        if len(jobs) == 1:
            (job,) = jobs
            kept = self.prefix_cache.take(job)
            if kept is not None:  # rewound to the shared prefix: only the rest is fed
                generator, job.cached_tokens, max_length = kept
                return _Batch(jobs, generator, list(job.ids[job.cached_tokens:]), max_length)
        # A lone request that may be kept gets room for its conversation's next turns.
        keeps = len(jobs) == 1 and self.prefix_cache.keeps(jobs[0])
        room = prefix_room(longest) if keeps else 0
        max_length = min(self.context_length, longest + options["max_tokens"] + room)
        if keeps:  # evict first: the memory of what goes is reused, not faulted in afresh
            self.prefix_cache.make_room(max_length)
        params = self._search_options(options, max_length, len(jobs))
        generator = self.og.Generator(self.model, params)
        if len(jobs) == 1:  # fed in chunks, one per scheduler turn: other batches go on meanwhile
            return _Batch(jobs, generator, list(jobs[0].ids), max_length)
        # onnxruntime-genai takes a batch's prompts in one call (right-padded)
        padded = np.full((len(jobs), longest), self.pad_token_id, dtype=np.int32)
        for row, job in enumerate(jobs):
            padded[row, : len(job.ids)] = job.ids
        return _Batch(jobs, generator, padded, max_length)

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
                job.generated += 1
                # an eos, or max_tokens (the generator itself may have room beyond it)
                job.done = token in self.eos or job.generated >= job.options["max_tokens"]
        _hand_over([job for job in batch.jobs if job.streamed and job.generated == 1])
        if batch.generator.is_done() or all(job.done or job.cancelled for job in batch.jobs):
            for job in batch.jobs:
                job.put(None)  # end of tokens (after an eos, or at max_tokens)
            if len(batch.jobs) == 1:
                self.prefix_cache.keep(batch.jobs[0], batch.generator, batch.max_length)
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
        jobs = self._submit(requests)
        results = [contract.collected(self._answer(job)) for job in jobs]
        if self.interface == "prompt":
            texts = [text.strip() for text, *_ in results]
            return texts[0] if isinstance(model_input, dict) else texts
        return [
            contract.completion(self.model_name, text, finish, len(request.ids), count,
                                entries if request.options["logprobs"] else None, request.calls,
                                job.cached_tokens)
            for request, job, (text, finish, count, entries) in zip(requests, jobs, results)
        ]

    def predict_stream(self, context, model_input, params: dict[str, Any] | None = None):
        rows = _rows(model_input)
        if len(rows) != 1:
            raise BadRequest(f"predict_stream takes one request, got {len(rows)} rows.")
        request = self.parse(rows[0], params)
        (job,) = self._submit([request], streamed=True)
        if self.interface == "prompt":
            yield from (piece.text for piece in self._answer(job) if piece.text)
            return
        yield from contract.chunks(self.model_name, self._answer(job), len(request.ids),
                                   request.options["logprobs"], request.calls,
                                   lambda: job.cached_tokens)


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


def _tokens_setting(env: str, default: int) -> int:
    """A number of tokens from the environment variable `env`, else `default`."""
    value = os.environ.get(env, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise MlflowException(f"{env}={value!r} must be a whole number of tokens >= 1; unset it "
                              f"for {default}.")
    return int(value)


class _Job:
    """One request row on its way through the scheduler: its tokens arrive on a queue."""

    def __init__(self, ids: list[int], options: dict[str, Any], guide: Any = None,
                 streamed: bool = False):
        self.ids, self.options = ids, options
        self.guide = guide  # the grammar the answer follows (contract.Guide), or None
        self.generated = 0  # tokens generated so far
        self.cached_tokens = 0  # prompt tokens whose KV cache a kept generator held
        self.streamed = streamed  # read token by token (predict_stream): its first token is handed over
        self.asked = 0  # how many times the reader has asked for its next token
        self.done = False  # the scheduler saw its eos
        self.cancelled = False  # the caller stopped reading
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item: tuple[int, dict | None] | None | Exception) -> None:
        self._queue.put(item)

    def tokens(self) -> Iterator[tuple[int, dict | None]]:
        while True:
            self.asked += 1  # the previous item is handled: the reader is back for the next
            if (item := self._queue.get()) is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class _Batch:
    def __init__(self, jobs: list[_Job], generator: Any, prompt: list[int] | np.ndarray,
                 max_length: int):
        # prompt: what is still to be fed (a row's token ids, or a padded batch); None once fed.
        self.jobs, self.generator, self.max_length = jobs, generator, max_length
        self.prompt: list[int] | np.ndarray | None = prompt


class _Kept:
    """A finished request's generator, kept with the tokens its KV cache holds."""

    def __init__(self, key: str, generator: Any, sequence: np.ndarray, max_length: int,
                 nbytes: int):
        self.key, self.generator, self.sequence = key, generator, sequence
        self.max_length, self.nbytes = max_length, nbytes


class _PrefixCache:
    """Finished generators kept for requests whose prompt begins as their sequence did.

    A chat client sends the whole conversation each turn; a request whose token ids share a
    prefix of at least MIN_PREFIX tokens with a kept generator's sequence takes that generator,
    rewinds it to the shared prefix (`rewind_to` cuts its KV cache there) and is fed only the
    rest, so a follow-up turn's first token costs its new tokens, not the whole history. What a
    generator fixes at creation is part of the key (search options) or checked (its max_length
    must hold the new prompt and max_tokens). A seeded request is neither kept nor served from
    the cache: its random stream must start afresh. Kept generators hold their KV cache, so the
    cache is bounded by a budget in bytes (each generator's max_length times the KV bytes a
    token takes), the least recently used evicted first. Only the scheduler thread uses it.
    """

    def __init__(self, budget_bytes: int, kv_bytes_per_token: int):
        self.budget, self.per_token = budget_bytes, kv_bytes_per_token
        self.kept: list[_Kept] = []  # least recently used first
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.kept)

    def keeps(self, job: _Job) -> bool:
        """Whether this request's generator may be kept (and served from the cache)."""
        return self.budget > 0 and job.options["seed"] is None

    def _best(self, job: _Job) -> tuple[_Kept, int] | None:
        if not self.keeps(job):
            return None
        ids, key, best = np.asarray(job.ids, dtype=np.int64), _key(job.options), None
        for kept in self.kept:
            if kept.key != key or kept.max_length < len(ids) + job.options["max_tokens"]:
                continue
            n = min(len(ids), len(kept.sequence))
            differs = np.flatnonzero(ids[:n] != kept.sequence[:n])
            shared = int(differs[0]) if differs.size else n
            if shared >= MIN_PREFIX and (best is None or shared > best[1]):
                best = (kept, shared)
        return best

    def fits(self, job: _Job) -> bool:
        """Whether a kept generator would serve this request."""
        return self._best(job) is not None

    def take(self, job: _Job) -> tuple[Any, int, int] | None:
        """(a kept generator rewound for `job`, the prompt tokens it holds, its max_length), or
        None (a miss)."""
        found = self._best(job)
        if found is None:
            self.misses += self.keeps(job)
            return None
        kept, shared = found
        self.kept.remove(kept)
        self.hits += 1
        # At least one prompt token is fed again: its step gives the first answer token's
        # logits. And the sequence's last token was chosen but never fed (no KV of its own).
        reuse = min(shared, len(job.ids) - 1, len(kept.sequence) - 1)
        kept.generator.rewind_to(reuse)
        return kept.generator, reuse, kept.max_length

    def make_room(self, max_length: int) -> None:
        """Evict the least recently used until a generator of max_length tokens fits."""
        while self.kept and self.nbytes + max_length * self.per_token > self.budget:
            self.kept.pop(0)  # its generator, and its KV cache, go with it

    def keep(self, job: _Job, generator: Any, max_length: int) -> None:
        """Keep a finished request's generator, evicting the least recently used to stay within
        the budget (a generator larger than the whole budget is not kept)."""
        nbytes = max_length * self.per_token
        if not self.keeps(job) or nbytes > self.budget:
            return
        sequence = np.asarray(generator.get_sequence(0), dtype=np.int64)
        self.make_room(max_length)
        self.kept.append(_Kept(_key(job.options), generator, sequence, max_length, nbytes))


def _key(options: dict[str, Any]) -> str:
    """What a generator fixes at creation besides its max_length: the search options."""
    sampled = options["temperature"] > 0
    return json.dumps({"temperature": options["temperature"],
                       **({"top_p": options["top_p"], "top_k": options["top_k"]} if sampled
                          else {})})


def _prefix_cache_bytes() -> int:
    """The prefix cache's budget: PHI3FLOW_ONNX_PREFIX_CACHE_MB (0 turns it off), else a
    quarter of the machine's memory, at most MAX_PREFIX_CACHE_MB."""
    value = os.environ.get(PREFIX_CACHE_ENV, "")
    if value:
        if not value.isdigit():
            raise MlflowException(f"{PREFIX_CACHE_ENV}={value!r} must be a whole number of MB "
                                  ">= 0 (0 turns the prefix cache off); unset it for the "
                                  "default.")
        return int(value) * 2**20
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 16 * 2**30
    return min(MAX_PREFIX_CACHE_MB * 2**20, memory // 4)


def prefix_room(prompt_tokens: int) -> int:
    """Tokens of room a kept request's KV cache gets beyond its prompt and max_tokens."""
    return min(max(prompt_tokens // 2, MIN_PREFIX_HEADROOM), MAX_PREFIX_HEADROOM)


def _hand_over(jobs: list[_Job]) -> None:
    """Let these streams' readers take their first token before the scheduler's next Generator
    call, which holds the GIL for a whole step: waits until each reader is back for its next
    token (or stopped), at most FIRST_TOKEN_HANDOVER_S. Measured on the full-size model, 2 cores:
    without it a stream's first token reached its reader one decode step late (+0.13 s TTFT)."""
    deadline = time.perf_counter() + FIRST_TOKEN_HANDOVER_S
    while any(job.asked < 2 and not job.cancelled for job in jobs):
        if time.perf_counter() > deadline:
            return
        time.sleep(0.0001)  # releases the GIL to the readers


def _schedule(model: weakref.ref[OnnxChatModel], inbox: queue.SimpleQueue) -> None:
    """The scheduler thread. It holds its model only while there is work: a model nobody else
    holds is freed, and the thread ends. (A caller waiting for its answer holds the model.)"""
    while True:
        try:
            arrived = [inbox.get(timeout=SCHEDULER_IDLE_CHECK_S)]
        except queue.Empty:
            if model() is None:
                return
            continue
        working = model()
        if working is None:
            return
        working._work(arrived)
        del working


def _drain(inbox: queue.SimpleQueue) -> list[Any]:
    """What is in the inbox now, without waiting."""
    items = []
    with contextlib.suppress(queue.Empty):
        while True:
            items.append(inbox.get_nowait())
    return items


def _batches(jobs: list[_Job], cap: int) -> list[list[_Job]]:
    """Jobs that share generation options, in batches whose one-call prefill stays small.

    A batch's prompts go in with one call that holds the GIL (and every other batch) for its
    whole length, so rows x longest prompt is capped at `cap` tokens; a longer
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
            if batch and longest * (len(batch) + 1) > cap:
                batches.append(batch)
                batch = []
            batch.append(job)
        batches.append(batch)
    return batches


mlflow.models.set_model(OnnxChatModel())

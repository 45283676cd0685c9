"""The ONNX chat model's scheduler: how concurrent requests share one model.

Design, for serving (`mlflow models serve` calls predict from several threads at once):
- One `og.Model` and `og.Tokenizer`, loaded once in load_context and only read afterwards.
- One scheduler thread runs all generation. predict/predict_stream hand it their rows and read
  the tokens back from a queue per row (decoding text and stop strings in the caller's thread).
  Each turn it starts a batch for the rows that arrived meanwhile (rows sharing generation
  options share one Generator) and advances every active batch by one Generator call. So
  concurrent requests share decode steps, which are memory-bound: on the full-size model a
  batch of 4 rows gives about twice one row's tokens/s (docs/decisions.md; served clients:
  docs/performance.md). onnxruntime-genai cannot add
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
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from .answer import Delta, deltas, logprob_entry
from .grammar import Guide
from .prefix_cache import prefix_room
from .request import SEED_RANGE
from .runtime import Chat

PREFILL_CHUNK = 16  # prompt tokens per call beside other requests: ~0.3 s, full size, 2 cores
ALONE_PREFILL_CHUNK = 256  # prompt tokens per call while nothing else is queued or running
ALONE_CHUNK_ENV = "PHI3FLOW_ONNX_PREFILL_CHUNK"  # overrides ALONE_PREFILL_CHUNK
THREADS_ENV = "PHI3FLOW_ONNX_THREADS"
BATCH_PREFILL = 256  # tokens (rows x longest prompt) a batch may prefill in one call
BATCH_PREFILL_ENV = "PHI3FLOW_ONNX_BATCH_PREFILL"  # overrides BATCH_PREFILL
THREADS_ENV = "PHI3FLOW_ONNX_THREADS"  # onnxruntime threads per model (onnx_runtime._threads)
MAX_BATCH_WAIT_S = 0.02  # the longest an idle scheduler waits for a request's batch-mates
SCHEDULER_IDLE_CHECK_S = 1.0  # how often an idle scheduler checks that its model is still held
# The first token of a stream is handed to its reader before the next Generator call: those calls
# hold the GIL for a whole step (~0.1 s at full size), which would make the reader wait for it.
FIRST_TOKEN_HANDOVER_S = 0.02  # the front door writes the chunk to its client meanwhile


class Scheduler:
    """The ONNX model's generation, mixed into it: one scheduler thread batches whatever
    requests are in flight. It uses the model's `og`, `model`, `tokenizer`, `eos`, `pieces`,
    `pad_token_id`, `context_length`, `grammar_tokenizer`, `prefix_cache`, `alone_chunk` and
    `batch_prefill`, and `start_scheduling()` sets up its own state."""

    def start_scheduling(self) -> None:
        self._inbox: queue.SimpleQueue[list[Job]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._scheduler: threading.Thread | None = None
        self._step_seconds = 0.0  # the last decode step's duration
        self._together = 0  # the most requests in flight at once since the scheduler was idle

    def _search_options(self, options: dict[str, Any], max_length: int, batch_size: int):
        params = self.og.GeneratorParams(self.model)
        search = {"max_length": max_length, "batch_size": batch_size}
        if options["temperature"] > 0:
            search.update(do_sample=True, temperature=options["temperature"],
                          top_p=options["top_p"], top_k=options["top_k"])
        else:
            search.update(do_sample=False)
        if options["seed"] is not None:
            search["random_seed"] = options["seed"] % SEED_RANGE
        params.set_search_options(**search)
        return params

    # --- generation: one scheduler thread batches whatever requests are in flight ------------

    def _submit(self, requests: list[Chat], streamed: bool = False) -> list[Job]:
        jobs = [Job(r.ids, r.options, r.grammar and Guide(self.grammar_tokenizer,
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

    def _work(self, arrived: list[list[Job]]) -> None:
        """Run every active batch one step at a time, starting new batches as requests come,
        until none is left (`arrived`: the requests that woke the scheduler).

        Each step is one Generator call: a prompt chunk or one new token per row. Requests that
        arrive while a step runs are batched together at the next turn, so concurrent clients
        share decode steps (decode is memory-bound: a batch of 4 gives about twice one row's
        tokens/s),
        and no request waits for an unrelated one to finish before it starts.
        """
        active: list[Batch] = []
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
            for group in [[job] for job in continuing] + batches(waiting, self.batch_prefill):
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

    def _start(self, jobs: list[Job]) -> Batch:
        options = jobs[0].options
        longest = max(len(job.ids) for job in jobs)
        if len(jobs) == 1:
            (job,) = jobs
            kept = self.prefix_cache.take(job)
            if kept is not None:  # rewound to the shared prefix: only the rest is fed
                generator, job.cached_tokens, max_length = kept
                return Batch(jobs, generator, list(job.ids[job.cached_tokens:]), max_length)
        # A lone request that may be kept gets room for its conversation's next turns.
        keeps = len(jobs) == 1 and self.prefix_cache.keeps(jobs[0])
        room = prefix_room(longest) if keeps else 0
        max_length = min(self.context_length, longest + options["max_tokens"] + room)
        if keeps:  # evict first: the memory of what goes is reused, not faulted in afresh
            self.prefix_cache.make_room(max_length)
        params = self._search_options(options, max_length, len(jobs))
        generator = self.og.Generator(self.model, params)
        if len(jobs) == 1:  # fed in chunks, one per scheduler turn: other batches go on meanwhile
            return Batch(jobs, generator, list(jobs[0].ids), max_length)
        # onnxruntime-genai takes a batch's prompts in one call (right-padded)
        padded = np.full((len(jobs), longest), self.pad_token_id, dtype=np.int32)
        for row, job in enumerate(jobs):
            padded[row, : len(job.ids)] = job.ids
        return Batch(jobs, generator, padded, max_length)

    def _step(self, batch: Batch, alone: bool) -> bool:
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
                    logprob_entry(logits[row], token, job.options["top_logprobs"],
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

    def _answer(self, job: Job) -> Iterator[Delta]:
        """One request's answer as it grows; whatever ends the reading (a stop string, a
        closed stream) marks the row cancelled, so the scheduler drops it at its next token."""
        stream = self.tokenizer.create_stream()
        try:
            yield from deltas(job.tokens(), stream.decode, self.eos,
                                       job.options["stop"] or [])
        finally:
            job.cancelled = True


def tokens_setting(env: str, default: int) -> int:
    """A number of tokens from the environment variable `env`, else `default`."""
    value = os.environ.get(env, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise MlflowException(f"{env}={value!r} must be a whole number of tokens >= 1; unset it "
                              f"for {default}.")
    return int(value)


class Job:
    """One request row on its way through the scheduler: its tokens arrive on a queue."""

    def __init__(self, ids: list[int], options: dict[str, Any], guide: Any = None,
                 streamed: bool = False):
        self.ids, self.options = ids, options
        self.guide = guide  # the grammar the answer follows (Guide), or None
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


class Batch:
    def __init__(self, jobs: list[Job], generator: Any, prompt: list[int] | np.ndarray,
                 max_length: int):
        # prompt: what is still to be fed (a row's token ids, or a padded batch); None once fed.
        self.jobs, self.generator, self.max_length = jobs, generator, max_length
        self.prompt: list[int] | np.ndarray | None = prompt



def _hand_over(jobs: list[Job]) -> None:
    """Let these streams' readers take their first token before the scheduler's next Generator
    call, which holds the GIL for a whole step: waits until each reader is back for its next
    token (or stopped), at most FIRST_TOKEN_HANDOVER_S. Measured on the full-size model, 2 cores:
    without it a stream's first token reached its reader one decode step late (+0.13 s TTFT)."""
    deadline = time.perf_counter() + FIRST_TOKEN_HANDOVER_S
    while any(job.asked < 2 and not job.cancelled for job in jobs):
        if time.perf_counter() > deadline:
            return
        time.sleep(0.0001)  # releases the GIL to the readers


def _schedule(model: weakref.ref[Scheduler], inbox: queue.SimpleQueue) -> None:
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


def batches(jobs: list[Job], cap: int) -> list[list[Job]]:
    """Jobs that share generation options, in batches whose one-call prefill stays small.

    A batch's prompts go in with one call that holds the GIL (and every other batch) for its
    whole length, so rows x longest prompt is capped at `cap` tokens; a longer
    prompt runs alone, fed in chunks. Stop strings and logprobs are applied per row, so they
    do not split. A seeded row runs alone: rows of one batch draw from one random stream, so a
    batch-mate would change what the seed gives.
    """
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        key = {k: v for k, v in job.options.items() if k not in ("stop", "logprobs",
                                                                   "top_logprobs")}
        if job.options["seed"] is not None:
            key["row"] = id(job)
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(job)
    batches = []
    for group in groups.values():
        batch: list[Job] = []
        for job in sorted(group, key=lambda j: len(j.ids)):
            longest = max([len(job.ids)] + [len(j.ids) for j in batch])
            if batch and longest * (len(batch) + 1) > cap:
                batches.append(batch)
                batch = []
            batch.append(job)
        batches.append(batch)
    return batches


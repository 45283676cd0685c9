"""The ONNX model's prefix cache: finished generators kept, so a conversation's next turn
computes only its new tokens."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

PREFIX_CACHE_ENV = "PHI3FLOW_ONNX_PREFIX_CACHE_MB"  # the prefix cache's budget; 0 turns it off
MAX_PREFIX_CACHE_MB = 4096  # the default budget: a quarter of the machine's memory, at most this
# Room a kept request's KV cache holds beyond its prompt and max_tokens, for its conversation's
# next turns: half the prompt, within these bounds. Growing with the conversation, a turn that no
# longer fits starts a generator with room for as many tokens again (as a list doubles), so a long
# conversation re-reads its history a handful of times, not every few turns; and a short request
# does not take (and fault in) memory for a long one: each fresh megabyte costs a page fault.
MIN_PREFIX_HEADROOM = 64  # tokens: a 16-token prompt's room costs 50 MB of fp32 cache, ~1% TTFT
MAX_PREFIX_HEADROOM = 1024  # tokens: 0.8 GB of the full-size model's fp32 cache
MIN_PREFIX = 16  # the shortest shared prefix worth reusing (a template header alone is 2-4)


class Kept:
    """A finished request's generator, kept with the tokens its KV cache holds."""

    def __init__(self, key: str, generator: Any, sequence: np.ndarray, max_length: int,
                 nbytes: int):
        self.key, self.generator, self.sequence = key, generator, sequence
        self.max_length, self.nbytes = max_length, nbytes


class PrefixCache:
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
        self.kept: list[Kept] = []  # least recently used first
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.kept)

    def keeps(self, job: Any) -> bool:
        """Whether this request's generator may be kept (and served from the cache)."""
        return self.budget > 0 and job.options["seed"] is None

    def _best(self, job: Any) -> tuple[Kept, int] | None:
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

    def fits(self, job: Any) -> bool:
        """Whether a kept generator would serve this request."""
        return self._best(job) is not None

    def take(self, job: Any) -> tuple[Any, int, int] | None:
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

    def keep(self, job: Any, generator: Any, max_length: int) -> None:
        """Keep a finished request's generator, evicting the least recently used to stay within
        the budget (a generator larger than the whole budget is not kept)."""
        nbytes = max_length * self.per_token
        if not self.keeps(job) or nbytes > self.budget:
            return
        sequence = np.asarray(generator.get_sequence(0), dtype=np.int64)
        self.make_room(max_length)
        self.kept.append(Kept(_key(job.options), generator, sequence, max_length, nbytes))


def _key(options: dict[str, Any]) -> str:
    """What a generator fixes at creation besides its max_length: the search options."""
    sampled = options["temperature"] > 0
    return json.dumps({"temperature": options["temperature"],
                       **({"top_p": options["top_p"], "top_k": options["top_k"]} if sampled
                          else {})})


def budget_bytes() -> int:
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


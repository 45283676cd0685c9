"""The transformers chat model behind the front door: its own pipeline, driven token by token.

MLflow's transformers flavor answers an `llm/v1/chat` request through its pipeline in one call,
and a request can carry nothing else to `generate` (no params schema; JSON cannot carry a logits
processor; docs/decisions.md): it cannot stream, sample unless it was logged to, take a seed,
report logprobs, or keep control tags out of message text. So the front door loads the model
with MLflow (the same artifacts, `mlflow.pyfunc.load_model`) and calls the pipeline's
`model.generate` itself, the way MLflow's flavor does: the same prompt tokens (the chat
template, the tokenizer's own special tokens), the same generation defaults (the logged
`model_config`), the same answer text, so greedy answers are MLflow's token for token
(tests/e2e/test_front_door.py). Around it: a streamer, a stop check, and a logits recorder; the
answer is assembled by the ONNX model's own code (`deltas`, `completion`, `chunks`), so both
runtimes answer, stream, stop and report logprobs alike.

A transformers model is not safe to call from several threads at once: one request generates at
a time (`lock`), in a thread of its own, handing tokens to the caller through a queue.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

from .answer import Delta, chunks, collected, completion, deltas, logprob_entry, token_bytes
from .grammar import Guide, grammar_tokenizer
from .prompt import added_tokens, chat_ids, keeps_system, plain_text_encoder
from .request import DEFAULTS, SEED_RANGE, ChatRequest, checked_options
from .runtime import Chat, prepare


class TransformersChat:
    """The chat runtime interface (runtime.ChatRuntime: prepare, complete, stream) on a logged
    `mlflow.transformers` llm/v1/chat model loaded as a pyfunc."""

    def __init__(self, pyfunc: Any):
        wrapper = pyfunc._model_impl  # MLflow's _TransformersWrapper: pipeline and model_config
        self.model = wrapper.pipeline.model
        self.tokenizer = wrapper.pipeline.tokenizer
        self.model_name = wrapper.flavor_config.get("source_model_name", "")
        self.context_length = int(self.model.config.max_position_embeddings)
        logged = dict(wrapper.model_config or {})
        sampled = bool(logged.get("do_sample"))
        self.defaults = checked_options({
            "max_tokens": logged.get("max_new_tokens", DEFAULTS["max_tokens"]),
            "temperature": logged.get("temperature", 1.0) if sampled else 0.0,
            "top_p": logged.get("top_p", DEFAULTS["top_p"]),
            "top_k": logged.get("top_k", DEFAULTS["top_k"]),
        })
        tokenizer_json = self.tokenizer.backend_tokenizer.to_str()
        self.tags = added_tokens(tokenizer_json)
        self.encode_text = plain_text_encoder(tokenizer_json)
        self.pieces = token_bytes(tokenizer_json)
        eos = self.model.generation_config.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_token_id = self.model.generation_config.pad_token_id or min(self.eos, default=0)
        self.keeps_system = keeps_system(self.render)
        self.grammar_tokenizer = grammar_tokenizer(
            tokenizer_json, int(self.model.config.vocab_size), sorted(self.eos))
        self.lock = threading.Lock()

    # --- prompts ---------------------------------------------------------------------------

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The tokenizer's default special tokens (a BOS for Phi-3), as MLflow's pipeline has it.
        return list(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: list[dict], always: bool = False) -> list[int]:
        return chat_ids(messages, self.render, self.encode, self.encode_text, self.tags, always)

    # --- the chat runtime interface (runtime.ChatRuntime) ----------------------------------

    def prepare(self, request: ChatRequest) -> Chat:
        return prepare(request, self)

    # Nothing is cached between requests here: cached_tokens is 0, so both runtimes' usage has
    # the same fields (prompt_tokens_details.cached_tokens).
    def complete(self, chat: Chat) -> dict[str, Any]:
        text, finish, count, entries = collected(self._answer(chat))
        return completion(self.model_name, text, finish, len(chat.ids), count,
                          entries if chat.options["logprobs"] else None, chat.calls,
                          cached_tokens=0)

    def stream(self, chat: Chat) -> Iterator[dict[str, Any]]:
        yield from chunks(self.model_name, self._answer(chat), len(chat.ids),
                          chat.options["logprobs"], chat.calls, lambda: 0)

    # --- generation --------------------------------------------------------------------------

    def _answer(self, chat: Chat) -> Iterator[Delta]:
        """The answer's deltas; closing the iterator (a stop string, a client that left) stops
        the generation at its next token."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        backend = self.tokenizer.backend_tokenizer
        stopped = threading.Event()
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        worker = threading.Thread(target=self._generate, args=(chat, tokens, stopped),
                                  daemon=True, name="transformers-generate")
        worker.start()

        def generated() -> Iterator[tuple[int, dict | None]]:
            while (item := tokens.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item

        try:
            yield from deltas(generated(), lambda token: stream.step(backend, token) or "",
                              self.eos, chat.options["stop"] or [])
        finally:
            stopped.set()
            worker.join()  # within one decode step: the stop check runs at each token

    def _generate(self, chat: Chat, tokens: queue.SimpleQueue, stopped: threading.Event) -> None:
        """model.generate for one request, under the lock, each token (with its logprob entry
        when asked) put on `tokens`, then None (or the error)."""
        import torch
        import transformers

        ids, options = chat.ids, chat.options
        pieces, top = self.pieces, options["top_logprobs"]
        guide = Guide(self.grammar_tokenizer, chat.grammar) if chat.grammar else None
        last_logits: list[Any] = []  # the logits of the step being decided

        class Recorder(transformers.LogitsProcessor):
            """Keeps the step's raw logits (custom processors run before temperature, top-k
            and top-p: the logprobs are the model's own)."""

            def __call__(self, input_ids, scores):
                last_logits[:] = [scores[0].float().numpy().copy()]
                return scores

        class Guided(transformers.LogitsProcessor):
            """The grammar's mask (after the recorder: logprobs stay the model's own)."""

            def __call__(self, input_ids, scores):
                if input_ids.shape[1] > len(ids):  # the last step's token moves the grammar on
                    guide.follow(int(input_ids[0, -1]))
                allowed = torch.from_numpy(guide.allowed(scores.shape[-1]))
                return scores.masked_fill(~allowed, float("-inf"))

        class Streamer(transformers.generation.streamers.BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate hands over the prompt first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    entry = (logprob_entry(last_logits[0], token, top, pieces)
                             if options["logprobs"] and last_logits else None)
                    tokens.put((int(token), entry))

            def end(self):
                pass

        class Stop(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stopped.is_set(), dtype=torch.bool)

        sampled = options["temperature"] > 0
        kwargs = dict(
            max_new_tokens=options["max_tokens"], pad_token_id=self.pad_token_id,
            do_sample=sampled, streamer=Streamer(),
            stopping_criteria=transformers.StoppingCriteriaList([Stop()]),
            logits_processor=transformers.LogitsProcessorList(
                ([Recorder()] if options["logprobs"] else []) + ([Guided()] if guide else [])),
        )
        if sampled:
            kwargs.update(temperature=options["temperature"], top_p=options["top_p"],
                          top_k=options["top_k"])
        try:
            while not self.lock.acquire(timeout=0.1):
                if stopped.is_set():  # the caller left while it waited its turn
                    return
            try:
                seeded = options["seed"] is not None
                # A seed draws from a generator of its own; unseeded requests go on drawing
                # from torch's, which the seeded one leaves as it was.
                with torch.no_grad(), (torch.random.fork_rng(devices=[]) if seeded
                                       else contextlib.nullcontext()):
                    if seeded:
                        torch.manual_seed(options["seed"] % SEED_RANGE)
                    self.model.generate(input_ids=torch.tensor([ids]),
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        **kwargs)
            finally:
                self.lock.release()
        except Exception as exc:  # noqa: BLE001 (handed to the reader, which raises it)
            tokens.put(exc)
        finally:
            tokens.put(None)

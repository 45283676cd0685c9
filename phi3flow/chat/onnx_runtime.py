"""An onnxruntime-genai chat model as an MLflow pyfunc, logged from this file (no pickle).

Self-contained on purpose: MLflow copies this file and the chat core it is part of (the `chat`
folder: request checks, prompt tokens, grammars, answer assembly, the scheduler and the prefix
cache) into the logged model, which needs nothing else from this repository (only mlflow, numpy,
pandas, tokenizers, llguidance and onnxruntime-genai). The front door parses a request with the
same core and hands this model the typed request (`prepare`, then `complete` or `stream`), so
both runtimes answer alike. The scheduler that runs generation is onnx_scheduler.py.

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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

try:  # inside a logged model: MLflow puts its code/ folder, with the chat package, on sys.path
    from chat import answer, grammar, onnx_scheduler, prefix_cache, prompt, request, runtime
except ImportError:  # in this repository
    from phi3flow.chat import (
        answer,
        grammar,
        onnx_scheduler,
        prefix_cache,
        prompt,
        request,
        runtime,
    )

BadRequest, DEFAULTS, OPTIONS = request.BadRequest, request.DEFAULTS, request.OPTIONS

ONNX_ARTIFACT = "onnx"
TEMPLATE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # Phi-3's chat format
# What a predict row may carry: OpenAI's chat fields (the front door refuses the rest itself).
CHAT_FIELDS = ("messages", "n", "stream", "max_completion_tokens", *OPTIONS,
               *request.SHAPE_FIELDS)
PROMPT_FIELDS = ("prompt", *OPTIONS)


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
        {k: request.plain(v) for k, v in row.items() if v is not None and not _is_nan(v)}
        for row in rows
    ]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


class OnnxChatModel(onnx_scheduler.Scheduler, PythonModel):
    """The ONNX chat model: MLflow's pyfunc interface (predict, predict_stream) and the chat
    runtime interface the front door uses (runtime.ChatRuntime: prepare, complete, stream)."""

    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        config = dict(context.model_config or {})
        self.interface = config.get("interface", "chat")
        # The logged generation options, checked once: a request's own options go over them.
        self.defaults = request.checked_options(
            {k: config.get(k, v) for k, v in DEFAULTS.items()})
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
        self.alone_chunk = onnx_scheduler.tokens_setting(onnx_scheduler.ALONE_CHUNK_ENV,
                                                         onnx_scheduler.ALONE_PREFILL_CHUNK)
        self.batch_prefill = onnx_scheduler.tokens_setting(onnx_scheduler.BATCH_PREFILL_ENV,
                                                           onnx_scheduler.BATCH_PREFILL)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
        self.tags = prompt.added_tokens(tokenizer_json)
        self.encode_text = prompt.plain_text_encoder(tokenizer_json)
        self.pieces = answer.token_bytes(tokenizer_json)
        self.keeps_system = prompt.keeps_system(self.render)
        self.grammar_tokenizer = grammar.grammar_tokenizer(
            tokenizer_json, int(genai_config["model"]["vocab_size"]), sorted(self.eos))
        self.prefix_cache = prefix_cache.PrefixCache(
            prefix_cache.budget_bytes(), self._kv_bytes_per_token(genai_config))
        self.start_scheduling()

    # --- the chat runtime interface (runtime.ChatRuntime) ----------------------------------

    def prepare(self, chat_request: request.ChatRequest) -> runtime.Chat:
        return runtime.prepare(chat_request, self)

    def complete(self, chat: runtime.Chat) -> dict[str, Any]:
        (completion,) = self._completions([chat])
        return completion

    def stream(self, chat: runtime.Chat) -> Iterator[dict[str, Any]]:
        (job,) = self._submit([chat], streamed=True)
        yield from answer.chunks(self.model_name, self._answer(job), len(chat.ids),
                                 chat.options["logprobs"], chat.calls, lambda: job.cached_tokens)

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def chat_ids(self, messages: list[dict], always: bool = False) -> list[int]:
        """The conversation's prompt ids, its message text read as text (prompt.chat_ids)."""
        return prompt.chat_ids(messages, self.render, self.encode, self.encode_text, self.tags,
                               always)

    # --- the pyfunc interface: a row of predict's input, parsed at this edge ---------------

    def prepare_row(self, row: dict[str, Any], params: dict[str, Any] | None = None
                    ) -> runtime.Chat:
        """One predict row (with MLflow's `params` under it), checked and tokenized."""
        fields = CHAT_FIELDS if self.interface == "chat" else PROMPT_FIELDS
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field(s) {request.shown(None, 200, str(unknown))}; "
                             f"this model accepts {list(fields)}.")
        merged = {**{k: v for k, v in (params or {}).items() if v is not None}, **row}
        if self.interface == "prompt":
            return self._prompt_chat(merged)
        if "messages" not in row:
            raise BadRequest("the request has no messages: send {\"messages\": [{\"role\": "
                             "\"user\", \"content\": \"...\"}]}.")
        if merged.get("stream") not in (None, False):
            raise BadRequest("stream=true is not available over predict: use predict_stream "
                             "in Python (MLflow serving has no streaming over REST).")
        return self.prepare(request.parse(merged, self.context_length))

    def _prompt_chat(self, merged: dict[str, Any]) -> runtime.Chat:
        text = merged.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("the request needs a non-empty string field prompt: "
                             "{\"prompt\": \"...\"}.")
        request.checked_size(len(text), self.context_length)
        # The Phi-3 cookbook's contract: a prompt already in the chat format (its example:
        # "<|system|>...<|end|><|user|>...<|end|><|assistant|>") goes to the tokenizer as it
        # is. Plain text is wrapped as one user turn with the checkpoint's own template.
        if not any(tag in text for tag in TEMPLATE_TAGS):
            ids = self.chat_ids([{"role": "user", "content": text}])
        else:
            ids = self.encode(text)
        options = request.checked_options({**self.defaults, **{
            k: v for k, v in merged.items() if k in OPTIONS}})
        prompt.check_room(len(ids), options["max_tokens"], self.context_length)
        return runtime.Chat(ids, options, None, False)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        chats = [self.prepare_row(row, params) for row in _rows(model_input)]
        if self.interface == "chat":
            return self._completions(chats)
        texts = [text.strip() for text, *_ in (
            answer.collected(self._answer(job)) for job in self._submit(chats))]
        return texts[0] if isinstance(model_input, dict) else texts

    def predict_stream(self, context, model_input, params: dict[str, Any] | None = None):
        rows = _rows(model_input)
        if len(rows) != 1:
            raise BadRequest(f"predict_stream takes one request, got {len(rows)} rows.")
        chat = self.prepare_row(rows[0], params)
        if self.interface == "chat":
            yield from self.stream(chat)
            return
        (job,) = self._submit([chat], streamed=True)
        yield from (piece.text for piece in self._answer(job) if piece.text)

    def _completions(self, chats: list[runtime.Chat]) -> list[dict[str, Any]]:
        """chat.completions for requests submitted together (so they may share a batch)."""
        jobs = self._submit(chats)
        results = [answer.collected(self._answer(job)) for job in jobs]
        return [
            answer.completion(self.model_name, text, finish, len(chat.ids), count,
                              entries if chat.options["logprobs"] else None, chat.calls,
                              job.cached_tokens)
            for chat, job, (text, finish, count, entries) in zip(chats, jobs, results)
        ]

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


def _threads(genai_config: dict[str, Any]) -> int | None:
    """onnxruntime threads per model: PHI3FLOW_ONNX_THREADS, else the model's own setting, else
    every core this process may use.

    onnxruntime-genai's default used one core of two here (prefill is compute-bound: two threads
    halved it, and decode went from 9 to 14 tokens/s on the full-size model). With several
    serving workers (`mlflow models serve -w N`), give each cores / N.
    """
    value = os.environ.get(onnx_scheduler.THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise MlflowException(f"{onnx_scheduler.THREADS_ENV}={value!r} must be a whole "
                                  "number of threads >= 1; unset it to use every core.")
        return int(value)
    session = genai_config["model"]["decoder"].get("session_options", {})
    if "intra_op_num_threads" in session:
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()



mlflow.models.set_model(OnnxChatModel())

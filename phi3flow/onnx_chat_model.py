"""An onnxruntime-genai chat model as an MLflow pyfunc, logged from this file (no pickle).

Self-contained on purpose: MLflow copies this one file into the logged model, which needs nothing
else from this repository (only mlflow, numpy, pandas, tokenizers and onnxruntime-genai). The
front door (phi3flow/front_door.py) drives the transformers model with the same request checks,
prompt tokens, logprobs and answer assembly, imported from here, so both runtimes answer alike.

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
- Threads: onnxruntime gets every core this process may use (see _threads). The Engine API releases the GIL but, on the CPU build, runs fixed
  batches that queued requests wait for (docs/decisions.md); this scheduler does not make a
  request wait for an unrelated one to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

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
OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "logprobs",
           "top_logprobs")
CHAT_FIELDS = ("messages", "n", "stream", *OPTIONS)
PROMPT_FIELDS = ("prompt", *OPTIONS)
DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 50, "stop": None}
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
SEED_RANGE = 2**31  # onnxruntime-genai's random_seed is a C int: a seed is taken modulo this
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


def checked_stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of non-empty strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}.")
    return stops or None


def checked_seed(value: Any) -> int | None:
    """seed: any integer (OpenAI's range), or None for a fresh random draw."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise BadRequest(f"seed must be an integer, got {_shown(value)}.")
    return int(value)


def checked_logprobs(logprobs: Any, top_logprobs: Any) -> tuple[bool, int]:
    """(logprobs, top_logprobs) as OpenAI takes them: top_logprobs 0-20, only with logprobs."""
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise BadRequest(f"logprobs must be true or false, got {_shown(logprobs)}.")
    if top_logprobs is None:
        return logprobs, 0
    top = checked_number("top_logprobs", top_logprobs, int, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true (it asks for alternatives to each "
                         "answer token's log-probability).")
    return logprobs, top


def checked_options(merged: dict[str, Any]) -> dict[str, Any]:
    """The generation options of a request (defaults filled in), checked: one place for both
    runtimes, so they refuse and accept the same values."""
    logprobs, top_logprobs = checked_logprobs(merged.get("logprobs"), merged.get("top_logprobs"))
    return {
        "max_tokens": checked_number("max_tokens", merged["max_tokens"], int, 1),
        "temperature": checked_number("temperature", merged["temperature"], float, 0),
        "top_p": checked_number("top_p", merged["top_p"], float, 0, 1, low_inclusive=False),
        "top_k": checked_number("top_k", merged["top_k"], int, 1),
        "stop": checked_stop(merged.get("stop")),
        "seed": checked_seed(merged.get("seed")),
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
    }


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


# --- prompt tokens: message text is text -----------------------------------------------------

_SLOT = "\ue000{}\ue001"  # private-use characters no tokenizer maps to a control tag
_SLOT_PATTERN = re.compile("(\ue000\\d+\ue001)")


def chat_ids(messages: list[dict[str, str]], render: Callable[[list[dict]], str],
             encode: Callable[[str], list[int]], encode_text: Callable[[str], list[int]],
             tags: dict[str, int], always: bool = False) -> list[int]:
    """The prompt's token ids, with every message's content tokenized as text.

    A tokenizer reads a control tag (`<|end|>`, `<|assistant|>`: its added tokens, `tags`)
    wherever the text spells it, content included, so typed tags would let a message close its
    own turn and write the next. Tokenizers split text at those tags and tokenize each piece on
    its own (Phi-3's prepends its word-start marker to each piece), so the same ids come from
    splitting only at the template's own tags and tokenizing each piece between them, content
    included, as text (`encode_text`: no tag is read). A prompt whose content spells no tag is
    `encode(render(messages))`, as ever; `always` takes the piecewise path anyway (tests compare
    the two). `encode("")` gives what the tokenizer puts before any text (a BOS, or nothing).
    """
    contents = [m["content"] for m in messages]
    if not always and not any(tag in text for text in contents for tag in tags):
        return encode(render(messages))
    slots = [_SLOT.format(i) for i in range(len(messages))]
    template = render([{**m, "content": slot} for m, slot in zip(messages, slots)])
    filled = _SLOT_PATTERN.sub(lambda found: contents[slots.index(found.group(1))], template)
    if filled != render(messages) or any(template.count(slot) != 1 for slot in slots):
        raise BadRequest("a message spells a control tag of the chat format (such as <|end|>), "
                         "and this model's chat template changes message text, so the tag "
                         "cannot be kept as text: remove it from the message.")
    tag_pattern = re.compile("(" + "|".join(
        re.escape(tag) for tag in sorted(tags, key=len, reverse=True)) + ")")
    ids, text = list(encode("")), ""
    for piece in _SLOT_PATTERN.split(template):
        if _SLOT_PATTERN.fullmatch(piece):
            text += contents[slots.index(piece)]
            continue
        for part in tag_pattern.split(piece):
            if part in tags:
                ids += encode_text(text) if text else []
                ids.append(tags[part])
                text = ""
            else:
                text += part
    return ids + (encode_text(text) if text else [])


def plain_text_encoder(tokenizer_json: str) -> Callable[[str], list[int]]:
    """text -> ids with the `tokenizers` library, reading no control tag (encode_special_tokens)
    and adding nothing before or after: the `encode_text` of chat_ids."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer_json)
    plain.encode_special_tokens = True
    return lambda text: plain.encode(text, add_special_tokens=False).ids


def added_tokens(tokenizer_json: str) -> dict[str, int]:
    """Every added token (control tags, BOS, EOS, ...) of a tokenizer.json: text -> id."""
    return {t["content"]: int(t["id"]) for t in json.loads(tokenizer_json)["added_tokens"]}


# --- logprobs ----------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer_json: str) -> list[bytes]:
    """Each token id's bytes (OpenAI's `bytes` of a logprob), read from a tokenizer.json.

    Phi-3's vocabulary is SentencePiece-style BPE: `▁` is a space and `<0x0A>` one raw byte
    (byte fallback); a byte-level BPE (GPT-2 style) maps bytes to printable characters instead.
    """
    spec = json.loads(tokenizer_json)
    vocab: dict[str, int] = dict(spec["model"].get("vocab") or {})
    vocab.update({t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])})
    added = {t["content"] for t in spec.get("added_tokens", [])}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    if byte_level:  # GPT-2's printable stand-ins for bytes
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in printable]
        unbyte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for piece, index in vocab.items():
        found = _BYTE_PIECE.match(piece)
        if piece in added:
            table[index] = piece.encode()
        elif found and spec["model"].get("byte_fallback"):
            table[index] = bytes([int(found.group(1), 16)])
        elif byte_level:
            table[index] = bytes(unbyte.get(c, 0) for c in piece)
        else:
            table[index] = piece.replace("\u2581", " ").encode()
    return table


def logprob_entry(logits: np.ndarray, token: int, top: int, pieces: list[bytes]) -> dict:
    """OpenAI's logprob of `token` from one step's logits (log-softmax, in float64), with the
    `top` most likely tokens of that step."""
    values = logits.astype(np.float64).reshape(-1)
    peak = values.max()
    logprobs = values - (peak + np.log(np.exp(values - peak).sum()))

    def described(index: int) -> dict[str, Any]:
        raw = pieces[index] if index < len(pieces) else b""
        return {"token": raw.decode("utf-8", errors="backslashreplace"),
                "logprob": float(logprobs[index]), "bytes": list(raw)}

    best = np.argpartition(-logprobs, top - 1)[:top] if top else np.array([], dtype=int)
    best = sorted(best.tolist(), key=lambda i: -logprobs[i])
    return {**described(token), "top_logprobs": [described(i) for i in best]}


# --- answers: tokens -> text deltas, stop strings, completions and chunks ----------------------

class Delta(NamedTuple):
    """A piece of an answer: its text, why it ended (on the last one), the tokens generated so
    far, and the logprob entries of the tokens whose text it carries."""

    text: str
    finish: str | None
    count: int
    logprobs: list[dict]


def deltas(tokens: Iterator[tuple[int, dict | None]], decode: Callable[[int], str],
           eos: frozenset[int], stops: list[str]) -> Iterator[Delta]:
    """An answer's text as it grows, from (token id, logprob entry or None) pairs.

    Text that may begin a stop string is held back until it cannot; the answer ends before the
    first stop string (as OpenAI's does), and leading whitespace is dropped (as the transformers
    model does). A token's logprob entry goes with the delta that releases its text; the tokens
    of a stop string, and the end-of-text token, have none.
    """
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent, count, ended = "", 0, 0, False
    pending: list[tuple[int, dict]] = []  # (where the token's text starts, its entry)

    def released(upto: int) -> list[dict]:
        nonlocal pending
        out = [entry for start, entry in pending if start < upto]
        pending = [(start, entry) for start, entry in pending if start >= upto]
        return out

    for token, entry in tokens:
        count += 1
        if token in eos:
            ended = True
            break
        start = len(text)
        text += decode(token)
        if entry is not None:
            pending.append((start, entry))
        if not sent:
            stripped = text.lstrip()
            removed = len(text) - len(stripped)
            if removed:
                text = stripped
                pending = [(max(0, at - removed), e) for at, e in pending]
        cut = find_stop(text, stops)
        if cut is not None:
            yield Delta(text[sent:cut], "stop", count, released(cut))
            return
        safe = len(text) - hold
        if safe > sent:
            yield Delta(text[sent:safe], None, count, released(safe))
            sent = safe
    yield Delta(text[sent:], "stop" if ended else "length", count, released(len(text) + 1))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
               logprobs: list[dict] | None) -> dict[str, Any]:
    """A chat.completion as OpenAI's schema has it (refusal and logprobs are required keys,
    null when there are none)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            # as streamed: leading whitespace dropped (deltas), the rest as the model wrote it
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish,
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunks(model: str, pieces: Iterator[Delta], prompt_tokens: int,
           logprobs: bool) -> Iterator[dict[str, Any]]:
    """chat.completion.chunk dicts for an answer's deltas; the last carries the finish reason
    and the request's usage (the front door moves it to a chunk of its own when asked)."""
    completion_id, created, first = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), True
    for piece in pieces:
        if not piece.text and piece.finish is None:
            continue
        delta = {"role": "assistant", "content": piece.text} if first else {
            "content": piece.text}
        first = False
        choice = {"index": 0, "delta": delta, "finish_reason": piece.finish}
        if logprobs:
            choice["logprobs"] = {"content": piece.logprobs, "refusal": None}
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [choice]}
        if piece.finish is not None:
            chunk["usage"] = usage(prompt_tokens, piece.count)
        yield chunk


def collected(pieces: Iterator[Delta]) -> tuple[str, str, int, list[dict]]:
    """(text, finish reason, tokens generated, logprob entries) of a whole answer."""
    text, finish, count, entries = "", "length", 0, []
    for piece in pieces:
        text += piece.text
        finish, count = piece.finish or finish, piece.count
        entries += piece.logprobs
    return text, finish, count, entries


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
        self.tags = added_tokens(tokenizer_json)
        self.encode_text = plain_text_encoder(tokenizer_json)
        self.pieces = token_bytes(tokenizer_json)
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
            ids = self.chat_ids(messages)
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
        options = checked_options(merged)
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

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def chat_ids(self, messages: list[dict], always: bool = False) -> list[int]:
        """The conversation's prompt ids, its message text read as text (chat_ids)."""
        return chat_ids(messages, self.render, self.encode, self.encode_text, self.tags, always)

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
        if options["seed"] is not None:
            search["random_seed"] = options["seed"] % SEED_RANGE
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
        logits = None
        if any(job.options["logprobs"] for job in batch.jobs):
            # The logits the next tokens are chosen from (get_logits after generate_next_token
            # would already run the step after).
            logits = batch.generator.get_logits().reshape(len(batch.jobs), -1).copy()
        batch.generator.generate_next_token()
        for row, (job, token) in enumerate(zip(batch.jobs, batch.generator.get_next_tokens())):
            if not (job.done or job.cancelled):  # nobody reads a cancelled row's tokens
                token = int(token)
                entry = None if logits is None or not job.options["logprobs"] else (
                    logprob_entry(logits[row], token, job.options["top_logprobs"], self.pieces))
                job.put((token, entry))
                job.done = token in self.eos
        if batch.generator.is_done() or all(job.done or job.cancelled for job in batch.jobs):
            for job in batch.jobs:
                job.put(None)  # end of tokens (after an eos, or at max_tokens)
            return True
        return False

    def _answer(self, job: _Job) -> Iterator[Delta]:
        """One request's answer as it grows; whatever ends the reading (a stop string, a
        closed stream) marks the row cancelled, so the scheduler drops it at its next token."""
        stream = self.tokenizer.create_stream()
        try:
            yield from deltas(job.tokens(), stream.decode, self.eos, job.options["stop"] or [])
        finally:
            job.cancelled = True

    # --- pyfunc API ------------------------------------------------------------------------

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        requests = [self._parse(row, params or {}) for row in _rows(model_input)]
        results = [collected(self._answer(job)) for job in self._submit(requests)]
        if self.interface == "prompt":
            texts = [text.strip() for text, *_ in results]
            return texts[0] if isinstance(model_input, dict) else texts
        return [
            completion(self.model_name, text, finish, len(request["ids"]), count,
                       entries if request["options"]["logprobs"] else None)
            for request, (text, finish, count, entries) in zip(requests, results)
        ]

    def predict_stream(self, context, model_input, params: dict[str, Any] | None = None):
        rows = _rows(model_input)
        if len(rows) != 1:
            raise BadRequest(f"predict_stream takes one request, got {len(rows)} rows.")
        request = self._parse(rows[0], params or {})
        (job,) = self._submit([request])
        if self.interface == "prompt":
            yield from (piece.text for piece in self._answer(job) if piece.text)
            return
        yield from chunks(self.model_name, self._answer(job), len(request["ids"]),
                          request["options"]["logprobs"])


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


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of `stops` begins in `text`, or None."""
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


mlflow.models.set_model(OnnxChatModel())

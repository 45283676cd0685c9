"""The chat contract both runtimes share: OpenAI's chat request checked, the prompt's token ids
(message text read as text), logprobs, and an answer assembled into chat.completion(.chunk)s.

The ONNX model (onnx_chat_model.py) ships this file beside its own (MLflow `code_paths`), so it
is self-contained: only the standard library, numpy, mlflow, and `tokenizers` and `llguidance`
where a function says so. The front door and its transformers runtime (transformers_chat.py)
import it from here, so both runtimes refuse, tokenize, stop, and report alike.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ROLES = ("system", "user", "assistant")
OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "logprobs",
           "top_logprobs")
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


def shown(value: Any, limit: int = 60, text: str | None = None) -> str:
    """A value (as JSON) for an error message, cut short: errors never echo a huge input."""
    text = json.dumps(value, default=str) if text is None else text
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def checked_number(name: str, value: Any, kind: type, low: float, high: float | None = None,
            low_inclusive: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {shown(value)}.")
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
            raise BadRequest(f"seed must be an integer, got {shown(value)}.")
    return int(value)


def checked_logprobs(logprobs: Any, top_logprobs: Any) -> tuple[bool, int]:
    """(logprobs, top_logprobs) as OpenAI takes them: top_logprobs 0-20, only with logprobs."""
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise BadRequest(f"logprobs must be true or false, got {shown(logprobs)}.")
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
                             f"{shown(None, 200, str(sorted(extra)))}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                             f"{shown(role)}.")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string, got {shown(content)}.")
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


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of `stops` begins in `text`, or None."""
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


"""An answer, as the runtime generates it: tokens to text deltas (stop strings held back), tool
calls shaped as OpenAI streams them, logprobs, usage, and the chat.completion or
chat.completion.chunk dicts OpenAI's schema has.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from .grammar import TOOL_CALL

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



class AnswerShape:
    """An answer's text, as it grows, turned into the fields of OpenAI's message delta: text
    `content`, or, when the request lets the answer call tools and it begins with a call,
    `tool_calls` deltas (the first of a call with its id and name, then its arguments in
    pieces, as OpenAI streams them). The grammar makes a call exactly
    `<tool_call>{"name":"NAME","arguments":{...}}</tool_call>`."""

    _HEAD = re.compile(r'\s*' + re.escape(TOOL_CALL[0]) + r'\{"name":("(?:[^"\\]|\\.)*"),'
                       r'"arguments":')

    def __init__(self, calls: bool):
        self.mode = "undecided" if calls else "text"
        self.held, self.calls = "", []  # text not yet shaped; the calls so far
        self._depth, self._string, self._escaped = 0, False, False  # inside the arguments

    def feed(self, text: str) -> dict[str, Any]:
        """The delta fields for `text`, the answer's next piece ({} while undecided)."""
        self.held += text
        if self.mode == "undecided":
            stripped = self.held.lstrip()
            if stripped.startswith(TOOL_CALL[0]):
                self.mode = "calls"
            elif not TOOL_CALL[0].startswith(stripped):
                self.mode = "text"
        if self.mode == "text":
            text, self.held = self.held, ""
            return {"content": text} if text else {}
        if self.mode == "calls":
            deltas = self._calls()
            return {"tool_calls": deltas} if deltas else {}
        return {}

    def finish(self) -> dict[str, Any]:
        """What is still held when the answer ends (an undecided start is text)."""
        if self.mode == "undecided":
            self.mode = "text"
            return self.feed("")
        return {}

    def _calls(self) -> list[dict[str, Any]]:
        deltas = []
        while self.held:
            if self._depth == 0:  # between calls: a call's head, or its closing
                closing = "}" + TOOL_CALL[1]
                if self.calls and self.calls[-1]["open"] and self.held.startswith(closing):
                    self.calls[-1]["open"] = False
                    self.held = self.held[len(closing):]
                    continue
                head = self._HEAD.match(self.held)
                if head is None:
                    break  # wait for more text
                call = {"id": f"call_{uuid.uuid4().hex[:24]}", "name": json.loads(head.group(1)),
                        "arguments": "", "open": True}
                self.calls.append(call)
                deltas.append({"index": len(self.calls) - 1, "id": call["id"],
                               "type": "function",
                               "function": {"name": call["name"], "arguments": ""}})
                self.held = self.held[head.end():]
                self._depth = -1  # the arguments' first "{" is next
            piece = self._arguments()
            if piece:
                self.calls[-1]["arguments"] += piece
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
            if self._depth != 0:
                break
        return deltas

    def _arguments(self) -> str:
        """The arguments' text in `held`, up to where their JSON object closes."""
        for at, char in enumerate(self.held):
            if self._string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._string = False
            elif char == '"':
                self._string = True
            elif char in "{[":
                self._depth = 1 if self._depth == -1 else self._depth + 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    piece, self.held = self.held[:at + 1], self.held[at + 1:]
                    return piece
        piece, self.held = self.held, ""
        return piece

    def message(self, text: str) -> dict[str, Any]:
        """A whole answer's message fields: content, or the calls (content null)."""
        fields = self.feed(text)
        fields.update(self.finish())
        if self.mode != "calls":
            return {"content": fields.get("content", "")}
        # Every call the model began, as the stream's deltas add up: one cut short by
        # max_tokens keeps what was written (OpenAI returns it so, with finish_reason length).
        calls = [{"id": c["id"], "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in self.calls]
        return {"content": None, **({"tool_calls": calls} if calls else {})}

    def finish_reason(self, finish: str) -> str:
        """OpenAI's reason: `tool_calls` for an answer that ended with complete calls."""
        done = self.calls and not self.calls[-1]["open"]
        return "tool_calls" if self.mode == "calls" and finish == "stop" and done else finish



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


def usage(prompt_tokens: int, completion_tokens: int,
          cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens`, where the runtime keeps KV caches: the prompt tokens
    it did not compute again (prompt_tokens_details, as OpenAI reports its prompt cache)."""
    counts: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return counts


def completion(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
               logprobs: list[dict] | None, calls: bool = False,
               cached_tokens: int | None = None) -> dict[str, Any]:
    """A chat.completion as OpenAI's schema has it (refusal and logprobs are required keys,
    null when there are none). `calls`: the request let the answer call tools."""
    shape = AnswerShape(calls)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            # as streamed: leading whitespace dropped (deltas), the rest as the model wrote it
            "message": {"role": "assistant", **shape.message(text), "refusal": None},
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": shape.finish_reason(finish),
        }],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chunks(model: str, pieces: Iterator[Delta], prompt_tokens: int, logprobs: bool,
           calls: bool = False,
           cached_tokens: Callable[[], int] | None = None) -> Iterator[dict[str, Any]]:
    """chat.completion.chunk dicts for an answer's deltas; the last carries the finish reason
    and the request's usage (the front door moves it to a chunk of its own when asked)."""
    completion_id, created, first = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), True
    shape, entries = AnswerShape(calls), []
    for piece in pieces:
        fields = shape.feed(piece.text)
        if piece.finish is not None:
            for key, value in shape.finish().items():
                fields[key] = fields.get(key, type(value)()) + value
        entries += piece.logprobs
        if not fields and piece.finish is None:
            continue  # held: text that may begin a tool call
        delta = {"role": "assistant", **fields} if first else fields
        first = False
        finish = None if piece.finish is None else shape.finish_reason(piece.finish)
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = {"content": entries, "refusal": None}
        entries = []
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [choice]}
        if piece.finish is not None:
            chunk["usage"] = usage(prompt_tokens, piece.count,
                                   cached_tokens and cached_tokens())
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


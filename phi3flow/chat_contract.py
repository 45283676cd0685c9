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

ROLES = ("system", "user", "assistant", "tool")
# A request's structured-output and tool fields (the answer's shape, not its sampling).
SHAPE_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls")
MESSAGE_FIELDS = {"system": {"role", "content"}, "user": {"role", "content"},
                  "assistant": {"role", "content", "tool_calls"},
                  "tool": {"role", "content", "tool_call_id"}}
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

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.code = code  # OpenAI's error code, where it has one (context_length_exceeded)

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


def checked_messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI's chat messages, checked: system, user and assistant turns with text content; an
    assistant turn may carry `tool_calls` instead of text, and a `tool` turn answers one of them
    (`tool_call_id`). Returned without any other field."""
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects."
        )
    checked = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                             f"{shown(role)}.")
        allowed = MESSAGE_FIELDS[role]
        extra = set(message) - allowed
        if extra:
            raise BadRequest(f"messages[{i}] has unknown field(s) "
                             f"{shown(None, 200, str(sorted(extra)))} for role {role} (it takes "
                             f"{', '.join(sorted(allowed))}).")
        calls = message.get("tool_calls")
        if role == "assistant" and calls is not None:
            checked.append({"role": role, "content": _optional_text(i, content),
                            "tool_calls": _checked_calls(i, calls)})
            continue
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string, got {shown(content)}.")
        if not content.strip():
            raise BadRequest(f"messages[{i}].content is empty.")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"messages[{i}].tool_call_id must be the id of the tool call "
                                 "this message answers.")
            checked.append({"role": role, "content": content, "tool_call_id": call_id})
            continue
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] == "assistant":
        raise BadRequest("the last message must be from the user (or system, or a tool), not the "
                         "assistant.")
    return checked


def _optional_text(i: int, content: Any) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string or null, got {shown(content)}.")
    return content


def _checked_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant turn's tool_calls: [{"id", "type": "function", "function": {"name",
    "arguments": a JSON object as text}}], as OpenAI answers them."""
    if not isinstance(calls, list) or not calls:
        raise BadRequest(f"messages[{i}].tool_calls must be a non-empty list of tool calls.")
    checked = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or call.get("type", "function") != "function"
                or not isinstance(call.get("id"), str)
                or not isinstance(function.get("name"), str)):
            raise BadRequest(f"{where} must be {{\"id\": ..., \"type\": \"function\", "
                             "\"function\": {\"name\": ..., \"arguments\": ...}}.")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}.function.arguments must be a JSON object as a string, got "
                             f"{shown(function.get('arguments'))}.")
        checked.append({"id": call["id"], "type": "function",
                        "function": {"name": function["name"],
                                     "arguments": function.get("arguments") or "{}"}})
    return checked


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


# --- structured outputs and tool calls --------------------------------------------------------
#
# Both come from grammar-constrained decoding: the request's JSON schema, or its tools, become a
# grammar (llguidance's Lark dialect, with JSON schemas embedded by `%json`), and at each step a
# token that the grammar cannot continue with is masked out of the logits, so every answer
# parses. Phi-3-mini has no tool-call format of its own: the tools are described in the prompt
# (`tool_messages`) and a call is written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

TOOL_CALL = ("<tool_call>", "</tool_call>")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function and schema names
# Compact JSON: no whitespace between tokens, which a model could otherwise repeat forever.
JSON_OPTIONS = {"whitespace_flexible": False}
TOOL_CHOICES = ("none", "auto", "required")


class Tools(NamedTuple):
    """A request's tools, checked: each function's {"name", "description", "parameters"}; how
    they may be used (none, auto, required, or one function's name); several calls or one."""

    functions: tuple[dict[str, Any], ...]
    choice: str
    parallel: bool

    @property
    def callable(self) -> tuple[dict[str, Any], ...]:
        """The functions an answer may call."""
        if self.choice == "none":
            return ()
        if self.choice in TOOL_CHOICES:
            return self.functions
        return tuple(f for f in self.functions if f["name"] == self.choice)


def checked_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> Tools | None:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, checked (None: no tools)."""
    if tools in (None, []):
        if tool_choice not in (None, "none"):
            raise BadRequest("tool_choice is only allowed when tools are given.")
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}}.")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"parameters\": {...}}} (only function tools).")
        extra = set(function) - {"name", "description", "parameters", "strict"}
        if extra:
            raise BadRequest(f"tools[{i}].function has unknown field(s) {sorted(extra)}.")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadRequest(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, "
                             f"got {shown(name)}.")
        if name in {f["name"] for f in functions}:
            raise BadRequest(f"tools[{i}].function.name {name!r} is given twice.")
        parameters = function.get("parameters", {"type": "object", "properties": {},
                                                 "additionalProperties": False})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema of an "
                             "object (the call's arguments).")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise BadRequest(f"tools[{i}].function.description must be a string.")
        functions.append({"name": name, "description": description, "parameters": parameters})
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        named = choice.get("function") if choice.get("type") == "function" else None
        if not isinstance(named, dict) or named.get("name") not in {f["name"] for f in functions}:
            raise BadRequest("tool_choice must be none, auto, required or {\"type\": "
                             "\"function\", \"function\": {\"name\": <one of the tools>}}, got "
                             f"{shown(tool_choice)}.")
        choice = named["name"]
    elif choice not in TOOL_CHOICES:
        raise BadRequest(f"tool_choice must be none, auto, required or a function, got "
                         f"{shown(tool_choice)}.")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise BadRequest("parallel_tool_calls must be true or false.")
    return Tools(tuple(functions), choice, parallel_tool_calls is not False)


def checked_response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the answer to follow (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return {"type": "object"}
    if kind != "json_schema":
        raise BadRequest("response_format must be {\"type\": \"text\"}, {\"type\": "
                         "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                         f"{{\"name\": ..., \"schema\": {{...}}}}}}, got {shown(value)}.")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or set(value) != {"type", "json_schema"}:
        raise BadRequest("response_format.json_schema must be an object with name and schema.")
    extra = set(spec) - {"name", "schema", "strict", "description"}
    if extra:
        raise BadRequest(f"response_format.json_schema has unknown field(s) {sorted(extra)}.")
    if not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise BadRequest("response_format.json_schema.name must be 1-64 letters, digits, _ or -, "
                         f"got {shown(spec.get('name'))}.")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise BadRequest("response_format.json_schema.strict must be true or false.")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON schema (an object).")
    return schema


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + _compact({**schema, "x-guidance": JSON_OPTIONS})


def grammar(answer_schema: dict[str, Any] | None, tools: Tools | None) -> str | None:
    """The grammar an answer must follow, or None when it is free text: JSON in the answer
    schema (else text), or, when tools may be called, one (or, if parallel, several) calls;
    with tool_choice auto either, a text answer never starting with a call's opening tag.
    A leading space is allowed: the tokenizer's word-start marker after `<|assistant|>`."""
    callable_ = tools.callable if tools else ()
    if answer_schema is None and not callable_:
        return None
    rules = ['SP: " "']
    if answer_schema is not None:
        rules.append(f"answer: {_json_rule(answer_schema)}")
        answer = "answer"
    else:  # free text, where the alternative is a call: text that does not begin as one
        rules.append(f"TEXT: /(.|\\n)+/ & ~/\\s*{re.escape(TOOL_CALL[0])}(.|\\n)*/")
        answer = "TEXT"
    if not callable_:
        return "\n".join([f"start: SP? {answer}", *rules]) + "\n"
    if tools.choice != "auto":
        rules = rules[:1]  # the answer must be calls
    rules.append("call: " + _json_rule({"anyOf": [_call_schema(f) for f in callable_]}))
    several = "+" if tools.parallel and tools.choice in TOOL_CHOICES else ""
    rules.append(f'calls: ("{TOOL_CALL[0]}" call "{TOOL_CALL[1]}"){several}')
    start = f"SP? ({answer} | calls)" if tools.choice == "auto" else "SP? calls"
    return "\n".join([f"start: {start}", *rules]) + "\n"


def grammar_errors(answer_schema: dict[str, Any] | None, tools: Tools | None,
                   valid: Callable[[str], str | None]) -> None:
    """Each schema of the request compiled on its own, so that a feature the grammar engine
    does not support is refused naming the field it is in. `valid(grammar)` -> its error or
    None (the runtime's tokenizer decides what compiles)."""
    parts = [("response_format.json_schema.schema", answer_schema)] if answer_schema else []
    parts += [(f"tools[{i}].function.parameters", f["parameters"])
              for i, f in enumerate(tools.functions if tools else ())]
    for where, schema in parts:
        error = valid(f"start: {_json_rule(schema)}\n")
        if error:
            found = re.search(r"failed to compile JSON schema: ([^\n]*)", error)
            raise BadRequest(f"{where} is not supported: {found.group(1) if found else error} "
                             "(structured outputs here support JSON Schema's types, properties, "
                             "required, enum, const, anyOf/oneOf/allOf, $ref/$defs, items, "
                             "lengths, bounds, pattern and common formats).")


def tool_messages(messages: list[dict[str, Any]], tools: Tools | None,
                  keeps_system: bool) -> list[dict[str, str]]:
    """The conversation as plain system/user/assistant turns for a chat template that knows no
    tools: an assistant's calls as the text it would have written (`<tool_call>...`), each run
    of tool results as one user turn of `<tool_result id="...">...</tool_result>` blocks, and
    the callable functions described in the system message (or, where the template drops
    system messages, at the start of the first user turn)."""
    plain: list[dict[str, str]] = []
    for message in messages:
        if message["role"] == "tool":
            result = (f"<tool_result id={json.dumps(message['tool_call_id'])}>"
                      f"{message['content']}</tool_result>")
            if plain and plain[-1]["role"] == "user" and plain[-1]["content"].endswith(
                    "</tool_result>"):
                plain[-1] = {"role": "user", "content": plain[-1]["content"] + "\n" + result}
            else:
                plain.append({"role": "user", "content": result})
        elif message["role"] == "assistant" and "tool_calls" in message:
            calls = "".join(
                TOOL_CALL[0] + _compact({"name": c["function"]["name"],
                                         "arguments": json.loads(c["function"]["arguments"])})
                + TOOL_CALL[1] for c in message["tool_calls"])
            plain.append({"role": "assistant", "content": message["content"] + calls})
        else:
            plain.append({"role": message["role"], "content": message["content"]})
    if not tools or not tools.callable:
        return plain
    guide = _tools_prompt(tools)
    at = next((i for i, m in enumerate(plain) if m["role"] == "system"), None) if keeps_system \
        else next((i for i, m in enumerate(plain) if m["role"] == "user"), None)
    if at is None:
        return [{"role": "system" if keeps_system else "user", "content": guide}, *plain]
    plain[at] = {**plain[at], "content": guide + "\n\n" + plain[at]["content"]}
    return plain


def _tools_prompt(tools: Tools) -> str:
    functions = "\n".join(_compact({"name": f["name"], "description": f["description"],
                                    "parameters": f["parameters"]}) for f in tools.callable)
    how = (f"To call a function, answer with {TOOL_CALL[0]}{{\"name\":<function name>,"
           f"\"arguments\":<its arguments as a JSON object>}}{TOOL_CALL[1]}"
           + (" (one such block per call)" if tools.parallel else "")
           + " and nothing else.")
    when = {"auto": " If no function helps, answer in words.",
            "required": " Call at least one function now."}.get(
        tools.choice, f" Call {tools.choice} now.")
    return f"You can call these functions (their arguments as JSON Schema):\n{functions}\n{how}{when}"


class Guide:
    """A grammar followed by one answer (llguidance): before each step, the logits of every
    token the grammar cannot continue with are set to the lowest float; after it, the chosen
    token moves the grammar on. Once the grammar is complete only an end-of-text token is
    allowed, so the answer ends there."""

    def __init__(self, tokenizer: Any, grammar_text: str):
        import llguidance
        import llguidance.numpy

        self._numpy = llguidance.numpy
        self.matcher = llguidance.LLMatcher(tokenizer, grammar_text, log_level=0)
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)

    def allowed(self, width: int) -> np.ndarray:
        """Which of the `width` token ids (the logits' width) the grammar allows next."""
        self._numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").astype(bool)
        return np.pad(bits, (0, max(0, width - bits.size)))[:width]

    def mask(self, logits: np.ndarray) -> None:
        """Masks one row of logits in place."""
        logits[~self.allowed(logits.shape[-1])] = np.finfo(logits.dtype).min

    def follow(self, token: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")


def grammar_tokenizer(tokenizer_json: str, vocab_size: int, eos: list[int]) -> Any:
    """llguidance's view of a tokenizer (what each token id spells), for Guide and checks."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos))


def grammar_error(tokenizer: Any, grammar_text: str) -> str | None:
    """What is wrong with a grammar for this tokenizer, or None."""
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_text, tokenizer)
    return messages[0] if failed else None


class Chat(NamedTuple):
    """A chat request, checked and made ready for a runtime: its prompt's token ids, its
    generation options, the grammar its answer follows (None: free text), and whether the
    answer may call tools."""

    ids: list[int]
    options: dict[str, Any]
    grammar: str | None
    calls: bool


def chat_request(payload: dict[str, Any], defaults: dict[str, Any], runtime: Any) -> Chat:
    """A chat request for `runtime` (which has `render`, `encode`, `encode_text`, `tags`,
    `keeps_system` and `grammar_tokenizer`): the same checks, prompt and grammar on both
    runtimes. `defaults`: the model's logged generation options."""
    messages = checked_messages(payload.get("messages"))
    options = checked_options({**defaults, **{
        k: v for k, v in payload.items() if k in OPTIONS and v is not None}})
    tools = checked_tools(payload.get("tools"), payload.get("tool_choice"),
                          payload.get("parallel_tool_calls"))
    schema = checked_response_format(payload.get("response_format"))
    rules = grammar(schema, tools)
    if rules is not None:
        grammar_errors(schema, tools, lambda text: grammar_error(runtime.grammar_tokenizer, text))
        error = grammar_error(runtime.grammar_tokenizer, rules)
        if error:  # the parts compiled on their own: their combination should too
            raise BadRequest(f"response_format and tools cannot be combined here: {error}")
    plain = tool_messages(messages, tools, runtime.keeps_system)
    ids = chat_ids(plain, runtime.render, runtime.encode, runtime.encode_text, runtime.tags)
    return Chat(ids, options, rules, bool(tools and tools.callable))


def check_room(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """The prompt and max_tokens new tokens fit the context window, or a BadRequest saying how
    much does."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise BadRequest(f"the messages are {prompt_tokens} tokens, more than the context window "
                         f"of {context_length}: shorten them.", code="context_length_exceeded")
    if max_tokens > room:
        raise BadRequest(f"max_tokens={max_tokens} does not fit: the prompt is {prompt_tokens} "
                         f"tokens and the context window is {context_length}; pass max_tokens "
                         f"<= {room}.", code="context_length_exceeded")


def keeps_system(render: Callable[[list[dict]], str]) -> bool:
    """Whether `render` (messages -> prompt text, the model's chat template) shows a system
    message in the prompt (Phi-3-mini-4k's original template drops them)."""
    probe = "phi3flow system message probe"
    return probe in render([{"role": "system", "content": probe},
                            {"role": "user", "content": "Hello."}])


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
        """A whole answer's message fields: content, or the complete calls (content null)."""
        fields = self.feed(text)
        fields.update(self.finish())
        if self.mode != "calls":
            return {"content": fields.get("content", "")}
        calls = [{"id": c["id"], "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in self.calls if not c["open"]]  # a call cut short is no call
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


"""A chat request, parsed and checked once, at the edge, into a typed `ChatRequest`: OpenAI's
messages, generation options, tools and response format. Both runtimes take what this returns;
no runtime checks a request again.

Shipped inside the logged ONNX model (MLflow `code_paths`, the whole `chat` folder), so it needs
only the standard library, numpy and mlflow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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


def plain(value: Any) -> Any:
    """numpy arrays and scalars (what MLflow makes of {"inputs": ...}, what Arrow hands a Spark
    UDF) as plain Python lists and values."""
    if isinstance(value, np.ndarray):
        return plain(value.tolist())  # nested lists, or a scalar for a 0-d array
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


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



# --- tools and response formats --------------------------------------------------------------

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



# --- the typed request ----------------------------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    """A chat request, checked: its messages, the generation options it sent (a runtime fills
    in its own defaults for the rest), its tools, and the JSON schema its answer must follow
    (None: free text)."""

    messages: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    tools: Tools | None = None
    schema: dict[str, Any] | None = None


def parse(payload: dict[str, Any], context_length: int | None = None) -> ChatRequest:
    """The chat request in `payload` (OpenAI's request fields), checked once for every runtime:
    messages (within what `context_length` tokens can hold), n, the options it sends, tools and
    response_format. The caller has refused fields it does not know."""
    messages = checked_messages(payload.get("messages"))
    n = payload.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest(f"n must be 1 (one answer per request), got {shown(n)}.")
    if context_length is not None:
        checked_size(sum(len(m.get("content") or "") for m in messages), context_length)
    sent = {name: payload[name] for name in OPTIONS if payload.get(name) is not None}
    if payload.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
        sent["max_tokens"] = payload["max_completion_tokens"]
    checked = checked_options({**DEFAULTS, **sent})
    return ChatRequest(
        messages, {name: checked[name] for name in sent},
        checked_tools(payload.get("tools"), payload.get("tool_choice"),
                      payload.get("parallel_tool_calls")),
        checked_response_format(payload.get("response_format")))


def checked_size(characters: int, context_length: int) -> None:
    """Refuse, before tokenizing it, a prompt of `characters` too long for any tokenizer to fit
    into the context window."""
    if characters > context_length * MAX_CHARS_PER_TOKEN:  # no tokenizer packs more
        raise BadRequest(f"the messages have {characters} characters, more than the context "
                         f"window of {context_length} tokens can hold: shorten them.",
                         code="context_length_exceeded")

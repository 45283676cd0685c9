"""An OpenAI-compatible front door for the registered models: `POST /v1/chat/completions`.

    python -m phi3flow.front_door                       # models:/<default name>@champion
    python -m phi3flow.front_door --model phi3-mini-4k-instruct-chat@champion \
        --model phi3-mini-4k-instruct-chat@challenger --port 8000

Any OpenAI client works against it (`OpenAI(base_url="http://127.0.0.1:8000/v1")`): each model
is served under the `model` name the client sends (`<registered name>@<alias>`, or the name given
as `NAME=URI`), `stream: true` answers `chat.completion.chunk` server-sent events ending with
`[DONE]`, and every bad request gets a 4xx in OpenAI's error shape naming the field, checked
here the same way for both models before either computes anything.

Why a server of our own: MLflow's AI Gateway has the OpenAI route but forwards to `mlflow models
serve` in a body the served pyfunc refuses and crashes on `stream: true` (docs/decisions.md);
`mlflow models serve` itself has no `/v1/...` routes and no streaming. So this is FastAPI and
uvicorn (which MLflow ships), the chat core (phi3flow/chat) that parses a request once into a
typed request and that both runtimes take, and the models loaded in this process with
`mlflow.pyfunc.load_model`; what is left by hand is the routing, the error shape and the events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import mlflow
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from mlflow.exceptions import MlflowException
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from phi3flow.chat import request as chat_request
from phi3flow.chat import system_messages
from phi3flow.chat.request import MAX_TOP_LOGPROBS
from phi3flow.chat.runtime import Chat, ChatRuntime
from phi3flow.chat.transformers_runtime import TransformersChat
from phi3flow.core import names

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
# A chat request of a full 4,096-token context is well under 100 KB of JSON; 1 MB leaves room
# and refuses, before reading it, a body that could only waste memory.
DEFAULT_MAX_BODY_BYTES = 1_000_000

@dataclass(frozen=True)
class Field:
    """One request field of OpenAI's chat completions API, and what this server does with it:
    honours it (`supported`) or refuses it with a 400 naming it, except for the values that
    ask for nothing (`asks_nothing`: OpenAI's documented default or no-op), which are accepted.
    JSON null is "not sent" for every field."""

    name: str
    supported: bool
    note: str
    asks_nothing: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        """Whether `value` may be sent: any for a supported field (its checks come later),
        else null or a value that asks nothing (`false` is not `0`, as JSON has it)."""
        return self.supported or value is None or any(
            value == v and isinstance(value, bool) == isinstance(v, bool)
            for v in self.asks_nothing)

    def row(self) -> str:
        """The field's row in docs/serving.md's conformance table."""
        accepted = ", ".join(f"`{json.dumps(v)}`" for v in self.asks_nothing)
        status = "supported" if self.supported else "refused (400)" + (
            f"; accepted: {accepted}" if accepted else "")
        return f"| `{self.name}` | {status} | {self.note} |"


# Every field of OpenAI's chat completions request (CompletionCreateParams of the official
# `openai` SDK, which is generated from OpenAI's API spec; a test checks the installed SDK has
# no field this table lacks), and top_k, which OpenAI lacks and both runtimes have. Nothing is
# accepted and ignored: docs/serving.md's conformance table is rendered from this one.
FIELDS = (
    Field("messages", True, "roles system, user, assistant (content, or tool_calls), tool "
          "(content, tool_call_id); content a string (content-part arrays and `name` are "
          "refused); content is text: a control tag it spells (`<|end|>`) is tokenized as "
          "characters, never as the tag"),
    Field("model", True, "required: a name this server serves"),
    Field("max_tokens", True, "at least 1, within the context window"),
    Field("max_completion_tokens", True, "the same as max_tokens (which it replaces)"),
    Field("temperature", True, ">= 0; 0 is greedy"),
    Field("top_p", True, "in (0, 1]"),
    Field("top_k", True, "not OpenAI's: at least 1"),
    Field("n", True, "1 only"),
    Field("stop", True, "a string or up to 4 strings; the answer ends before the first"),
    Field("stream", True, "server-sent chunks, then [DONE]"),
    Field("stream_options", True, "include_usage: a last chunk with the usage"),
    Field("user", True, "an end-user id; it does not change the answer, nothing records it"),
    Field("safety_identifier", True, "the same as user"),
    Field("presence_penalty", False, "not implemented by either runtime", asks_nothing=(0,)),
    Field("frequency_penalty", False, "not implemented by either runtime", asks_nothing=(0,)),
    Field("logit_bias", False, "not implemented", asks_nothing=({},)),
    Field("logprobs", True, "each answer token's log-probability (log-softmax of the model's "
          "logits, before temperature), streamed and not"),
    Field("top_logprobs", True, f"0 to {MAX_TOP_LOGPROBS} alternatives per token; needs "
          "logprobs"),
    Field("seed", True, "the same request with the same seed gets the same answer (per "
          "runtime; taken modulo 2^31)"),
    Field("response_format", True, "text, json_object, json_schema (strict or not): the answer "
          "follows the schema by grammar-constrained decoding; a schema feature the grammar "
          "engine lacks is a 400 naming it"),
    Field("tools", True, "function tools: calls in `message.tool_calls` whose arguments follow "
          "each function's parameters schema (grammar-constrained), streamed as OpenAI streams "
          "them"),
    Field("tool_choice", True, "none, auto (the default with tools), required, or a named "
          "function; allowed_tools is refused"),
    Field("parallel_tool_calls", True, "true (the default): one or more calls; false: one"),
    Field("functions", False, "deprecated by OpenAI for tools", asks_nothing=([],)),
    Field("function_call", False, "deprecated by OpenAI for tool_choice",
          asks_nothing=("none",)),
    Field("modalities", False, "text only", asks_nothing=(["text"],)),
    Field("audio", False, "text only"),
    Field("prediction", False, "no predicted outputs"),
    Field("reasoning_effort", False, "Phi-3-mini does not reason in hidden tokens"),
    Field("verbosity", False, "no verbosity control", asks_nothing=("medium",)),
    Field("web_search_options", False, "no web search"),
    Field("store", False, "nothing is stored", asks_nothing=(False,)),
    Field("metadata", False, "only with store", asks_nothing=({},)),
    Field("service_tier", False, "one tier", asks_nothing=("auto", "default")),
    Field("moderation", False, "no moderation"),
    Field("prompt_cache_key", False, "no prompt cache"),
    Field("prompt_cache_options", False, "no prompt cache"),
    Field("prompt_cache_retention", False, "no prompt cache"),
)
FIELD = {f.name: f for f in FIELDS}

# Nesting no chat request needs (messages -> content parts -> fields is 4 deep): a deeper body
# is refused before it can exhaust the parser's recursion.
MAX_JSON_DEPTH = 32


class ApiError(Exception):
    """A request the client must fix: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class ServedModel:
    """One loaded model: the name clients ask for, and its chat runtime (runtime.ChatRuntime:
    the ONNX model's own python model, or TransformersChat on the transformers pipeline)."""

    name: str  # the `model` clients ask for
    uri: str
    runtime: ChatRuntime
    pyfunc: Any  # MLflow's loaded model, which owns the runtime

    @property
    def context_length(self) -> int:
        return self.runtime.context_length


def load(name: str, uri: str) -> ServedModel:
    """Load `uri` with mlflow.pyfunc and take its chat runtime."""
    logger.info("loading %s as %r", uri, name)
    model = mlflow.pyfunc.load_model(uri)
    if "transformers" in model.metadata.flavors:
        runtime = TransformersChat(model)
    else:
        runtime = model.unwrap_python_model()
        if (not all(hasattr(runtime, m) for m in ("prepare", "complete", "stream"))
                or getattr(runtime, "interface", "chat") != "chat"):
            raise SystemExit(f"{uri} is not a chat model of this project (log it with "
                             "log_transformers, or log_onnx_pyfunc with interface=chat; a model "
                             "logged by an older version of this project: log it again).")
    system_messages.probe(runtime.render, name)  # warns where the template drops them
    return ServedModel(name, uri, runtime, model)


def parse(body: bytes, models: dict[str, ServedModel]) -> tuple[ServedModel, Chat, Streaming]:
    """The request, parsed and checked once and prepared by its model's runtime: (model, the
    request ready for it, how to answer), or an ApiError; nothing is computed for a bad one."""
    if _depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels; a chat request "
                       "needs a few.")
    try:
        data = json.loads(body)
    except RecursionError:  # nesting the depth check could not see (an unterminated string)
        raise ApiError(400, "the body nests too deep to be a chat request.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object with model and messages.")
    if "model" not in data:  # required by OpenAI's API, even where one model is served
        raise ApiError(400, f"model is required: one of {sorted(models)}.", param="model")
    check_fields(data)
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false.", param="stream")
    for name in ("user", "safety_identifier"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise ApiError(400, f"{name} must be a string.", param=name)
    usage = _stream_options(data.get("stream_options"), bool(stream))
    model = _model(data["model"], models)
    try:
        request = chat_request.parse(data, model.context_length)
        if not model.runtime.keeps_system:  # the template would drop them: fold them in
            request = replace(request, messages=system_messages.fold(request.messages))
        chat = model.runtime.prepare(request)
    except MlflowException as exc:
        raise _refused(exc) from None
    return model, chat, Streaming(bool(stream), usage)


def _refused(exc: MlflowException) -> ApiError:
    """A model's refusal as OpenAI's 400, or the exception itself if it is no refusal.

    The ONNX model's BadRequest is its own class (its code is loaded from the logged model), so
    a refusal is known by MLflow's error code, which both classes carry."""
    if exc.error_code != "INVALID_PARAMETER_VALUE":
        raise exc
    message = getattr(exc, "message", str(exc))
    return ApiError(400, message, param=_param_of(message), code=getattr(exc, "code", None))


def check_fields(data: dict[str, Any]) -> None:
    """Every field is one of FIELDS, and one this server cannot honour asks nothing of it."""
    unknown = sorted(set(data) - FIELD.keys())
    if unknown:  # as OpenAI answers them: "Unrecognized request argument supplied"
        raise ApiError(400, f"unrecognized request argument(s) {unknown[:5]}: not a field of "
                       "OpenAI's chat completions API.", param=unknown[0])
    for name, value in data.items():
        field = FIELD[name]
        if field.accepts(value):
            continue
        allowed = (" (or " + ", ".join(json.dumps(v) for v in field.asks_nothing) + ")"
                   if field.asks_nothing else "")
        raise ApiError(400, f"{name} is not supported by this server ({field.note}): leave it "
                       f"out{allowed}.", param=name)


@dataclass(frozen=True)
class Streaming:
    """How to answer: as server-sent events or not, and with a final usage chunk or not."""

    on: bool
    include_usage: bool = False


def _stream_options(value: Any, stream: bool) -> bool:
    """stream_options.include_usage (OpenAI's only stream option), checked."""
    if value is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true.",
                       param="stream_options")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise ApiError(400, "stream_options takes one field, include_usage (true or false).",
                       param="stream_options")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false.",
                       param="stream_options.include_usage")
    return include


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_A_BRACKET = bytes(set(range(256)) - set(b"[]{}"))
_OPENS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _depth(body: bytes) -> int:
    """How deep the JSON in `body` nests, without parsing it: its brackets outside strings."""
    brackets = _JSON_STRING.sub(b"", body).translate(_OPENS, _NOT_A_BRACKET)
    return max(itertools.accumulate(b - 1 for b in brackets), default=0)


def _model(name: Any, models: dict[str, ServedModel]) -> ServedModel:
    if not isinstance(name, str) or name not in models:
        raise ApiError(404, f"the model {str(name)[:100]!r} is not served here; this server "
                       f"serves {sorted(models)}.", param="model", code="model_not_found")
    return models[name]


def _param_of(message: str) -> str | None:
    """The request field a check's message starts with (`messages[0].role must ...`)."""
    found = PARAM.match(message)
    return found.group(0) if found else ("messages" if "message" in message else None)


PARAM = re.compile(r"^(messages(\[\d+\](\.(role|content|tool_calls|tool_call_id))?)?|max_tokens"
                   r"|temperature|top_p|top_k|stop|n|seed|logprobs|top_logprobs|response_format"
                   r"|tools(\[\d+\])?|tool_choice|parallel_tool_calls)\b")


def create_app(models: dict[str, ServedModel],
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="phi3flow front door", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown route or method
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                     f"{exc.detail}", code="not_found").body(),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(models)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_object(name) for name in sorted(models)]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        return _model_object(_model(model_id, models).name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_limited(request, max_body_bytes)
        model, chat, stream = parse(body, models)
        if stream.on:
            return StreamingResponse(_events(model, chat, stream.include_usage),
                                     media_type="text/event-stream")
        response = await run_in_threadpool(_generate, model, chat)
        return JSONResponse(response)

    return app


async def _read_limited(request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes without reading (or keeping) the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes, more than this server's limit "
                       f"of {limit} (--max_body_bytes).", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is more than this server's limit of {limit} bytes "
                           "(--max_body_bytes).", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "phi3flow"}


def _generate(model: ServedModel, chat: Chat) -> dict:
    try:
        response = model.runtime.complete(chat)
    except MlflowException as exc:  # a check only the model could make
        raise _refused(exc) from None
    return {**response, "model": model.name}


async def _events(model: ServedModel, chat: Chat, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: one `data:` line per chunk, a usage chunk if asked, `data: [DONE]`.

    A client that goes away ends this generator (Starlette cancels it): the model's stream is
    then closed, which stops its decoding at the next token and ends its thread.
    """
    usage, first = None, None
    async for chunk in _in_one_thread(lambda: model.runtime.stream(chat)):
        if isinstance(chunk, Exception):  # the stream has begun: report in-band, as OpenAI does
            logger.warning("stream of %s failed: %s", model.name, chunk)
            error = ApiError(500, str(chunk)[:500], kind="server_error").body()
            yield f"data: {json.dumps(error)}\n\n".encode()
            break
        first = first or chunk
        usage = chunk.pop("usage", None) or usage
        yield f"data: {json.dumps({**chunk, 'model': model.name})}\n\n".encode()
    if include_usage and first is not None:
        if usage is None:  # a model that cannot count its stream's tokens
            logger.warning("stream of %s: the model reported no usage", model.name)
        final = {"id": first["id"], "object": "chat.completion.chunk",
                 "created": first["created"], "model": model.name, "choices": [],
                 "usage": usage}
        yield f"data: {json.dumps(final)}\n\n".encode()
    yield b"data: [DONE]\n\n"


# Chunks a stream may run ahead of a slow client; past that its thread waits for the client.
STREAM_AHEAD = 64
# How long a stream's thread waits for its first item to be sent before it asks for the next.
# The ONNX model's next decode step holds the GIL for a whole step (~0.1 s at full size): a first
# chunk not yet written by then reaches the client a step late.
FIRST_ITEM_SENT_S = 0.02


async def _in_one_thread(make: Any) -> AsyncIterator[Any]:
    """Iterate `make()` in one thread of its own, handing each item (or the error) over.

    Each item of a runtime's stream may wait a whole decode step: one thread per stream keeps
    the event loop free for other clients and lets the stream run ahead of a slow client, by up
    to STREAM_AHEAD chunks.
    When the consumer stops (a client that left), the thread closes `make()`'s iterator and
    ends: it waits for room with a timeout, so it never blocks on a reader that is gone.
    """
    loop = asyncio.get_running_loop()
    handed: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(STREAM_AHEAD)
    stopped = threading.Event()
    sent = threading.Event()  # the first item is sent: the consumer is back for the next
    done = object()

    def hand(item: Any) -> None:
        loop.call_soon_threadsafe(handed.put_nowait, item)

    def run() -> None:
        items = make()
        try:
            for index, item in enumerate(items):
                while not room.acquire(timeout=0.1):
                    if stopped.is_set():
                        return
                if stopped.is_set():
                    return
                hand(item)
                if index == 0:
                    sent.wait(FIRST_ITEM_SENT_S)
        except Exception as exc:  # noqa: BLE001 (handed to the response, which reports it)
            hand(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the model's stream: its cleanup stops the decoding
            with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
                hand(done)

    threading.Thread(target=run, daemon=True, name="front-door-stream").start()
    try:
        while (item := await handed.get()) is not done:
            room.release()
            yield item
            sent.set()
    finally:
        stopped.set()


def _model_arg(value: str) -> tuple[str, str]:
    """NAME=URI, or a registry reference whose name it is: `name@alias` or `models:/name@alias`."""
    if "=" in value:
        name, uri = value.split("=", 1)
        return name, uri
    name = value.removeprefix("models:/")
    return name, f"models:/{name}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m phi3flow.front_door",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", metavar="NAME@ALIAS|NAME=URI",
                        help="a model to serve (repeatable); default: "
                             f"{names.DEFAULT_REGISTERED_MODEL}@champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    specs = [_model_arg(v) for v in (args.model or [f"{names.DEFAULT_REGISTERED_MODEL}@champion"])]
    try:
        models = {name: load(name, uri) for name, uri in specs}
    except MlflowException as exc:
        raise SystemExit(f"cannot load a model: {exc.message} (is MLFLOW_TRACKING_URI the store "
                         "where it was registered?)") from None
    import uvicorn

    logger.info("serving %s on http://%s:%d/v1 (Ctrl-C stops)", sorted(models), args.host,
                args.port)
    uvicorn.run(create_app(models, args.max_body_bytes), host=args.host, port=args.port,
                log_level="info")


if __name__ == "__main__":
    main()

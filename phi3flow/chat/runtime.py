"""What a chat runtime is: the one interface both runtimes implement (the ONNX pyfunc and the
transformers model behind the front door), and the request made ready for one (`Chat`).

A request is parsed and checked once (request.parse), then prepared once by the runtime that
answers it (its prompt tokenized, its grammar compiled, its room checked), then answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

from .grammar import compiled
from .prompt import chat_ids, check_room, tool_messages
from .request import ChatRequest


class Chat(NamedTuple):
    """A chat request made ready for a runtime: its prompt's token ids, its generation options
    (the runtime's defaults filled in), the grammar its answer follows (None: free text), and
    whether the answer may call tools."""

    ids: list[int]
    options: dict[str, Any]
    grammar: str | None
    calls: bool


class ChatRuntime(Protocol):
    """A model that answers chat requests as OpenAI does."""

    model_name: str
    context_length: int
    keeps_system: bool  # its chat template shows system messages (else they must be folded in)
    defaults: dict[str, Any]  # every generation option, checked (the model's logged ones)
    render: Callable[[list[dict]], str]  # messages -> prompt text (the chat template)

    def prepare(self, request: ChatRequest) -> Chat:
        """The request tokenized for this model; a BadRequest if it cannot take it."""

    def complete(self, chat: Chat) -> dict[str, Any]:
        """A chat.completion."""

    def stream(self, chat: Chat) -> Iterator[dict[str, Any]]:
        """chat.completion.chunk dicts; the last carries the usage. Closing it stops the
        generation at its next token."""


def prepare(request: ChatRequest, runtime: Any) -> Chat:
    """`request` made ready for `runtime` (which has `render`, `encode`, `encode_text`, `tags`,
    `keeps_system`, `grammar_tokenizer`, `defaults` and `context_length`): the same prompt,
    grammar and room check on both runtimes."""
    options = {**runtime.defaults, **request.options}
    rules = compiled(request, runtime.grammar_tokenizer)
    plain = tool_messages(request.messages, request.tools, runtime.keeps_system)
    ids = chat_ids(plain, runtime.render, runtime.encode, runtime.encode_text, runtime.tags)
    check_room(len(ids), options["max_tokens"], runtime.context_length)
    return Chat(ids, options, rules, bool(request.tools and request.tools.callable))

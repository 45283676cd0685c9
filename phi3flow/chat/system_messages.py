"""Whether a chat template keeps system messages, and folding them in where it does not.

Phi-3-mini-4k's original chat template renders only user and assistant turns: a system message
vanishes without a word (`[system "You are a pirate.", user "..."]` becomes
`<s><|user|>\n...<|end|>\n<|assistant|>\n`, in transformers and onnxruntime-genai alike;
docs/decisions.md). Log steps probe the checkpoint's template and tag the model with what it does
(`phi3flow.system_messages`: kept or dropped), warning when it drops them; the front door folds
system messages into the first user turn for such a model, the same for both models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .prompt import keeps_system

logger = logging.getLogger(__name__)

KEPT, DROPPED = "kept", "dropped"


def probe(render: Callable[[list[dict]], str], what: str) -> str:
    """KEPT or DROPPED for `render`, warning when the template drops system messages."""
    if keeps_system(render):
        return KEPT
    logger.warning("the chat template of %s drops system messages: served directly, a system "
                   "message vanishes; the front door (python -m phi3flow.front_door) folds it "
                   "into the first user turn. Tagged %s.", what, DROPPED)
    return DROPPED


def fold(messages: list[dict]) -> list[dict]:
    """The conversation with its system messages put at the start of the first user turn."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    if not system:
        return messages
    rest = [dict(m) for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        return [{"role": "user", "content": "\n\n".join(system)}, *rest]
    rest[users[0]]["content"] = "\n\n".join([*system, rest[users[0]]["content"]])
    return rest

"""The prompt's token ids: the conversation (tool calls and results as text, tools described)
through the model's chat template, with every message's text read as text, never as a tag.

`tokenizers` is imported only where a function needs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .grammar import TOOL_CALL, compact
from .request import BadRequest, Tools

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
                TOOL_CALL[0] + compact({"name": c["function"]["name"],
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
    functions = "\n".join(compact({"name": f["name"], "description": f["description"],
                                    "parameters": f["parameters"]}) for f in tools.callable)
    how = (f"To call a function, answer with {TOOL_CALL[0]}{{\"name\":<function name>,"
           f"\"arguments\":<its arguments as a JSON object>}}{TOOL_CALL[1]}"
           + (" (one such block per call)" if tools.parallel else "")
           + " and nothing else.")
    when = {"auto": " If no function helps, answer in words.",
            "required": " Call at least one function now."}.get(
        tools.choice, f" Call {tools.choice} now.")
    return f"You can call these functions (their arguments as JSON Schema):\n{functions}\n{how}{when}"



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


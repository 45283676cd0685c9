"""Structured outputs and tool calls by grammar-constrained decoding: a request's JSON schema, or
its tools, become a grammar (llguidance's Lark dialect), and at each step a token the grammar
cannot continue with is masked out of the logits, so every answer parses.

Phi-3-mini has no tool-call format of its own: the tools are described in the prompt
(prompt.tool_messages) and a call is written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
`llguidance` is imported only where a function needs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .request import TOOL_CHOICES, BadRequest, ChatRequest, Tools

TOOL_CALL = ("<tool_call>", "</tool_call>")
# Compact JSON: no whitespace between tokens, which a model could otherwise repeat forever.
JSON_OPTIONS = {"whitespace_flexible": False}


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + compact({**schema, "x-guidance": JSON_OPTIONS})


def grammar(answer_schema: dict[str, Any] | None, tools: Tools | None) -> str | None:
    """The grammar an answer must follow, or None when it is free text: JSON in the answer
    schema (else text), or, when tools may be called, one (or, if parallel, several) calls;
    with tool_choice auto either, a text answer never starting with a call's opening tag.
    A leading space is allowed: the tokenizer's word-start marker after `<|assistant|>`.

    The space goes inside the first call's opening tag (`OPEN`), not in a lexeme of its own:
    llguidance's lexer takes the longest match, so with `SP? (TEXT | calls)` a space followed
    by `<tool_call` was read as the start of TEXT, which the tag's `>` then ended, and an auto
    answer could never call a tool."""
    callable_ = tools.callable if tools else ()
    if answer_schema is None and not callable_:
        return None
    rules = []
    if answer_schema is not None:
        rules += ['SP: " "', f"answer: {_json_rule(answer_schema)}"]
        answer = "SP? answer"
    else:  # free text, where the alternative is a call: text that does not begin as one
        rules.append(f"TEXT: /(.|\\n)+/ & ~/\\s*{re.escape(TOOL_CALL[0])}(.|\\n)*/")
        answer = "TEXT"  # its leading whitespace is its own
    if not callable_:
        return "\n".join([f"start: {answer}", *rules]) + "\n"
    if tools.choice != "auto":
        rules = []  # the answer must be calls
    rules.append("call: " + _json_rule({"anyOf": [_call_schema(f) for f in callable_]}))
    rules.append(f"OPEN: /\\s?{re.escape(TOOL_CALL[0])}/")
    more = (f' ("{TOOL_CALL[0]}" call "{TOOL_CALL[1]}")*'
            if tools.parallel and tools.choice in TOOL_CHOICES else "")
    rules.append(f'calls: OPEN call "{TOOL_CALL[1]}"{more}')
    start = f"{answer} | calls" if tools.choice == "auto" else "calls"
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



def compiled(request: ChatRequest, tokenizer: Any) -> str | None:
    """The grammar `request`'s answer follows (None: free text), checked against the runtime's
    tokenizer (llguidance's view of it): a schema feature the engine lacks is refused naming
    the field it is in."""
    rules = grammar(request.schema, request.tools)
    if rules is not None:
        grammar_errors(request.schema, request.tools,
                       lambda text: grammar_error(tokenizer, text))
        error = grammar_error(tokenizer, rules)
        if error:  # the parts compiled on their own: their combination should too
            raise BadRequest(f"response_format and tools cannot be combined here: {error}")
    return rules

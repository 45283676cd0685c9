"""System messages never vanish silently: the probe tells a template that drops them (the real
Phi-3-mini-4k template, from the real vocabulary fixture) from one that keeps them, and folding
puts them where such a template shows them."""

from __future__ import annotations

import pytest
import transformers

from phi3flow.chat import system_messages
from tests.helpers import FIXTURE

VOCAB = FIXTURE.parent / "phi3-vocab"
PIRATE = [{"role": "system", "content": "You are a pirate."},
          {"role": "user", "content": "What is the capital of Spain?"}]


@pytest.fixture(scope="module")
def phi3():
    """The real Phi-3-mini-4k tokenizer and its original chat template."""
    return transformers.AutoTokenizer.from_pretrained(VOCAB, gguf_file="ggml-vocab-phi-3.gguf")


def _render(tokenizer):
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)


def test_the_real_phi3_template_drops_system_messages_and_the_probe_says_so(phi3, caplog):
    assert len(phi3) == 32064
    assert _render(phi3)(PIRATE) == (
        "<s><|user|>\nWhat is the capital of Spain?<|end|>\n<|assistant|>\n")
    assert system_messages.probe(_render(phi3), "phi3") == system_messages.DROPPED
    assert "drops system messages" in caplog.text


def test_a_template_that_keeps_them_is_told_apart():
    tiny = transformers.AutoTokenizer.from_pretrained(FIXTURE)
    assert system_messages.probe(_render(tiny), "tiny") == system_messages.KEPT


def test_folded_system_messages_reach_the_prompt_of_a_template_that_drops_them(phi3):
    folded = system_messages.fold(PIRATE)
    assert folded == [{"role": "user",
                       "content": "You are a pirate.\n\nWhat is the capital of Spain?"}]
    prompt = _render(phi3)(folded)
    assert "You are a pirate." in prompt
    ids = phi3.apply_chat_template(folded, add_generation_prompt=True, return_dict=False)
    assert ids == phi3.encode(prompt, add_special_tokens=False)  # real Phi-3 token ids
    assert len(ids) > len(phi3.apply_chat_template(PIRATE, add_generation_prompt=True,
                                                   return_dict=False))


def test_fold_keeps_the_conversation_and_handles_edge_cases():
    talk = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "system", "content": "s"}, {"role": "user", "content": "c"}]
    assert system_messages.fold(talk) == [{"role": "user", "content": "s\n\na"},
                                          {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c"}]
    assert system_messages.fold([{"role": "system", "content": "s"}]) == [
        {"role": "user", "content": "s"}]
    plain = [{"role": "user", "content": "a"}]
    assert system_messages.fold(plain) is plain

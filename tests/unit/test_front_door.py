"""The front door's request fields (phi3flow/serving/front_door.py FIELDS) against OpenAI's own list, and
each field walked through the check every request passes (over HTTP: tests/e2e/test_front_door.py)."""

from __future__ import annotations

import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from phi3flow.serving import front_door
from phi3flow.serving.front_door import FIELD, FIELDS, ApiError, check_fields

# For each field this server refuses: a value that asks for something.
ASKS_SOMETHING = {
    "presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"42": 5},
    "functions": [{"name": "f"}], "function_call": "auto",
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
    "verbosity": "high", "web_search_options": {}, "store": True, "metadata": {"k": "v"},
    "service_tier": "flex", "moderation": {"model": "m"}, "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "explicit"}, "prompt_cache_retention": "24h",
}


def test_the_table_has_every_field_of_openais_request_and_only_top_k_besides():
    """The SDK's CompletionCreateParams is generated from OpenAI's API description: a newer SDK
    with a field the table lacks fails here, so every field gets a decision."""
    openai_fields = set(CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert openai_fields - FIELD.keys() == set()
    assert FIELD.keys() - openai_fields == {"top_k"}
    assert len(FIELDS) == len(FIELD)  # each field once


@pytest.mark.parametrize("field", [f for f in FIELDS if not f.supported], ids=lambda f: f.name)
def test_a_refused_field_is_a_400_naming_it_and_its_no_op_values_pass(field):
    for value in (None, *field.asks_nothing):
        check_fields({field.name: value})  # accepted: nothing asked
    with pytest.raises(ApiError) as refused:
        check_fields({field.name: ASKS_SOMETHING[field.name]})
    assert refused.value.status == 400 and refused.value.param == field.name
    assert refused.value.message.startswith(f"{field.name} is not supported by this server")


def test_false_is_not_zero_and_an_unknown_field_is_refused_as_openai_refuses_it():
    with pytest.raises(ApiError, match="presence_penalty is not supported"):
        check_fields({"presence_penalty": False})  # JSON false is not the number 0
    with pytest.raises(ApiError, match=r"unrecognized request argument\(s\) \['best_of'\]") as e:
        check_fields({"model": "m", "best_of": 2})
    assert e.value.param == "best_of"


def test_every_refused_field_has_a_sample_that_asks_something():
    assert set(ASKS_SOMETHING) == {f.name for f in FIELDS if not f.supported}
    assert all(not FIELD[name].accepts(value) for name, value in ASKS_SOMETHING.items())


def test_nesting_is_measured_outside_strings():
    assert front_door._depth(b'{"a": [1, {"b": "x[[[[\\"]]"}]}') == 3
    assert front_door._depth(b"[" * 5000) == 5000 and front_door._depth(b"{}") == 1

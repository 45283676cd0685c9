"""The ONNX model's prefix cache (phi3flow/chat/prefix_cache.py, PrefixCache): a request that
continues a kept sequence reuses its KV cache and computes only its new tokens, and answers
token for token as the same request does without the cache, for every prompt form."""

from __future__ import annotations

import sys

import mlflow
import pytest

from tests.helpers import eval_rows

ROWS = eval_rows()
GREEDY = {"max_tokens": 24, "temperature": 0.0}
SYSTEM = {"role": "system", "content": "You answer questions about geography and arithmetic, "
                                      "briefly and in one sentence, like a helpful teacher."}


@pytest.fixture(scope="module")
def cached(onnx_model_uri):
    """The session's ONNX model, with the default cache."""
    return mlflow.pyfunc.load_model(onnx_model_uri)


@pytest.fixture(scope="module")
def uncached(onnx_model_uri):
    """The same model with the cache off (PHI3FLOW_ONNX_PREFIX_CACHE_MB=0)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PHI3FLOW_ONNX_PREFIX_CACHE_MB", "0")
        return mlflow.pyfunc.load_model(onnx_model_uri)


def ask(model, messages, **options) -> dict:
    (response,) = model.predict({"messages": messages, **GREEDY, **options})
    return response


def reply(response: dict) -> dict:
    return {"role": "assistant", "content": response["choices"][0]["message"]["content"]}


def cache_of(model):
    return model.unwrap_python_model().prefix_cache


def cached_tokens(response: dict) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


def same_answer(a: dict, b: dict) -> bool:
    return (a["choices"][0]["message"] == b["choices"][0]["message"]
            and a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
            and a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"])


def test_a_multi_turn_chat_reuses_each_turn_and_answers_as_without_the_cache(cached, uncached):
    """Five turns: from the second on, every prompt token of the previous turn (prompt and
    answer) is reused while the turn fits in the room the last generator was given (half its
    prompt, prefix_room); a turn that does not starts a generator with more, and
    the next turn is reused again. Each answer equals the uncached model's."""
    module = sys.modules[type(cached.unwrap_python_model().prefix_cache).__module__]
    messages, previous_total, room, reused = [], 0, 0, 0
    for turn, row in enumerate(ROWS[:5]):
        messages.append(row["messages"][0])
        with_cache, without = ask(cached, messages), ask(uncached, messages)
        assert same_answer(with_cache, without), turn
        assert cached_tokens(without) == 0
        prompt = with_cache["usage"]["prompt_tokens"]
        if turn and prompt + GREEDY["max_tokens"] <= room:
            # All but the re-fed last token of what the last turn's generator held.
            assert cached_tokens(with_cache) >= previous_total - 2, turn
            reused += 1
        elif turn:
            assert cached_tokens(with_cache) == 0, turn
        if not cached_tokens(with_cache):  # a fresh generator, and its room
            room = prompt + GREEDY["max_tokens"] + module.prefix_room(prompt)
        previous_total = with_cache["usage"]["total_tokens"]
        messages.append(reply(with_cache))
    assert reused >= 2  # most follow-ups


@pytest.mark.parametrize("form", ["system kept", "system folded into the first user turn"])
def test_a_system_message_in_either_form_is_reused(cached, uncached, form):
    def first_turn(row):
        if form == "system kept":
            return [SYSTEM, row["messages"][0]]
        return [{"role": "user", "content": SYSTEM["content"] + "\n\n"
                 + row["messages"][0]["content"]}]

    messages = first_turn(ROWS[5])
    first = ask(cached, messages)
    messages += [reply(first), ROWS[6]["messages"][0]]
    second, reference = ask(cached, messages), ask(uncached, messages)
    assert same_answer(second, reference)
    assert cached_tokens(second) >= first["usage"]["total_tokens"] - 2


def test_conversations_that_share_a_system_prompt_reuse_it(cached, uncached):
    """Another conversation with the same system prompt reuses the system prompt's tokens,
    and no more."""
    ask(cached, [SYSTEM, ROWS[7]["messages"][0]])
    other = [SYSTEM, ROWS[8]["messages"][0]]
    reused, reference = ask(cached, other), ask(uncached, other)
    assert same_answer(reused, reference)
    system_only = cached_tokens(reused)
    assert 16 <= system_only < reused["usage"]["prompt_tokens"]


def test_a_prompt_that_diverges_mid_way_reuses_up_to_the_divergence(cached, uncached):
    head = "Here is a long preamble that both prompts share word for word, so that " * 3
    first = [{"role": "user", "content": head + "What is the capital of Spain?"}]
    second = [{"role": "user", "content": head + "What is the capital of France?"}]
    ask(cached, first)
    diverged, reference = ask(cached, second), ask(uncached, second)
    assert same_answer(diverged, reference)
    prompt = diverged["usage"]["prompt_tokens"]
    assert 30 < cached_tokens(diverged) < prompt - 2


def test_eviction_keeps_the_cache_within_its_budget(onnx_model_uri, uncached):
    """A budget for about one kept generator: the second conversation evicts the first, whose
    next turn then starts afresh (and still answers right); the cache never holds more than
    its budget."""
    probe = cache_of(uncached)
    first_turn = [ROWS[0]["messages"][0]]
    module = sys.modules[type(uncached.unwrap_python_model().prefix_cache).__module__]
    prompt = len(uncached.unwrap_python_model().prepare_row({"messages": first_turn, **GREEDY}).ids)
    size = (prompt + GREEDY["max_tokens"] + module.prefix_room(prompt)) * probe.per_token
    small = mlflow.pyfunc.load_model(onnx_model_uri)
    cache = cache_of(small)
    cache.budget = int(size * 1.5)  # the fixture's cache is tiny: a budget finer than 1 MB
    conversations = [[row["messages"][0]] for row in ROWS[:2]]
    for messages in conversations:
        messages.append(reply(ask(small, messages)))
        assert cache.nbytes <= cache.budget and len(cache.kept) == 1
    conversations[0].append(ROWS[2]["messages"][0])
    evicted, reference = ask(small, conversations[0]), ask(uncached, conversations[0])
    assert cached_tokens(evicted) == 0 and same_answer(evicted, reference)
    assert cache.nbytes <= cache.budget


def test_a_seeded_request_starts_afresh(cached):
    """A seeded request's random stream must start afresh: it is not served from the cache."""
    messages = [ROWS[3]["messages"][0]]
    ask(cached, messages)
    follow = [*messages, {"role": "assistant", "content": "x"}, ROWS[4]["messages"][0]]
    assert cached_tokens(ask(cached, follow, seed=3, temperature=1.0)) == 0


def test_rows_of_one_call_are_answered_alike_with_and_without_the_cache(cached, uncached):
    """Rows that continue kept sequences run alone on their generators, the others share a
    batch; every row answers as without the cache."""
    kept = [[row["messages"][0]] for row in ROWS[9:11]]
    for messages in kept:
        messages.append(reply(ask(cached, messages)))
        messages.append(ROWS[0]["messages"][0])
    rows = [{"messages": m, **GREEDY} for m in [*kept, [ROWS[1]["messages"][0]]]]
    with_cache, without = cached.predict(rows), uncached.predict(rows)
    assert all(same_answer(a, b) for a, b in zip(with_cache, without))
    assert [cached_tokens(r) > 0 for r in with_cache] == [True, True, False]


def test_a_bad_budget_is_refused_with_the_fix(onnx_model_uri, monkeypatch):
    monkeypatch.setenv("PHI3FLOW_ONNX_PREFIX_CACHE_MB", "lots")
    with pytest.raises(Exception, match="PHI3FLOW_ONNX_PREFIX_CACHE_MB='lots' must be a whole"):
        mlflow.pyfunc.load_model(onnx_model_uri)

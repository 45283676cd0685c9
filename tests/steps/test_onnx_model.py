"""The onnxruntime-genai chat pyfunc: same answers as transformers, batches, threads, streams."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import types
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from phi3flow.core import names
from steps import fetch_model, log_onnx_pyfunc
from tests.helpers import FIXTURE, QUESTION, ROOT, eval_rows

ROWS = eval_rows()


@pytest.fixture(scope="module")
def onnx_model(onnx_model_uri):
    return mlflow.pyfunc.load_model(onnx_model_uri)


@pytest.fixture(scope="module")
def transformers_model(transformers_model_uri):
    return mlflow.pyfunc.load_model(transformers_model_uri)


@pytest.fixture
def no_prefix_cache(onnx_model, monkeypatch):
    """The model with its prefix cache off for one test, whose repeated prompts would otherwise
    be served from it (tests/steps/test_prefix_cache.py tests the cache)."""
    monkeypatch.setattr(onnx_model.unwrap_python_model().prefix_cache, "budget", 0)


def content(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def ask(model, row: dict, **options) -> dict:
    (response,) = model.predict({"messages": row["messages"], **options})
    return response


def loaded_module(model):
    """The module MLflow loaded the model's code into (models from code: not phi3flow's)."""
    return sys.modules[type(model.unwrap_python_model()).__module__]


def scheduler_module(model):
    """The scheduler module of the chat core the logged model carries (its `chat` package)."""
    (scheduler,) = [c for c in type(model.unwrap_python_model()).__mro__
                    if c.__name__ == "Scheduler"]
    return sys.modules[scheduler.__module__]


def prefix_cache_module(model):
    return sys.modules[type(model.unwrap_python_model().prefix_cache).__module__]


def test_fp32_onnx_answers_equal_the_transformers_answers(onnx_model, transformers_model):
    for row in ROWS:
        onnx, reference = ask(onnx_model, row), ask(transformers_model, row)
        assert content(onnx) == content(reference), row["messages"]
        assert row["expected"] in content(onnx)
        assert onnx["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
        assert onnx["choices"][0]["finish_reason"] == reference["choices"][0]["finish_reason"]


def test_response_has_the_openai_chat_completion_shape(onnx_model):
    response = ask(onnx_model, ROWS[0])
    assert response["object"] == "chat.completion"
    assert response["id"].startswith("chatcmpl-") and isinstance(response["created"], int)
    assert response["model"] == str(FIXTURE)
    (choice,) = response["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    usage = response["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_counts_new_tokens_and_reports_length(onnx_model):
    response = ask(onnx_model, ROWS[0], max_tokens=3)
    assert response["usage"]["completion_tokens"] == 3
    assert response["choices"][0]["finish_reason"] == "length"
    assert content(ask(onnx_model, ROWS[0])).startswith(content(response))


def test_options_come_from_params_too(onnx_model):
    (response,) = onnx_model.predict({"messages": ROWS[0]["messages"]}, params={"max_tokens": 2})
    assert response["usage"]["completion_tokens"] == 2


def test_stop_sequences_cut_the_answer(onnx_model):
    response = ask(onnx_model, ROWS[0], stop=["Spain"])
    assert content(response) == "The capital of "  # what comes before it, as OpenAI's API
    assert response["choices"][0]["finish_reason"] == "stop"


def test_every_row_of_a_batch_is_answered_as_if_alone(onnx_model):
    singles = [content(ask(onnx_model, row)) for row in ROWS]
    batch = onnx_model.predict([{"messages": row["messages"]} for row in ROWS])
    assert [content(r) for r in batch] == singles
    # Rows with different options are answered too, each with its own options.
    mixed = onnx_model.predict([{"messages": ROWS[0]["messages"], "max_tokens": 2},
                                {"messages": ROWS[1]["messages"]}])
    assert mixed[0]["usage"]["completion_tokens"] == 2 and content(mixed[1]) == singles[1]


@pytest.fixture
def prefill_calls(onnx_model, monkeypatch, no_prefix_cache) -> list[list[int]]:
    """The size of every prompt chunk each new Generator is fed (a wrapper around the real one)."""
    import onnxruntime_genai as og

    calls: list[list[int]] = []

    class RecordingGenerator:
        def __init__(self, *args):
            self.inner = og.Generator(*args)
            self.calls: list[int] = []
            calls.append(self.calls)

        def append_tokens(self, tokens):
            self.calls.append(len(tokens) if isinstance(tokens, list) else tokens.size)
            self.inner.append_tokens(tokens)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(onnx_model.unwrap_python_model(), "og", types.SimpleNamespace(
        GeneratorParams=og.GeneratorParams, Generator=RecordingGenerator))
    return calls


def test_chunked_prompt_feeding_gives_the_same_answers(onnx_model, prefill_calls, monkeypatch):
    """The prompt goes in chunks, one call each (GIL released between them), same output."""
    module = scheduler_module(onnx_model)
    whole = [ask(onnx_model, row) for row in ROWS[:4]]
    prefill_calls.clear()
    monkeypatch.setattr(module, "PREFILL_CHUNK", 1)
    monkeypatch.setattr(onnx_model.unwrap_python_model(), "alone_chunk", 1)
    chunked = [ask(onnx_model, row) for row in ROWS[:4]]
    assert [content(r) for r in chunked] == [content(r) for r in whole]
    # one call per token
    assert prefill_calls == [[1] * r["usage"]["prompt_tokens"] for r in whole]


def test_a_request_alone_prefills_in_large_chunks_and_beside_others_in_small_ones(
        onnx_model, prefill_calls, monkeypatch):
    """Adaptive prefill: ALONE_PREFILL_CHUNK tokens per call while a row is the only work,
    PREFILL_CHUNK while another batch runs beside it, so that one keeps decoding."""
    module = scheduler_module(onnx_model)
    monkeypatch.setattr(onnx_model.unwrap_python_model(), "alone_chunk", 8)
    monkeypatch.setattr(module, "PREFILL_CHUNK", 2)
    alone = ask(onnx_model, ROWS[0])
    tokens = alone["usage"]["prompt_tokens"]
    assert tokens > 8  # else this checks nothing
    assert prefill_calls == [[8] * (tokens // 8) + ([tokens % 8] if tokens % 8 else [])]
    prefill_calls.clear()
    # Different options: two batches started in the same turn, each fed beside the other.
    both = onnx_model.predict([{"messages": ROWS[0]["messages"], "max_tokens": 3},
                               {"messages": ROWS[0]["messages"], "max_tokens": 4}])
    assert [r["usage"]["completion_tokens"] for r in both] == [3, 4]
    assert len(prefill_calls) == 2
    for calls in prefill_calls:
        assert sum(calls) == tokens and calls[0] == 2  # the first chunks went in beside the other


@pytest.mark.parametrize(("env", "default"), [("ALONE_CHUNK_ENV", 256), ("BATCH_PREFILL_ENV", 256)])
def test_token_settings_are_256_unless_the_environment_says(onnx_model, monkeypatch, env,
                                                             default):
    module = scheduler_module(onnx_model)
    name = getattr(module, env)
    monkeypatch.delenv(name, raising=False)
    assert module.tokens_setting(name, default) == default
    monkeypatch.setenv(name, "16")
    assert module.tokens_setting(name, default) == 16
    for bad in ("lots", "0"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(MlflowException, match=f"{name}='{bad}' must be a whole number"):
            module.tokens_setting(name, default)


def test_the_batch_prefill_cap_decides_which_rows_share_a_generator(onnx_model, prefill_calls,
                                                                    monkeypatch):
    """rows x longest prompt within batch_prefill: one Generator, its prompts fed in one
    call; over it, a row per Generator. The answers are the same either way."""
    rows = [{"messages": row["messages"]} for row in ROWS]
    model = onnx_model.unwrap_python_model()
    singles = [content(ask(onnx_model, row)) for row in ROWS]
    sizes = [sum(calls) for calls in prefill_calls]  # each single's prompt tokens
    longest, shortest = max(sizes), min(sizes)
    prefill_calls.clear()
    monkeypatch.setattr(model, "batch_prefill", longest * len(rows))
    together = onnx_model.predict(rows)
    assert [content(r) for r in together] == singles
    assert prefill_calls == [[longest * len(rows)]]  # one Generator, one padded call
    prefill_calls.clear()
    monkeypatch.setattr(model, "batch_prefill", 2 * shortest - 1)  # no two rows fit
    apart = onnx_model.predict(rows)
    assert [content(r) for r in apart] == singles
    assert len(prefill_calls) == len(rows)


def test_concurrent_predicts_on_one_model_match_sequential_answers(onnx_model):
    expected = {i: content(ask(onnx_model, row)) for i, row in enumerate(ROWS)}
    jobs = [i % len(ROWS) for i in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: (i, content(ask(onnx_model, ROWS[i]))), jobs))
    assert [a for _, a in answers] == [expected[i] for i, _ in answers]


def test_stream_concatenates_to_the_answer_with_finish_reasons(onnx_model):
    for options, reason in (({}, "stop"), ({"max_tokens": 3}, "length")):
        chunks = list(onnx_model.predict_stream({"messages": ROWS[0]["messages"], **options}))
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == content(ask(onnx_model, ROWS[0], **options))
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == reason
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert len({c["id"] for c in chunks}) == 1


def test_a_streams_first_token_reaches_its_reader_before_the_next_step(onnx_model, monkeypatch):
    """A Generator call holds the GIL for its whole step (~0.1 s at full size), so a token put
    on a stream's queue would reach its reader only after the next step: the scheduler hands
    the first token over first (TTFT is not one step late; the gap the benchmark measured)."""
    module, model_class = scheduler_module(onnx_model), type(onnx_model.unwrap_python_model())
    monkeypatch.setattr(module, "FIRST_TOKEN_HANDOVER_S", 30.0)  # generous: the check is order
    real, read, seen = model_class._step, [], []

    def step(self, batch, alone):
        if batch.prompt is None:  # a decode step: how many chunks had the reader read by now?
            seen.append(len(read))
        return real(self, batch, alone)

    monkeypatch.setattr(model_class, "_step", step)
    for chunk in onnx_model.predict_stream({"messages": ROWS[0]["messages"], "max_tokens": 4,
                                                 "temperature": 0}):
        read.append(chunk)
    assert read[0]["choices"][0]["delta"]["content"]  # the first token is text of its own
    assert seen[:2] == [0, 1], seen


def test_kv_cache_is_sized_to_each_request(onnx_model, monkeypatch):
    """onnxruntime-genai allocates max_length up front: prompt + max_tokens, and for a request
    the prefix cache may keep, room for its conversation's next turn."""
    sizes = []
    cls = type(onnx_model.unwrap_python_model())
    real = cls._search_options

    def recording(self, options, max_length, batch_size):
        params = real(self, options, max_length, batch_size)
        sizes.append(params.get_search_options()["max_length"])
        return params

    monkeypatch.setattr(cls, "_search_options", recording)
    cache = onnx_model.unwrap_python_model().prefix_cache
    monkeypatch.setattr(cache, "kept", [])  # a fresh generator, not a kept one
    response = ask(onnx_model, ROWS[0], max_tokens=5)
    prompt = response["usage"]["prompt_tokens"]
    assert sizes == [prompt + 5 + prefix_cache_module(onnx_model).prefix_room(prompt)]
    monkeypatch.setattr(cache, "budget", 0)  # nothing kept: exactly what the request needs
    response = ask(onnx_model, ROWS[0], max_tokens=5)
    assert sizes[1:] == [response["usage"]["prompt_tokens"] + 5]


def test_no_generator_outlives_its_batch_unless_the_prefix_cache_keeps_it(onnx_model,
                                                                         monkeypatch):
    """A finished batch's Generator and its KV cache (prompt + max_tokens for every row: 1.8 GB
    for 8 rows of 288 tokens at full size) are freed when the batch ends. The scheduler once
    held the last one while it waited for the next request (a worker's memory grew by it)."""
    import onnxruntime_genai as og

    live: list[int] = []

    class CountedGenerator:
        def __init__(self, *args):
            self.inner = og.Generator(*args)
            live.append(id(self))

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __del__(self):
            live.remove(id(self))

    def alive_only_in_the_cache() -> bool:
        """Whether the live generators are the prefix cache's, once the scheduler has finished
        with the batch (the caller has its answer a moment before)."""
        deadline = time.monotonic() + 5
        while True:
            if live == [id(kept.generator) for kept in model.prefix_cache.kept]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    model = onnx_model.unwrap_python_model()
    monkeypatch.setattr(model, "og", types.SimpleNamespace(
        GeneratorParams=og.GeneratorParams, Generator=CountedGenerator))
    monkeypatch.setattr(model.prefix_cache, "kept", [])
    budget = model.prefix_cache.budget
    assert budget > 0
    monkeypatch.setattr(model.prefix_cache, "budget", 0)
    onnx_model.predict([{"messages": row["messages"], "max_tokens": 4} for row in ROWS[:2]])
    assert alive_only_in_the_cache() and not live, "a batch's generator outlived it"
    ask(onnx_model, ROWS[0], max_tokens=4)
    assert alive_only_in_the_cache() and not live, "a lone request's generator outlived it"
    monkeypatch.setattr(model.prefix_cache, "budget", budget)
    ask(onnx_model, ROWS[0], max_tokens=4)  # kept for the conversation's next turn
    assert alive_only_in_the_cache() and len(live) == 1


def test_a_model_nobody_holds_is_freed_and_its_scheduler_ends(onnx_model_uri):
    """A model that has answered and is then dropped is freed, weights and all: its scheduler
    thread holds it only while there is work. A Spark worker that scored one model and then the
    next job's once held both (12.3 GB against 8.2 GB in one process, at full size).
    MLflow keeps the model it loaded from code last (mlflow.models.model.__mlflow_model__), so
    the first model is dropped after a second one is loaded, as in that worker."""
    first = mlflow.pyfunc.load_model(onnx_model_uri)
    assert content(ask(first, ROWS[0], max_tokens=2))
    inner = first.unwrap_python_model()
    scheduler, freed = inner._scheduler, weakref.ref(inner)
    second = mlflow.pyfunc.load_model(onnx_model_uri)
    del first, inner
    gc.collect()
    assert freed() is None, "the dropped model is still alive"
    scheduler.join(timeout=10)
    assert not scheduler.is_alive()
    assert content(ask(second, ROWS[0], max_tokens=2))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"max_tokens": 5}, "has no messages"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content is empty"),
        ({"messages": [{"role": "user"}]}, "messages[0].content must be a string"),
        ({"messages": "hello"}, "messages must be a non-empty list"),
        ({**QUESTION, "max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({**QUESTION, "max_tokens": "ten"}, 'max_tokens must be a number, got "ten"'),
        ({**QUESTION, "max_tokens": 100000}, "max_tokens=100000 does not fit"),
        ({**QUESTION, "temperature": -0.5}, "temperature must be >= 0"),
        ({**QUESTION, "top_p": 0}, "top_p must be > 0"),
        ({**QUESTION, "n": 2}, "n must be 1"),
        ({**QUESTION, "stream": True}, "stream=true is not available over predict"),
        ({**QUESTION, "stop": [1]}, "stop must be a non-empty string"),
        ({**QUESTION, "temprature": 0.5}, "unknown field(s) ['temprature']"),
        ({"messages": [{"role": "user", "content": "x " * 5000}]}, "more than the context window"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_requests_are_refused_naming_the_field(onnx_model, payload, message):
    with pytest.raises(MlflowException) as error:
        onnx_model.predict(payload)
    assert message in str(error.value)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 when served
    assert content(ask(onnx_model, ROWS[0])) == ROWS[0]["answer"]  # still serving


@pytest.fixture(scope="module")
def prompt_model_uri(fetch_run_id):
    """The ONNX model logged with interface=prompt (the Phi-3 cookbook's contract), once."""
    return log_onnx_pyfunc.main(["--fetch_run_id", fetch_run_id, "--interface", "prompt",
                                 "--max_new_tokens", "32"])


def test_prompt_interface_answers_a_string(prompt_model_uri):
    model = mlflow.pyfunc.load_model(prompt_model_uri)
    assert model.predict({"prompt": "What is the capital of Spain?"}) == (
        "The capital of Spain is Madrid.")
    assert model.predict([{"prompt": r["messages"][0]["content"]} for r in ROWS[:3]]) == [
        r["answer"] for r in ROWS[:3]]
    with pytest.raises(MlflowException, match="non-empty string field prompt"):
        model.predict({"prompt": ""})
    with pytest.raises(MlflowException, match=r"unknown field\(s\) \['messages'\]"):
        model.predict(QUESTION)

    # The cookbook's own example payload is already in the chat format: it reaches the model
    # exactly as the cookbook's `tokenizer.encode(prompt)` gives it, not wrapped a second time.
    seed = ("<|system|>You are a stand-up comedian.<|end|><|user|>Tell me a joke about atom"
            "<|end|><|assistant|>")
    inner = model.unwrap_python_model()
    assert list(inner.prepare_row({"prompt": seed}).ids) == list(inner.tokenizer.encode(seed))
    plain = list(inner.prepare_row({"prompt": "What is the capital of Spain?"}).ids)
    wrapped = inner.tokenizer.apply_chat_template(json.dumps(
        [{"role": "user", "content": "What is the capital of Spain?"}]), add_generation_prompt=True)
    assert plain == list(inner.tokenizer.encode(wrapped))
    assert isinstance(model.predict({"prompt": seed}), str)


def test_the_prompt_interface_reuses_its_prefix_too(prompt_model_uri, monkeypatch):
    """interface=prompt (pre-formatted prompts): a prompt that extends the last one reuses it,
    with the same answer as without the cache."""
    with_cache = mlflow.pyfunc.load_model(prompt_model_uri)
    monkeypatch.setenv("PHI3FLOW_ONNX_PREFIX_CACHE_MB", "0")
    without = mlflow.pyfunc.load_model(prompt_model_uri)
    turn = "<|user|>\nWhat is the capital of Spain?<|end|>\n<|assistant|>\n"
    answer = with_cache.predict({"prompt": turn})
    follow = f"{turn}{answer}<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"
    assert with_cache.predict({"prompt": follow}) == without.predict({"prompt": follow})
    assert with_cache.unwrap_python_model().prefix_cache.hits == 1


def test_int4_build_loads_and_answers(int4_onnx):
    """The default precision's build, logged, answers every row the fixture learned. (That
    fetch_model builds and records the precision asked: tests/steps/test_steps.py.)"""
    fetch = fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", str(int4_onnx)])
    uri = log_onnx_pyfunc.main(["--fetch_run_id", fetch, "--max_new_tokens", "32"])
    model = mlflow.pyfunc.load_model(uri)
    answers = [content(ask(model, row)) for row in ROWS]
    assert sum(row["expected"] in a for row, a in zip(ROWS, answers)) == len(ROWS), answers


def test_logged_from_code_without_pickles_or_torch(onnx_model_uri, fetch_run_id):
    model = mlflow.get_logged_model(onnx_model_uri.split("/")[-1])
    stored = Path(mlflow.artifacts.download_artifacts(model.artifact_location))
    files = [p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "onnx_runtime.py" in files  # the model's code (models from code)
    # The chat core it is part of, and no other project code.
    shipped = sorted(f.removeprefix("code/chat/") for f in files if f.startswith("code/"))
    assert shipped == sorted(f.name for f in (ROOT / "phi3flow" / "chat").glob("*.py")), shipped
    requirements = (stored / "requirements.txt").read_text()
    assert "onnxruntime-genai==0.18.0" in requirements and "torch" not in requirements
    fetch_tags = mlflow.get_run(fetch_run_id).data.tags
    assert model.tags[names.TAG_FETCH_RUN_ID] == fetch_run_id
    assert model.tags[names.TAG_MANIFEST_SHA256] == fetch_tags[names.TAG_MANIFEST_SHA256]
    assert model.tags[names.TAG_ONNX_SOURCE] == "build"
    assert model.tags[names.TAG_ONNX_EXECUTION_PROVIDER] == "cpu"

    # A process that hangs prints where it is, before the timeout kills it.
    # phi3flow made unimportable: the model runs on the code it carries.
    code = ("import faulthandler, json, sys\n"
            "faulthandler.dump_traceback_later(240, exit=True)\n"
            "sys.modules['phi3flow'] = None\n"
            "import mlflow\n"
            "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "print(json.dumps(m.predict(json.loads(sys.argv[2]))))\n")
    done = subprocess.run(
        [sys.executable, "-c", code, onnx_model_uri, json.dumps(QUESTION)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert done.returncode == 0, done.stderr[-6000:]
    assert "Madrid" in done.stdout


def test_tampered_onnx_file_is_refused_by_name(fp32_onnx):
    fetch = fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", str(fp32_onnx)])
    store = Path(mlflow.artifacts.download_artifacts(run_id=fetch, artifact_path=""))
    (store / "onnx" / "genai_config.json").write_text("{}")  # in the run's artifact store
    with pytest.raises(Exception, match="onnx/genai_config.json has"):
        log_onnx_pyfunc.main(["--fetch_run_id", fetch])


def test_onnx_threads_come_from_the_environment_and_a_bad_value_is_named(onnx_model_uri,
                                                                          monkeypatch):
    """PHI3FLOW_ONNX_THREADS sets onnxruntime's threads (e.g. cores / serving workers)."""
    monkeypatch.setenv("PHI3FLOW_ONNX_THREADS", "1")
    assert content(ask(mlflow.pyfunc.load_model(onnx_model_uri), ROWS[0])) == ROWS[0]["answer"]
    monkeypatch.setenv("PHI3FLOW_ONNX_THREADS", "two")
    with pytest.raises(MlflowException, match="PHI3FLOW_ONNX_THREADS='two' must be a whole number"):
        mlflow.pyfunc.load_model(onnx_model_uri)

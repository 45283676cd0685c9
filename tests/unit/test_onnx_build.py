"""onnx_build's int8 KV cache (`fetch_model -P onnx_source=build -P kv_cache=int8`), on the fixture."""

from __future__ import annotations

import json

import pytest

from phi3flow.fetching import onnx_build
from tests.helpers import FIXTURE, eval_rows

ROWS = eval_rows()


@pytest.fixture(scope="module")
def builds(tmp_path_factory, int4_onnx):
    root = tmp_path_factory.mktemp("kv-cache")
    int8 = onnx_build.build(FIXTURE, root / "int8", "int4", "cpu", kv_cache="int8",
                            baseline=int4_onnx)
    return {"fp32": int4_onnx, "int8": int8}


def greedy_answers(folder) -> list[str]:
    """raw onnxruntime-genai, greedy; the prompt in 8-token chunks so later chunks and every
    decode step read the cache as the build stores it."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    answers = []
    for row in ROWS:
        ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(row["messages"]),
                                                             add_generation_prompt=True))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 32, do_sample=False)
        generator = og.Generator(model, params)
        for start in range(0, len(ids), 8):
            generator.append_tokens(ids[start:start + 8])
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        answers.append(tokenizer.decode(tokens))
    return answers


def test_an_int8_kv_cache_build_has_an_int8_cache_in_a_shared_buffer(builds):
    assert onnx_build.kv_cache_dtype(builds["fp32"]) == "fp32"
    assert onnx_build.kv_cache_dtype(builds["int8"]) == "int8"
    search = json.loads((builds["int8"] / onnx_build.GENAI_CONFIG).read_text())["search"]
    assert search["past_present_share_buffer"] is True  # the builder had turned it off


def test_an_int8_kv_cache_answers_the_smoke_set_as_the_fp32_cache_does(builds):
    fp32, int8 = greedy_answers(builds["fp32"]), greedy_answers(builds["int8"])
    assert all(row["expected"] in answer for row, answer in zip(ROWS, fp32))  # else moot
    assert int8 == fp32

"""Unit tests of phi3flow.core.config: defaults that work, and bad values refused by name."""

from __future__ import annotations

import dataclasses

import pytest

from phi3flow.core import names
from phi3flow.core.config import ConfigError, parameters, parse_config
from phi3flow.fetching.config import FetchModelConfig
from phi3flow.models.config import GenerationOptions, LogTransformersConfig
from phi3flow.pipeline import config as pipeline_config
from phi3flow.pipeline import stages as pipeline
from phi3flow.pipeline.config import MainConfig
from tests.helpers import FIXTURE

RUN_ID = "0123456789abcdef0123456789abcdef"


def test_default_model_is_pinned_to_a_commit_not_a_branch():
    cfg = parse_config(FetchModelConfig, [])
    assert cfg.model_id == names.DEFAULT_MODEL_ID
    assert cfg.revision == names.DEFAULT_MODEL_REVISION
    assert len(cfg.revision) == 40 and cfg.revision != "main"


def test_other_hub_models_default_to_main_and_local_folders_have_no_revision():
    assert parse_config(FetchModelConfig, ["--model_id", "org/other", "--onnx_source", "build"]
                        ).revision == "main"
    local = parse_config(FetchModelConfig, ["--model_id", str(FIXTURE), "--onnx_source", "build"])
    assert local.is_local_model and local.revision == ""


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--onnx_source", "s3-bucket"], "onnx_source='s3-bucket'"),
        (["--precision", "int3"], "precision='int3'"),
        (["--execution_provider", "tpu"], "execution_provider='tpu'"),
        (["--log_weights", "maybe"], "log_weights='maybe'"),
        (["--model_id", "not a model"], "model_id='not a model'"),
        (["--model_id", "/no/such/dir/at/all"], "model_id='/no/such/dir/at/all'"),
        (["--model_id", "org/other"], "onnx_source=hub provides the ONNX build"),
        (["--kv_cache", "fp8", "--onnx_source", "build"], "kv_cache='fp8' is not one of fp32, int8"),
        (["--kv_cache", "int8"], "kv_cache=int8 needs onnx_source=build"),
        (["--block_size", "48", "--onnx_source", "build"], "block_size=48 is not one of 16, 32"),
        (["--block_size", "128"], "block_size=128 needs onnx_source=build"),
        (["--block_size", "128", "--onnx_source", "build", "--precision", "fp32"],
         "block_size=128 needs onnx_source=build with precision int4 or int8"),
    ],
)
def test_fetch_model_bad_values_are_named(argv, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        parse_config(FetchModelConfig, argv)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([], "fetch_run_id is required"),
        (["--fetch_run_id", "latest"], "fetch_run_id='latest' is not an MLflow run ID"),
        (["--fetch_run_id", RUN_ID, "--max_new_tokens", "0"], "max_new_tokens=0"),
        (["--fetch_run_id", RUN_ID, "--temperature", "-1"], "temperature=-1.0"),
        (["--fetch_run_id", RUN_ID, "--top_p", "1.5"], "top_p=1.5"),
        (["--fetch_run_id", RUN_ID, "--torch_dtype", "int8"], "torch_dtype='int8'"),
        (["--fetch_run_id", RUN_ID, "--max_new_tokens", "many"], "bad command line"),
    ],
)
def test_log_transformers_bad_values_are_named(argv, named):
    with pytest.raises(ConfigError, match=named):
        parse_config(LogTransformersConfig, argv)


def test_greedy_by_default_and_sampling_only_when_asked():
    greedy = parse_config(LogTransformersConfig, ["--fetch_run_id", RUN_ID])
    assert greedy.generation_defaults() == {"max_new_tokens": 256, "do_sample": False}
    sampled = parse_config(LogTransformersConfig,
                           ["--fetch_run_id", RUN_ID, "--temperature", "0.7", "--top_p", "0.9"])
    assert sampled.generation_defaults() == {
        "max_new_tokens": 256, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50}


def test_main_validates_every_step_before_running_any():
    with pytest.raises(ConfigError, match="top_p=0.0"):
        parse_config(MainConfig, ["--model_id", str(FIXTURE), "--onnx_source", "build",
                                  "--top_p", "0"])


def test_main_hands_each_step_exactly_its_own_parameters():
    cfg = parse_config(MainConfig, ["--model_id", str(FIXTURE), "--onnx_source", "build",
                                    "--max_new_tokens", "7"])
    fetch_stage, log_stage = pipeline.PIPELINE[:2]
    fetch = fetch_stage.parameters(cfg, {})
    log = log_stage.parameters(cfg, {names.FETCH_MODEL: RUN_ID})
    assert fetch["model_id"] == str(FIXTURE) and "max_new_tokens" not in fetch
    assert log == {**log, "fetch_run_id": RUN_ID, "max_new_tokens": "7"} and "model_id" not in log
    assert "fetch_run_id" not in parameters(cfg)  # main wires run IDs itself
    # One flag feeds every step that takes that option.
    assert cfg.evaluate.max_new_tokens == cfg.log_onnx_pyfunc.max_new_tokens == 7


def test_main_is_composed_of_the_steps_options_and_shared_flags_agree():
    """MainConfig contains each step's options; a flag several steps take has one default and
    one main-level help saying what it feeds (no field silently meaning two things)."""
    parts = pipeline_config.main_parts()
    assert list(parts) == [stage.entry_point for stage in pipeline.PIPELINE]
    owners: dict[str, list] = {}
    for part in parts.values():
        for f in dataclasses.fields(part):
            owners.setdefault(f.name, []).append(f)
    shared = {name for name, fields in owners.items() if len(fields) > 1}
    assert shared == set(pipeline_config.MAIN_SHARED_HELP)
    for name in shared:
        assert len({f.default for f in owners[name]}) == 1, f"{name}: defaults differ"
    flags = {f.name: f.metadata["help"] for f in pipeline_config.main_fields()}
    assert set(flags) == set(owners) | {"force"}
    assert all(flags[name] == pipeline_config.MAIN_SHARED_HELP[name] for name in shared)


def test_every_stage_consumes_run_ids_by_the_name_its_producer_hands_on():
    outputs = {stage.entry_point: stage.output for stage in pipeline.PIPELINE}
    seen = set()
    for stage in pipeline.PIPELINE:
        for param, producer in stage.upstream.items():
            assert producer in seen, f"{stage.entry_point} runs before its input {producer}"
            assert param == outputs[producer], f"{stage.entry_point}.{param} vs {producer}"
        seen.add(stage.entry_point)


def test_the_onnx_model_code_falls_back_to_the_configs_generation_defaults():
    """onnx_chat_model.py is logged as standalone model code and cannot import the config, so
    its fallbacks (for a model_config without a key) are a copy: they must stay the same."""
    from phi3flow.chat import onnx_runtime as onnx_chat_model

    defaults = {f.name: f.default for f in dataclasses.fields(GenerationOptions)}
    assert onnx_chat_model.DEFAULTS == {
        "max_tokens": defaults["max_new_tokens"], "temperature": defaults["temperature"],
        "top_p": defaults["top_p"], "top_k": defaults["top_k"], "stop": None}


def test_the_defaults_are_pinned_commits_so_main_reuses_a_default_fetch():
    default = parse_config(FetchModelConfig, [])
    assert default.onnx_revision == names.DEFAULT_ONNX_REVISION and default.pinned
    assert not parse_config(FetchModelConfig, ["--onnx_revision", "main"]).pinned
    assert not parse_config(FetchModelConfig, ["--revision", "main"]).pinned

"""Unit tests of phi3flow.config: defaults that work, and bad values refused by name."""

from __future__ import annotations

import pytest

from phi3flow import names
from phi3flow.config import (
    ConfigError,
    FetchModelConfig,
    LogTransformersConfig,
    MainConfig,
    parameters,
    parse_config,
)
from tests.conftest import FIXTURE

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
    fetch = parameters(cfg.fetch_model_config())
    log = parameters(cfg.log_transformers_config(RUN_ID))
    assert fetch["model_id"] == str(FIXTURE) and "max_new_tokens" not in fetch
    assert log == {**log, "fetch_run_id": RUN_ID, "max_new_tokens": "7"} and "model_id" not in log
    assert "fetch_run_id" not in parameters(cfg)  # main wires run IDs itself

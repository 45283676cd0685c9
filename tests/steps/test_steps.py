"""In-process tests of each step's main(argv) on the tiny fixture: outputs, tags, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.core.errors import StepError
from phi3flow.fetching import manifest, onnx_build
from phi3flow.fetching.manifest import Manifest
from steps import fetch_model, log_transformers
from tests.helpers import FIXTURE, QUESTION, created_run, predict_in_fresh_process


def test_fetch_model_logs_files_and_a_manifest_of_them(fetch_run_id):
    run = mlflow.get_run(fetch_run_id)
    assert run.info.status == "FINISHED"
    data = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{names.MANIFEST}"))
    assert run.data.tags[names.TAG_MANIFEST_SHA256] == Manifest.read(run).sha256()
    assert run.data.tags[names.TAG_MODEL_ID] == str(FIXTURE)
    assert run.data.tags[names.TAG_ONNX_SOURCE] == "build"
    assert data["sources"]["onnx"]["precision"] == "fp32"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        entry = data["files"][f"checkpoint/{name}"]
        assert entry["sha256"] == manifest.sha256_file(FIXTURE / name)
        assert entry["size"] == (FIXTURE / name).stat().st_size
    assert "onnx/genai_config.json" in data["files"]
    assert any(key.endswith(".onnx") for key in data["files"])
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(fetch_run_id)}
    assert {"manifest.json", "checkpoint", "onnx", "config.json"} <= artifacts


def test_log_transformers_model_answers_openai_chat_in_a_fresh_process(
        fetch_run_id, transformers_model_uri):
    # No pickles either: it loads with pickle deserialization refused.
    answer = predict_in_fresh_process(transformers_model_uri, QUESTION,
                                      env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert "Madrid" in answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_both_logged_models_name_the_checkpoint_they_came_from(transformers_model_uri,
                                                               onnx_model_uri):
    """A completion's `model` is the checkpoint's model_id for both models, not the temporary
    folder the transformers model was staged in."""
    for uri in (transformers_model_uri, onnx_model_uri):
        (answer,) = mlflow.pyfunc.load_model(uri).predict({**QUESTION, "max_tokens": 8})
        assert answer["model"] == str(FIXTURE), uri


def test_log_transformers_tags_lineage_and_pins_requirements(fetch_run_id, transformers_model_uri):
    # The run that logged the fixture's model (other tests leave FAILED log_transformers runs).
    run = mlflow.get_run(
        mlflow.get_logged_model(transformers_model_uri.split("/")[-1]).source_run_id)
    fetch = mlflow.get_run(fetch_run_id)
    expected = {
        names.TAG_FETCH_RUN_ID: fetch_run_id,
        names.TAG_MODEL_ID: str(FIXTURE),
        names.TAG_REVISION: "local",
        names.TAG_MANIFEST_SHA256: fetch.data.tags[names.TAG_MANIFEST_SHA256],
        names.TAG_TRUST_REMOTE_CODE: "false",
    }
    assert expected.items() <= run.data.tags.items()
    model = mlflow.get_logged_model(transformers_model_uri.split("/")[-1])
    assert expected.items() <= model.tags.items()
    requirements = mlflow.artifacts.load_text(f"{model.artifact_location}/requirements.txt")
    pins = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    assert "transformers==5.23.0" in pins and "torch==2.13.0" in pins
    assert all("==" in pin for pin in pins), pins
    assert not any(pin.startswith("torchvision") for pin in pins)


def _assert_failed_with(step: str, message: str):
    run = created_run()
    assert run.info.status == "FAILED" and run.data.tags[names.TAG_STEP] == step
    assert message in run.data.tags[names.TAG_ERROR]


def test_missing_fetch_run_id_fails_the_run_with_the_fix():
    with pytest.raises(StepError, match="fetch_run_id is required: pass -P fetch_run_id="):
        log_transformers.main([])
    _assert_failed_with(names.LOG_TRANSFORMERS, "fetch_run_id is required")


def test_unknown_fetch_run_id_is_refused():
    with pytest.raises(StepError, match="no such run in the tracking store"):
        log_transformers.main(["--fetch_run_id", "f" * 32])
    _assert_failed_with(names.LOG_TRANSFORMERS, "no such run")


def test_run_of_another_step_is_refused(transformers_model_uri):
    other = mlflow.get_logged_model(transformers_model_uri.split("/")[-1]).source_run_id
    with pytest.raises(StepError, match="is a log_transformers run, not a fetch_model run"):
        log_transformers.main(["--fetch_run_id", other])


def test_failed_fetch_run_is_refused(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(StepError, match="is not a Hugging Face checkpoint: it has no config.json"):
        fetch_model.main(["--model_id", str(tmp_path / "not-a-checkpoint"),
                          "--onnx_source", "build"])
    failed = created_run()
    assert failed.info.status == "FAILED"
    assert not mlflow.MlflowClient().list_artifacts(failed.info.run_id, "checkpoint")
    with pytest.raises(StepError, match="with status FAILED, not FINISHED"):
        log_transformers.main(["--fetch_run_id", failed.info.run_id])


def test_unknown_onnx_source_fails_before_any_work():
    with pytest.raises(StepError, match="onnx_source='onnx-zoo' is not `hub`, `build`"):
        fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", "onnx-zoo"])
    _assert_failed_with(names.FETCH_MODEL, "onnx_source='onnx-zoo'")


def _artifact_dir(run_id: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=""))


@pytest.mark.e2e  # an ONNX build of its own (int8 KV cache, block 16)
def test_fetch_model_builds_the_kv_cache_and_block_size_asked_and_records_them():
    run_id = fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", "build",
                               "--kv_cache", "int8", "--block_size", "16"])
    source = Manifest.read(mlflow.get_run(run_id)).sources[names.ONNX_DIR]
    assert (source.kind, source.precision, source.kv_cache, source.block_size) == (
        "build", "int4", "int8", 16)
    built = _artifact_dir(run_id) / names.ONNX_DIR
    assert onnx_build.kv_cache_dtype(built) == "int8"
    assert onnx_build.block_size(built) == 16  # read from the graph: the builder took it


def test_tampered_weights_are_refused_by_file_name(fp32_onnx):
    run_id = fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", str(fp32_onnx)])
    weights = _artifact_dir(run_id) / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(StepError, match="checkpoint/model.safetensors does not match its sha256"):
        log_transformers.main(["--fetch_run_id", run_id])
    _assert_failed_with(names.LOG_TRANSFORMERS, "model.safetensors")


def test_tampered_manifest_is_refused(fp32_onnx):
    run_id = fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", str(fp32_onnx)])
    path = _artifact_dir(run_id) / names.MANIFEST
    data = json.loads(path.read_text())
    data["files"]["checkpoint/model.safetensors"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    with pytest.raises(StepError, match="manifest was changed after the run"):
        log_transformers.main(["--fetch_run_id", run_id])


def _fetch_with_code(tmp_path: Path, onnx: Path, trust: str) -> tuple[dict, dict]:
    """Fetch a checkpoint that ships Python code; the ONNX side is the session fetch's."""
    import shutil

    checkpoint = tmp_path / f"with-code-{trust}"
    shutil.copytree(FIXTURE, checkpoint)
    (checkpoint / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    run_id = fetch_model.main(["--model_id", str(checkpoint), "--onnx_source", str(onnx),
                               *(["--trust_remote_code", trust] if trust else [])])
    run = mlflow.get_run(run_id)
    data = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{names.MANIFEST}"))
    return run.data.tags, data["files"]


def test_trust_remote_code_is_off_by_default_and_tagged(tmp_path, fetch_run_id, fp32_onnx):
    tags, files = _fetch_with_code(tmp_path, fp32_onnx, "")
    assert tags[names.TAG_TRUST_REMOTE_CODE] == "false"
    assert "checkpoint/modeling_custom.py" not in files  # code is not even fetched
    assert mlflow.get_run(fetch_run_id).data.tags[names.TAG_TRUST_REMOTE_CODE] == "false"
    # log_transformers: off by default too (its tag is checked in
    # test_log_transformers_tags_lineage_and_pins_requirements).


def test_trust_remote_code_on_is_tagged_and_fetches_the_code(tmp_path, fp32_onnx):
    tags, files = _fetch_with_code(tmp_path, fp32_onnx, "true")
    assert tags[names.TAG_TRUST_REMOTE_CODE] == "true"
    assert "checkpoint/modeling_custom.py" in files  # and verified like every fetched file

"""No secret from the environment ends up in the tracking store, an artifact or the log.

The whole offline pipeline runs with a fake Hugging Face token and Azure-style credentials in
its environment; then every byte of the tracking database, every artifact and the output are
searched for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_project

pytestmark = pytest.mark.e2e

SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenFORtestsONLY0123456789abcdef",
    "AZURE_CLIENT_SECRET": "azure-client-secret-FAKE-0123456789",
    "AZURE_STORAGE_KEY": "c3RvcmFnZS1rZXktRkFLRS0wMTIzNDU2Nzg5",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-FAKE-0123456789",
}


def test_pipeline_leaks_no_secret_from_its_environment(tracking, tmp_path):
    done = run_project("-e", "main", "-P", "model_id=tests/fixtures/tiny-phi3",
                       "-P", "onnx_source=build", "-P", "max_new_tokens=32",
                       cwd=tmp_path, env=SECRETS)
    assert done.returncode == 0, done.stderr[-4000:]
    searched = {"output": (done.stdout + done.stderr).encode()}
    searched["tracking database"] = Path(tracking.removeprefix("sqlite:///")).read_bytes()
    artifacts = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    assert len(artifacts) > 20  # the store really holds the pipeline's artifacts
    for path in artifacts:
        searched[str(path)] = path.read_bytes()
    for name, secret in SECRETS.items():
        leaks = [where for where, data in searched.items() if secret.encode() in data]
        assert not leaks, f"{name} found in {leaks}"

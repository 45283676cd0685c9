"""The pipeline against a tracking server without MLflow 3's logged-model API (as Azure ML's).

A real `mlflow server` (sqlite) runs on 127.0.0.1 behind a small proxy that answers 404 on
/api/2.0/mlflow/logged-models, as Azure ML workspaces do with MLflow 3 (docs/decisions.md). The log steps
must fall back to save_model + log_artifacts, and evaluate and register must finish from the
resulting runs:/ URIs.
"""

from __future__ import annotations

import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from phi3flow import names
from steps import evaluate, fetch_model, log_onnx_pyfunc, log_transformers, register
from tests.helpers import (
    FIXTURE,
    QUESTION,
    created_run,
    free_port,
    predict_in_fresh_process,
    tracking_server,
)

pytestmark = pytest.mark.e2e


class _Proxy(BaseHTTPRequestHandler):
    upstream_port = 0
    refused: list[str] = []

    def log_message(self, *args):
        pass

    def _forward(self):
        if "/mlflow/logged-models" in self.path:
            self.refused.append(self.path)
            body = b"404 Not Found"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host",)}
        upstream.request(self.command, self.path, body=data, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


@pytest.fixture
def server_without_logged_models(tmp_path, monkeypatch):
    port = free_port()
    with tracking_server(tmp_path, port):
        handler = type("Proxy", (_Proxy,), {"upstream_port": port, "refused": []})
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.server_address[1]}")
        yield handler
        proxy.shutdown()


def test_pipeline_completes_where_the_logged_model_api_answers_404(server_without_logged_models):
    fetch = fetch_model.main(["--model_id", str(FIXTURE), "--onnx_source", "build",
                              "--precision", "fp32"])
    transformers_uri = log_transformers.main(["--fetch_run_id", fetch, "--max_new_tokens", "32"])
    onnx_uri = log_onnx_pyfunc.main(["--fetch_run_id", fetch, "--max_new_tokens", "32"])
    assert server_without_logged_models.refused, "the proxy never saw the logged-model API"
    assert transformers_uri.startswith("runs:/") and transformers_uri.endswith(
        names.TRANSFORMERS_MODEL_NAME)
    assert onnx_uri.startswith("runs:/") and onnx_uri.endswith(names.ONNX_MODEL_NAME)
    for uri in (transformers_uri, onnx_uri):
        answer = predict_in_fresh_process(uri, QUESTION,
                                          env={"MLFLOW_TRACKING_URI": os.environ[
                                              "MLFLOW_TRACKING_URI"]})
        assert "Madrid" in answer["choices"][0]["message"]["content"]

    def run_id(uri: str) -> str:
        return uri.split("/")[1]

    decision = evaluate.main(["--transformers_run_id", run_id(transformers_uri),
                              "--onnx_run_id", run_id(onnx_uri), "--max_new_tokens", "32"])
    assert decision.models[decision.chosen].model_uri.startswith("runs:/")
    evaluate_run = created_run()
    registered = register.main(["--evaluate_run_id", evaluate_run.info.run_id])
    assert registered.alias == "champion"
    version = mlflow.MlflowClient().get_model_version_by_alias(names.DEFAULT_REGISTERED_MODEL,
                                                               "champion")
    assert version.source.startswith(("runs:/", "mlflow-artifacts:"))

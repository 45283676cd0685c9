"""A stand-in for a tracking server that refuses what an Azure ML workspace refuses: a real
`mlflow server` (sqlite) on 127.0.0.1 behind a small proxy that answers some requests itself.

It is not named after Azure on purpose: the store adapter (`phi3flow/core/store.py`) must follow what
a store answers, not what it is called, so the same refusals come from a plain `http://` server.
Each refusal is one of the workspace stand-in's, with the same answer and the same source
(`tests/azureml_standin.py`):

- `logged-models`: MLflow 3's logged-model API, an empty 404 (LOGGED_MODELS_404);
- `registry-tag-filters`: a registered-model or model-version search with a tag clause or `!=`,
  issue 42155's 400 (REGISTRY_TAG_FILTERS_400), which is what MLflow's own prompt filter gets;
- `escaped-keys`: a run search with a backtick-escaped identifier, a 400;
- `max-results`: `max_results` of 1,000 or more in a run, version or metric-history search,
  issue 10694's 400 (MAX_RESULTS_400);
- `traces`: the trace API, an empty 403 (TRACES_403);
- `aliases`: the registry's alias endpoints, an empty 404 (ALIASES_UNKNOWN's default);
- `registry` (not in ALL): every registry endpoint, an empty 404, as a server without one.

Everything else is forwarded to the real server. `refused` records what it refused, by name.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tests.azureml_standin import MAX_RESULTS, azure_error, search_refusal
from tests.helpers import free_port, tracking_server

ALL = ("logged-models", "registry-tag-filters", "escaped-keys", "max-results", "traces",
       "aliases")


class _Proxy(BaseHTTPRequestHandler):
    upstream_port = 0
    refusing: frozenset[str] = frozenset()
    refused: list[tuple[str, str]] = []  # (refusal, path)
    forwarded: list[str] = []  # paths

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes | dict, content_type="application/json"):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refusal(self, body: bytes) -> tuple[str, int, bytes | dict] | None:
        url = urlparse(self.path)
        endpoint = re.sub(r"^/api/[23]\.0/(preview/)?mlflow/", "", url.path)
        if endpoint == url.path:  # not MLflow's REST API (the UI, artifacts, health)
            return None
        try:
            request = json.loads(body or b"{}") if self.command == "POST" else {
                k: v[0] for k, v in parse_qs(url.query).items()}
        except ValueError:
            request = {}
        if endpoint.startswith("logged-models"):
            return "logged-models", 404, b""
        if endpoint.startswith("traces"):
            return "traces", 403, b""
        if endpoint == "registered-models/alias":
            return "aliases", 404, b""
        if "registry" in self.refusing and endpoint.startswith(("registered-models",
                                                                  "model-versions")):
            return "registry", 404, b""
        if endpoint in ("runs/search", "model-versions/search", "metrics/get-history") and int(
                request.get("max_results") or 0) >= MAX_RESULTS:
            return "max-results", 400, azure_error(
                f"MaxResults = {request['max_results']} is invalid: MaxResults must be less than "
                "1000.", "BAD_REQUEST")
        kind = {"runs/search": "runs", "registered-models/search": "registry",
                "model-versions/search": "registry"}.get(endpoint)
        if kind:
            order_by = request.get("order_by")
            feature = search_refusal(request.get("filter", ""),
                                     [order_by] if isinstance(order_by, str) else order_by, kind)
            if feature == "tag filter in a registry search":
                return "registry-tag-filters", 400, azure_error(
                    "Currently unsupported filter string format (we currently do not support "
                    f"OR). Provided filter string: {request.get('filter', '')}",
                    "INVALID_PARAMETER_VALUE")
            if feature == "escaped identifiers":
                return "escaped-keys", 400, {"error_code": "INVALID_PARAMETER_VALUE",
                                             "message": "escaped identifiers are not supported"}
        return None

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        refusal = self._refusal(data)
        if refusal and refusal[0] in self.refusing:
            name, status, body = refusal
            self.refused.append((name, self.path))
            return self._reply(status, body, "application/json" if body else "text/plain")
        self.forwarded.append(self.path)
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=300)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        upstream.request(self.command, self.path, body=data or None, headers=headers)
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


@contextmanager
def refusing_server(root: Path, refusing=ALL):
    """A real `mlflow server` behind the refusing proxy; yields the proxy's handler class (its
    `uri`, `refused`, `forwarded`; set `refusing` to change what it refuses)."""
    port = free_port()
    with tracking_server(root, port):
        handler = type("Proxy", (_Proxy,), {"upstream_port": port, "refused": [],
                                            "forwarded": [], "refusing": frozenset(refusing)})
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        handler.uri = f"http://127.0.0.1:{proxy.server_address[1]}"
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            yield handler
        finally:
            proxy.shutdown()

"""Local stand-ins for an Azure ML workspace and its job service (no Azure is reachable here).

**Workspace stand-in** (`Workspace`): what `azureml-mlflow`, Microsoft's MLflow client for Azure
ML, talks to, speaking the protocol it speaks (read from its source, azureml-mlflow 1.62.0.post6):

- a real `mlflow server` (sqlite) serves MLflow's REST API, but only under Azure ML's path
  `/mlflow/v2.0/subscriptions/<s>/resourceGroups/<g>/providers/Microsoft.MachineLearningServices/
  workspaces/<w>/api/2.0/mlflow/...`, over TLS (azureml-mlflow builds `https://` URLs and
  nothing overrides it), with a bearer token required (401 without one, or with an expired one);
- it is **never more lenient than Azure ML**: it serves only the MLflow REST endpoints and the
  search features that Microsoft documents for a workspace (or that azureml-mlflow's own code
  calls), `ALLOWED` below, each with its source; it answers what Azure is known to answer where
  that is known (403 on the trace API, an empty 404 on MLflow 3's logged-model API) and a 400
  naming the feature for everything else (`Refusal`). The same table, with the sources, is in
  docs/decisions.md ("What the workspace stand-in answers");
- runs' artifact URIs are rewritten to the form current workspaces answer, `azureml://<host>/
  mlflow/v2.0/<workspace scope>/experiments/<id>/runs/<id>/artifacts`, and the run-history
  artifact endpoints that azureml-mlflow calls for them
  (`/history/v1.0/<scope>/experiments/<e>/runs/<r>/artifacts[/batch/metadata|/contentinfo]`)
  hand out SAS URLs into **Azurite**, Microsoft's Azure Storage emulator, so every artifact byte
  goes through the real azure-storage-blob client into real (emulated) blob storage;
- the run-token refresh endpoint (`/history/v1.0/<scope>/experimentids/<e>/runs/<r>/token`)
  that azureml-mlflow calls inside a job, and a managed-identity endpoint (`/msi`, the protocol
  azure-identity's ManagedIdentityCredential speaks) that gives the user's side its token;
- a run token (a job's) is checked on every write: runs are created only in its experiment, and
  written only if they are the job's run or nested under it (403 otherwise; RUN_TOKEN_SCOPE);
- the job's run carries the tags Azure sets on it (JOB_SYSTEM_TAGS), and a write that would
  change `mlflow.user` or `mlflow.rootRunId` is refused.

Where Azure's behaviour is undocumented it refuses, and can be set to each of the answers a real
workspace might give instead: the registry's alias endpoints (`alias_answer`: refused with an
empty 404 by default; or 403, an Azure-shaped error body, a hang past the client's timeout, or
served), the run-token refresh for runs nested under the job (`token_scope`: only the job's own
run by default). `artifact_fault` makes every artifact upload fail with an error that quotes its
SAS URL. Every request to the MLflow API is recorded (`requests`), refusals included.

What it cannot prove: Azure's real responses beyond these shapes, RBAC, quotas, the image build,
and real blob hostnames. azureml-mlflow downloads only from URLs that look like
`https://<account>.blob.core.windows.net/...` (and silently writes nothing otherwise), so the SAS
URLs it gets carry one extra query parameter that makes an Azurite URL match that pattern; the
blob client drops it before the request goes out.

**Job-service stand-in** (`JobService`): an offline stand-in for `MLClient.jobs` / `.compute`.
It takes the exact job the backend submits (azure-ai-ml's `Command`, from `load_job`), lays out
the code snapshot with Azure's ignore rules, creates the job's MLflow run in the workspace (run
ID = job name, as Azure ML does), sets the environment an Azure ML job gets (JOB_ENVIRONMENT
below), runs the job's command in this interpreter's environment (standing in for the image
built from the job's conda file), and reports Azure job states.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, quote, urlparse

from tests.helpers import free_port

AZURITE_VERSION = "3.37.0"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, well-known development key (not a secret).
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
CONTAINER = "azureml"
# azureml-mlflow's download check wants *.blob.core.windows.net (see the module docstring).
BLOB_HOST_DECOY = "&_=.blob.core.windows.net/x/y?z"
SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE = ("00000000-0000-0000-0000-000000000000", "rg-phi3",
                                           "ws-phi3")
SCOPE = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
         f"Microsoft.MachineLearningServices/workspaces/{WORKSPACE}")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi3flow"


def azurite_bin() -> Path:
    """Azurite's blob server, installed from the npm registry on first use (about 20 s)."""
    prefix = CACHE / f"azurite-{AZURITE_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                        f"azurite@{AZURITE_VERSION}"], cwd=prefix, check=True, timeout=600)
    return binary


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1, and a CA bundle of the system's CAs plus it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path, bundle = (directory / "cert.pem", directory / "key.pem",
                                   directory / "ca-bundle.pem")
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    system = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    bundle.write_bytes((system.read_bytes() if system.exists() else b"") + b"\n" + cert_pem)
    return cert_path, key_path, bundle


@dataclass
class Counters:
    """What the stand-in saw: the tests assert on these."""
    unauthorized: list[str] = field(default_factory=list)
    logged_models_404: int = 0
    token_refreshes: int = 0
    refused_refreshes: list[str] = field(default_factory=list)
    # Every call to the MLflow API: (method, path after /api/, status); refusals by feature.
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


# --- What a workspace's MLflow endpoint answers -------------------------------------------------
# Sources (Microsoft Learn, articles/machine-learning/ in MicrosoftDocs/azure-ai-docs):
RUNS = ("how-to-track-experiments-mlflow.md, 'Query & compare experiments and runs with MLflow' "
        "(create, query, search experiments and runs; metrics, params, tags, artifacts)")
LOGGING = "how-to-log-view-metrics.md, 'Log metrics, parameters, and files with MLflow'"
MODELS = ("how-to-manage-models-mlflow.md, 'Review supported capabilities for managing models' "
          "(the support matrix)")
# The MLflow REST endpoints served, by path after /api/2.0/mlflow/ (any method): each with the
# capability that documents it.
ALLOWED = {
    "experiments/get": RUNS + ": get_experiment",
    "experiments/get-by-name": RUNS + ": get_experiment_by_name",
    "experiments/create": RUNS + ": create experiments",
    "experiments/search": RUNS + ": search_experiments",
    "runs/create": LOGGING + ": start_run",
    "runs/get": RUNS + ": get_run",
    "runs/update": LOGGING + ": end_run / run status",
    "runs/search": RUNS + ": search_runs (features: SEARCH_REFUSALS)",
    "runs/log-batch": LOGGING + ": log_metrics, log_params, set_tags",
    "runs/log-metric": LOGGING + ": log_metric",
    "runs/log-parameter": LOGGING + ": log_param",
    "runs/set-tag": LOGGING + ": set_tag",
    "metrics/get-history": RUNS + ": get_metric_history",
    "registered-models/create": MODELS + ": register models from runs outputs (runs:/)",
    "registered-models/get": MODELS + ": retrieving details of registered models",
    "registered-models/search": MODELS + ": search/list registered models (by name; no LIKE)",
    "model-versions/create": MODELS + ": register models from runs outputs (runs:/)",
    "model-versions/get": MODELS + ": retrieving details of registered model's versions",
    # Assumed: in no support matrix or example of Microsoft's; azureml-mlflow's registry store is
    # MLflow's REST store, which sends every version search here. Searched by name only
    # (REGISTRY_TAG_FILTERS_400), in pages under MAX_RESULTS_400's limit.
    "model-versions/search": "assumed: azureml-mlflow's registry store sends every version "
                             "search here; documented nowhere",
    "model-versions/get-download-uri": MODELS + ": retrieving details (loading a version)",
    "model-versions/update": MODELS + ": edit registered model's versions description",
    "model-versions/set-tag": MODELS + ": edit registered model's versions tags",
    "model-versions/delete-tag": MODELS + ": edit registered model's versions tags",
    "model-versions/delete": MODELS + ": delete a registered model's version",
    "registered-models/get-latest-versions": MODELS + ": manage MLflow model stages",
    "model-versions/transition-stage": MODELS + ": manage MLflow model stages",
}
# Writes with a run token (a job's) beyond the job's own run and the runs nested under it, or runs
# created in another experiment. Assumed (safe side): nothing documents a run token's scope; a
# job's run token is issued for the job's run (azureml-mlflow refreshes it by that run's ID).
RUN_TOKEN_SCOPE = "assumed: a run token writes only to its run's tree (403 otherwise)"
# Known answers to what a workspace does not serve.
TRACES_403 = ("Azure/azure-sdk-for-python issue 40261 (open): `/api/2.0/mlflow/traces` failed "
              "with error code 403; Microsoft: \"mlflow tracing is not supported in AML yet\"; "
              "MLflow falls back from /api/3.0 to /api/2.0 only on a 404")
LOGGED_MODELS_404 = ("MLflow 3 against a workspace: `/api/2.0/mlflow/logged-models` failed with "
                     "error code 404 (azure-sdk-for-python issue 44896; docs/decisions.md)")
ALIASES_UNKNOWN = ("assumed: the alias endpoints are in no support matrix (MODELS lists stages, "
                   "not aliases); refused by default, `alias_answer` plays each other answer")
# A registry search with a tag clause or `!=`, as a workspace answers it: Azure/azure-sdk-for-python
# issue 42155 (open), the body quoted there (to the filter MLflow adds to every registered-model
# search, ``tag.`mlflow.prompt.is_prompt` != 'true'``); Microsoft's model matrix (MODELS) lists no
# search of registered models by tag. Applied to model-version searches too (assumed: the same
# service parses both).
REGISTRY_TAG_FILTERS_400 = "Azure/azure-sdk-for-python issue 42155"
# `max_results` of 1,000 or more: mlflow/mlflow issue 10694, a workspace's answer to MLflow's
# metric-history page of 25,000 ("MaxResults must be less than 1000"). Applied to run and
# model-version searches too (assumed: MLflow's own defaults ask 1,000 and 10,000 there; 1,000
# itself is refused, as the message says).
MAX_RESULTS_400 = "mlflow/mlflow issue 10694"
MAX_RESULTS = 1000  # refused from here up
# Tags Azure ML sets on a job's run: seen in a command job's run read back through MLflow
# (`mlflow.rootRunId` and `mlflow.runName` the job's name, `mlflow.user` the submitting user's
# display name). Whether a job may change them is documented nowhere; overwriting `mlflow.user`
# has been reported refused (mlflow/mlflow-export-import issue 78). The safe side: the stand-in
# refuses, with a 400, any write that would change `mlflow.user` or `mlflow.rootRunId` on a run
# that has them. `mlflow.runName` stays writable: Microsoft documents the job's display name as
# the way to name its run (how-to-use-mlflow-cli-runs.md), and `mlflow run --run-name` sets it.
JOB_SYSTEM_TAGS = ("mlflow.rootRunId", "mlflow.runName", "mlflow.user")
PROTECTED_TAGS = ("mlflow.rootRunId", "mlflow.user")
STANDIN_USER = "Stand-in User"


def azure_error(message: str, error_code: str, status: int = 400) -> dict:
    """An error body in the shape a workspace's MLflow endpoint sends (issues 42155, 10694)."""
    return {"Error": {"Code": "UserError", "Severity": None, "Message": message,
                      "MessageFormat": None, "MessageParameters": None, "ReferenceCode": None,
                      "DetailsUri": None, "Target": None, "Details": [], "InnerError": None,
                      "DebugInfo": None, "AdditionalInfo": None},
            "Correlation": {"operation": uuid.uuid4().hex, "request": uuid.uuid4().hex[:16]},
            "Environment": "stand-in", "Location": "stand-in", "Time": datetime.datetime.now(
                datetime.timezone.utc).isoformat(), "ComponentName": "mlflow",
            "statusCode": status, "error_code": error_code}


# Run search features refused, each with its source.
SEARCH_REFUSALS = {
    "filter on attributes": "assumed from the 2022 page (MicrosoftDocs/azure-docs "
                            "how-to-track-experiments-mlflow.md): \"Expressions containing "
                            "attributes.status in the parameter filter_string are not support at "
                            "the moment\"; the 2025 page lists attribute filters as supported, so "
                            "this is stricter than Azure",
    "LIKE/ILIKE": "the 2022 page: not supported (the 2025 page: supported; stricter than Azure); "
                  "MODELS: no LIKE/ILIKE in registry searches",
    "OR": RUNS + ", 'Filter runs': \"the syntax doesn't support OR\"",
    "!= on tags": RUNS + ", support matrix, footnote 2: \"!= for tags not supported\"",
    "order by metrics, params or tags": RUNS + ", 'Order runs': \"The order_by parameter doesn't "
                                        "currently support expressions containing metrics.*, "
                                        "params.*, or tags.*\"",
    "escaped identifiers": "assumed: RUNS shows only unescaped keys (`tags.mlflow.parentRunId`) "
                           "and lists escaped identifiers as unsupported for metrics; refused "
                           "for every key (stricter than Azure, if it takes them for tags)",
}


@dataclass(frozen=True)
class Refusal:
    """One request the stand-in refused, and which feature of Azure's it lacks."""
    method: str
    path: str
    feature: str


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`")
_STRINGS = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def search_refusal(filter_string: str, order_by: list[str] | None = None,
                   kind: str = "runs") -> str | None:
    """The feature of SEARCH_REFUSALS a search of `kind` ("runs", "registry", "experiments")
    uses, or None if a workspace answers it."""
    from mlflow.utils.search_utils import SearchUtils

    runs = kind == "runs"
    bare = _QUOTED.sub("''", filter_string or "")
    if re.search(r"(?i)\bor\b", bare):
        return "OR"
    if re.search(r"(?i)\bi?like\b", bare):
        return "LIKE/ILIKE"
    if runs and "`" in _STRINGS.sub("''", " ".join([filter_string or "", *(order_by or [])])):
        return "escaped identifiers"
    if kind == "registry" and (re.search(r"(?i)\btags?\s*\.", bare) or "!=" in bare):
        return "tag filter in a registry search"
    if runs and filter_string:
        for clause in SearchUtils.parse_search_filter(filter_string):
            if clause["type"] == "attribute":
                return "filter on attributes"
            if clause["type"] == "tag" and clause["comparator"] == "!=":
                return "!= on tags"
    for key in order_by or []:
        if runs and SearchUtils.parse_order_by_for_search_runs(key)[0] != "attribute":
            return "order by metrics, params or tags"
    return None


class Workspace:
    """The workspace stand-in (see the module docstring). Use `with workspace(tmp) as ws:`."""

    def __init__(self, root: Path, run_token_seconds: int = 3600):
        import jwt  # PyJWT, a dependency of azureml-mlflow

        self.jwt, self.root = jwt, root
        self.secret = uuid.uuid4().hex
        self.run_token_seconds = run_token_seconds
        self.counters = Counters()
        self.mode = "ok"  # "ok" | "401" (every token refused) | "403" (no role on the workspace)
        # The registry's alias endpoints (see the module docstring): "404" (an empty 404, the
        # default), "403", "azure-error" (500 with Azure's error body), "timeout" (no answer for
        # `alias_hang_s`), or "serve" (MLflow's own answers).
        self.alias_answer = "404"
        self.alias_hang_s = 30.0
        # Run-token refresh: "job" (only for the job's own run, the default) or "descendants"
        # (also for runs nested under it).
        self.token_scope = "job"
        self.artifact_fault = False  # every artifact upload fails, quoting its SAS URL
        self.lock = threading.Lock()
        self.parents: dict[str, str | None] = {}  # run ID -> its parent's (descends_from)

    # -- tokens ------------------------------------------------------------------------------
    def token(self, kind: str, seconds: int, **claims) -> str:
        return self.jwt.encode({"exp": int(time.time()) + seconds, "kind": kind, **claims},
                               self.secret, algorithm="HS256")

    def run_token(self, run_id: str, experiment_id: str) -> str:
        return self.token("run", self.run_token_seconds, run_id=run_id,
                          experiment_id=experiment_id)

    def check_token(self, header: str | None) -> dict | None:
        if not header or not header.startswith("Bearer "):
            return None
        try:
            return self.jwt.decode(header[7:], self.secret, algorithms=["HS256"])
        except self.jwt.PyJWTError:  # expired or not ours
            return None

    # -- URIs --------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tracking_uri(self) -> str:
        """What `az ml workspace show --query mlflow_tracking_uri` prints, for this host."""
        return f"azureml://{self.host}/mlflow/v1.0{SCOPE}"

    def client_env(self) -> dict[str, str]:
        """The user's side: tracking into the workspace, signed in through managed identity."""
        # The test process's own calls give up after 2 retries. In the full suite the user's
        # side stalled 4 to 8 minutes before the job's submission (twice; 34 s while every
        # side had 2 retries), with no request reaching the workspace meanwhile: taken to be a
        # call retried with MLflow's default backoff, not yet identified. The job's environment
        # (tls_env) keeps MLflow's defaults, as on Azure.
        return {"MLFLOW_TRACKING_URI": self.tracking_uri,
                "IDENTITY_ENDPOINT": f"https://{self.host}/msi", "IDENTITY_HEADER": "stand-in",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", **self.tls_env()}

    def tls_env(self) -> dict[str, str]:
        # Trust the stand-in's certificate (requests, azure-core and the blob client read it);
        # AZUREML_CURRENT_CLOUD spares azureml-mlflow a lookup of Azure's cloud metadata.
        # No MLFLOW_HTTP_REQUEST_* setting: a job runs with MLflow's own retries, as on Azure.
        return {"REQUESTS_CA_BUNDLE": str(self.bundle), "SSL_CERT_FILE": str(self.bundle),
                "AZUREML_CURRENT_CLOUD": "AzureCloud", "NO_PROXY": "127.0.0.1,localhost"}

    def artifact_uri(self, experiment_id: str, run_id: str) -> str:
        """A run's artifact URI in the form current workspaces answer (regional host, the
        workspace's scope, experiment and run by ID)."""
        return (f"azureml://{self.host}/mlflow/v2.0{SCOPE}/experiments/{experiment_id}/runs/"
                f"{run_id}/artifacts")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Workspace:
        from azure.storage.blob import BlobServiceClient

        self.root.mkdir(parents=True, exist_ok=True)
        self.cert, self.key, self.bundle = make_certificate(self.root)
        self.backend_port, self.blob_port, self.port = free_port(), free_port(), free_port()
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 f"sqlite:///{self.root / 'workspace.db'}", "--default-artifact-root",
                 str(self.root / "unused-artifacts"), "--host", "127.0.0.1", "--port",
                 str(self.backend_port), "--workers", "1"],
                cwd=self.root, stdout=open(self.root / "mlflow-server.log", "w"),
                stderr=subprocess.STDOUT),
            subprocess.Popen(
                [str(azurite_bin()), "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
                 "--location", str(self.root / "azurite"), "--cert", str(self.cert), "--key",
                 str(self.key), "--skipApiVersionCheck", "--loose", "--silent"],
                cwd=self.root, stdout=open(self.root / "azurite.log", "w"),
                stderr=subprocess.STDOUT),
        ]
        handler = type("Handler", (_Handler,), {"ws": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert all(p.poll() is None for p in self.procs), "a stand-in process exited"
            assert time.monotonic() < deadline, "the workspace stand-in did not start in 120 s"
            time.sleep(0.5)
        self.blobs = BlobServiceClient(
            f"https://127.0.0.1:{self.blob_port}/{AZURITE_ACCOUNT}",
            credential={"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY},
            connection_verify=str(self.bundle))
        for _ in range(60):
            try:
                self.blobs.create_container(CONTAINER)
                break
            except Exception as exc:
                if "ContainerAlreadyExists" in str(exc):
                    break
                time.sleep(0.5)
        else:
            raise AssertionError("Azurite did not come up")
        return self

    def stop(self) -> None:
        self.server.shutdown()
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- the backing server, as the service itself uses it (no token: Azure's own side) -------
    def backend(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=120)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload or b"{}")

    def experiment(self, id_or_name: str) -> dict:
        try:
            return self.backend("GET", f"/api/2.0/mlflow/experiments/get?experiment_id="
                                       f"{quote(id_or_name)}")["experiment"]
        except RuntimeError:
            return self.backend("GET", f"/api/2.0/mlflow/experiments/get-by-name?"
                                       f"experiment_name={quote(id_or_name)}")["experiment"]

    def artifact_bytes(self, run_id: str) -> int:
        """The bytes stored in blob storage under a run's artifacts."""
        prefix = self.blob_name(run_id, "")
        container = self.blobs.get_container_client(CONTAINER)
        return sum(b.size for b in container.list_blobs(name_starts_with=prefix))

    def refused(self, *features: str) -> list[Refusal]:
        return [r for r in self.counters.refusals if not features or r.feature in features]

    def run_tags(self, run_id: str) -> dict[str, str]:
        """A run's tags as the backing server has them ({} for no such run)."""
        try:
            found = self.backend("GET", f"/api/2.0/mlflow/runs/get?run_id={quote(run_id)}")
        except RuntimeError:
            return {}
        return {t["key"]: t["value"] for t in found["run"]["data"].get("tags", [])}

    def descends_from(self, run_id: str, ancestor: str) -> bool:
        """Whether `run_id` is `ancestor` or nested under it (a run's parent never changes, so
        each is looked up once)."""
        for _ in range(10):
            if run_id == ancestor:
                return True
            if run_id not in self.parents:
                self.parents[run_id] = self.run_tags(run_id).get("mlflow.parentRunId")
            run_id = self.parents[run_id]
            if run_id is None:
                return False
        return False

    def blob_name(self, run_id: str, path: str) -> str:
        return f"ExperimentRun/dcid.{run_id}/{path}"

    def sas_url(self, blob: str) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        sas = generate_blob_sas(AZURITE_ACCOUNT, CONTAINER, blob, account_key=AZURITE_KEY,
                                permission=BlobSasPermissions(read=True, write=True, create=True),
                                expiry=datetime.datetime.now(datetime.timezone.utc)
                                + datetime.timedelta(hours=1))
        return (f"https://127.0.0.1:{self.blob_port}/{AZURITE_ACCOUNT}/{CONTAINER}/"
                f"{quote(blob)}?{sas}{BLOB_HOST_DECOY}")

    def artifact_paths(self, run_id: str) -> list[str]:
        prefix = self.blob_name(run_id, "")
        container = self.blobs.get_container_client(CONTAINER)
        return sorted(b.name[len(prefix):] for b in container.list_blobs(name_starts_with=prefix))


_WORKSPACE_PREFIX = re.compile(r"^/mlflow/v2\.0(?P<scope>/subscriptions/[^/]+/resourceGroups/"
                               r"[^/]+/providers/Microsoft\.MachineLearningServices/workspaces/"
                               r"[^/]+)(?P<rest>/api/.*)$", re.IGNORECASE)
_HISTORY = re.compile(r"^/history/v1\.0(?P<scope>/subscriptions/.+?/workspaces/[^/]+)/"
                      r"(?P<kind>experiments|experimentids)/(?P<exp>[^/]+)/runs/(?P<run>[^/]+)"
                      r"/(?P<what>artifacts(?:/batch/metadata|/contentinfo)?|token)$",
                      re.IGNORECASE)


class _Handler(BaseHTTPRequestHandler):
    ws: Workspace
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict | bytes | None = None,
               content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (
            json.dumps(body).encode() if body is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/msi":
            return self._msi(query)
        claims = self.ws.check_token(self.headers.get("Authorization"))
        self.claims = claims or {}
        if claims is None or self.ws.mode == "401":
            self.ws.counters.unauthorized.append(f"{self.command} {url.path}")
            return self._reply(401, {"error": {"code": "AuthenticationFailed",
                                               "message": "missing, invalid or expired token"}})
        if self.ws.mode == "403":
            return self._reply(403, {"error": {"code": "AuthorizationFailed", "message":
                                               "the client does not have authorization"}})
        if match := _WORKSPACE_PREFIX.match(url.path):
            if match["scope"].lower() != SCOPE.lower():
                return self._reply(404, {"error": {"code": "WorkspaceNotFound",
                                                   "message": match["scope"]}})
            return self._mlflow(match["rest"], url.query, body)
        if (match := _HISTORY.match(url.path)) and match["scope"].lower() == SCOPE.lower():
            if match["what"] == "token":
                return self._refresh(claims, match["exp"], match["run"])
            return self._artifacts(match["run"], match["what"], query, body)
        return self._reply(404, {"error": {"code": "NotFound", "message": url.path}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _msi(self, query: dict) -> None:
        if not self.headers.get("X-IDENTITY-HEADER"):
            return self._reply(400, {"error": "X-IDENTITY-HEADER missing"})
        expires = int(time.time()) + 3600
        self._reply(200, {"access_token": self.ws.token("user", 3600), "expires_on": str(expires),
                          "resource": query.get("resource", ""), "token_type": "Bearer"})

    def _refresh(self, claims: dict, experiment_id: str, run_id: str) -> None:
        allowed = claims.get("kind") == "run" and (
            run_id == claims["run_id"] if self.ws.token_scope == "job"
            else self.ws.descends_from(run_id, claims["run_id"]))
        if not allowed:
            self.ws.counters.refused_refreshes.append(run_id)
            return self._reply(403, {"error": {"code": "Forbidden", "message": "not this run"}})
        self.ws.counters.token_refreshes += 1
        token = self.ws.run_token(run_id, experiment_id)
        expiry = datetime.datetime.fromtimestamp(self.ws.jwt.decode(
            token, options={"verify_signature": False})["exp"], datetime.timezone.utc)
        self._reply(200, {"token": token, "expiryTimeUtc": expiry.isoformat()})

    def _mlflow(self, rest: str, query: str, body: bytes) -> None:
        status = self._answer_mlflow(rest, query, body)
        with self.ws.lock:
            self.ws.counters.requests.append((self.command, rest, status))

    def _refuse(self, rest: str, feature: str, status: int = 400,
                body: dict | None = None) -> int:
        with self.ws.lock:
            self.ws.counters.refusals.append(Refusal(self.command, rest, feature))
        self._reply(status, body or {"error": {"code": "UserError", "message": (
            f"{feature} is not supported by this workspace (the Azure ML stand-in serves only "
            f"what Azure ML documents): {self.command} {rest}")}})
        return status

    # Writes to a run, by endpoint: a run token may make them only to its own run and the runs
    # nested under it (RUN_TOKEN_SCOPE).
    RUN_WRITES = ("runs/update", "runs/log-batch", "runs/log-metric", "runs/log-parameter",
                  "runs/set-tag", "runs/delete-tag", "runs/delete", "runs/restore")

    def _out_of_scope(self, endpoint: str, request: dict) -> str | None:
        """What a run token asks for beyond its scope (RUN_TOKEN_SCOPE), or None."""
        claims = self.claims
        if endpoint == "runs/create":
            if str(request.get("experiment_id")) != str(claims["experiment_id"]):
                return f"create runs in experiment {request.get('experiment_id')}"
            return None
        if endpoint in self.RUN_WRITES:
            run_id = request.get("run_id") or request.get("run_uuid") or ""
            if not self.ws.descends_from(run_id, claims["run_id"]):
                return f"write to run {run_id}"
        return None

    def _changes_system_tags(self, request: dict) -> list[str]:
        """The PROTECTED_TAGS a write would change on a run that has them."""
        tags = ([{"key": request.get("key"), "value": request.get("value")}]
                if "key" in request else request.get("tags", []))
        asked = {t["key"]: t["value"] for t in tags if t.get("key") in PROTECTED_TAGS}
        if not asked:
            return []
        run_id = request.get("run_id") or request.get("run_uuid") or ""
        current = self.ws.run_tags(run_id)
        return [k for k, v in asked.items() if k in current and current[k] != v]

    def _answer_mlflow(self, rest: str, query: str, body: bytes) -> int:
        endpoint = re.sub(r"^/api/[23]\.0/(preview/)?mlflow/", "", rest)
        if endpoint.startswith("traces"):  # TRACES_403, both API versions
            with self.ws.lock:
                self.ws.counters.refusals.append(Refusal(self.command, rest, "traces"))
            self._reply(403, b"", "text/plain")
            return 403
        if endpoint.startswith("logged-models"):  # LOGGED_MODELS_404
            self.ws.counters.logged_models_404 += 1
            self._reply(404, b"", "text/plain")
            return 404
        if endpoint == "registered-models/alias" and self.ws.alias_answer != "serve":
            return self._alias(rest)  # ALIASES_UNKNOWN
        if not rest.startswith("/api/2.0/mlflow/") or endpoint not in ALLOWED and not (
                endpoint == "registered-models/alias"):
            return self._refuse(rest, f"the MLflow endpoint {endpoint}")
        request = json.loads(body or b"{}") if self.command == "POST" else {
            k: v[0] for k, v in parse_qs(query).items()}
        if endpoint in ("runs/search", "model-versions/search", "metrics/get-history") and int(
                request.get("max_results") or 0) >= MAX_RESULTS:  # MAX_RESULTS_400
            return self._refuse(rest, "max_results of 1000 or more", body=azure_error(
                f"MaxResults = {request['max_results']} is invalid: MaxResults must be less "
                "than 1000.", "BAD_REQUEST"))
        if endpoint in ("runs/search", "experiments/search", "registered-models/search",
                        "model-versions/search"):
            order_by = request.get("order_by")
            kind = {"runs/search": "runs", "experiments/search": "experiments"}.get(
                endpoint, "registry")
            refusal = search_refusal(request.get("filter", ""),
                                     [order_by] if isinstance(order_by, str) else order_by, kind)
            if refusal == "tag filter in a registry search":  # REGISTRY_TAG_FILTERS_400
                return self._refuse(rest, refusal, body=azure_error(
                    "Currently unsupported filter string format (we currently do not support "
                    f"OR). Provided filter string: {request.get('filter', '')}",
                    "INVALID_PARAMETER_VALUE"))
            if refusal:
                return self._refuse(rest, refusal)
        if self.claims.get("kind") == "run" and (refusal := self._out_of_scope(endpoint,
                                                                                request)):
            return self._refuse(rest, "a run token beyond its run", status=403, body={"error": {
                "code": "Forbidden", "message": f"this run token may not {refusal}"}})
        if endpoint in ("runs/set-tag", "runs/log-batch") and (
                changed := self._changes_system_tags(request)):
            return self._refuse(rest, "changing a system tag of a job's run", body=azure_error(
                f"The tag(s) {', '.join(changed)} are set by Azure Machine Learning and cannot "
                "be changed.", "INVALID_PARAMETER_VALUE"))
        conn = http.client.HTTPConnection("127.0.0.1", self.ws.backend_port, timeout=300)
        conn.request(self.command, rest + (f"?{query}" if query else ""), body=body or None,
                     headers={"Content-Type": self.headers.get("Content-Type",
                                                               "application/json")})
        response = conn.getresponse()
        payload = response.read()
        if response.status == 200 and payload:
            payload = json.dumps(self._azure_artifact_uris(json.loads(payload))).encode()
        self._reply(response.status, payload,
                    response.getheader("Content-Type") or "application/json")
        return response.status

    def _alias(self, rest: str) -> int:
        """The alias endpoints, answered as `alias_answer` says (ALIASES_UNKNOWN)."""
        answer = self.ws.alias_answer
        with self.ws.lock:
            self.ws.counters.refusals.append(Refusal(self.command, rest, f"aliases ({answer})"))
        if answer == "timeout":
            time.sleep(self.ws.alias_hang_s)  # past the client's timeout: it has given up
            self._reply(504, b"", "text/plain")
            return 504
        if answer == "403":
            self._reply(403, {"error": {"code": "AuthorizationFailed", "message": (
                "The client does not have authorization to perform action 'Microsoft."
                "MachineLearningServices/workspaces/models/write'")}})
            return 403
        if answer == "azure-error":
            self._reply(500, {"error": {"code": "ServiceError", "message": (
                "Received 500 from a service request"), "innerError": {"code": "InternalError"}}})
            return 500
        self._reply(404, b"", "text/plain")
        return 404

    def _azure_artifact_uris(self, value):
        """Run infos carry Azure's artifact URI form, as the workspace returns them."""
        if isinstance(value, dict):
            if "artifact_uri" in value and "run_id" in value and "experiment_id" in value:
                value = {**value, "artifact_uri": self.ws.artifact_uri(value["experiment_id"],
                                                                       value["run_id"])}
            return {k: self._azure_artifact_uris(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._azure_artifact_uris(v) for v in value]
        return value

    def _artifacts(self, run_id: str, what: str, query: dict, body: bytes) -> None:
        ws = self.ws
        container = f"dcid.{run_id}"
        if what == "artifacts/batch/metadata" and self.command == "POST":
            paths = [item["path"] for item in json.loads(body)["paths"]]
            if ws.artifact_fault:  # a storage error that quotes the URL it was given
                return self._reply(200, {"artifacts": {}, "artifactContentInformation": {},
                                         "errors": {p: {"error": {
                                             "code": "AuthorizationFailure", "message": (
                                                 "This request is not authorized to perform this "
                                                 "operation. RequestUrl: "
                                                 f"{ws.sas_url(ws.blob_name(run_id, p))}")}}
                                             for p in paths}})
            info = {p: {"origin": "ExperimentRun", "container": container, "path": p,
                        "contentUri": ws.sas_url(ws.blob_name(run_id, p))} for p in paths}
            artifacts = {p: {"artifactId": f"ExperimentRun/{container}/{p}",
                             "origin": "ExperimentRun", "container": container, "path": p}
                         for p in paths}
            return self._reply(200, {"artifacts": artifacts, "artifactContentInformation": info,
                                     "errors": {}})
        if what == "artifacts" and self.command == "GET":
            value = [{"artifactId": f"ExperimentRun/{container}/{p}", "origin": "ExperimentRun",
                      "container": container, "path": p} for p in ws.artifact_paths(run_id)]
            return self._reply(200, {"value": value, "continuationToken": None,
                                     "nextLink": None})
        if what == "artifacts/contentinfo" and self.command == "GET":
            path = query.get("path", "")
            if path not in ws.artifact_paths(run_id):
                return self._reply(404, {"error": {"code": "UserError",
                                                   "message": f"{path} not found"}})
            return self._reply(200, {"contentUri": ws.sas_url(ws.blob_name(run_id, path)),
                                     "origin": "ExperimentRun", "container": container,
                                     "path": path})
        return self._reply(404, {"error": {"code": "NotFound", "message": what}})


@contextmanager
def workspace(root: Path, **options):
    ws = Workspace(root, **options).start()
    try:
        yield ws
    finally:
        ws.stop()


# Environment variables Azure ML sets in a command job, and which of them this stand-in sets.
# Sources: azureml-mlflow 1.62 (`_internal/service_context_loader.py`: a job is recognised by
# MLFLOW_TRACKING_URI + MLFLOW_TRACKING_TOKEN + MLFLOW_RUN_ID + MLFLOW_EXPERIMENT_ID/_NAME;
# `_internal/utils.py` reads them; `_store/tracking/store.py` reads AZUREML_RUN_ID), and
# docs/decisions.md ("What Azure ML sets inside a job"). Azure overwrites any MLFLOW_* variable
# the job's own definition sets.
JOB_ENVIRONMENT = (
    "MLFLOW_TRACKING_URI",      # azureml://<region>.api.azureml.ms/mlflow/v1.0/<workspace scope>
    "MLFLOW_TRACKING_TOKEN",    # a run-scoped JWT that expires; refreshed through /token
    "MLFLOW_RUN_ID",            # the job's run (= the job's name)
    "MLFLOW_EXPERIMENT_ID",     # and/or MLFLOW_EXPERIMENT_NAME (both variants are tested)
    "MLFLOW_EXPERIMENT_NAME",
    "AZUREML_RUN_ID",           # = MLFLOW_RUN_ID; azureml-mlflow leaves that run's status to Azure
    "AZUREML_ARM_SUBSCRIPTION", "AZUREML_ARM_RESOURCEGROUP", "AZUREML_ARM_WORKSPACE_NAME",
    "AZUREML_ARM_PROJECT_NAME",  # the experiment name
)


class JobService:
    """Stand-in for MLClient.jobs and MLClient.compute (see the module docstring)."""

    def __init__(self, ws: Workspace, root: Path, computes=("cpu-cluster",),
                 experiment_variables=("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"),
                 statuses: list[str] | None = None, image_has_git: bool = True):
        self.ws, self.root = ws, root
        # False: no git in the job's image, as in Azure ML's openmpi4.1.0-ubuntu22.04 base image,
        # whose Dockerfile installs none (Azure/AzureML-Containers): `git` on PATH fails.
        self.image_has_git = image_has_git
        self.computes = set(computes)
        self.experiment_variables = experiment_variables
        self.scripted = list(statuses or [])  # fixed states to report instead of running
        self.submitted: list = []
        self.jobs: dict[str, dict] = {}
        self.cancelled: list[str] = []
        self.compute = SimpleNamespace(get=self._get_compute)

    @property
    def client(self):
        return SimpleNamespace(jobs=self, compute=self.compute)

    def _get_compute(self, name: str):
        from azure.core.exceptions import ResourceNotFoundError

        if name not in self.computes:
            raise ResourceNotFoundError(
                f"(ResourceNotFound) The Resource 'Microsoft.MachineLearningServices/workspaces/"
                f"{WORKSPACE}/computes/{name}' under resource group '{RESOURCE_GROUP}' was not "
                "found.")
        return SimpleNamespace(name=name, type="amlcompute")

    def create_or_update(self, job):
        from azure.ai.ml._utils._asset_utils import get_ignore_file
        from azure.ai.ml.entities import Command

        assert isinstance(job, Command), f"the job service takes Command jobs, got {type(job)}"
        self.submitted.append(job)
        if job.compute:
            self._get_compute(job.compute)
        experiment = self._experiment(job.experiment_name)
        run = self.ws.backend("POST", "/api/2.0/mlflow/runs/create", {
            "experiment_id": experiment["experiment_id"], "run_name": job.display_name,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": "mlflow.runName", "value": job.display_name or ""},
                     {"key": "mlflow.user", "value": STANDIN_USER}]})["run"]
        name = run["info"]["run_id"]  # Azure ML: the job's name is its MLflow run ID
        self.ws.backend("POST", "/api/2.0/mlflow/runs/set-tag", {  # JOB_SYSTEM_TAGS
            "run_id": name, "key": "mlflow.rootRunId", "value": name})
        workdir = self.root / name
        code = Path(job.code)
        ignore = get_ignore_file(code)
        for path in code.rglob("*"):
            relative = path.relative_to(code)
            if (path.is_file() and ".git" not in relative.parts
                    and not ignore.is_file_excluded(str(path))):
                (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, workdir / relative)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "AZUREML_", "IDENTITY_", "AZURE_"))}
        env.update(job.environment_variables or {})
        env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}  # Azure overwrites
        env.update({
            "MLFLOW_TRACKING_URI": self.ws.tracking_uri,
            "MLFLOW_TRACKING_TOKEN": self.ws.run_token(name, experiment["experiment_id"]),
            "MLFLOW_RUN_ID": name, "AZUREML_RUN_ID": name,
            "AZUREML_ARM_SUBSCRIPTION": SUBSCRIPTION, "AZUREML_ARM_RESOURCEGROUP": RESOURCE_GROUP,
            "AZUREML_ARM_WORKSPACE_NAME": WORKSPACE,
            "AZUREML_ARM_PROJECT_NAME": experiment["name"],
            **self.ws.tls_env(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        })
        if not self.image_has_git:
            shim = self.root / f"{name}.no-git"
            shim.mkdir(parents=True)
            (shim / "git").write_text("#!/bin/sh\necho 'git: not installed in this image' >&2\n"
                                      "exit 127\n")
            (shim / "git").chmod(0o755)
            env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
            env["GIT_PYTHON_GIT_EXECUTABLE"] = str(shim / "git")
        if "MLFLOW_EXPERIMENT_ID" in self.experiment_variables:
            env["MLFLOW_EXPERIMENT_ID"] = experiment["experiment_id"]
        if "MLFLOW_EXPERIMENT_NAME" in self.experiment_variables:
            env["MLFLOW_EXPERIMENT_NAME"] = experiment["name"]
        record = {"status": "Queued", "env": env, "workdir": workdir, "proc": None,
                  "log": self.root / f"{name}.std_log.txt", "experiment": experiment}
        self.jobs[name] = record
        if not self.scripted:
            threading.Thread(target=self._execute, args=(name, job.command), daemon=True).start()
        return SimpleNamespace(name=name, status="Queued",
                               studio_url=f"https://ml.azure.com/runs/{name}?wsid={SCOPE}")

    def _experiment(self, name: str) -> dict:
        try:
            return self.ws.experiment(name)
        except RuntimeError:  # Azure ML creates a job's experiment when it does not exist
            self.ws.backend("POST", "/api/2.0/mlflow/experiments/create", {"name": name})
            return self.ws.experiment(name)

    def _execute(self, name: str, command: str) -> None:
        record = self.jobs[name]
        with open(record["log"], "w") as log:
            record["status"] = "Running"
            record["proc"] = subprocess.Popen(["bash", "-c", command], cwd=record["workdir"],
                                              env=record["env"], stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            code = record["proc"].wait()
        if record["status"] == "Running":
            record["status"] = "Completed" if code == 0 else "Failed"
        # Azure ML ends the job's run itself (azureml-mlflow leaves AZUREML_RUN_ID's to it).
        final = {"Completed": "FINISHED", "Failed": "FAILED", "Canceled": "KILLED"}[
            record["status"]]
        self.ws.backend("POST", "/api/2.0/mlflow/runs/update", {
            "run_id": name, "status": final, "end_time": int(time.time() * 1000)})

    def get(self, name: str):
        if self.scripted:
            status = self.scripted.pop(0) if len(self.scripted) > 1 else self.scripted[0]
        else:
            status = self.jobs[name]["status"]
        return SimpleNamespace(name=name, status=status)

    def begin_cancel(self, name: str):
        self.cancelled.append(name)
        record = self.jobs[name]
        record["status"] = "Canceled"
        if record["proc"] is not None and record["proc"].poll() is None:
            os.killpg(record["proc"].pid, signal.SIGTERM)
        return SimpleNamespace(wait=lambda: None)


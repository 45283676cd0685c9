"""What the tests share besides fixtures: paths, subprocess runners, servers started for a test,
and HTTP calls to them, imported by name (`from tests.helpers import serve`). The fixtures and
the suite's hermetic setup are in conftest.py; importing this module changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-phi3"
EVAL_DATA = ROOT / "data" / "eval.jsonl"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tracking_server(root: Path, port: int):
    """`mlflow server` with a sqlite backend and proxied artifacts on 127.0.0.1:port, until exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=open(root / f"server-{time.monotonic_ns()}.log", "w"),
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def run_project(*args: str, cwd: Path, env: dict[str, str] | None = None,
                project: Path | str = ROOT, env_manager: str = "local",
                timeout: int = 1200) -> subprocess.CompletedProcess:
    """`mlflow run <project> --env-manager <manager> ...` in a subprocess, as a user types it."""
    command = [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", env_manager,
               *args]
    full_env = {**os.environ, **(env or {})}
    # The steps run `python -m ...`: make `python` this interpreter.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


QUESTION = {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}


def predict_in_fresh_process(model_uri: str, payload: dict, env: dict | None = None) -> dict:
    """Load the model in a new interpreter (no state shared with the test) and predict."""
    code = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(json.loads(sys.argv[2]))\n"
        "print('RESULT=' + json.dumps(out[0] if isinstance(out, list) else out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, model_uri, json.dumps(payload)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    found = next(line for line in done.stdout.splitlines() if line.startswith("RESULT="))
    return json.loads(found[len("RESULT="):])


def eval_rows() -> list[dict]:
    return [json.loads(line) for line in EVAL_DATA.read_text().splitlines() if line.strip()]


def post(url: str, body: bytes | dict | list, timeout: float = 120,
         path: str = "/invocations") -> tuple[int, bytes]:
    """POST to a served model (MLflow's /invocations by default); (HTTP status, raw body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def ping(url: str, timeout: float = 30) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as response:
        return response.status


@contextmanager
def serve(model_uri: str, *args: str):
    """`mlflow models serve -m <uri> --env-manager local` on 127.0.0.1; yields (url, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ping(url)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    pytest.fail(f"the model server exited: {proc.stdout.read()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("the model server did not come up in 180 s")
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHAMPIONS = {"transformers": "phi3-transformers-chat", "onnx": "phi3-onnx-chat"}
FRONT_DOOR_NAMES = {kind: f"{name}@champion" for kind, name in CHAMPIONS.items()}


@contextmanager
def front_door(*args: str):
    """`python -m phi3flow.front_door ARGS` on a free port; yields (base URL, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3flow.front_door", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
             f"{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    pytest.fail(f"the front door exited: {proc.stdout.read()[-3000:]}")
                assert time.monotonic() < deadline, "the front door did not come up in 180 s"
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def created_run():
    """The run that the in-process step call just before made, by its ID: this process's last
    run (MLflow keeps it), never a search of the shared store for "the newest run of step X"."""
    import mlflow

    run = mlflow.last_active_run()
    assert run is not None, "no run was started in this process"
    return run


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()




def run_of(model_uri: str) -> str:
    """The log step's run that logged a models:/m-... model."""
    import mlflow

    return mlflow.get_logged_model(model_uri.split("/")[-1]).source_run_id


def evaluate_args(log_runs: dict[str, str], *extra: str) -> list[str]:
    """evaluate's flags for the two log runs (the `log_runs` fixture), answers of 32 tokens."""
    return ["--transformers_run_id", log_runs["transformers_run_id"],
            "--onnx_run_id", log_runs["onnx_run_id"], "--max_new_tokens", "32", *extra]


def batch_questions(count: int) -> list[dict]:
    """`count` rows of data/eval.jsonl's questions in turn, each with an `id` (its position),
    `messages` and `expected`: batch_score's input (without the training answers, whose column
    name batch_score writes)."""
    rows = eval_rows()
    return [{"id": i, "messages": rows[i % len(rows)]["messages"],
             "expected": rows[i % len(rows)]["expected"]} for i in range(count)]


def write_jsonl(path: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows)
                    + "".join(line + "\n" for line in extra_lines))
    return path


def ensure_java() -> None:
    """Java 17 or newer for Spark, installed where it is missing (as root) with the command the
    docs give, Debian's default-jre-headless (Java 17 on Debian 12, 21 on Debian 13), else the
    test fails saying how to install it."""
    from phi3flow.batch.score import require_spark
    from phi3flow.core.errors import StepError

    try:
        require_spark()
        return
    except StepError as missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail(str(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "default-jre-headless"], check=True, env=env,
                   timeout=1200)
    require_spark()


def spark_env() -> dict[str, str]:
    """What Spark's processes started by a test get: loopback only, this interpreter for the
    executors' Python workers, pyspark's own Spark."""
    import pyspark

    return {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent),
            "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}


@contextmanager
def standalone_cluster(folder: Path, cores: int = 2):
    """A real Spark standalone cluster on 127.0.0.1, started with pyspark's own launcher
    (bin/spark-class): one master and one worker with `cores` cores. Yields (master URL, the
    worker's folder, where each executor's stderr is); both are stopped on exit."""
    ensure_java()
    env = spark_env()
    launcher = Path(env["SPARK_HOME"]) / "bin" / "spark-class"
    folder.mkdir(parents=True, exist_ok=True)
    properties = folder / "spark.conf"
    properties.write_text("spark.master.rest.enabled false\n")
    port, ui = free_port(), free_port()
    work = folder / "work"
    work.mkdir()
    started = []
    try:
        started.append(subprocess.Popen(
            [str(launcher), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui), "--properties-file", str(properties)],
            env=env, stdout=open(folder / "master.log", "w"), stderr=subprocess.STDOUT))
        url = f"spark://127.0.0.1:{port}"
        started.append(subprocess.Popen(
            [str(launcher), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
             "--cores", str(cores), "--memory", "2g", "--work-dir", str(work),
             "--webui-port", str(free_port()), "--properties-file", str(properties), url],
            env=env, stdout=open(folder / "worker.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while True:  # the master's status page counts the workers registered with it
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as page:
                    if json.load(page).get("aliveworkers", 0) >= 1:
                        break
            except OSError:
                pass
            assert all(p.poll() is None for p in started), (folder / "master.log").read_text()
            assert time.monotonic() < deadline, "the Spark cluster did not come up in 120 s"
            time.sleep(1)
        yield url, work
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""The ONNX chat model behind `mlflow models serve --env-manager local`, over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import CHAMPIONS, QUESTION, ROOT, eval_rows, free_port

pytestmark = pytest.mark.e2e

ROWS = eval_rows()


def post(url: str, body: bytes | dict, timeout: float = 120) -> tuple[int, dict | list]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ping(url: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"{url}/ping", timeout=30) as response:
        assert response.status == 200
    return time.monotonic() - started


@pytest.fixture(scope="module")
def server(onnx_model_uri):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", onnx_model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            ping(url)
            break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the model server did not come up in 180 s")
    yield url
    proc.terminate()
    proc.wait(30)


def test_served_model_answers_the_chat_payload(server):
    status, body = post(server, {**QUESTION, "max_tokens": 32})
    assert status == 200
    (answer,) = body
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "The capital of Spain is Madrid."
    assert answer["usage"]["completion_tokens"] > 0


def test_served_batch_and_stop_field(server):
    status, body = post(server, {"inputs": [{"messages": r["messages"]} for r in ROWS[:3]]})
    assert status == 200  # MLflow's standard {"inputs": ...} -> {"predictions": ...} envelope
    answers = [b["choices"][0]["message"]["content"] for b in body["predictions"]]
    assert answers == [r["answer"] for r in ROWS[:3]]
    status, body = post(server, {**QUESTION, "stop": "Spain"})  # a string, as OpenAI allows
    assert status == 200 and body[0]["choices"][0]["message"]["content"] == "The capital of "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "valid JSON"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content must be a string"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({**QUESTION, "max_tokens": -1}, "max_tokens must be >= 1"),
        ({**QUESTION, "max_tokens": 10**6}, "does not fit"),
        ({**QUESTION, "temperature": -1}, "temperature must be >= 0"),
        ({**QUESTION, "n": 3}, "n must be 1"),
        ({**QUESTION, "stream": True}, "stream=true is not available"),
        ({**QUESTION, "functions": []}, "unknown field(s) ['functions']"),
        ({**QUESTION, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_payloads_get_a_400_naming_the_problem_and_the_server_keeps_serving(
        server, body, message):
    status, answer = post(server, body)
    assert status == 400, answer
    assert message in answer["message"]
    status, _ = post(server, {**QUESTION, "max_tokens": 8})
    assert status == 200


def test_ping_stays_prompt_while_a_long_request_is_in_flight(server):
    # A long request: 24 rows, each with its own max_tokens (so each runs alone, prompt fed in
    # chunks) and a prompt of about 3,000 tokens.
    filler = "The sky is blue. " * 600
    rows = [{"messages": [{"role": "user", "content": filler + r["messages"][0]["content"]}],
             "max_tokens": 40 + i} for i, r in enumerate(ROWS * 2)]
    result = {}

    def long_request():
        started = time.monotonic()
        result["status"], _ = post(server, {"inputs": rows}, timeout=300)
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.3)
    latencies = []
    while worker.is_alive():
        latencies.append(ping(server))
        time.sleep(0.05)
    worker.join()
    print(f"long request {result['seconds']:.1f} s; {len(latencies)} pings, max "
          f"{max(latencies) * 1000:.0f} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")
    assert result["status"] == 200
    assert result["seconds"] > 1.0, "the request was too short to show anything"
    assert len(latencies) >= 5
    # Generous bound for a loaded 2-core machine; a frozen server stalls for the whole request.
    assert max(latencies) < max(1.0, result["seconds"] / 4), (max(latencies), result)


def test_both_registered_champions_answer_the_same_chat_request(served):
    """The README's serving commands: each model registered with alias champion, served with
    `mlflow models serve -m models:/<name>@champion --env-manager local`, asked the same thing."""
    answers = {}
    for kind, (url, _) in served.items():
        status, answered = post(url, {**QUESTION, "max_tokens": 32})
        assert status == 200, answered
        (body,) = answered
        assert body["object"] == "chat.completion"
        answers[kind] = body["choices"][0]["message"]["content"]
    assert answers["onnx"] == answers["transformers"] == "The capital of Spain is Madrid."
    readme = (ROOT / "README.md").read_text()
    for name in CHAMPIONS.values():
        assert f"mlflow models serve -m models:/{name}@champion --env-manager local" in readme


def test_served_onnx_model_answers_json_schemas_and_tool_calls(server):
    """Structured outputs and tool calls live in the logged model, not only behind the front
    door: `mlflow models serve` answers them in the same shapes (schemas and tools from the
    front-door tests)."""
    import jsonschema

    from tests.e2e.test_front_door import CAPITAL, PARAMETERS, TOOLS

    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL,
                                                  "strict": True}}
    status, body = post(server, {**QUESTION, "max_tokens": 120, "response_format": fmt})
    assert status == 200, body
    jsonschema.validate(json.loads(body[0]["choices"][0]["message"]["content"]), CAPITAL)
    status, body = post(server, {**QUESTION, "max_tokens": 80, "tools": TOOLS,
                                 "tool_choice": "required", "parallel_tool_calls": False})
    assert status == 200, body
    (choice,) = body[0]["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        PARAMETERS[call["function"]["name"]])

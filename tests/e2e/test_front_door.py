"""The OpenAI-compatible front door (`python -m phi3flow.front_door`) over real HTTP, with the
real clients: the official `openai` SDK and curl. Both registered champions behind one port."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import mlflow
import openai
import pytest

from phi3flow import names
from tests.e2e.test_load import REQUESTS_PER_CLIENT, run_load
from tests.helpers import FIXTURE, FRONT_DOOR_NAMES, QUESTION, front_door

pytestmark = pytest.mark.e2e

MESSAGES = QUESTION["messages"]
NAMES = FRONT_DOOR_NAMES


@pytest.fixture(scope="module")
def door(champions):
    with front_door(*(arg for name in NAMES.values() for arg in ("--model", name))) as (url, p):
        yield url, p


@pytest.fixture(scope="module")
def client(door):
    return openai.OpenAI(base_url=f"{door[0]}/v1", api_key="not-needed", max_retries=0)


def _raw(url: str, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_both_champions_answer_the_openai_sdk_in_the_same_shape(client):
    models = {m.id for m in client.models.list()}
    assert models == set(NAMES.values())
    shapes = []
    for name in NAMES.values():
        answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=32)
        assert answer.model == name  # the model the client asked for
        assert "Madrid" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
        shapes.append(sorted(answer.model_dump(exclude_none=True)))
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("kind", sorted(NAMES))
def test_streamed_deltas_add_up_to_the_answer_and_end_with_done(client, door, kind):
    name = NAMES[kind]
    whole = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=32)
    chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=32,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == name for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == whole.choices[0].message.content  # greedy: the same answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    if kind == "onnx":
        assert len(chunks) > 2, "the ONNX model streams token by token"
    # On the wire: server-sent events ending with [DONE].
    events = subprocess.run(
        ["curl", "-sN", f"{door[0]}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": name, "messages": MESSAGES, "max_tokens": 8,
                           "stream": True})], capture_output=True, text=True, timeout=120).stdout
    lines = [line for line in events.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_curl_as_documented(door):
    done = subprocess.run(
        ["curl", "-s", f"{door[0]}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": NAMES["onnx"], "messages": MESSAGES, "max_tokens": 32})],
        capture_output=True, text=True, timeout=120)
    answer = json.loads(done.stdout)
    assert answer["object"] == "chat.completion" and "Madrid" in answer["choices"][0][
        "message"]["content"]


BAD = {
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "empty content": ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    "no content": ({"messages": [{"role": "user"}]}, "messages[0].content"),
    "content not a string": ({"messages": [{"role": "user", "content": 7}]}, "messages"),
    "no messages": ({}, "messages"),
    "max_tokens not a number": ({"messages": MESSAGES, "max_tokens": "lots"}, "max_tokens"),
    "max_tokens zero": ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    "max_tokens beyond the window": ({"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
    "prompt beyond the window": (
        {"messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),
    "temperature negative": ({"messages": MESSAGES, "temperature": -1}, "temperature"),
    "n above one": ({"messages": MESSAGES, "n": 3}, "n"),
    "tools": ({"messages": MESSAGES, "tools": [{"type": "function", "function": {
        "name": "f"}}]}, "tools"),
}


@pytest.mark.parametrize("kind", sorted(NAMES))
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_a_4xx_in_openais_shape_naming_the_field(door, kind, case):
    body, param = BAD[case]
    status, answer = _raw(door[0], json.dumps({"model": NAMES[kind], **body}).encode())
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param.split(".")[0]), error
    assert param.split("[")[0] in error["message"] or param in (error["param"] or ""), error
    assert "word word word" not in error["message"]  # never the body echoed


def test_errors_the_sdk_raises_and_the_server_keeps_serving(client, door, tmp_path):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAMES["onnx"], max_tokens=8,
                                       messages=[{"role": "wizard", "content": "hi"}])
    assert "messages[0].role" in str(bad.value)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    # A 10 MB body is refused by its declared size, before it is read: at once, 413 (curl
    # waits for the answer to its `Expect: 100-continue` before sending such a body).
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * 10_000_000 + b"}")
    started = time.monotonic()
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"{door[0]}/v1/chat/completions",
                           "-H", "Content-Type: application/json", "--data-binary", f"@{big}"],
                          capture_output=True, text=True, timeout=60)
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "413" and json.loads(body)["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 10
    status, answer = _raw(door[0], b"not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = _raw(door[0], b"{}", path="/v1/nothing")
    assert status == 404 and "error" in answer
    # Still serving, and answering well.
    answer = client.chat.completions.create(model=NAMES["onnx"], messages=MESSAGES, max_tokens=32)
    assert "Madrid" in answer.choices[0].message.content
    assert door[1].poll() is None


def test_ctrl_c_stops_the_front_door_cleanly(champions):
    with front_door("--model", NAMES["onnx"]) as (url, proc):
        pass
    assert proc.returncode == 0, proc.stdout.read()[-2000:]


def test_front_door_under_concurrent_load(door):
    """8 clients x 25 requests to the ONNX champion through the front door: no errors, every
    greedy answer equal to the same request sent alone, /health answered throughout."""
    url, proc = door
    result = run_load(url, proc.pid, 8, model=NAMES["onnx"])
    print(f"\nfront door, onnx: {json.dumps(result, indent=1)}")
    assert result["requests"] == 8 * REQUESTS_PER_CLIENT
    assert not result["errors"], result["errors"][:5]
    assert not result["mismatches"], result["mismatches"][:5]
    assert result["pings"] >= 5 and not result["ping_failures"], result["ping_failures"][:5]


@pytest.fixture(scope="module")
def dropping(tmp_path_factory):
    """Both models of the fixture logged with Phi-3-mini-4k's original chat template (from the
    real vocabulary fixture), which drops system messages: {kind: model URI}."""
    import shutil

    import transformers

    from steps import fetch_model, log_onnx_pyfunc, log_transformers

    real = transformers.AutoTokenizer.from_pretrained(
        FIXTURE.parent / "phi3-vocab", gguf_file="ggml-vocab-phi-3.gguf")
    checkpoint = tmp_path_factory.mktemp("real-template") / "checkpoint"
    shutil.copytree(FIXTURE, checkpoint)
    (checkpoint / "chat_template.jinja").write_text(real.chat_template)
    fetch = fetch_model.main(["--model_id", str(checkpoint), "--onnx_source", "build",
                              "--precision", "fp32"])
    args = ["--fetch_run_id", fetch, "--max_new_tokens", "16"]
    return {"transformers": log_transformers.main(args), "onnx": log_onnx_pyfunc.main(args)}


def test_system_messages_are_tagged_and_folded_in_where_the_template_drops_them(
        dropping, transformers_model_uri, onnx_model_uri):
    """Logged with a template that drops system messages, both models are tagged `dropped`
    (the fixture's own template keeps them: `kept`); behind the front door a system message
    is folded into the first user turn, so it reaches both models' prompts."""
    for uri, expected in ((dropping["transformers"], "dropped"), (dropping["onnx"], "dropped"),
                          (transformers_model_uri, "kept"), (onnx_model_uri, "kept")):
        model = mlflow.get_logged_model(uri.split("/")[-1])
        assert model.tags[names.TAG_SYSTEM_MESSAGES] == expected, uri
    pirate = [{"role": "system", "content": "You are a pirate who answers in rhymes."},
              *MESSAGES]
    folded = [{"role": "user", "content": "You are a pirate who answers in rhymes.\n\n"
               + MESSAGES[0]["content"]}]
    with front_door(*(a for kind, uri in dropping.items()
                      for a in ("--model", f"{kind}={uri}"))) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)

        def prompt_tokens(kind: str, messages: list[dict]) -> int:
            return client.chat.completions.create(
                model=kind, messages=messages, max_tokens=4).usage.prompt_tokens

        for kind in dropping:
            alone, with_system = prompt_tokens(kind, MESSAGES), prompt_tokens(kind, pirate)
            assert with_system > alone, kind  # not dropped...
            assert with_system == prompt_tokens(kind, folded), kind  # ...but folded in
    # Served directly, the template drops it: the same prompt with or without it.
    direct = mlflow.pyfunc.load_model(dropping["onnx"])
    (alone,) = direct.predict({"messages": MESSAGES, "max_tokens": 4})
    (with_system,) = direct.predict({"messages": pirate, "max_tokens": 4})
    assert with_system["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]

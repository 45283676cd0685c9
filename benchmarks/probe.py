"""One runtime, measured in its own fresh process: `python -m benchmarks.probe SPEC.json OUT.json`.

A fresh process per runtime makes load time and peak RSS (VmHWM) its own. Timing, per prompt:
- runtimes that stream (raw onnxruntime-genai, the ONNX pyfunc's predict_stream, llama.cpp's
  generate loop, the ONNX pyfunc behind the front door read as server-sent events, as an OpenAI
  client reads them): one request of N new tokens; TTFT = time to the first token, decode
  tokens/s = (N - 1) / (last - first token);
- runtimes that cannot (the transformers pyfunc, MLflow's REST server): TTFT = latency of a
  1-token request, decode tokens/s = (N - 1) / (latency of N tokens - TTFT);
each the median of `repeats` runs, except for prompts over LONG_PROMPT tokens, timed once.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi3flow.evaluation.eval_worker import peak_rss_mb

HEAD_OF_LINE = "head-of-line"  # the paired protocol's line that asks for head_of_line()
CONCURRENT = "concurrent"  # the paired protocol's line that asks for concurrent()
ASK = "ask"  # "ask {"messages": [...], "new_tokens": N}": one run of that request (multiturn.py)
MEMORY = "memory"  # the process's memory now, and its prefix cache's (multiturn.py)
GUIDED = "guided"  # "guided LENGTH": one run of that prompt whose answer follows GUIDED_FORMAT
# A JSON answer that cannot end within the plan's new tokens: the grammar is checked at every
# step, as for any structured output, while the answer is as long as a free one.
GUIDED_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "minLength": 1000,
                                                "maxLength": 4000}},
    "required": ["answer"], "additionalProperties": False}}}
FRONT_DOOR_NAME = "bench"  # the model's name behind the front door
LONG_PROMPT = 256  # tokens; longer prompts are timed once, not `repeats` times
# Set by benchmarks.run when it starts (seconds since the epoch), inherited by every probe: the
# progress lines of all processes count from the start of the whole run.
STARTED = "PHI3FLOW_BENCH_STARTED"


def progress(message: str) -> None:
    """One line on stderr: minutes:seconds since the run started, then what is happening."""
    elapsed = time.time() - float(os.environ.get(STARTED) or time.time())
    print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {message}", file=sys.stderr,
          flush=True)


def raw_runtime(onnx_folder: str):
    """onnxruntime-genai used directly, the way its own examples do: the baseline."""
    import onnxruntime_genai as og

    # The same onnxruntime threads as the pyfunc (every core): the comparison is the wrapper's.
    config = og.Config(onnx_folder)
    threads = {"intra_op_num_threads": len(os.sched_getaffinity(0))}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)

    def stream(messages: list[dict], new_tokens: int) -> Iterator[int]:
        prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        length = len(ids) + new_tokens
        # min_length = max_length: random weights cannot end the answer early.
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        text = tokenizer.create_stream()
        while not generator.is_done():
            generator.generate_next_token()
            yield text.decode(int(generator.get_next_tokens()[0]))  # as a caller would

    return stream


def llama_runtime(gguf: str):
    """llama.cpp through llama-cpp-python, settings as benchmarks/llamacpp.py says."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    # The other runtimes' prompt token ids exactly: the same checkpoint's tokenizer and template.
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    cores = len(os.sched_getaffinity(0))
    # use_mmap=False: weights in the process's own memory, as onnxruntime holds them, so peak
    # RSS compares (mapped from the file, the default, they are page cache the kernel may drop).
    llm = Llama(gguf, n_ctx=spec["n_ctx"], n_batch=spec["n_ctx"], n_threads=cores,
                n_threads_batch=cores, flash_attn=True, use_mmap=False, verbose=False)

    def stream(messages: list[dict], new_tokens: int) -> Iterator[bytes]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if not spec.get("keep_prefix"):
            llm.reset()  # else generate() reuses the KV cache of a repeated prompt: no prefill
        # generate() never stops by itself (create_completion checks for eos): N tokens exactly.
        for count, token in enumerate(llm.generate(ids, temp=0.0, reset=True), start=1):
            yield llm.detokenize([token])  # as a caller would
            if count == new_tokens:
                return

    return stream


def pyfunc_runtime(model_uri: str):
    """Any MLflow model through mlflow.pyfunc.load_model; streamed when the model can stream."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    if spec.get("stream"):
        def stream(messages: list[dict], new_tokens: int, **shape: Any) -> Iterator[Any]:
            for chunk in model.predict_stream({"messages": messages, "max_tokens": new_tokens,
                                               **shape}):
                if chunk.get("usage"):  # the last chunk's (cached_tokens: multiturn.py)
                    stream.usage = chunk["usage"]
                if chunk["choices"][0]["delta"].get("content"):  # the last chunk may be empty
                    yield chunk

        stream.model = model
        return stream

    def generate(messages: list[dict], new_tokens: int) -> int:
        # Greedy: both models were saved with temperature 0 as their default.
        out = model.predict({"messages": messages, "max_tokens": new_tokens})
        out = out[0] if isinstance(out, list) else out
        return int(out["usage"]["completion_tokens"])

    return generate


def front_door_runtime(model_path: str):
    """The model behind the front door (`python -m phi3flow.front_door`, a process of its own,
    as users start it), each request streamed over HTTP and read chunk by chunk."""
    import atexit
    import http.client
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "phi3flow.front_door", "--model", f"{FRONT_DOOR_NAME}={model_path}",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(server.terminate)
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the front door exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                break
        except OSError:
            time.sleep(0.2)

    def stream(messages: list[dict], new_tokens: int) -> Iterator[dict]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        connection.request("POST", "/v1/chat/completions", json.dumps({
            "model": FRONT_DOOR_NAME, "messages": messages, "max_tokens": new_tokens,
            "stream": True}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        try:
            for line in response:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        yield chunk
        finally:
            connection.close()

    stream.pid = server.pid  # its peak RSS is the server's
    return stream


def memory(generate) -> dict[str, float]:
    """This process's resident memory now and at its peak, and what its prefix cache holds."""
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    model = getattr(generate, "model", None)
    cache = getattr(model.unwrap_python_model(), "prefix_cache", None) if model else None
    return {"rss_mb": rss / 1024, "peak_rss_mb": peak_rss_mb(),
            "cache_mb": cache.nbytes / 2**20 if cache else 0.0,
            "cache_budget_mb": cache.budget / 2**20 if cache else 0.0,
            "cache_entries": len(cache.kept) if cache else 0}


def once(generate, messages: list[dict], new_tokens: int, stream: bool) -> dict[str, float]:
    """One measurement of one prompt (see the module docstring for the two methods)."""
    if stream:
        started = time.perf_counter()
        stamps = [time.perf_counter() - started for _ in generate(messages, new_tokens)]
        ttft, latency, count = stamps[0], stamps[-1], len(stamps)
    else:
        started = time.perf_counter()
        generate(messages, 1)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        count = generate(messages, new_tokens)
        latency = time.perf_counter() - started
    return {"ttft_s": ttft, "latency_s": latency, "new_tokens": count,
            "decode_tokens_per_s": (count - 1) / max(latency - ttft, 1e-9)}


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over the runs (the machine is noisy: a median ignores one disturbed run)."""
    row: dict[str, Any] = {key: statistics.median(run[key] for run in runs)
                           for key in ("ttft_s", "latency_s", "decode_tokens_per_s")}
    row["new_tokens"] = min(run["new_tokens"] for run in runs)
    row["runs"] = runs
    return row


def head_of_line(stream, prompts: dict[str, list[dict]], delay_s: float) -> dict[str, float]:
    """A 1-token request sent delay_s after the longest prompt's request, in one process: does it
    come back before the long one's prefill ends (its first token)? Streaming shows that moment,
    which the REST server cannot."""
    before = peak_rss_mb()  # two requests at once hold more: kept apart from single requests'
    started = time.perf_counter()
    first: list[float] = []

    def long() -> None:
        for _ in stream(prompts[max(prompts, key=int)], 2):
            first.append(time.perf_counter() - started)

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(delay_s)
    sent = time.perf_counter() - started
    for _ in stream(prompts[min(prompts, key=int)], 1):
        pass
    returned = time.perf_counter() - started
    thread.join()
    return {"short_sent_at_s": sent, "short_returned_at_s": returned,
            "long_first_token_at_s": first[0], "peak_rss_before_mb": before,
            "peak_rss_after_mb": peak_rss_mb()}


def concurrent(stream, messages: list[dict], new_tokens: int, clients: int) -> dict[str, float]:
    """`clients` streams of one request each, started together: aggregate tokens/s over the
    wall time, each stream's TTFT and decode tokens/s (medians)."""
    started = time.perf_counter()
    stamps: list[list[float]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        for _ in stream(messages, new_tokens):
            stamps[index].append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "wall_s": wall,
            "tokens_per_s": sum(len(s) for s in stamps) / wall,
            "ttft_s": statistics.median(s[0] for s in stamps),
            "decode_tokens_per_s": statistics.median(
                (len(s) - 1) / max(s[-1] - s[0], 1e-9) for s in stamps)}


def runs_for(length: str, repeats: int) -> int:
    return repeats if int(length) <= LONG_PROMPT else 1  # a 2048-token prefill takes a minute


def measure(generate, prompts: dict[str, list[dict]], new_tokens: int, repeats: int,
            stream: bool, name: str) -> dict:
    rows = {}
    for length, messages in prompts.items():
        runs, count = [], runs_for(length, repeats)
        for index in range(count):
            progress(f"{name}: prompt {length} tokens, run {index + 1}/{count}")
            runs.append(once(generate, messages, new_tokens, stream))
        rows[length] = summary(runs)
        log(name, length, rows[length])
    return rows


def log(name: str, length: str, row: dict) -> None:
    progress(f"{name} prompt {length}: TTFT {row['ttft_s']:.3f} s, {row['new_tokens']} tokens "
             f"in {row['latency_s']:.2f} s, decode {row['decode_tokens_per_s']:.2f} tokens/s")


if __name__ == "__main__":
    # argv: SPEC.json OUT.json. With "paired" in the spec the probe measures one prompt per line
    # of stdin (its length), answering a JSON line each, so the harness can alternate runtimes.
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    started = time.perf_counter()
    runtime = {"raw": raw_runtime, "llama_cpp": llama_runtime,
               "front_door": front_door_runtime}.get(spec["runtime"], pyfunc_runtime)
    generate = runtime(spec["model"])
    load_s = time.perf_counter() - started
    stream = spec["runtime"] in ("raw", "llama_cpp", "front_door") or spec.get("stream", False)
    once(generate, spec["warmup"], 2, stream)  # first-call costs are not the steady state
    result: dict[str, Any] = {"load_s": load_s}
    if spec.get("paired"):
        print("ready", flush=True)
        for line in sys.stdin:
            if line.startswith(HEAD_OF_LINE):  # "head-of-line DELAY_S"
                print(json.dumps(head_of_line(generate, spec["prompts"], float(line.split()[1]))),
                      flush=True)
                continue
            if line.startswith(GUIDED):  # "guided LENGTH"
                guided = functools.partial(generate, response_format=GUIDED_FORMAT)
                print(json.dumps(once(guided, spec["prompts"][line.split()[1]],
                                      spec["new_tokens"], stream)), flush=True)
                continue
            if line.startswith(ASK):
                request = json.loads(line[len(ASK):])
                generate.usage = None
                row = once(generate, request["messages"], request["new_tokens"], stream)
                usage = getattr(generate, "usage", None) or {}
                row["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get(
                    "cached_tokens")
                print(json.dumps(row), flush=True)
                continue
            if line.startswith(MEMORY):
                print(json.dumps(memory(generate)), flush=True)
                continue
            if line.startswith(CONCURRENT):  # "concurrent CLIENTS"
                print(json.dumps(concurrent(generate, spec["prompts"][min(spec["prompts"], key=int)],
                                            spec["new_tokens"], int(line.split()[1]))), flush=True)
                continue
            print(json.dumps(once(generate, spec["prompts"][line.strip()], spec["new_tokens"],
                                  stream)), flush=True)
    else:
        result["prompts"] = measure(generate, spec["prompts"], spec["new_tokens"],
                                    spec["repeats"], stream, spec["name"])
    result["peak_rss_mb"] = peak_rss_mb(getattr(generate, "pid", None) or os.getpid())
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))

"""One runtime, measured in its own fresh process: `python -m benchmarks.probe SPEC.json OUT.json`.

A fresh process per runtime makes load time and peak RSS (VmHWM) its own. Timing, per prompt:
- runtimes that stream (raw onnxruntime-genai, the ONNX pyfunc's predict_stream): one request of
  N new tokens; TTFT = time to the first token, decode tokens/s = (N - 1) / (last - first token);
- runtimes that cannot (the transformers pyfunc, MLflow's REST server): TTFT = latency of a
  1-token request, decode tokens/s = (N - 1) / (latency of N tokens - TTFT);
each the best of `repeats` runs (the machine is noisy; the best is the least disturbed), except
for prompts over LONG_PROMPT tokens, timed once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi3flow.evaluation import peak_rss_mb

LONG_PROMPT = 256  # tokens; longer prompts are timed once, not best of `repeats`


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


def pyfunc_runtime(model_uri: str):
    """Any MLflow model through mlflow.pyfunc.load_model; streamed when the model can stream."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    if spec.get("stream"):
        def stream(messages: list[dict], new_tokens: int) -> Iterator[Any]:
            for chunk in model.predict_stream({"messages": messages, "max_tokens": new_tokens}):
                if chunk["choices"][0]["delta"].get("content"):  # the last chunk may be empty
                    yield chunk

        return stream

    def generate(messages: list[dict], new_tokens: int) -> int:
        # Greedy: both models were saved with temperature 0 as their default.
        out = model.predict({"messages": messages, "max_tokens": new_tokens})
        out = out[0] if isinstance(out, list) else out
        return int(out["usage"]["completion_tokens"])

    return generate


def streamed(stream, messages: list[dict], new_tokens: int, repeats: int) -> dict:
    best: dict[str, float] = {}
    for _ in range(repeats):
        started = time.perf_counter()
        stamps = [time.perf_counter() - started for _ in stream(messages, new_tokens)]
        run = {"ttft_s": stamps[0], "latency_s": stamps[-1], "new_tokens": len(stamps),
               "decode_tokens_per_s": (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)}
        if not best or run["latency_s"] < best["latency_s"]:
            best = run
    return best


def timed(generate, messages: list[dict], new_tokens: int, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        count = generate(messages, new_tokens)
        best = min(best, time.perf_counter() - started)
    return best, count


def measure(generate, prompts: dict[str, list[dict]], new_tokens: int, repeats: int,
            stream: bool = False) -> dict:
    rows = {}
    for length, messages in prompts.items():
        times = repeats if int(length) <= LONG_PROMPT else 1  # a 2048-token prefill is minutes
        if stream:
            rows[length] = streamed(generate, messages, new_tokens, times)
        else:
            ttft, _ = timed(generate, messages, 1, times)
            total, count = timed(generate, messages, new_tokens, times)
            rows[length] = {
                "ttft_s": ttft,
                "latency_s": total,
                "new_tokens": count,
                "decode_tokens_per_s": (count - 1) / max(total - ttft, 1e-9),
            }
        row = rows[length]
        print(f"  {spec['name']} prompt {length}: TTFT {row['ttft_s']:.3f} s, {row['new_tokens']} "
              f"tokens in {row['latency_s']:.2f} s, decode {row['decode_tokens_per_s']:.2f} "
              "tokens/s", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    started = time.perf_counter()
    runtime = raw_runtime if spec["runtime"] == "raw" else pyfunc_runtime
    generate = runtime(spec["model"])
    load_s = time.perf_counter() - started
    stream = spec["runtime"] == "raw" or spec.get("stream", False)
    for _ in generate(spec["warmup"], 2) if stream else [generate(spec["warmup"], 2)]:
        pass  # first-call costs (lazy allocations) are not the steady state
    rows = measure(generate, spec["prompts"], spec["new_tokens"], spec["repeats"], stream)
    Path(sys.argv[2]).write_text(json.dumps(
        {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "prompts": rows}, indent=1))

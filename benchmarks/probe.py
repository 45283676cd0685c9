"""One runtime, measured in its own fresh process: `python -m benchmarks.probe SPEC.json OUT.json`.

A fresh process per runtime makes load time and peak RSS (VmHWM) its own. Every runtime is timed
the same way, because the transformers pyfunc and MLflow's REST server cannot stream:
- time to first token (TTFT) = latency of a request for 1 new token (prefill + one decode step);
- decode tokens/s = (N - 1) / (latency for N new tokens - latency for 1 new token);
each the best of `repeats` runs (the machine is noisy; the best is the least disturbed), except
for prompts over LONG_PROMPT tokens, timed once.

Runtimes: `raw` (onnxruntime-genai, no MLflow), `pyfunc` (any MLflow model through
mlflow.pyfunc.load_model: the ONNX pyfunc or the transformers one).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from phi3flow.evaluation import peak_rss_mb

LONG_PROMPT = 256  # tokens; longer prompts are timed once, not best of `repeats`


def raw_runtime(onnx_folder: str):
    """onnxruntime-genai used directly, the way its own examples do: the baseline."""
    import onnxruntime_genai as og

    model = og.Model(onnx_folder)
    tokenizer = og.Tokenizer(model)

    def generate(messages: list[dict], new_tokens: int) -> int:
        prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        length = len(ids) + new_tokens
        # min_length = max_length: random weights cannot end the answer early.
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        return count

    return generate


def pyfunc_runtime(model_uri: str):
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)

    def generate(messages: list[dict], new_tokens: int) -> int:
        # Greedy: both models were saved with temperature 0 as their default.
        out = model.predict({"messages": messages, "max_tokens": new_tokens})
        out = out[0] if isinstance(out, list) else out
        return int(out["usage"]["completion_tokens"])

    return generate


def timed(generate, messages: list[dict], new_tokens: int, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        count = generate(messages, new_tokens)
        best = min(best, time.perf_counter() - started)
    return best, count


def measure(generate, prompts: dict[str, list[dict]], new_tokens: int, repeats: int) -> dict:
    rows = {}
    for length, messages in prompts.items():
        times = repeats if int(length) <= LONG_PROMPT else 1  # a 2048-token prefill is minutes
        ttft, _ = timed(generate, messages, 1, times)
        total, count = timed(generate, messages, new_tokens, times)
        rows[length] = {
            "ttft_s": ttft,
            "latency_s": total,
            "new_tokens": count,
            "decode_tokens_per_s": (count - 1) / max(total - ttft, 1e-9),
        }
        print(f"  {spec['name']} prompt {length}: TTFT {ttft:.3f} s, {count} tokens in "
              f"{total:.2f} s, decode {rows[length]['decode_tokens_per_s']:.2f} tokens/s",
              file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    started = time.perf_counter()
    runtime = raw_runtime if spec["runtime"] == "raw" else pyfunc_runtime
    generate = runtime(spec["model"])
    load_s = time.perf_counter() - started
    generate(spec["warmup"], 2)  # first-call costs (lazy allocations) are not the steady state
    rows = measure(generate, spec["prompts"], spec["new_tokens"], spec["repeats"])
    Path(sys.argv[2]).write_text(json.dumps(
        {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "prompts": rows}, indent=1))

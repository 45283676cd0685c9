"""The cost model: the bytes one decode step reads (weights, and the KV cache at the answer's
context), per runtime, and what the measured decode speed makes of them against the machine's
read bandwidth: how close each runtime comes to the limit of memory-bound decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import build as build_mod
from benchmarks import llamacpp
from phi3flow.fetching import onnx_build


def weight_bytes(onnx_folder: Path) -> int:
    """Bytes of weights one decode step reads: every initializer but the embedding table, of
    which a step gathers one row (394 MB of the full-size model's 2.72 GB are that table)."""
    import onnx

    model = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"),
                      len(tensor.raw_data))
        if "embed_tokens" not in tensor.name:
            total += length
    return total


def kv_bytes_per_token(onnx_folder: Path) -> int:
    """Bytes of KV cache one token adds, which every later decode step reads: keys and values of
    every layer, in the cache's dtype (fp32 in the CPU int4 build)."""
    decoder = json.loads((onnx_folder / "genai_config.json").read_text())["model"]["decoder"]
    return (2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"]
            * decoder["head_size"] * onnx_build.kv_cache_numpy_dtype(onnx_folder).itemsize)


def step_bytes(checkpoint: Path, onnx: Path, ggufs: dict[str, Path]) -> dict[str, dict]:
    """What one decode step of each model reads: weights (the embedding table aside: a step
    gathers one row of it) and KV cache per token of context, in each runtime's cache dtype."""
    config = json.loads((checkpoint / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    kv_per_token = 2 * config["num_hidden_layers"] * kv_heads * (
        config["hidden_size"] // config["num_attention_heads"])  # elements, keys and values
    tensors = build_mod.tensors(checkpoint)
    torch_weights = sum(end - begin for name, t in tensors.items()
                        for begin, end in [t["data_offsets"]] if "embed_tokens" not in name)
    torch_kv = 4 if {t["dtype"] for t in tensors.values()} == {"F32"} else 2  # the weights' dtype
    return {
        "onnx": {"weights": weight_bytes(onnx), "kv_per_token": kv_bytes_per_token(onnx)},
        "transformers": {"weights": torch_weights, "kv_per_token": kv_per_token * torch_kv},
        # llama.cpp's default KV cache type is f16
        **{f"llama_cpp_{q}": {"weights": llamacpp.weight_bytes(path), "kv_per_token": kv_per_token * 2}
           for q, path in ggufs.items()},
    }


STEP_MODEL = {"raw": "onnx", "onnx_pyfunc": "onnx", "transformers_pyfunc": "transformers"}


def decode_limits(results: dict) -> list[dict]:
    """Per runtime and prompt length: the bytes one decode step reads (weights, plus the KV cache
    at the mean context of the answer), times the measured tokens/s, against the bandwidth probe."""
    steps = results["step_bytes"]
    rows, new_tokens = [], results["plan"]["new_tokens"]
    bandwidth = results["machine"]["read_bandwidth_gbs"] * 1e9
    for key, runtime in results["runtimes"].items():
        step = steps.get(STEP_MODEL.get(key, key))
        if step is None:  # the served model: the same steps as the pyfunc, plus HTTP
            continue
        for length, row in runtime["prompts"].items():
            kv = step["kv_per_token"] * (int(length) + new_tokens / 2)
            achieved = (step["weights"] + kv) * row["decode_tokens_per_s"]
            rows.append({"runtime": key, "prompt": length, "weights_gb": step["weights"] / 1e9,
                         "kv_gb": kv / 1e9, "tokens_per_s": row["decode_tokens_per_s"],
                         "achieved_gbs": achieved / 1e9, "of_probe": achieved / bandwidth,
                         "met": achieved / bandwidth >= 0.8})
    return rows

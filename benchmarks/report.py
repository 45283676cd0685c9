"""The report: targets (each measured value, its bound, met or missed by how much), the
markdown tables of docs/performance.md and its plot, written with the results' JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks import llamacpp
from benchmarks.cost import STEP_MODEL, decode_limits
from phi3flow.batch import udf_model as batch_model

# --- results ----------------------------------------------------------------------------------

RUNTIMES = {  # result key -> label, in the order of the table (llama.cpp only with --llama-cpp)
    "raw": "onnxruntime-genai (raw)",
    "onnx_pyfunc": "ONNX pyfunc",
    "front_door": "ONNX pyfunc behind the front door (streamed)",
    "served": "ONNX pyfunc, served (HTTP)",
    "transformers_pyfunc": "transformers pyfunc",
    **{f"llama_cpp_{q}": f"llama.cpp {q}" for q in llamacpp.QUANTS},
}


# The two tables of targets, by what they measure.
TARGETS = "Targets: the pyfunc's overhead, serving, the pipeline"
PEER_TARGETS = "Targets: the machine's limit and the peer runtimes"
BATCH_TARGETS = "Targets: batch_score on Spark"
BATCH = "batch_score on Spark against in-process predict"
TURNS_TARGETS = "Targets: conversations and the prefix cache"
TURNS = "A conversation's follow-up turns"


def measured(results: dict) -> dict[str, str]:
    """The runtimes this run measured, in the table's order, with their labels."""
    return {k: label for k, label in RUNTIMES.items() if k in results["runtimes"]}


def paired_ratio(runtimes: dict, a: str, b: str, length: str, field: str) -> float:
    """Median over alternating pairs of runs of a's field / b's (both from paired_probes)."""
    pairs = zip(runtimes[a]["prompts"][length]["runs"], runtimes[b]["prompts"][length]["runs"])
    return statistics.median(x[field] / y[field] for x, y in pairs)


def _target(rows: list[dict], name: str, value: float, bound: float, at_least: bool,
            unit: str = "x") -> None:
    met = value >= bound if at_least else value <= bound
    rows.append({"target": name, "measured": value, "bound": f"{'>=' if at_least else '<='} "
                 f"{bound:g}{unit}", "met": met, "by_percent": (value / bound - 1) * 100})


def peer_targets(results: dict) -> list[dict]:
    """The ONNX pyfunc against the machine's limit and the peer runtimes (transformers, and
    llama.cpp when measured), each at its worst prompt length (which one is in the name)."""
    runtimes, rows = results["runtimes"], []
    lengths = list(runtimes["raw"]["prompts"])

    def worst(name: str, values: dict[str, float], bound: float, at_least: bool) -> None:
        length = (min if at_least else max)(values, key=values.get)
        _target(rows, f"{name} (worst: {length}-token prompt)", values[length], bound, at_least)

    limits = [r for r in results["decode_limits"] if r["runtime"] == "onnx_pyfunc"]
    worst("ONNX pyfunc decode: bytes read per step x tokens/s / read-bandwidth probe",
          {r["prompt"]: r["of_probe"] for r in limits}, 0.8, True)
    if "llama_cpp_Q4_0" in runtimes:
        worst("ONNX pyfunc / llama.cpp Q4_0 decode tokens/s, paired runs",
              {n: paired_ratio(runtimes, "onnx_pyfunc", "llama_cpp_Q4_0", n, "decode_tokens_per_s")
               for n in lengths}, 1.0, True)
        worst("ONNX pyfunc / llama.cpp Q4_0 TTFT, paired runs",
              {n: paired_ratio(runtimes, "onnx_pyfunc", "llama_cpp_Q4_0", n, "ttft_s")
               for n in lengths}, 1.0, False)
    long = [n for n in lengths if int(n) >= 256]
    worst("ONNX pyfunc / transformers pyfunc TTFT",
          {n: runtimes["onnx_pyfunc"]["prompts"][n]["ttft_s"]
           / runtimes["transformers_pyfunc"]["prompts"][n]["ttft_s"] for n in long}, 1.0, False)
    worst("A request alone: ONNX pyfunc / raw TTFT, paired runs",
          {n: paired_ratio(runtimes, "onnx_pyfunc", "raw", n, "ttft_s") for n in lengths}, 1.05, False)
    blocking = runtimes["onnx_pyfunc"].get("head_of_line")
    if blocking:
        rss = (f"; peak RSS {blocking['peak_rss_before_mb']:.0f} MB before, "
               f"{blocking['peak_rss_after_mb']:.0f} MB with both requests"
               if "peak_rss_after_mb" in blocking else "")
        rows.append({"target": f"A 1-token request sent {blocking['short_sent_at_s']:.1f} s into "
                     f"a {max(lengths, key=int)}-token prefill returns before that prefill ends "
                     f"(its first token at {blocking['long_first_token_at_s']:.1f} s{rss}); "
                     "seconds",
                     "measured": blocking["short_returned_at_s"],
                     "bound": f"< {blocking['long_first_token_at_s']:.1f} s",
                     "met": blocking["short_returned_at_s"] < blocking["long_first_token_at_s"],
                     "by_percent": None})
    steps = results["step_bytes"]
    ratio = steps["transformers"]["weights"] / steps["onnx"]["weights"]
    worst(f"ONNX pyfunc / transformers pyfunc decode tokens/s (reported; weights read per step: "
          f"{ratio:.1f}x fewer)",
          {n: runtimes["onnx_pyfunc"]["prompts"][n]["decode_tokens_per_s"]
           / runtimes["transformers_pyfunc"]["prompts"][n]["decode_tokens_per_s"]
           for n in lengths}, ratio, True)
    return rows


def targets(results: dict) -> list[dict]:
    """The pyfunc's overhead over raw onnxruntime-genai, serving and the pipeline: each measured
    value, its bound, met or missed by how much."""
    runtimes = results["runtimes"]

    def decode(key: str, length: str) -> float:
        return runtimes[key]["prompts"][length]["decode_tokens_per_s"]

    lengths = list(runtimes["raw"]["prompts"])
    rows: list[dict] = []

    def target(name: str, value: float, bound: float, at_least: bool, unit: str = "x") -> None:
        _target(rows, name, value, bound, at_least, unit)

    target("ONNX pyfunc / raw decode tokens/s, paired runs (worst prompt length)",
           min(paired_ratio(runtimes, "onnx_pyfunc", "raw", n, "decode_tokens_per_s")
               for n in lengths), 0.95, True)
    # Single requests on both sides: the pyfunc's head-of-line test (two requests at once,
    # which raw onnxruntime-genai is never asked) comes after, and is reported on its own.
    blocking = runtimes["onnx_pyfunc"].get("head_of_line", {})
    target("ONNX pyfunc / raw peak RSS, single requests",
           blocking.get("peak_rss_before_mb", runtimes["onnx_pyfunc"]["peak_rss_mb"])
           / runtimes["raw"]["peak_rss_mb"], 1.1, False)
    target("ONNX pyfunc / transformers pyfunc decode tokens/s (worst prompt length)",
           min(decode("onnx_pyfunc", n) / decode("transformers_pyfunc", n) for n in lengths),
           5, True)
    roofline = results["machine"]["read_bandwidth_gbs"] * 1e9 / results["weight_bytes"]
    target(f"ONNX pyfunc decode / roofline ({roofline:.1f} tokens/s), {lengths[0]}-token prompt",
           decode("onnx_pyfunc", lengths[0]) / roofline, 0.40, True)
    if "front_door" in runtimes:
        for field, name, bound, at_least in (
                ("ttft_s", "TTFT", 1.05, False), ("decode_tokens_per_s", "decode tokens/s",
                                                  0.95, True)):
            values = {n: paired_ratio(runtimes, "front_door", "onnx_pyfunc", n, field)
                      for n in lengths}
            length = (min if at_least else max)(values, key=values.get)
            target(f"front door / in-process ONNX pyfunc {name}, paired runs (worst: "
                   f"{length}-token prompt)", values[length], bound, at_least)
        together = [runtimes[k].get("concurrent") for k in ("front_door", "onnx_pyfunc")]
        if all(together):
            target(f"front door / in-process, {together[0]['clients']} concurrent streams: "
                   "aggregate tokens/s", together[0]["tokens_per_s"] / together[1]["tokens_per_s"],
                   0.95, True)
    guided = runtimes["onnx_pyfunc"].get("guided")
    if guided:
        values = {n: guided_ratio(runtimes["onnx_pyfunc"], n, "decode_tokens_per_s")
                  for n in lengths if int(n) <= 256}
        length = min(values, key=values.get)
        target(f"JSON-schema (grammar-constrained) / free decode tokens/s, ONNX pyfunc, paired "
               f"runs (worst: {length}-token prompt)", values[length], 0.9, True)
    concurrency = runtimes["served"]["concurrency"]
    if "4" in concurrency:
        target("served: 4 clients / 1 client aggregate tokens/s",
               concurrency["4"]["tokens_per_s"] / concurrency["1"]["tokens_per_s"], 1.8, True)
    blocking = runtimes["served"]["head_of_line"]
    rows.append({"target": "served: a short request is answered while a long one still runs",
                 "measured": blocking["short_during_long_s"], "bound": "before the long one ends",
                 "met": blocking["long_still_running"], "by_percent": None})
    if "pipeline" in results:
        target("`main` on the fixture, cold", results["pipeline"]["main_cold_s"], 90, False, " s")
        target("`main` on the fixture, every step reused", results["pipeline"]["main_reused_s"],
               15, False, " s")
    return rows


def batch_targets(results: dict) -> list[dict]:
    """batch_score's aggregate tokens/s against in-process predict with the same batch size
    (Spark's overhead stays small) and against one row at a time (batching pays), per length."""
    rows: list[dict] = []
    for length, row in results.get("batch_score", {}).get("lengths", {}).items():
        _target(rows, f"batch_score / in-process predict (batches of {row['batch_size']}) "
                f"aggregate tokens/s, {length}-token prompts",
                row["batch_score_vs_in_process"], 0.9, True)
        _target(rows, f"batch_score / one-at-a-time predict aggregate tokens/s, {length}-token "
                "prompts", row["batch_score_vs_one_at_a_time"], 1.8, True)
    return rows


def multiturn_targets(results: dict) -> list[dict]:
    """A follow-up turn against its new tokens alone and against llama.cpp (the worst turn), the
    cache's cost where nothing is shared, and its memory within the budget after eviction."""
    turns, rows = results.get("multiturn"), []
    if not turns:
        return rows

    def worst(values: list[float]) -> tuple[float, int]:
        value = max(values)
        return value, values.index(value) + 2  # follow-ups are turns 2..

    value, turn = worst(turns["follow_up_vs_alone"])
    _target(rows, f"follow-up TTFT / its new tokens alone (worst: turn {turn})", value, 1.5, False)
    if "follow_up_vs_llama_cpp" in turns:
        value, turn = worst(turns["follow_up_vs_llama_cpp"])
        _target(rows, f"follow-up TTFT / llama.cpp Q4_0's, same turn (worst: turn {turn})",
                value, 1.2, False)
    for length, ratios in turns["nothing_shared"].items():
        _target(rows, f"nothing shared, {length}-token prompt: TTFT with the cache / without",
                ratios["ttft_s"], 1.03, False)
        _target(rows, f"nothing shared, {length}-token prompt: decode with the cache / without",
                ratios["decode_tokens_per_s"], 0.97, True)
    evicted = turns["after_eviction"]["cache"]
    _target(rows, "prefix cache after eviction (MB) / its budget", evicted["cache_mb"]
            / evicted["cache_budget_mb"], 1.0, False)
    return rows


def multiturn_markdown(results: dict) -> list[str]:
    turns = results.get("multiturn")
    if not turns:
        return []
    machine = turns.get("machine", results["machine"])
    llama = "llama_cpp" in turns["turns"][0]
    lines = [f"## {TURNS}", "",
             f"A conversation of {turns['history_tokens']} tokens of history, then "
             f"{len(turns['turns'])} turns of a user message (~50 tokens) and a "
             f"{turns['new_tokens_per_answer']}-token answer, sent whole each turn as chat "
             f"clients send it, on {machine['cpu']} ({machine['cores']} cores, "
             f"{machine['date']}); each runtime in its own process, turn by turn in alternation. "
             "New tokens: what the turn adds to the previous turn's prompt (the previous answer, "
             "the user message, the tags). Alone: a prompt of that many tokens sharing nothing, "
             f"right after the turn. The cache's budget here: {turns['budget_mb']} MB. "
             "benchmarks/multiturn.py.", "",
             "| turn | prompt tokens | new tokens | cached | TTFT, cache (s) | TTFT, no cache (s) "
             "| new tokens alone (s) | x alone |" + (" llama.cpp Q4_0 (s) | x llama.cpp |"
                                                     if llama else ""),
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if llama else "")]
    for row in turns["turns"]:
        alone = row.get("alone")
        line = (f"| {row['turn']} | {row['prompt_tokens']} | {row['new_tokens']} | "
                f"{row['cache'].get('cached_tokens') or 0} | {row['cache']['ttft_s']:.2f} | "
                f"{row['no_cache']['ttft_s']:.2f} | "
                + (f"{alone['ttft_s']:.2f} | {row['cache']['ttft_s'] / alone['ttft_s']:.2f} |"
                   if alone else "| |"))
        if llama:
            line += (f" {row['llama_cpp']['ttft_s']:.2f} | "
                     f"{row['cache']['ttft_s'] / row['llama_cpp']['ttft_s']:.2f} |")
        lines.append(line)
    after, evicted = turns["after_turns"], turns["after_eviction"]
    lines += ["", "Nothing shared (median ratio with the cache / without, alternating runs): " + ", ".join(
        f"{n} tokens: TTFT {r['ttft_s']:.2f}x, decode {r['decode_tokens_per_s']:.2f}x"
        for n, r in turns["nothing_shared"].items()) + ".", "",
        f"Memory: after the turns the cached process held {after['cache']['rss_mb']:.0f} MB "
        f"(its prefix cache {after['cache']['cache_mb']:.0f} MB in "
        f"{after['cache']['cache_entries']} generators), the one without a cache "
        f"{after['no_cache']['rss_mb']:.0f} MB"
        + (f", llama.cpp {after['llama_cpp']['rss_mb']:.0f} MB" if llama else "")
        + f". After {len(turns['evicting'])} more distinct 256-token prompts the cache held "
        f"{evicted['cache']['cache_mb']:.0f} MB in {evicted['cache']['cache_entries']} "
        f"generators (budget {evicted['cache']['cache_budget_mb']:.0f} MB); the process "
        f"{evicted['cache']['rss_mb']:.0f} MB (peak {evicted['cache']['peak_rss_mb']:.0f} MB), "
        f"against {evicted['no_cache']['rss_mb']:.0f} MB (peak "
        f"{evicted['no_cache']['peak_rss_mb']:.0f} MB) without a cache.", ""]
    return lines


def batch_markdown(results: dict) -> list[str]:
    batch = results.get("batch_score")
    if not batch:
        return []
    machine = batch.get("machine", results["machine"])
    lines = [f"## {BATCH}", "",
             f"The ONNX pyfunc, {results['plan']['new_tokens']} new tokens per prompt, greedy, on "
             f"{machine['cpu']} ({machine['cores']} cores, {machine['date']}). Each way in a "
             "fresh process: `predict` one row at a time; `predict` on batches of the size "
             "batch_score uses, the model loaded as batch_score's workers load it (a batch's "
             f"prompts in one call up to {batch_model.SCORING_BATCH_PREFILL:,} tokens); "
             "`batch_score` on `local[*]` (its defaults: one model copy with every core). "
             "Aggregate tokens/s = completion tokens / seconds from the model's load to the "
             "last answer (batch_score: its Spark job, the worker's model load "
             "included); warm = without the load (batch_score: the seconds inside predict "
             "calls). benchmarks/batch.py.", "",
             "| prompt | prompts | batch | one at a time | in-process batches | batch_score | "
             "x in-process | x one at a time | warm: one / batches / batch_score |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for length, row in batch["lengths"].items():
        one, inproc, spark = row["one_at_a_time"], row["in_process"], row["batch_score"]
        lines.append(
            f"| {length} | {row['prompts']} | {row['batch_size']} | {one['tokens_per_s']:.2f} | "
            f"{inproc['tokens_per_s']:.2f} | {spark['tokens_per_s']:.2f} | "
            f"{row['batch_score_vs_in_process']:.2f} | {row['batch_score_vs_one_at_a_time']:.2f} "
            f"| {one['warm_tokens_per_s']:.2f} / {inproc['warm_tokens_per_s']:.2f} / "
            f"{spark['warm_tokens_per_s']:.2f} |")
    lines += ["", f"Memory: the Spark Python worker holding the model peaked at "
              f"{batch['worker_peak_rss_mb']:.0f} MB ({batch['workers']} Python worker process(es) "
              f"seen), the in-process predict process at {batch['in_process_peak_rss_mb']:.0f} "
              f"MB; Spark's JVM (driver and executor in one, local mode) at "
              f"{batch['jvm_peak_rss_mb']:.0f} MB. Spark started in "
              f"{batch['spark_start_s']:.1f} s (not in the figures above).", ""]
    return lines


def markdown(results: dict, command: str) -> str:
    m = results["machine"]
    lines = [
        "# Performance",
        "",
        f"Generated by `{command}` on {m['date']} (commit {m['commit']}); do not edit by hand.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, no GPU; "
        f"memory read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s (all cores; the best of "
        + (", ".join(f"{k} {v:.1f}" for k, v in m["read_bandwidth_kernels_gbs"].items())
           if "read_bandwidth_kernels_gbs" in m else "two reads") + ").",
        f"- Model: {results['model']}; a decode step reads {results['weight_bytes'] / 1e9:.2f} GB "
        "of int4 weights (the embedding table aside); "
        f"{results['plan']['new_tokens']} new tokens per request, greedy.",
        "- Versions: Python " + m["python"] + ", "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "- Timing (benchmarks/probe.py): raw onnxruntime-genai and the ONNX pyfunc stream, so "
        "TTFT is the time to the first token and decode = (N - 1) / (last - first token) in one "
        "request; the transformers pyfunc and the REST server cannot stream, so TTFT is the "
        "latency of a 1-token request and decode = (N - 1) / (latency of N tokens - TTFT). "
        "Medians of the repeats (prompts over 256 tokens: one run). Each in-process runtime runs "
        "in its own fresh process (its own load time and peak RSS); raw onnxruntime-genai, "
        "the ONNX pyfunc (and llama.cpp, when measured) are loaded side by side and timed in "
        "alternation, prompt by prompt.",
    ]
    if results["plan"].get("llama_quants"):
        sizes = ", ".join(f"{q} {results['step_bytes'][f'llama_cpp_{q}']['weights'] / 1e9:.2f} GB"
                          for q in results["plan"]["llama_quants"])
        lines.append(
            f"- llama.cpp (llama-cpp-python {m['versions'].get('llama-cpp-python', '?')}, "
            "benchmarks/llamacpp.py): the same checkpoint converted by llama.cpp's "
            "convert_hf_to_gguf.py and quantized by llama_model_quantize; weights a decode step "
            f"reads: {sizes}. Every core, flash attention on, n_ctx = longest prompt + new "
            "tokens, the same prompt token ids, its own `Llama.generate` loop.")
    lines += [
        "",
        "## Single request",
        "",
        "| runtime | load (s) | peak RSS (MB) | prompt | TTFT (s) | decode (tokens/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in measured(results).items():
        runtime = results["runtimes"][key]
        for i, (length, row) in enumerate(runtime["prompts"].items()):
            head = (f"| {label} | {runtime['load_s']:.1f} | {runtime['peak_rss_mb']:.0f} "
                    if i == 0 else "| | | ")
            lines.append(f"{head}| {length} | {row['ttft_s']:.3f} | "
                         f"{row['decode_tokens_per_s']:.2f} |")
    lines += front_door_section(results)
    lines += guided_section(results)
    served = results["runtimes"]["served"]
    lines += ["", "## Served, concurrent clients (short prompt, "
              f"{results['plan']['requests_per_client']} requests per client)", "",
              "| clients | requests | aggregate tokens/s | x one client | p50 (s) | p95 (s) |",
              "|---:|---:|---:|---:|---:|---:|"]
    one = served["concurrency"]["1"]["tokens_per_s"]
    for n, row in served["concurrency"].items():
        lines.append(f"| {n} | {row['requests']} | {row['tokens_per_s']:.2f} | "
                     f"{row['tokens_per_s'] / one:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} |")
    blocking = served["head_of_line"]
    lines += ["", f"A 1-token request took {blocking['short_alone_s']:.2f} s alone and "
              f"{blocking['short_during_long_s']:.2f} s while a "
              f"{max(served['prompts'], key=int)}-token request was being answered.", ""]
    if "pipeline" in results:
        p = results["pipeline"]
        lines += ["## Pipeline", "", f"`main` on the fixture: {p['main_cold_s']:.1f} s cold, "
                  f"{p['main_reused_s']:.1f} s with every step reused.", ""]
    if results.get("decode_limits"):
        kv = {STEP_MODEL.get(r["runtime"], r["runtime"]) for r in results["decode_limits"]}
        per_token = ", ".join(f"{m} {results['step_bytes'][m]['kv_per_token'] / 1e6:.3f} MB"
                              for m in sorted(kv))
        lines += ["## Decode against the machine's limit", "",
                  "Bytes one decode step reads: the weights (embedding table aside) plus the KV "
                  f"cache at the answer's mean context (per token of context: {per_token}), "
                  "times decode tokens/s, against the read-bandwidth probe. Target, for the "
                  "ONNX pyfunc: >= 0.8x the probe.", "",
                  "| runtime | prompt | weights (GB) | KV (GB) | decode (tokens/s) | read (GB/s) "
                  "| x probe | met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        labels = measured(results)
        for row in results["decode_limits"]:
            met = ("yes" if row["met"] else f"**no**, by {(1 - row['of_probe'] / 0.8) * 100:.0f}%"
                   ) if row["runtime"] == "onnx_pyfunc" else ""
            lines.append(f"| {labels[row['runtime']]} | {row['prompt']} | "
                         f"{row['weights_gb']:.2f} | {row['kv_gb']:.2f} | "
                         f"{row['tokens_per_s']:.2f} | {row['achieved_gbs']:.1f} | "
                         f"{row['of_probe']:.2f} | {met} |")
        lines.append("")
    lines += multiturn_markdown(results)
    lines += batch_markdown(results)
    for title, key in ((TARGETS, "targets"), (PEER_TARGETS, "peer_targets"),
                       (TURNS_TARGETS, "multiturn_targets"), (BATCH_TARGETS, "batch_targets")):
        if not results.get(key):
            continue
        lines += [f"## {title}", "", "| target | measured | bound | met |", "|---|---:|---|---|"]
        for row in results[key]:
            met = "yes" if row["met"] else (f"**no**, by {abs(row['by_percent']):.0f}%"
                                            if row["by_percent"] is not None else "**no**")
            lines.append(f"| {row['target']} | {row['measured']:.2f} | {row['bound']} | {met} |")
        lines.append("")
    return "\n".join(lines)


def guided_ratio(runtime: dict, length: str, field: str) -> float:
    """Median over pairs of runs (one free, then the same under a JSON schema) of guided/free."""
    pairs = zip(runtime["guided"][length]["runs"], runtime["prompts"][length]["runs"])
    return statistics.median(g[field] / f[field] for g, f in pairs)


def guided_section(results: dict) -> list[str]:
    """The ONNX pyfunc answering under a JSON schema against answering freely."""
    runtime = results["runtimes"]["onnx_pyfunc"]
    if "guided" not in runtime:
        return []
    lines = ["", "## Grammar-constrained decoding", "",
             "The ONNX pyfunc answering the same prompt freely and under a JSON schema "
             "(`response_format` json_schema: one string property of at least 1,000 characters, "
             "so the answer is as long as a free one), run after run in one process; the grammar "
             "(llguidance) masks every decode step's logits. Ratios are medians over the pairs.",
             "", "| prompt | TTFT free (s) | TTFT JSON (s) | x | decode free (tokens/s) | decode "
             "JSON (tokens/s) | x |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for length, row in runtime["guided"].items():
        free = runtime["prompts"][length]
        lines.append(f"| {length} | {free['ttft_s']:.3f} | {row['ttft_s']:.3f} | "
                     f"{guided_ratio(runtime, length, 'ttft_s'):.3f} | "
                     f"{free['decode_tokens_per_s']:.2f} | {row['decode_tokens_per_s']:.2f} | "
                     f"{guided_ratio(runtime, length, 'decode_tokens_per_s'):.3f} |")
    return lines


def front_door_section(results: dict) -> list[str]:
    """The ONNX pyfunc through the front door against in process, run for run."""
    runtimes = results["runtimes"]
    if "front_door" not in runtimes:
        return []
    lines = ["", "## Through the front door", "",
             "The ONNX pyfunc behind `python -m phi3flow.front_door` (its own process), each "
             "request streamed over HTTP and timed from the chunks as an OpenAI client reads "
             "them, in alternation with the same pyfunc in process (`predict_stream`): TTFT and "
             "decode from the stream's token times on both sides. Ratios are medians over the "
             "alternating pairs.", "",
             "| prompt | TTFT in process (s) | TTFT front door (s) | x | decode in process "
             "(tokens/s) | decode front door (tokens/s) | x |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in runtimes["front_door"]["prompts"]:
        inside = runtimes["onnx_pyfunc"]["prompts"][length]
        door = runtimes["front_door"]["prompts"][length]
        lines.append(
            f"| {length} | {inside['ttft_s']:.3f} | {door['ttft_s']:.3f} | "
            f"{paired_ratio(runtimes, 'front_door', 'onnx_pyfunc', length, 'ttft_s'):.3f} | "
            f"{inside['decode_tokens_per_s']:.2f} | {door['decode_tokens_per_s']:.2f} | "
            f"{paired_ratio(runtimes, 'front_door', 'onnx_pyfunc', length, 'decode_tokens_per_s'):.3f} |")
    together = [runtimes[k].get("concurrent") for k in ("onnx_pyfunc", "front_door")]
    if all(together):
        lines += ["", f"{together[0]['clients']} concurrent streams of the shortest prompt "
                  "(medians of 2 alternating runs): aggregate "
                  f"{together[0]['tokens_per_s']:.2f} tokens/s in process, "
                  f"{together[1]['tokens_per_s']:.2f} through the front door "
                  f"({together[1]['tokens_per_s'] / together[0]['tokens_per_s']:.2f}x); per "
                  f"stream TTFT {together[0]['ttft_s']:.2f} / {together[1]['ttft_s']:.2f} s, "
                  f"decode {together[0]['decode_tokens_per_s']:.2f} / "
                  f"{together[1]['decode_tokens_per_s']:.2f} tokens/s."]
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = results["runtimes"]
    lengths = list(runtimes["raw"]["prompts"])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 5))
    width = 0.8 / len(measured(results))
    for i, (key, label) in enumerate(measured(results).items()):
        xs = np.arange(len(lengths)) + i * width
        left.bar(xs, [runtimes[key]["prompts"][n]["decode_tokens_per_s"] for n in lengths],
                 width, label=label)
        middle.bar(xs, [runtimes[key]["prompts"][n]["ttft_s"] for n in lengths], width, label=label)
    roofline = results["machine"]["read_bandwidth_gbs"] * 1e9 / results["weight_bytes"]
    left.axhline(roofline, color="grey", linestyle="--", label="bandwidth roofline")
    for axis, title, unit in ((left, "Decode speed", "tokens/s"),
                              (middle, "Time to first token", "seconds (log)")):
        axis.set_xticks(np.arange(len(lengths)) + 0.4 - width / 2, [f"{n} tokens" for n in lengths])
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.set_xlabel("prompt length")
    middle.set_yscale("log")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9)
    concurrency = runtimes["served"]["concurrency"]
    clients = [int(n) for n in concurrency]
    right.plot(clients, [concurrency[str(n)]["tokens_per_s"] for n in clients], "o-",
               label="aggregate tokens/s")
    right.set_xticks(clients)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("tokens/s")
    right.set_title("Served ONNX model")
    twin = right.twinx()
    twin.plot(clients, [concurrency[str(n)]["p95_s"] for n in clients], "s--", color="tab:red",
              label="p95 latency (s)")
    twin.set_ylabel("p95 latency (s)")
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{results['model']} on {results['machine']['cores']} CPU cores "
                 f"({results['machine']['cpu']})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, command: str, out: Path) -> dict:
    """Targets and decode limits added to the results, which are written as OUT/performance.json,
    .md and .png; the targets printed."""
    results["targets"] = targets(results)
    results["decode_limits"] = decode_limits(results)
    results["peer_targets"] = peer_targets(results)
    results["batch_targets"] = batch_targets(results)
    results["multiturn_targets"] = multiturn_targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(results, indent=1))
    (out / "performance.md").write_text(markdown(results, command))
    plot(results, out / "performance.png")
    print(markdown(results, command).split(f"## {TARGETS}")[1])
    print(f"written: {out / 'performance.md'}, .json, .png")
    return results



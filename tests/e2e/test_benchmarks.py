"""The performance harness runs end to end at fixture scale (its smoke mode); no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import report as bench_report
from tests.helpers import ROOT


def smoke(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path / "out"),
         "--cache", str(tmp_path / "cache"), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.e2e
def test_smoke_benchmark_measures_every_runtime_and_writes_the_report(tmp_path):
    done = smoke(tmp_path)
    results = json.loads((tmp_path / "out" / "performance.json").read_text())
    for name in ("raw", "onnx_pyfunc", "front_door", "served", "transformers_pyfunc"):
        runtime = results["runtimes"][name]
        assert runtime["load_s"] > 0 and runtime["peak_rss_mb"] > 0, name
        assert set(runtime["prompts"]) == {"16", "256"}, name
        for row in runtime["prompts"].values():
            assert row["ttft_s"] > 0 and row["new_tokens"] >= 1, (name, row)
    served = results["runtimes"]["served"]
    assert set(served["concurrency"]) == {"1", "2"}
    assert all(row["requests"] == 2 * int(n) for n, row in served["concurrency"].items())
    assert results["pipeline"]["main_cold_s"] > results["pipeline"]["main_reused_s"] > 0
    # Every target is reported (met or not: smoke mode measures nothing real).
    assert len(results["targets"]) == 11
    # The front door, streamed over HTTP beside the in-process pyfunc, alone and 4 at once.
    for name in ("onnx_pyfunc", "front_door"):
        together = results["runtimes"][name]["concurrent"]
        assert together["clients"] == 4 and together["tokens_per_s"] > 0, name
    assert "## Through the front door" in (tmp_path / "out" / "performance.md").read_text()
    # The same prompts answered under a JSON schema, beside the free runs.
    guided = results["runtimes"]["onnx_pyfunc"]["guided"]
    assert set(guided) == {"16", "256"} and all(r["new_tokens"] >= 1 for r in guided.values())
    assert "## Grammar-constrained decoding" in (tmp_path / "out" / "performance.md").read_text()
    # Decode against the machine's limit: weights plus the KV cache each step reads, per length.
    assert results["kv_bytes_per_token"] > 0
    limits = results["decode_limits"]
    onnx = [row for row in limits if row["runtime"] == "onnx_pyfunc"]
    assert [row["prompt"] for row in onnx] == ["16", "256"]
    assert onnx[1]["kv_gb"] > onnx[0]["kv_gb"] > 0 and all(r["of_probe"] > 0 for r in limits)
    # ... for every in-process runtime, each with its own weights and KV bytes
    assert {row["runtime"] for row in limits} == {"raw", "onnx_pyfunc", "transformers_pyfunc"}
    steps = results["step_bytes"]
    assert steps["transformers"]["weights"] > steps["onnx"]["weights"] > 0
    assert len(results["machine"]["read_bandwidth_kernels_gbs"]) == 4
    assert results["machine"]["read_bandwidth_gbs"] == max(
        results["machine"]["read_bandwidth_kernels_gbs"].values())
    # The targets against the machine's limit and the peers (no llama.cpp rows without
    # --llama-cpp), and the in-process head-of-line measurement they use.
    names = [row["target"] for row in results["peer_targets"]]
    assert len(names) == 5 and not any("llama" in n for n in names), names
    blocking = results["runtimes"]["onnx_pyfunc"]["head_of_line"]
    assert blocking["short_returned_at_s"] > blocking["short_sent_at_s"] > 0
    # batch_score against in-process predict: every length measured three ways, and its targets
    batch = results["batch_score"]
    assert set(batch["lengths"]) == {"16", "256"}
    for row in batch["lengths"].values():
        tokens = {row[way]["completion_tokens"] for way in ("one_at_a_time", "in_process",
                                                            "batch_score")}
        assert len(tokens) == 1 and tokens.pop() > 0, row  # greedy: the same answers' tokens
        assert row["batch_score"]["score_s"] > row["batch_score"]["model_calls_s"] > 0
    assert batch["worker_peak_rss_mb"] > 0 and batch["workers"] >= 1
    assert batch["jvm_peak_rss_mb"] > 0 and batch["in_process_peak_rss_mb"] > 0
    assert len(results["batch_targets"]) == 4
    report = (tmp_path / "out" / "performance.md").read_text()
    # A conversation's turns with the prefix cache and without, each follow-up beside its new
    # tokens alone; single prompts sharing nothing; the cache within its budget after eviction.
    turns = results["multiturn"]
    assert len(turns["turns"]) == 3 and all("alone" in row for row in turns["turns"][1:])
    assert all(row["cache"]["cached_tokens"] > 0 for row in turns["turns"][1:])
    assert not any(row["no_cache"]["cached_tokens"] for row in turns["turns"])
    assert set(turns["nothing_shared"]) == {"16", "256", str(turns["turns"][0]["prompt_tokens"])}
    evicted = turns["after_eviction"]["cache"]
    assert 0 < evicted["cache_mb"] <= evicted["cache_budget_mb"] == turns["budget_mb"]
    assert len(results["multiturn_targets"]) == 1 + 2 * 3 + 1
    assert f"## {bench_report.TURNS}" in report and f"## {bench_report.TURNS_TARGETS}" in report
    assert f"## {bench_report.BATCH}" in report and f"## {bench_report.BATCH_TARGETS}" in report
    assert f"## {bench_report.TARGETS}" in report and "transformers pyfunc" in report
    assert "## Decode against the machine's limit" in report
    assert f"## {bench_report.PEER_TARGETS}" in report
    assert (tmp_path / "out" / "performance.png").stat().st_size > 10_000
    assert "ONNX pyfunc / raw decode tokens/s" in done.stdout
    # Progress: what is being measured, with the time since the start; no progress-bar floods.
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    for expected in ("ONNX pyfunc: prompt 256 tokens, run 1/1", "transformers pyfunc: prompt 16 "
                     "tokens, run 1/1", "served, 2 client(s)", "main, reused: running",
                     "batch scoring: batch_score, 256-token prompts", "writing the report"):
        assert any(expected in line for line in progress), (expected, progress)
    for bar in ("Downloading artifacts", "Loading weights", "it/s]"):
        assert bar not in done.stderr, (bar, done.stderr[-3000:])


@pytest.mark.e2e
def test_smoke_benchmark_with_llama_cpp_converts_quantizes_and_times_it(tmp_path):
    """The opt-in llama.cpp peer (benchmarks/requirements-llama.txt; not installed by CI, where
    this is skipped): the fixture converted by llama.cpp's own converter, quantized to both
    types, timed beside onnxruntime-genai, in the report's tables and targets."""
    pytest.importorskip("llama_cpp", reason="pip install -r benchmarks/requirements-llama.txt")
    done = smoke(tmp_path, "--llama-cpp", "--no-pipeline")
    results = json.loads((tmp_path / "out" / "performance.json").read_text())
    for quant in ("Q4_0", "Q4_K_M"):
        runtime = results["runtimes"][f"llama_cpp_{quant}"]
        assert runtime["load_s"] > 0 and runtime["peak_rss_mb"] > 0
        assert {row["new_tokens"] for row in runtime["prompts"].values()} == {8}  # exactly N
        assert results["step_bytes"][f"llama_cpp_{quant}"]["weights"] > 0
    paired = results["runtimes"]["llama_cpp_Q4_0"]["prompts"]["16"]["runs"]
    assert len(paired) == len(results["runtimes"]["raw"]["prompts"]["16"]["runs"])
    assert sum("llama.cpp Q4_0" in row["target"] for row in results["peer_targets"]) == 2
    # ... and in the conversation, with its own prefix reuse
    assert all(row["llama_cpp"]["new_tokens"] == 8 for row in results["multiturn"]["turns"])
    assert any("llama.cpp" in row["target"] for row in results["multiturn_targets"])
    report = (tmp_path / "out" / "performance.md").read_text()
    assert "| llama.cpp Q4_K_M |" in report and "convert_hf_to_gguf.py" in report
    assert "hf-to-gguf" not in done.stderr  # the converter's lines went to its log file

"""The performance harness runs end to end at fixture scale (its smoke mode); no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.e2e
def test_smoke_benchmark_measures_every_runtime_and_writes_the_report(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path / "out"),
         "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "performance.json").read_text())
    for name in ("raw", "onnx_pyfunc", "served", "transformers_pyfunc"):
        runtime = results["runtimes"][name]
        assert runtime["load_s"] > 0 and runtime["peak_rss_mb"] > 0, name
        assert set(runtime["prompts"]) == {"16", "256"}, name
        for row in runtime["prompts"].values():
            assert row["ttft_s"] > 0 and row["new_tokens"] >= 1, (name, row)
    served = results["runtimes"]["served"]
    assert set(served["concurrency"]) == {"1", "2"}
    assert all(row["requests"] == 2 * int(n) for n, row in served["concurrency"].items())
    assert results["pipeline"]["main_cold_s"] > results["pipeline"]["main_reused_s"] > 0
    # Every target of the issue is reported (met or not: smoke mode measures nothing real).
    assert len(results["targets"]) == 7
    # Decode against the machine's limit: weights plus the KV cache each step reads, per length.
    assert results["kv_bytes_per_token"] > 0
    limits = results["decode_limits"]
    assert [row["prompt"] for row in limits] == ["16", "256"]
    assert limits[1]["kv_gb"] > limits[0]["kv_gb"] > 0 and all(r["of_probe"] > 0 for r in limits)
    report = (tmp_path / "out" / "performance.md").read_text()
    assert "## Targets (issue 7)" in report and "transformers pyfunc" in report
    assert "## Decode against the machine's limit (issue 15)" in report
    assert (tmp_path / "out" / "performance.png").stat().st_size > 10_000
    assert "ONNX pyfunc / raw decode tokens/s" in done.stdout
    # Progress: what is being measured, with the time since the start; no progress-bar floods.
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    for expected in ("ONNX pyfunc: prompt 256 tokens, run 1/1", "transformers pyfunc: prompt 16 "
                     "tokens, run 1/1", "served, 2 client(s)", "main, reused: running",
                     "writing the report"):
        assert any(expected in line for line in progress), (expected, progress)
    for bar in ("Downloading artifacts", "Loading weights", "it/s]"):
        assert bar not in done.stderr, (bar, done.stderr[-3000:])

"""Performance harness: `python -m benchmarks.run` (see docs/speed.md and docs/performance.md)."""

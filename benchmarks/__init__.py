"""Performance harness: `python -m benchmarks.run` (see README, Performance)."""

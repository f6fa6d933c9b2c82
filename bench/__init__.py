"""Benchmark of the order service: `python -m bench.run --quick`."""

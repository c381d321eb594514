"""Benchmarks (not shipped): `python -m bench.quota` measures the shared quota (issue 4)."""

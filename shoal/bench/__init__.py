"""Benchmark tooling: the `shoal bench serve` load generator, its HTTP client and dataset."""

"""Benchmarks and the demo: code beside its results (benchmarks/results/); not shipped in the Bento."""

"""Benchmark helpers shared by `expertyard bench` and the scripts under benchmarks/."""

"""Helpers shared by the test modules and the benchmarks; no test module imports another."""

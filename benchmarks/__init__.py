"""Benchmarks: side-by-side speed and memory ratios (BENCHMARKS.md); not part of the library."""

"""Metrics with verl's names and formulas, FLOP counts, and where metrics go."""

"""Validation: generate, grade, and verl's mean@k / best@k / maj@k / pass@k metrics."""

"""Fixtures used by the tests and the demo: tiny models and the demo task."""

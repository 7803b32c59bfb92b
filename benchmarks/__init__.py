"""Measurement scripts, run from a checkout (`python benchmarks/<script>.py`); not installed."""

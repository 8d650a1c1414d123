"""Benchmarks: ``python -m tests.bench`` (``make bench``)."""

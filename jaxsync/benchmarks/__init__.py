"""Benchmark helpers: timing, machine description, tables, the report (BENCHMARKS.md) and the
benchmark drivers of the scaling, asynchronous, RL and GAN experiments.

This package sits above the library: it imports the training code, and nothing under
``jaxsync/`` outside it imports it back (``tests/test_layers.py`` checks).
"""

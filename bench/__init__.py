"""Benchmarks: solver comparison (`cachefit bench solvers`) and standalone timing scripts.

Each ``bench_*.py`` module runs as ``python -m cachefit.bench.bench_<name>``
and prints medians with the machine it ran on.
"""

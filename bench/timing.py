"""Timing and record helpers the benchmark scripts share (one definition each)."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_seconds", "has_plan"]


def median_seconds(function, repeats):
    """(median wall seconds of `repeats` calls of `function`, the last call's result).

    Examples
    --------
    >>> seconds, value = median_seconds(lambda: 42, 3)
    >>> seconds >= 0, value
    (True, 42)
    """
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def has_plan(run):
    """Whether a benchmark run record holds a plan (status OPTIMAL or FEASIBLE with k groups).

    Examples
    --------
    >>> has_plan({"status": "FEASIBLE", "k": 3}), has_plan({"status": "timeout", "k": None})
    (True, False)
    """
    return run["status"] in ("OPTIMAL", "FEASIBLE") and bool(run["k"])

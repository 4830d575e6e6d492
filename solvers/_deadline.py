"""One call's wall-clock budget, shared by every phase of a solver and by the solvers `auto` runs in turn.

A time limit is a promise about the whole call, set-up included: the
bounds, the hints, every model build, every CP-SAT solve in its forked child
and the re-proving solves, the search's repackings and dp's final
rebalancing all read the same `Deadline` and stop (or are skipped) when
their share of it is spent.  The only work done past it is what turns the
best plan in hand into a `Plan` (sizes and the independent check): the
solvers end their searching `Deadline.reserve` seconds early for that, and
the documented slack of a call is `SLACK` (``max(0.25 s, 5 %)`` of the
limit), which covers that work and the reaping of a child process on a
loaded machine.

The clock is injectable (``clock=``), so a test can stop the clock at any
phase and check that every later phase stops without measuring time.
"""

from __future__ import annotations

import time

__all__ = ["Deadline", "slack_s", "finish_reserve"]


def slack_s(limit_s):
    """The documented slack of a call with time limit `limit_s`: max(0.25 s, 5 % of the limit).

    >>> slack_s(1.0), slack_s(10.0)
    (0.25, 0.5)
    """
    return max(0.25, 0.05 * float(limit_s))


def finish_reserve(n, limit_s):
    """Seconds kept at the end of a call for assembling and checking the plan of `n` nodes.

    25 µs per node (sizes and the independent check of a 2,000-node plan
    take ~0.05 s on a loaded 2-core machine), at least 20 ms, at most a
    tenth of the limit.

    >>> finish_reserve(2000, 10.0), finish_reserve(2000, 0.5)
    (0.05, 0.05)
    """
    return min(max(0.02, 2.5e-5 * n), 0.1 * float(limit_s))


class Deadline:
    """A wall-clock deadline: `limit_s` seconds after `start` on `clock`.

    Parameters
    ----------
    limit_s : float
        Seconds from `start`.
    start : float, optional
        A reading of `clock` (default: now).
    clock : callable, optional
        Returns seconds (default `time.perf_counter`, CLOCK_MONOTONIC on
        Linux, which a forked child shares with its parent).

    Examples
    --------
    >>> now = [0.0]
    >>> deadline = Deadline(10, clock=lambda: now[0])
    >>> part = deadline.within(0.5)
    >>> now[0] = 4.0
    >>> deadline.remaining(), part.remaining(), part.expired()
    (6.0, 1.0, False)
    >>> now[0] = 5.0
    >>> part.expired(), deadline.expired()
    (True, False)
    """

    def __init__(self, limit_s, *, start=None, clock=None):
        self.clock = time.perf_counter if clock is None else clock
        self.start = self.clock() if start is None else float(start)
        self.limit_s = float(limit_s)
        self.end = self.start + self.limit_s

    def now(self):
        return self.clock()

    def remaining(self):
        """Seconds left (negative once past)."""
        return self.end - self.clock()

    def expired(self):
        return self.clock() >= self.end

    def elapsed(self):
        return self.clock() - self.start

    def within(self, share):
        """A deadline ending after `share` of the time left now (never after this one)."""
        now = self.clock()
        return Deadline(max(share * (self.end - now), 0.0), start=now, clock=self.clock)

    def at_share(self, share):
        """A deadline ending `share` of this one's whole limit after its start."""
        return Deadline(share * self.limit_s, start=self.start, clock=self.clock)

    def reserve(self, seconds):
        """This deadline, `seconds` earlier (work that must leave time for what follows)."""
        return Deadline(max(self.limit_s - seconds, 0.0), start=self.start, clock=self.clock)

    def __repr__(self):
        return f"Deadline({self.limit_s:.3g} s, {self.remaining():.3g} s left)"

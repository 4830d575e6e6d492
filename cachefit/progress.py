"""Progress of long steps, reported by library code and shown by the CLI.

Library code never prints.  It opens a `task` and reports to it; the task
goes to the reporter installed in the current context (a `contextvars`
variable), and when none is installed — the default, and always in a
library user's process — every call is a no-op that costs a function call::

    from cachefit.progress import task

    with task("chunk search", total=len(candidates)) as progress:
        for chunk in candidates:
            ...
            progress.advance(detail=f"chunk {chunk}: k = {k}")

The CLI installs a reporter with `reporting` around a command: a
`rich.progress.Progress` on stderr, and only when stderr is a terminal and
``--quiet`` is not given, so machine-readable output on stdout (``--json``
files, pipes) never carries it.  Its lines vanish when the command ends.

How each long step reports (the pattern for solvers, bench and run):

* a loop with a known length: ``task(name, total=n)`` and
  ``progress.advance(detail=...)`` once per item (chunk probes, bench runs,
  executor schedules × passes);
* a search that improves a value: ``task(name)`` (no total) and
  ``progress.update(detail=f"k = {incumbent}, bound {bound}")`` whenever
  either changes — for CP-SAT from a ``cp_model.CpSolverSolutionCallback``'s
  ``on_solution_callback`` (``self.objective_value``,
  ``self.best_objective_bound``); a callback must do nothing else slow.

Tasks nest: each opens its own line under the reporter and closes with its
``with`` block.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

__all__ = ["task", "reporting", "Reporter", "RichReporter", "current_reporter"]

_REPORTER = contextvars.ContextVar("cachefit_progress_reporter", default=None)


class Reporter:
    """What a reporter does; this base class ignores everything (subclass it to show or record progress).

    Methods get a task id returned by `start`.
    """

    def start(self, name, total=None):
        """Open a task; return its id."""
        return None

    def update(self, task_id, *, completed=None, advance=0, detail=None):
        """Move a task on (`advance` items, or to `completed`) and/or set its detail text."""

    def stop(self, task_id):
        """Close a task."""


class _Task:
    """The handle `task` yields: report to it, never print."""

    __slots__ = ("_reporter", "_id")

    def __init__(self, reporter, task_id):
        self._reporter = reporter
        self._id = task_id

    def advance(self, steps=1, *, detail=None):
        """`steps` more items done; optionally a new detail text."""
        if self._reporter is not None:
            self._reporter.update(self._id, advance=steps, detail=detail)

    def update(self, *, completed=None, detail=None):
        """Set the items done and/or the detail text (e.g. an incumbent and its bound)."""
        if self._reporter is not None:
            self._reporter.update(self._id, completed=completed, detail=detail)


def current_reporter():
    """The reporter installed in this context, or None."""
    return _REPORTER.get()


@contextlib.contextmanager
def task(name, total=None):
    """Report a long step to the installed reporter (a no-op without one).

    Parameters
    ----------
    name : str
        What the step is, e.g. ``"chunk search"``.
    total : int, optional
        The number of items, when known.

    Yields
    ------
    handle
        With ``advance(steps=1, *, detail=None)`` and
        ``update(*, completed=None, detail=None)``.

    Examples
    --------
    >>> with task("nothing installed", total=2) as progress:
    ...     progress.advance(detail="first")
    >>> class Recorder(Reporter):
    ...     def __init__(self): self.events = []
    ...     def start(self, name, total=None): self.events.append(("start", name, total)); return name
    ...     def update(self, task_id, **change): self.events.append((task_id, change["detail"]))
    ...     def stop(self, task_id): self.events.append(("stop", task_id))
    >>> recorder = Recorder()
    >>> with reporting(recorder):
    ...     with task("probe", total=1) as progress:
    ...         progress.advance(detail="chunk 4")
    >>> recorder.events
    [('start', 'probe', 1), ('probe', 'chunk 4'), ('stop', 'probe')]
    """
    reporter = _REPORTER.get()
    if reporter is None:
        yield _Task(None, None)
        return
    task_id = reporter.start(name, total)
    try:
        yield _Task(reporter, task_id)
    finally:
        reporter.stop(task_id)


@contextlib.contextmanager
def reporting(reporter):
    """Install `reporter` for the code in the ``with`` block (None: report nothing)."""
    token = _REPORTER.set(reporter)
    try:
        yield reporter
    finally:
        _REPORTER.reset(token)


class RichReporter(Reporter):
    """Progress lines on stderr with rich; transient (they vanish when done).

    Use `cli_reporter` to get one only where it belongs (a terminal, not
    ``--quiet``).
    """

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                  console=console or Console(stderr=True), transient=True)
        self._open = 0

    def start(self, name, total=None):
        if self._open == 0:
            self._progress.start()
        self._open += 1
        return self._progress.add_task(name, total=total, detail="")

    def update(self, task_id, *, completed=None, advance=0, detail=None):
        fields = {} if detail is None else {"detail": detail}
        self._progress.update(task_id, completed=completed, advance=advance or None, **fields)

    def stop(self, task_id):
        self._progress.remove_task(task_id)
        self._open -= 1
        if self._open == 0:
            self._progress.stop()


def cli_reporter(quiet=False, stream=None):
    """A `RichReporter` when `stream` (default stderr) is a terminal and not `quiet`, else None."""
    stream = sys.stderr if stream is None else stream
    if quiet or not getattr(stream, "isatty", lambda: False)():
        return None
    return RichReporter()

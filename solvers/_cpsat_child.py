"""Run one CP-SAT solve in a forked child, so that a native abort cannot kill the caller.

OR-Tools 9.15 aborts the whole process (``Check failed: ...``, SIGABRT) on
some models, for instance with ``interleave_search`` and more than one worker
(`cachefit.solvers.cpsat` notes).  A C++ ``CHECK`` cannot be caught in
Python, so the solve runs in a child forked *after* the model is built: the
child inherits the model and its variables, solves, reads back what the
parent needs (status, objective, bound, one group index per node) and sends
it as one JSON line through a pipe.  The parent waits for that line until the
solve's limit plus a grace period, or an earlier hard limit (the caller's own
deadline), then reaps the child.  A child that dies, or
sends nothing, yields a result with status ``"CRASHED"`` and the signal or
exit code; one that overruns is killed and yields ``"UNKNOWN"``.

Cost: a fork copies page tables only (copy-on-write), about 1–5 ms for a
small model and tens of ms for a model of a million variables, against the
~0.3 s that a spawned interpreter needs to import OR-Tools and the time to
serialise the model.  Where ``os.fork`` does not exist (Windows) the solve
runs in-process, uncontained.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import os
import select
import signal
import time

__all__ = ["run_contained", "CONTAINED"]

logger = logging.getLogger(__name__)

#: Whether solves run in a child process on this platform.
CONTAINED = hasattr(os, "fork")

#: Seconds a child may run past its time limit before it is killed (CP-SAT
#: checks its limit often and a watchdog stops it there, but reading back and
#: sending the answer take a moment), unless the caller's `kill_after_s` is earlier.
GRACE_S = 1.0


def run_contained(solve, time_limit_s, *, contain=CONTAINED, kill_after_s=None):
    """Return ``solve()`` (a JSON-able dict), computed in a forked child when `contain`.

    Parameters
    ----------
    solve : callable
        Runs the solve and returns a dict of JSON-able values; it must not
        rely on changing the parent's state (a child's changes are lost).
    time_limit_s : float
        The solve's own time limit; the child is killed `GRACE_S` after it.
    contain : bool
        Fork (default where the platform can), or call `solve` in-process.
    kill_after_s : float, optional
        Kill the child this many seconds after the fork if it has not
        answered, even before its limit plus `GRACE_S` (the caller's deadline).

    Returns
    -------
    dict
        `solve`'s dict, plus ``"contained"`` (bool) and ``"overhead_s"``
        (wall time of fork, transfer and reaping beyond the child's own
        ``"wall_s"``).  On a crash: ``{"status": "CRASHED", "crash": <why>}``;
        on an overrun: ``{"status": "UNKNOWN", "crash": <why>}``.
    """
    if not contain:
        return {**solve(), "contained": False, "overhead_s": 0.0}
    _reap()
    started = time.perf_counter()
    read_end, write_end = os.pipe()
    error_read, error_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: solve, write one line, leave without running the parent's cleanup
        code = 0
        try:
            os.close(read_end)
            os.close(error_read)
            os.dup2(error_write, 2)  # the backend's own last words come back in the reason
            faulthandler.disable()  # a contained abort is reported by the parent, not dumped here
            payload = json.dumps(solve()).encode() + b"\n"
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
        except BaseException:  # noqa: BLE001 - anything the child raises is reported as a crash
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(error_write)
    try:
        wait_s = time_limit_s + GRACE_S if kill_after_s is None else min(time_limit_s + GRACE_S, kill_after_s)
        (data, errors), overrun = _read_all([read_end, error_read], started + max(wait_s, 0.0))
    finally:
        os.close(read_end)
        os.close(error_read)
    if overrun:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone (and reaped: the caller's SIGCHLD handling)
            pass
    wait_status = None
    if data.endswith(b"\n"):  # the answer is in: reap the child if its teardown ends soon, else later
        _EXITING.append(pid)
        _reap(wait_s=REAP_WAIT_S)
    else:
        try:
            _, wait_status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored or handled by the application)
            wait_status = None
    total = time.perf_counter() - started
    result = None
    if data.endswith(b"\n"):
        try:
            result = json.loads(data)
        except ValueError:
            result = None
    if result is None:
        if overrun:
            why = f"the CP-SAT child had not answered {wait_s:.3g} s after its start and was killed"
            return {"status": "UNKNOWN", "crash": why, "contained": True, "overhead_s": total}
        why = _death(wait_status)
        last_words = [line.strip() for line in errors.decode(errors="replace").splitlines() if line.strip()]
        if last_words:
            why += f" ({last_words[0][:200]})"
        logger.warning("cpsat: the CP-SAT backend crashed (%s); the caller is unaffected", why)
        return {"status": "CRASHED", "crash": why, "contained": True, "overhead_s": total}
    result["contained"] = True
    result["overhead_s"] = max(total - float(result.get("wall_s", 0.0)), 0.0)
    return result


#: Children that sent their answer and may still be exiting (reaped by `_reap`).
_EXITING = []

#: Seconds `run_contained` waits for a child that answered to finish exiting (a few ms unless its address
#: space is large); one that takes longer is reaped by the next call or at exit.
REAP_WAIT_S = 0.05


def _reap(block=False, wait_s=0.0):
    """Collect the exit status of children that already answered (no zombies left behind).

    `block`: wait for each; else poll for up to `wait_s` seconds in all.
    """
    until = time.perf_counter() + wait_s
    while True:
        for pid in list(_EXITING):
            try:
                done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                done = pid
            if done:
                _EXITING.remove(pid)
        if not _EXITING or time.perf_counter() >= until:
            return
        time.sleep(0.001)


atexit.register(_reap, True)


def _read_all(fds, deadline):
    """Everything written to each of `fds` until the first one holds a whole line or all are closed.

    Also returns whether `deadline` passed first.
    """
    chunks = {fd: [] for fd in fds}
    open_fds = list(fds)
    while open_fds and not (chunks[fds[0]] and chunks[fds[0]][-1].endswith(b"\n")):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        ready, _, _ = select.select(open_fds, [], [], min(left, 3600.0))
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                chunks[fd].append(chunk)
            else:
                open_fds.remove(fd)
    complete = chunks[fds[0]] and chunks[fds[0]][-1].endswith(b"\n")
    return [b"".join(chunks[fd]) for fd in fds], bool(open_fds) and not complete


def _death(wait_status):
    """How a child ended, in words (None: its exit status was collected by someone else)."""
    if wait_status is None:
        return "the CP-SAT process ended without a result (its exit status was collected elsewhere)"
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"the CP-SAT process died with {name}"
    return f"the CP-SAT process exited with code {os.WEXITSTATUS(wait_status)} without a result"

"""SIGTERM (SLURM's time limit, scancel, kill) raised as `Terminated` in the job, so that it unwinds: the logger
is finished as failed, the job marked failed in status.json, and the process exits with status 143 (Ctrl-C: 130).
`report_failure` writes the failure's one line first."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager, suppress

from stem.core.errors import StemError

log = logging.getLogger("run")


class Terminated(BaseException):
    """SIGTERM (SLURM's time limit or scancel, kill): raised in the main thread by `_ends_on_sigterm`'s handler,
    so that `finally` blocks run (run_job finishes its logger as failed) and main marks the job failed. Not an
    Exception: nothing that catches errors swallows it."""


class _SigtermState:
    deferred = 0        # depth of `_sigterm_deferred` blocks
    pending = False     # a SIGTERM arrived inside one: raised when the outermost ends
    raised = False      # Terminated raised already: later SIGTERMs leave the cleanup alone


def _on_sigterm(signum, frame) -> None:
    if _SigtermState.raised:
        return
    if _SigtermState.deferred:
        _SigtermState.pending = True
        return
    _SigtermState.raised = True
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


@contextmanager
def _sigterm_deferred():
    """A SIGTERM inside the block is raised as Terminated when it ends (W&B starting or finishing a run:
    an interrupted init or finish leaves a run without exit record)."""
    _SigtermState.deferred += 1
    try:
        yield
    finally:
        _SigtermState.deferred -= 1
        if not _SigtermState.deferred and _SigtermState.pending:
            _SigtermState.pending, _SigtermState.raised = False, True
            raise Terminated("terminated by signal SIGTERM")


def _redeliver_dropped(previous_hook):
    """A `sys.unraisablehook` that sends SIGTERM again (50 ms later) when a finaliser (`__del__`, a weakref
    callback, run during garbage collection) dropped the Terminated its handler raised: the handler then runs
    again outside the finaliser, in the job's own code. Other unraisable exceptions go to `previous_hook`."""

    def hook(unraisable):
        if isinstance(unraisable.exc_value, Terminated):
            _SigtermState.raised = False
            # from another thread, a moment later: sent from here the handler would run inside this hook
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        previous_hook(unraisable)

    return hook


REASON_CHARS = 300  # a failure's reason in status.json (and so in a table's row): one line, at most this long


def failure_reason(e: BaseException) -> str:
    """The one line a table shows for a job that ended with `e` (status.json's "reason", `mark_job`): the
    message of bad input (StemError: the problem and the fix), "terminated by signal SIGTERM", "interrupted
    (SIGINT)", else "<type>: <message>" (e.g. "OutOfMemoryError: CUDA out of memory. Tried to allocate ...");
    newlines joined, cut at `REASON_CHARS`."""
    if isinstance(e, Terminated):
        line = str(e)
    elif isinstance(e, KeyboardInterrupt):
        line = "interrupted (SIGINT)"
    elif isinstance(e, StemError):
        line = str(e)
    else:
        line = f"{type(e).__name__}: {e}"
    line = " ".join(line.split())
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


def report_failure(e: BaseException) -> None:
    """The failure's line, written and flushed before any cleanup (a torchrun rank is sent SIGTERM as soon as
    another rank ends: what comes later may never be written), once per exception, a SIGTERM meanwhile deferred:
    bad input (StemError), SIGTERM and Ctrl-C as one line `error: ...` on stderr and in the log (run.log); any
    other error as its type and message in the log, its traceback following on stderr (Hydra). SystemExit (a
    submitit requeue) is not a failure to report."""
    if isinstance(e, SystemExit) or getattr(e, "_stem_reported", False):
        return
    with _sigterm_deferred():
        with suppress(AttributeError):  # an exception class with __slots__: reported again at most
            e._stem_reported = True
        if isinstance(e, Terminated):
            line = f"{e}: the job is marked failed"
        elif isinstance(e, KeyboardInterrupt):
            line = "interrupted (SIGINT): the job is marked failed"
        elif isinstance(e, StemError):
            line = str(e)
        else:
            log.error("the job failed: %s: %s", type(e).__name__, str(e).replace("\n", " "))
            return
        log.error("%s", line)
        print(f"error: {line}", file=sys.stderr, flush=True)


def _ends_on_sigterm(task):
    """`task` (Hydra's task function, main) with SIGTERM raised as `Terminated` in it; the process then exits
    with status 143 (128 + SIGTERM), the previous handler restored. Ctrl-C (KeyboardInterrupt) unwinds the same
    way and exits with status 130 (128 + SIGINT); both end with one line `error: ...` (`report_failure`).

    SLURM sends SIGTERM at the time limit and on scancel, then SIGKILL after KillWait (30 s by default):
    unwinding and finishing an offline W&B run take a second or two. Under submitit (hydra/launcher=slurm or
    local_submitit) this replaces submitit's own SIGTERM handler, which ignored it; submitit's preemption and
    timeout signal (SIGUSR2: requeue then SystemExit, or UncompletedJobError) is left as it is and unwinds the job
    the same way (the SIGTERM that SLURM sends once the job is requeued may raise Terminated in its stead)."""

    @functools.wraps(task)
    def wrapped(cfg):
        if threading.current_thread() is not threading.main_thread():  # handlers are set from the main thread only
            return task(cfg)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_dropped(sys.unraisablehook)
        _SigtermState.pending = _SigtermState.raised = False
        try:
            return task(cfg)
        except Terminated as e:
            report_failure(e)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt as e:  # Ctrl-C: the same unwinding, one line instead of Python's traceback
            report_failure(e)
            sys.exit(128 + signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, previous)
            sys.unraisablehook = previous_hook

    return wrapped


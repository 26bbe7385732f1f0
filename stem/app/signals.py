"""SIGTERM (SLURM's time limit, scancel, kill) raised as `Terminated` in the job, so that it unwinds: the logger
is finished as failed, the job marked failed in status.json, and the process exits with status 143."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

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


def _ends_on_sigterm(task):
    """`task` (Hydra's task function, main) with SIGTERM raised as `Terminated` in it; the process then exits
    with status 143 (128 + SIGTERM), the previous handler restored.

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
            log.error("%s: the job is marked failed", e)
            print(f"error: {e}: the job is marked failed", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, previous)
            sys.unraisablehook = previous_hook

    return wrapped


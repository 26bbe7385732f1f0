"""SIGTERM (SLURM's time limit, scancel, kill): the job ends with its W&B run finished as failed (an exit
record with a non-zero exit code), status.json "failed" and a non-zero exit status (143 = 128 + SIGTERM)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import FAST, ROOT, read_wandb_records

# The tiny model on 2 frames of 64x64, inversion only, with W&B on: 1000 DDIM steps keep it inverting for
# longer than the test waits (the run is killed within a second of entering the inversion)
LONG = [*FAST, "model=tiny", "data=synthetic", "data.n_frames=2", "data.width=64", "data.height=64",
        "inversion.num_steps=1000", "reconstruct=false", "metrics.reconstruction=false", "logger=wandb",
        "use_cache=false"]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run.py ended (rc {proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def signal_during_the_inversion(tmp_path, sig: signal.Signals) -> tuple[int, str, Path]:
    """`python run.py` (a real process) sent `sig` once its inversion loop runs: (exit status, stderr, run folder).
    SIGINT is left at its default in the child, as a terminal sends it (a test run in a background job would
    otherwise start the child with SIGINT ignored)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *LONG, f"hydra.run.dir={run_dir}",
                             f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = run_dir / "run.log"   # Hydra's job log: "inverting ..." once W&B is up, the model built, the frames encoded
    wait_for(lambda: log.is_file() and "inverting 2 frames" in log.read_text(), 60, "the inversion to start", proc)
    time.sleep(0.5)   # into the inversion loop
    assert proc.poll() is None, f"the job ended before {sig.name}: give it more steps"
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"run.py still running 30 s after {sig.name}") from None
    return proc.returncode, stderr, run_dir


def test_sigterm_during_the_inversion_finishes_the_wandb_run_as_failed_and_marks_the_job_failed(tmp_path):
    """Catches: no SIGTERM handler (Python's default kills the process at once: no W&B exit record, status.json
    left "running"), a handler that exits without unwinding (os._exit: run_job's `finally` never finishes the
    logger), one that raises an Exception the job swallows or reports as success, and an exit status of 0."""
    returncode, stderr, run_dir = signal_during_the_inversion(tmp_path, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, (returncode, stderr[-3000:])
    assert not (run_dir / "metrics.json").exists()
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["reason"]) == ("failed", "terminated by signal SIGTERM")  # the row says why
    exits = [r.exit.exit_code for r in read_wandb_records(run_dir, timeout=10) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


class FakeWandb:
    """Stands for the `wandb` module in WandbLogger: records init and finish; SIGTERM raised inside `during`."""

    def __init__(self, during: tuple = ()):
        self.during, self.events = during, []

    def init(self, **_):
        self._maybe_signal("init")
        self.events.append("init returned")
        return self

    def finish(self, exit_code):
        self._maybe_signal("finish")
        self.events.append(("finish", exit_code))

    def _maybe_signal(self, where):
        self.events.append(where)
        if where in self.during:
            signal.raise_signal(signal.SIGTERM)   # the handler runs here, in the main thread


def terminated(task) -> int:
    """Run `task` as run.py's main runs (under `_ends_on_sigterm`); its exit status; the handler restored."""
    from stem.app.signals import _ends_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        _ends_on_sigterm(task)(None)
    except SystemExit as e:
        return e.code
    finally:
        assert signal.getsignal(signal.SIGTERM) is previous
    return 0


def test_sigterm_while_wandb_starts_a_run_is_raised_once_it_exists_and_the_run_is_finished_failed(monkeypatch):
    """Catches: Terminated raised inside wandb.init (no deferral: a half-started run, never finished, since
    run_job's try/finally starts after the logger exists) and a deferred SIGTERM that leaves the run unfinished."""
    from stem.app.loggers import WandbLogger

    fake = FakeWandb(during=("init",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert terminated(lambda cfg: WandbLogger()) == 143
    assert fake.events == ["init", "init returned", "finish", ("finish", 1)]


def test_sigterm_while_wandb_finishes_a_run_lets_it_finish_then_ends_the_job(monkeypatch):
    """Catches: Terminated raised inside run.finish (no exit record written), and a SIGTERM during finish
    ignored altogether (the job would exit 0 although it was terminated)."""
    from stem.app.loggers import WandbLogger

    fake = FakeWandb(during=("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert terminated(lambda cfg: WandbLogger().finish(failed=False)) == 143
    assert fake.events == ["init", "init returned", "finish", ("finish", 0)]


def test_a_second_sigterm_during_the_cleanup_of_the_first_is_ignored(monkeypatch):
    """Catches: each SIGTERM raising anew (no `raised` check in the handler), so that one SLURM or submitit's
    controller sends again while the job unwinds interrupts run_job's `finally` before the failed run's
    finish, leaving it without exit record."""
    from stem.app.loggers import WandbLogger

    fake = FakeWandb(during=("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def job(cfg):
        logger = WandbLogger()
        try:
            signal.raise_signal(signal.SIGTERM)   # the time limit, mid-job
        finally:
            signal.raise_signal(signal.SIGTERM)   # again, while unwinding (outside W&B's init/finish)
            logger.finish(failed=True)           # and once more inside finish (FakeWandb)

    assert terminated(job) == 143
    assert fake.events == ["init", "init returned", "finish", ("finish", 1)]


def test_sigterm_ends_a_submitit_job_whose_own_handler_ignores_it():
    """submitit's job process (hydra/launcher=slurm or local_submitit) sets SIGTERM to its `bypass`, which only
    logs it: such jobs ran on until SIGKILL. Catches: main's handler set only where none is (leaving submitit's
    in place) and submitit's handler not restored after the job."""
    from submitit.core.job_environment import SignalHandler

    bypass = SignalHandler(None, None, None).bypass   # what submitit's process_job installs before the job
    previous = signal.signal(signal.SIGTERM, bypass)
    try:
        assert terminated(lambda cfg: signal.raise_signal(signal.SIGTERM)) == 143   # `terminated` checks the restore
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_handled_inside_a_finaliser_still_ends_the_job():
    """The handler can run while Python executes a finaliser (`__del__`, a weakref callback, during garbage
    collection), where a raised exception is only reported and dropped: seen on a loaded machine, the job then
    went on inverting after its SIGTERM (`measure` calls gc.collect()). Catches: no re-delivery of a Terminated
    that a finaliser swallowed (the job runs to its end and returns normally)."""
    class RaisesInFinaliser:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)   # the signal arrives while this finaliser runs
            sum(range(1000))                       # Python code in the finaliser: the handler runs here

    ran_on = []

    def job(cfg):
        obj = RaisesInFinaliser()
        del obj                                    # Terminated raised inside __del__ is dropped by Python
        for i in range(300):                       # the job's own code, 3 s: Terminated must come here
            ran_on.append(i)
            time.sleep(0.01)
        return "finished"

    assert terminated(job) == 143
    assert len(ran_on) < 300, "the job ran to its end after the SIGTERM"


def test_sigint_during_the_inversion_is_one_error_line_exit_130_and_the_job_marked_failed(tmp_path):
    """Ctrl-C (SIGINT, a real signal to a real `python run.py`) during the inversion: one line `error: interrupted
    (SIGINT): the job is marked failed` on stderr, no traceback, exit status 130 (128 + SIGINT), status.json
    "failed" and the W&B run finished as failed (issue 23, item 7).

    Catches: KeyboardInterrupt left to Python (its traceback on stderr, status -2/130 with no error line), the
    interrupt caught and reported as success (exit 0), and a handler that skips run_job's unwinding (no W&B exit
    record, status.json left "running")."""
    returncode, stderr, run_dir = signal_during_the_inversion(tmp_path, signal.SIGINT)
    assert returncode == 130, (returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: interrupted (SIGINT): the job is marked failed"], stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    exits = [r.exit.exit_code for r in read_wandb_records(run_dir, timeout=10) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_failure_reason_is_one_line_the_table_can_show():
    """status.json's "reason" (a failed row's Not finished cell): bad input as its own message, other errors with
    their type, SIGTERM and Ctrl-C named, newlines joined, cut at 300 characters. Mutations caught: the
    traceback's first line or a multi-line message (a broken markdown row), the type dropped from an
    OutOfMemoryError (the reader cannot tell memory from a bug), an unbounded reason."""
    from stem.app.signals import Terminated, failure_reason
    from stem.core.errors import ConfigError

    assert failure_reason(ConfigError("editing.pnp_attn_t=2.0 must be in [0, 1]")) == \
        "editing.pnp_attn_t=2.0 must be in [0, 1]"
    assert failure_reason(RuntimeError("CUDA out of memory.\n  Tried to allocate 2.00 GiB")) == \
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failure_reason(Terminated("terminated by signal SIGTERM")) == "terminated by signal SIGTERM"
    assert failure_reason(KeyboardInterrupt()) == "interrupted (SIGINT)"
    long = failure_reason(ValueError("x" * 1000))
    assert len(long) == 300 and long.startswith("ValueError: xxx") and long.endswith("...")

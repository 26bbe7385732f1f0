"""run.py's one-line error contract and its failure path under real faults (issue 23, items 5, 7, 8 and 9): bad
seeds, a task_name that leaves paths.log_dir, an output folder that is a file, read-only or full (real mounts in a
user namespace), a disk that fills before status.json is marked failed, and torchrun ranks killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, assert_one_error_line, error_lines, run_cli

import stem.app.launch
from stem.core.errors import ConfigError
from stem.reporting.tables import collect_runs
from stem.runs.precheck import check_run_settings

# the tiny model, 4 frames of 64x64, inversion only: a few seconds
QUICK = [*FAST, "device=cpu", "data.width=64", "data.height=64", "reconstruct=false", "metrics.reconstruction=false"]


# --- seeds ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["nan", "18446744073709551616", "-1"])
def test_a_seed_torch_refuses_or_aliases_is_one_error_line(tmp_path, seed):
    """seed=nan and seed=2**64 made torch.manual_seed raise a ValueError (a traceback, exit 1) before any check;
    seed=-1 ran, torch taking it as 2**64 - 1 (the same weights and cache entry as that seed). Catches: the
    seed check missing or placed after torch.manual_seed, and negative seeds accepted."""
    proc = run_cli(*QUICK, f"seed={seed}", f"paths.log_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'c'}")
    assert_one_error_line(proc, f"seed={seed} must be an integer in [0, 18446744073709551615]", "seed=0")
    assert not (tmp_path / "c").exists()


def test_seed_range_is_torchs_without_its_negative_aliases():
    """Catches: a bound off by one (2**64 - 1 is torch's largest seed and must pass) and bools or floats taken
    as integers (`seed=true`, `seed=1.0`)."""
    for good in (0, 1, 2**64 - 1):
        check_run_settings(seed=good)
    for bad in (-1, -(2**63), 2**64, 1.5, 1.0, float("nan"), float("inf"), True, None, "3"):
        with pytest.raises(ConfigError, match=re.escape("must be an integer in [0, 18446744073709551615]")):
            check_run_settings(seed=bad)


# --- task_name and the output folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "a/b"])
def test_a_task_name_that_is_not_one_folder_name_is_refused_before_any_folder_exists(tmp_path, name):
    """task_name=../../x put the run folder two levels above paths.log_dir (the job ran and wrote there).
    Catches: no check, a check after Hydra created the folder (it would exist), and one that looks for '..'
    only (a/b nests the run folder one level deeper than every other task's)."""
    log_dir = tmp_path / "a" / "b" / "logs"
    proc = run_cli(*QUICK, f"task_name={name}", f"paths.log_dir={log_dir}", f"paths.cache_dir={tmp_path / 'c'}")
    assert_one_error_line(proc, f"task_name='{name}'", "task_name=my_run", "paths.log_dir")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [], "a folder was created"


def test_a_log_dir_that_is_a_file_is_one_error_line_naming_the_folder_and_the_fix(tmp_path):
    """paths.log_dir=<a regular file>: Hydra's NotADirectoryError traceback (exit 1) when it created the run
    folder. Catches: no check before Hydra's mkdir, and a message without the fix."""
    log_file = tmp_path / "outputs"
    log_file.write_text("not a folder\n")
    proc = run_cli(*QUICK, f"paths.log_dir={log_file}", f"paths.cache_dir={tmp_path / 'c'}")
    assert_one_error_line(proc, f"cannot write the output folder {log_file}/", "Not a directory", "paths.log_dir=")
    assert log_file.read_text() == "not a folder\n"


def test_a_log_dir_that_is_a_symlink_loop_is_one_error_line(tmp_path):
    """paths.log_dir=<a symlink to itself>: Hydra's ELOOP traceback. Catches: a probe that looks for the nearest
    existing folder with Path.exists() (False for a loop: the probe then passes in the loop's parent folder)."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    proc = run_cli(*QUICK, f"paths.log_dir={loop}", f"paths.cache_dir={tmp_path / 'c'}")
    assert_one_error_line(proc, f"cannot write the output folder {loop}/", f"symbolic links: {loop})")


def test_a_sweep_folder_under_a_file_is_one_error_line(tmp_path):
    """The same for a sweep (-m): Hydra's launcher creates the sweep folder before any job. Catches: the
    check made for single runs only (on_run_start, not on_multirun_start)."""
    log_file = tmp_path / "outputs"
    log_file.write_text("")
    proc = run_cli("-m", *QUICK, "seed=0,1", f"paths.log_dir={log_file}", f"paths.cache_dir={tmp_path / 'c'}")
    assert_one_error_line(proc, f"cannot write the output folder {log_file}/", "hydra.sweep.dir=")


@pytest.fixture(scope="module")
def namespace_mounts(tmp_path_factory) -> None:
    """Skip unless a tmpfs can be mounted in a new user and mount namespace (`unshare -rm`): root is not stopped
    by file modes, so read-only and full file systems are made as real mounts."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command: cannot mount a read-only or full file system for this test")
    target = tmp_path_factory.mktemp("probe")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {target}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")


def in_namespace(script: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """`script` (sh) in a new user and mount namespace: its mounts vanish with it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_MODE", None)
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_py(*overrides: str) -> str:
    return shlex.join([sys.executable, str(ROOT / "run.py"), *overrides])


@pytest.mark.parametrize("fault, mount, fill, message", [
    ("read-only", "size=64k,ro", False, "Read-only file system"),
    ("full", "size=64k", True, "No space left on device"),
])
def test_an_unwritable_log_dir_is_one_error_line(tmp_path, namespace_mounts, fault, mount, fill, message):
    """paths.log_dir on a read-only file system (EROFS from Hydra's mkdir) or a full one (Hydra creates the
    folders, which take no space on a tmpfs, then fails writing .hydra/config.yaml with ENOSPC): Hydra's
    traceback, exit 1. Catches: a check that only tries to create the folder (passes on the full disk) and
    no check at all."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    filler = f"dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null; " if fill else ""
    proc = in_namespace(f"mount -t tmpfs -o {mount} tmpfs {mnt} || exit 99; {filler}"
                        + run_py(*QUICK, f"paths.log_dir={mnt}", f"paths.cache_dir={tmp_path / 'c'}"))
    assert proc.returncode != 99, proc.stderr
    assert_one_error_line(proc, f"cannot write the output folder {mnt}/", f"{message}: {mnt}", "paths.log_dir=")


def test_a_disk_that_fills_during_the_job_still_ends_with_the_error_line_and_exit_status(tmp_path, namespace_mounts):
    """The run folder on a 1 MiB tmpfs, filled once the inversion runs, then SIGTERM: the failure path cannot write
    status.json (ENOSPC). Before, that OSError replaced the failure: a traceback, exit 1, the error line never
    printed. Catches: mark_job's write unguarded, and the status written before the error line. The status
    stays "running" (nothing can be written), and the table reports the job failed: its process is gone."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    job = run_py(*FAST, "device=cpu", "data.n_frames=2", "data.width=64", "data.height=64", "inversion.num_steps=1000",
                 "reconstruct=false", "metrics.reconstruction=false", "use_cache=false", f"hydra.run.dir={mnt}/0")
    script = f"""
mount -t tmpfs -o size=1m tmpfs {mnt} || exit 99
{job} >{out}/stdout 2>{out}/stderr &
pid=$!
i=0
until grep -q "inverting 2 frames" {mnt}/0/run.log 2>/dev/null; do
  i=$((i+1)); if [ $i -gt 1200 ] || ! kill -0 $pid 2>/dev/null; then kill -9 $pid; exit 98; fi; sleep 0.05
done
sleep 0.5
dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null
df -k {mnt} | tail -1 >{out}/df
kill -TERM $pid
wait $pid
echo $? >{out}/rc
cp -r {mnt}/0 {out}/job
"""
    proc = in_namespace(script)
    stderr = (out / "stderr").read_text() if (out / "stderr").exists() else ""
    assert proc.returncode == 0, (proc.returncode, proc.stderr, stderr[-3000:])
    assert (out / "df").read_text().split()[3] == "0", "the file system is not full"
    assert int((out / "rc").read_text()) == 128 + signal.SIGTERM, stderr[-3000:]
    assert "error: terminated by signal SIGTERM: the job is marked failed" in error_lines(stderr), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "cannot mark the job failed in" in stderr + (out / "stdout").read_text()
    status = json.loads((out / "job" / "status.json").read_text())
    assert status["state"] == "running"  # could not be rewritten: the table tells by the process
    assert [(r["status"], "is gone" in r["error"]) for r in collect_runs(out)] == [("failed", True)]


# --- torchrun: ranks killed -------------------------------------------------------------------------------------

TORCHRUN_JOB = [*FAST, "device=cpu", "inversion=stem", "inversion.num_bases=8", "excess_bases=clamp",
                "inversion.num_steps=1000", "data.n_frames=5", "data.width=64", "data.height=64", "reconstruct=false",
                "metrics.reconstruction=false", "use_cache=false"]


def rank_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of its agent process `agent`)."""
    children = Path(f"/proc/{agent}/task/{agent}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    ranks = {}
    for pid in pids:
        try:
            environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in environ:
            ranks[int(environ["RANK"])] = pid
    return ranks


def torchrun_killing(tmp_path: Path, rank: int) -> tuple[subprocess.CompletedProcess, Path, int]:
    """A 2-rank torchrun job, `rank` killed with SIGKILL once both ranks invert; (torchrun's result, the run folder,
    the killed pid). Temporary files under tmp_path/tmp."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("no /proc: cannot find torchrun's worker processes")
    (tmp_path / "tmp").mkdir()
    run_dir = tmp_path / "runs" / "0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path / "tmp")}
    env.pop("WANDB_MODE", None)
    # --monitor-interval 5: torchrun looks at its workers every 5 s (its default, 0.1 s, let it SIGTERM the survivor
    # before the survivor's own collective failed, now and then: the cause these tests check was then never logged)
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "--monitor-interval=5", str(ROOT / "run.py"), *TORCHRUN_JOB, f"hydra.run.dir={run_dir}",
                              f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        log = run_dir / "run.log"
        while not (log.is_file() and "metrics:" in log.read_text()):  # run.py's "video ...; metrics: " line
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(3)  # both ranks in the inversion's collectives
        pids = rank_pids(agent.pid)
        assert set(pids) == {0, 1} and agent.poll() is None, pids
        os.kill(pids[rank], signal.SIGKILL)
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    return subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr), run_dir, pids[rank]


def test_torchrun_rank_1_killed_leaves_the_cause_in_run_log_and_a_reclaimable_folder(tmp_path):
    """Rank 1 killed by SIGKILL: rank 0's collective fails (gloo: connection reset or closed), then torchrun sends
    it SIGTERM. Before, run.log had no line of that failure (only non-StemErrors' tracebacks, printed by Hydra on
    stderr after the cleanup), and the dead rank's temporary Hydra folder (`stem-rank1-*`) stayed in TMPDIR forever.
    Catches: the failure logged after the logger's finish or the process group's close (or not at all); a
    temporary folder without its pid (a later rank cannot tell it from a live one) and no cleanup of dead ones."""
    proc, run_dir, killed = torchrun_killing(tmp_path, rank=1)
    assert proc.returncode != 0
    log = (run_dir / "run.log").read_text()
    assert "[run][ERROR] - the job failed: " in log and "Error: " in log.split("the job failed: ", 1)[1], log[-2000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    left = [p.name for p in (tmp_path / "tmp").glob(".stem-rank*")]
    assert [name.startswith(f".stem-rank1.{killed}@{socket.gethostname()}") for name in left] == [True], left
    # a later rank > 0 on this host removes it
    code = "import stem.app.launch; stem.app.launch.rank_overrides([], {'RANK': '1', 'WORLD_SIZE': '2'})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    later = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert later.returncode == 0, later.stderr
    assert not list((tmp_path / "tmp").glob(".stem-rank*")), "the dead rank's folder is still there"


def test_torchrun_rank_0_killed_is_a_failed_row_and_the_survivor_prints_the_cause(tmp_path):
    """Rank 0 (the run folder's writer) killed by SIGKILL: status.json stays "running" with its pid and run.log ends
    where it was killed (nothing can add to them); the table reports the job failed because that process is gone.
    Rank 1's collective fails; its cause comes first in torchrun's output as one log line (rank 1 logs to the
    console). Catches: a table that trusts "running" from a dead process, and the survivor's cause reported only
    after its cleanup (before: only Hydra's traceback, which torchrun's SIGTERM can cut)."""
    proc, run_dir, killed = torchrun_killing(tmp_path, rank=0)
    assert proc.returncode != 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running" and status["pid"] == killed
    [row] = collect_runs(run_dir.parent)
    assert row["status"] == "failed" and f"its process {killed} is gone" in row["error"], row
    output = proc.stdout + proc.stderr  # rank 1 logs warnings and errors as bare messages (hydra/job_logging=stdout)
    assert re.search(r"^the job failed: \w*Error: ", output, re.MULTILINE), output[-3000:]


def test_a_killed_ranks_temporary_folder_is_removed_by_the_next_rank_and_a_live_ones_kept(tmp_path, monkeypatch):
    """rank_overrides in a process killed with SIGKILL (its atexit never runs) leaves `.stem-rank1.<pid>@<host>.*.tmp`;
    the next call on this host removes it and keeps the folder of a process still alive. Catches: cleanup of
    every .stem-rank* folder (a live rank of another job loses its Hydra output) and no cleanup at all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    code = ("import os, sys, time, stem.app.launch; "
            "stem.app.launch.rank_overrides([], {'RANK': '1', 'WORLD_SIZE': '2'}); "
            "print('ready', flush=True); time.sleep(120)")
    dying = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    living = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert dying.stdout.readline() == "ready\n" and living.stdout.readline() == "ready\n"
        dying.kill()
        dying.wait()
        host = socket.gethostname()
        assert len(list(tmp_path.glob(f".stem-rank1.{dying.pid}@{host}*.tmp"))) == 1
        other_host = tmp_path / ".stem-rank1.12345678@another-host.abcd1234.tmp"  # no such pid here; another host's
        other_host.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process's temporary folder
        own = Path(next(a for a in stem.app.launch.rank_overrides([], {"RANK": "1", "WORLD_SIZE": "2"})
                        if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        names = sorted(p.name for p in tmp_path.glob(".stem-rank*"))
        assert not list(tmp_path.glob(f".stem-rank1.{dying.pid}@*")), names
        assert len(list(tmp_path.glob(f".stem-rank1.{living.pid}@{host}*.tmp"))) == 1, names
        assert other_host.is_dir() and own.is_dir()
        shutil.rmtree(own)
    finally:
        for p in (dying, living):
            if p.poll() is None:
                p.kill()
                p.wait()

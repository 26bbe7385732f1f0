"""Cache faults: an unwritable cache folder (issue 13 point 4, issue 23 item 8), a full disk (issue 23 item 1, a
real full file system: tests/runs/test_cache_disk.py), concurrent writers of one key (issue 13 point 5, issue 23 item 3)
and writers killed with SIGKILL (issue 23 item 5)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import stem.runs.cache
from stem.core.errors import ConfigError
from stem.runs.cache import TensorCache

ROOT = Path(__file__).resolve().parents[2]


def _unwritable(tmp_path: Path, kind: str) -> Path:
    """A cache folder that cannot be written: read-only (chmod 0o500), under a regular file (unwritable even
    for root, who ignores permissions), a symbolic link loop (`ln -s loop loop`) or a dangling link."""
    if kind in ("symlink loop", "dangling symlink"):
        link = tmp_path / "loop"
        link.symlink_to("loop" if kind == "symlink loop" else tmp_path / "missing" / "cache")
        return link
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions, so a chmod 0o500 folder is writable")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "file" / "cache"


# Issue 23 item 8 added the links. Bug caught: the check walked up to the nearest parent that `exists()` (False for
# a link that leads nowhere), found the link's folder writable and passed; the save then failed with ELOOP/ENOENT
# after the whole inversion (before the fix: no ConfigError raised; run_job built the model).
UNWRITABLE = pytest.mark.parametrize("kind", ["read-only", "under a file", "symlink loop", "dangling symlink"])


# --- point 4: an unwritable cache folder -------------------------------------------------------------------------


@UNWRITABLE
def test_check_writable_refuses_an_unwritable_folder_in_one_line_naming_it_and_the_fix(tmp_path, kind):
    """Catches: no check (or one that only tests that the folder exists), a message without the folder or fix."""
    folder = _unwritable(tmp_path, kind)
    with pytest.raises(ConfigError) as err:
        TensorCache(folder / "inversion").check_writable()
    msg = str(err.value)
    assert "\n" not in msg and str(folder / "inversion") in msg
    assert "use_cache=false" in msg and "paths.cache_dir" in msg
    # a writable place: the cache is returned, and neither the probe nor the (new) folder is left behind, so a
    # run refused after the check writes no cache folder (tests/app/test_run.py: bad input writes no cache)
    before = sorted(tmp_path.iterdir())
    assert TensorCache(tmp_path / "ok" / "inversion").check_writable().root == tmp_path / "ok" / "inversion"
    assert sorted(tmp_path.iterdir()) == before


@UNWRITABLE
def test_run_job_refuses_an_unwritable_cache_before_building_the_model(tmp_path, monkeypatch, kind):
    """run.py's job with `paths.cache_dir` unwritable fails with the one-line ConfigError before the model is
    built (the builder here fails loudly if called). Catches: the check after the model or after the inversion
    (the reported traceback once the whole inversion is done), or no check."""
    from conftest import compose_config

    import stem.diffusion.models
    from stem.app.job import run_job

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the cache folder was checked")

    cfg = compose_config(tmp_path, "model=tiny")
    cfg.paths.cache_dir = str(_unwritable(tmp_path, kind))
    monkeypatch.setattr(stem.diffusion.models, "build_tiny", no_model)
    with pytest.raises(ConfigError, match="use_cache=false"):
        run_job(cfg, tmp_path / "run")


# The exceptions a full disk really raises: safetensors' save_file a SafetensorError (message as the library gives
# it on a full tmpfs, tests/runs/test_cache_disk.py provokes it for real), writing meta.json an OSError(ENOSPC).
FULL_DISK = {"tensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
             "meta.json": OSError(28, "No space left on device")}


@pytest.mark.parametrize("failing", list(FULL_DISK))
def test_a_failed_save_after_the_inversion_warns_with_the_entry_and_keeps_the_result(tiny_model, tmp_path,
                                                                                     monkeypatch, caplog, failing):
    """A disk that fills up while the entry is written: the finished inversion is returned (the run goes on)
    with a warning naming the entry, and no entry or temporary folder is left. Catches: the error propagating
    after the whole inversion (the run is lost; issue 23 item 1: only OSError was caught, so safetensors'
    SafetensorError killed the run: seen failing with that traceback), a half-written entry."""
    from stem.data.synthetic import camera_pan
    from stem.inversion.methods import DDIMInversion
    from stem.runs.reconstruction import invert_video

    real_save_file = stem.runs.cache.save_file

    def no_space(*args, **kwargs):
        raise FULL_DISK[failing]

    def full_disk(tensors, path):
        if failing == "tensors":
            no_space()
        real_save_file(tensors, path)
        monkeypatch.setattr(Path, "write_text", no_space)  # the disk is full once the tensors are written

    video = camera_pan(n_frames=2, width=64, height=64)
    method = DDIMInversion("1frame", num_steps=1)
    cache = TensorCache(tmp_path / "cache")
    monkeypatch.setattr(stem.runs.cache, "save_file", full_disk)
    with caplog.at_level("WARNING", logger="stem.runs.reconstruction"):
        inverted = invert_video(tiny_model, video, method, cache, progress=False)
    assert not inverted.cache_hit and inverted.entry is None
    assert inverted.trajectory.latents.shape == (2, 2, 4, 8, 8) and inverted.trajectory.latents.isfinite().all()
    assert str(cache.path(inverted.key)) in caplog.text and "No space left on device" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []


# --- point 5: concurrent writers of one key ----------------------------------------------------------------------

# A writer process: for each (key, scenario) it saves `key` holding its own name's values. Its first rename that the
# scenario names is gated: both writers reach it before either performs it, "first" performs it, then "second"
# performs its own, and only then does "first" go on. That forces the interleaving that breaks a check-then-rename
# install. fresh: the rename of the finished temporary folder onto the entry; damaged: moving the old entry aside.
WRITER = r"""
import os, sys, time
from pathlib import Path
import torch
from stem.runs.cache import TensorCache

root, me, races = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
other, flags = ("second" if me == "first" else "first"), root.parent
real = {"rename": os.rename, "replace": os.replace}

def wait(name):
    deadline = time.monotonic() + 30
    while not (flags / name).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me}: waited 30 s for {name}")
        time.sleep(0.005)

def race(key, scenario):
    entry, armed = root / key, [True]

    def gated(name):
        def call(src, dst, *args, **kwargs):
            src, dst = Path(src), Path(dst)
            hit = (dst == entry and src.name.endswith(".tmp")) if scenario == "fresh" else src == entry
            if not (armed[0] and hit):
                return real[name](src, dst, *args, **kwargs)
            armed[0] = False
            (flags / f"ready-{key}-{me}").touch()
            wait(f"ready-{key}-{other}")
            if me == "second":
                wait(f"done-{key}-first")
            try:
                return real[name](src, dst, *args, **kwargs)
            finally:
                (flags / f"done-{key}-{me}").touch()
                if me == "first":
                    wait(f"done-{key}-second")
        return call

    os.rename, os.replace = gated("rename"), gated("replace")
    cache = TensorCache(root)
    assert cache.load(key) is None  # both writers missed: no entry, or a damaged one
    cache.save(key, {"x": torch.full((4,), float(me == "first"))}, {"writer": me})

for key, scenario in zip(races[::2], races[1::2]):
    race(key, scenario)
"""


def test_two_processes_writing_one_key_both_succeed_and_leave_only_the_entry(tmp_path):
    """Two processes save the same key at once, in a forced interleaving (WRITER), in two races:
    fresh (key "a"): no entry; the second's final rename finds the first's complete entry, which is kept (used).
    damaged (key "b"): a truncated entry; both set out to replace it, the first moves it aside before the second.
    Both exit 0, each entry loads and verifies, and the cache root holds only the entries. Catches (both seen
    failing before the fix): a rename onto an existing entry that raises (the second writer crashed after its whole
    inversion: fresh), a writer crashing when the entry it wanted to move aside is gone, leaving an empty `.old`
    folder (damaged), orphaned `.old` / `.tmp` folders, an entry replaced instead of used (fresh)."""
    import subprocess
    import sys

    root = tmp_path / "cache"
    damaged = TensorCache(root).save("b", {"x": torch.full((4,), 7.0)}, {"writer": "old"})
    data = (damaged / stem.runs.cache.TENSORS).read_bytes()
    (damaged / stem.runs.cache.TENSORS).write_bytes(data[:len(data) // 2])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {me: subprocess.Popen([sys.executable, "-c", WRITER, str(root), me, "a", "fresh", "b", "damaged"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for me in ("first", "second")}
    outputs = {me: p.communicate(timeout=120)[0] for me, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outputs
    assert all((tmp_path / f"done-{key}-{me}").exists() for key in "ab" for me in procs)  # both races happened
    for key in "ab":
        tensors, meta = TensorCache(root).load(key)
        assert meta["writer"] in procs
        assert torch.equal(tensors["x"], torch.full((4,), float(meta["writer"] == "first")))
    assert TensorCache(root).load("a")[1]["writer"] == "first"  # the entry that appeared meanwhile is used
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]  # hidden .tmp / .old names included


# --- issue 23 item 3: the first complete entry wins ----------------------------------------------------------------

# A writer: says it is ready (file `<go>.ready-<number>`), waits for the file `go` (all writers are released
# together), then saves key "k" holding its own number.
RACER = r"""
import sys, time
from pathlib import Path
import torch
from stem.runs.cache import TensorCache

root, me, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
Path(f"{go}.ready-{me}").touch()
while not go.exists():
    time.sleep(0.002)
TensorCache(root).save("k", {"x": torch.full((256, 64), float(me))}, {"writer": me})
"""

# A reader: loads key "k" in a loop until the file `stop` exists; prints what it saw, in order, with repeats
# collapsed ("miss" or the writer's number).
READER = r"""
import json, sys
from pathlib import Path
from stem.runs.cache import TensorCache

cache, stop = TensorCache(Path(sys.argv[1])), Path(sys.argv[2])
seen, ready = [], Path(sys.argv[2] + ".ready")
while True:
    done = stop.exists()
    hit = cache.load("k")
    state = "miss" if hit is None else hit[1]["writer"]
    if not seen or seen[-1] != state:
        seen.append(state)
    ready.touch()
    if done:
        break
print(json.dumps(seen))
"""


def _python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return out


def _wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"waited {timeout} s for {path}"
        time.sleep(0.01)


# Bug caught: an install that moves an existing complete entry aside (last writer wins: an entry that an earlier
# run's metrics point to replaced by other bytes, and a reader finds no entry meanwhile). Before the fix:
# "sequential" ended with a later writer's tensors (seen with 2 and 4 writers); "simultaneous" with another writer's
# tensors than the first one a reader saw.
@pytest.mark.parametrize("order, writers", [("sequential", 2), ("sequential", 4), ("simultaneous", 4)])
def test_the_first_complete_entry_is_kept_and_a_reader_never_misses_it(tmp_path, order, writers):
    """Writers of one key with different tensors (as nondeterministic kernels give). sequential: writer 1 installs
    and exits before the others start together; simultaneous: all start together. A reader process polls the key
    all along. The entry in the end is the first one the reader saw (writer 1's when sequential), loads and
    verifies with that writer's tensors, and after the first install the reader never saw a miss or another
    writer's entry. No temporary or old folder is left."""
    root = tmp_path / "cache"
    stop = tmp_path / "stop"
    if order == "sequential":
        (tmp_path / "go-1").touch()
        _finish(_python(RACER, root, 1, tmp_path / "go-1"))
    reader = _python(READER, root, stop)
    _wait_for(Path(f"{stop}.ready"), reader)
    numbers = range(1 + (order == "sequential"), writers + 1)
    racers = [_python(RACER, root, me, tmp_path / "go") for me in numbers]
    for me, racer in zip(numbers, racers):  # all at the gate (torch imported): they race for the install
        _wait_for(tmp_path / f"go.ready-{me}", racer)
    (tmp_path / "go").touch()
    for racer in racers:
        _finish(racer)
    stop.touch()
    seen = json.loads(_finish(reader))
    installed = [s for s in seen if s != "miss"]
    assert installed, seen
    first = 1 if order == "sequential" else installed[0]
    tensors, meta = TensorCache(root).load("k")
    assert meta["writer"] == first and torch.equal(tensors["x"], torch.full((256, 64), float(first)))
    assert seen[seen.index(first):] == [first], seen  # from the first install on: that entry, never a miss
    assert sorted(p.name for p in root.iterdir()) == ["k"]


# --- issue 23 item 5: leftovers of killed writers ------------------------------------------------------------------

# A writer that stops mid-save and prints "ready" once it has: "tmp": written the tensors into its temporary folder;
# "old": also moved the (damaged) existing entry aside. Then it blocks until killed.
BLOCKED = r"""
import sys, threading
from pathlib import Path
import torch
import stem.core.atomic, stem.runs.cache
from stem.runs.cache import TensorCache

root, key, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def block(*args):
    print("ready", flush=True)
    threading.Event().wait()

real_save_file, real_move_aside = stem.runs.cache.save_file, stem.core.atomic._move_aside

def save_file(tensors, path):
    real_save_file(tensors, path)
    if where == "tmp":
        block()

def move_aside(path):
    old = real_move_aside(path)
    block()

stem.runs.cache.save_file, stem.core.atomic._move_aside = save_file, move_aside
TensorCache(root).save(key, {"x": torch.randn(1024, 256)}, {"writer": key})
"""


def _blocked(root: Path, key: str, where: str) -> subprocess.Popen:
    proc = _python(BLOCKED, root, key, where)
    line = proc.stdout.readline()  # the handshake: the writer is stopped where asked
    assert line == "ready\n", (line, proc.communicate())
    return proc


def _hidden(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith(".")}


# Bug caught: temporary (.tmp) and swapped-out (.old) folders of a writer killed with SIGKILL left forever, each a
# whole entry (before the fix: their names did not say whose they were, and no save removed them), or a cleaning
# that removes a live writer's temporary folder, another host's, or a complete entry.
def test_a_save_removes_the_leftovers_of_killed_writers_and_keeps_live_ones(tmp_path, caplog):
    import signal

    root = tmp_path / "cache"
    cache = TensorCache(root)
    cache.save("kept", {"x": torch.ones(3)}, {"v": 1})
    damaged = cache.save("b", {"x": torch.ones(3)}, {"v": 1})
    (damaged / stem.runs.cache.TENSORS).write_bytes(b"")
    live = _blocked(root, "c", "tmp")
    try:
        before = _hidden(root)
        assert len(before) == 1 and str(live.pid) in next(iter(before))  # its pid in the name
        dead = [_blocked(root, "a", "tmp"), _blocked(root, "b", "old")]
        for proc in dead:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
        leftovers = _hidden(root) - before
        assert len(leftovers) == 3, leftovers  # a's .tmp; b's .tmp and its damaged entry moved aside (.old)
        assert {n.rsplit(".", 1)[1] for n in leftovers} == {"tmp", "old"}
        assert all(any(str(p.pid) in n for p in dead) for n in leftovers), leftovers
        assert not (root / "b").exists() and sum(1 for _ in root.rglob("*.safetensors")) == 5  # whole entries
        # another host's leftover (its writer's pid is dead here, but that says nothing about the other host)
        foreign = root / f".x.{dead[0].pid}@another-host.0123abcd.tmp"
        foreign.mkdir()
        with caplog.at_level("INFO", logger="stem.runs.cache"):
            cache.save("d", {"x": torch.zeros(2)}, {"v": 2})
        assert _hidden(root) == before | {foreign.name}
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["d", "kept"]
        assert cache.load("kept")[1] == {"v": 1} and cache.load("d")[1] == {"v": 2}
        assert sum(f"removed {root}/." in r.getMessage() for r in caplog.records) == 3, caplog.text
    finally:
        live.kill()
        live.communicate(timeout=60)
    cache.save("e", {"x": torch.zeros(2)}, {"v": 3})  # now that writer is dead too
    assert _hidden(root) == {foreign.name}


def test_clean_command_removes_dead_leftovers_in_the_cache_folder_and_its_subfolders(tmp_path):
    """`python -m stem.runs.cache clean <paths.cache_dir>` removes killed writers' leftovers in it and in inversion/,
    flow/..., not entries nor live writers'. Catches: a command that cleans only the folder named (the caches
    are one level down), or that touches anything else."""
    import signal

    inversion = tmp_path / "inversion"
    TensorCache(inversion).save("kept", {"x": torch.ones(3)}, {"v": 1})
    dead = _blocked(inversion, "a", "tmp")
    dead.send_signal(signal.SIGKILL)
    dead.communicate(timeout=60)
    leftover = _hidden(inversion)
    assert len(leftover) == 1
    out = subprocess.run([sys.executable, "-m", "stem.runs.cache", "clean", str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"removed {inversion / next(iter(leftover))}\n"
    assert sorted(p.name for p in inversion.iterdir()) == ["kept"]

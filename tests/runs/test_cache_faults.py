"""Cache faults (issue 13): an unwritable cache folder (point 4) and concurrent writers of one key (point 5)."""

import os
from pathlib import Path

import pytest
import torch

import stem.runs.cache
from stem.core.errors import ConfigError
from stem.runs.cache import TensorCache

ROOT = Path(__file__).resolve().parents[2]


def _unwritable(tmp_path: Path, kind: str) -> Path:
    """A cache folder that cannot be written: read-only (chmod 0o500), or under a regular file (unwritable even
    for root, who ignores permissions)."""
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions, so a chmod 0o500 folder is writable")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "file" / "cache"


UNWRITABLE = pytest.mark.parametrize("kind", ["read-only", "under a file"])


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


def test_a_failed_save_after_the_inversion_warns_with_the_entry_and_keeps_the_result(tiny_model, tmp_path,
                                                                                     monkeypatch, caplog):
    """A disk that fills up while the entry is written: the finished inversion is returned (the run goes on)
    with a warning naming the entry, and no entry or temporary folder is left. Catches: the OSError propagating
    after the whole inversion (the run is lost), a half-written entry."""
    from stem.data.synthetic import camera_pan
    from stem.inversion.methods import DDIMInversion
    from stem.runs.reconstruction import invert_video

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

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

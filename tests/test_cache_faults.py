"""Cache faults (issue 13): an unwritable cache folder (point 4) and concurrent writers of one key (point 5)."""

import os
from pathlib import Path

import pytest
import torch

import stem.cache
from stem.cache import TensorCache
from stem.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


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
    assert TensorCache(tmp_path / "ok").check_writable().root == tmp_path / "ok"  # creates it, returns the cache
    assert (tmp_path / "ok").is_dir() and list((tmp_path / "ok").iterdir()) == []  # no probe left behind


@UNWRITABLE
def test_run_job_refuses_an_unwritable_cache_before_building_the_model(tmp_path, monkeypatch, kind):
    """run.py's job with `paths.cache_dir` unwritable fails with the one-line ConfigError before the model is
    built (the builder here fails loudly if called). Catches: the check after the model or after the inversion
    (the reported traceback once the whole inversion is done), or no check."""
    from conftest import compose_config

    import stem.models
    from run import run_job

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the cache folder was checked")

    cfg = compose_config(tmp_path, "model=tiny")
    cfg.paths.cache_dir = str(_unwritable(tmp_path, kind))
    monkeypatch.setattr(stem.models, "build_tiny", no_model)
    with pytest.raises(ConfigError, match="use_cache=false"):
        run_job(cfg, tmp_path / "run")


def test_a_failed_save_after_the_inversion_warns_with_the_entry_and_keeps_the_result(tiny_model, tmp_path,
                                                                                     monkeypatch, caplog):
    """A disk that fills up while the entry is written: the finished inversion is returned (the run goes on)
    with a warning naming the entry, and no entry or temporary folder is left. Catches: the OSError propagating
    after the whole inversion (the run is lost), a half-written entry."""
    from stem.inversion import DDIMInversion
    from stem.reconstruction import invert_video
    from stem.synthetic import camera_pan

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    video = camera_pan(n_frames=2, width=64, height=64)
    method = DDIMInversion("1frame", num_steps=2)
    cache = TensorCache(tmp_path / "cache")
    reference = invert_video(tiny_model, video, method, None, progress=False)
    monkeypatch.setattr(stem.cache, "save_file", full_disk)
    with caplog.at_level("WARNING", logger="stem.reconstruction"):
        inverted = invert_video(tiny_model, video, method, cache, progress=False)
    assert not inverted.cache_hit and inverted.entry is None
    assert torch.equal(inverted.trajectory.latents, reference.trajectory.latents)
    assert str(cache.path(inverted.key)) in caplog.text and "No space left on device" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []

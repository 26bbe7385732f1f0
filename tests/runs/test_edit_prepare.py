"""`stem.runs.edit.edit_video` around an editor's own work on the video (the Table 2 baselines' depth maps and
one-shot tuning): `prepare` before the inversion, `release` after the edit, the decode and the reconstruction of
the inversion, and also when the edit raises."""

from __future__ import annotations

import pytest
import torch

from stem.data.synthetic import camera_pan
from stem.editing.base import Editor
from stem.inversion.methods import DDIMInversion
from stem.runs.cache import TensorCache
from stem.runs.edit import edit_video


class Logged(DDIMInversion):
    def __init__(self, log: list):
        super().__init__(num_steps=2)
        self.log = log

    def invert(self, *args, **kwargs):
        self.log.append("invert")
        return super().invert(*args, **kwargs)

    def reconstruct(self, *args, **kwargs):
        self.log.append("reconstruct")
        return super().reconstruct(*args, **kwargs)


class Recording(Editor):
    name = "recording"

    def __init__(self, log: list, fail: bool = False):
        super().__init__(prompt="a cat", num_steps=2)
        self.log, self.fail = log, fail

    def prepare(self, model, video, cache, progress=True):
        self.log.append(("prepare", video.num_frames, cache is not None))

    def inversion_key(self):
        self.log.append("key")
        return {"recording": 1}

    def _edit(self, model, trajectory, prompts, progress, observed):
        self.log.append("edit")
        if self.fail:
            raise RuntimeError("edit failed")
        return trajectory.latents[0].clone(), {}

    def release(self, model):
        self.log.append("release")


@pytest.fixture(scope="module")
def pan():
    return camera_pan(n_frames=2, width=64, height=64)


def test_prepare_comes_before_the_inversion_and_release_after_the_reconstruction(tiny_model, pan, tmp_path):
    """Catches: `prepare` called after the inversion (Tune-A-Video would invert with the untuned model, Pix2Video
    without its depth channel), or `release` before the reconstruction of the inversion (which must sample back with
    the UNet the latents were inverted with)."""
    log: list = []
    cache = TensorCache(tmp_path / "cache" / "inversion")
    edit_video(tiny_model, pan, Logged(log), Recording(log), cache, progress=False, report_reconstruction=True)
    assert log == [("prepare", 2, True), "key", "invert", "edit", "reconstruct", "release"]


def test_release_runs_when_the_edit_raises(tiny_model, pan):
    """Catches: hooks and tuned weights left on the shared model after a failed edit (the next job of the process
    would run on a changed UNet)."""
    log: list = []
    with pytest.raises(RuntimeError, match="edit failed"):
        edit_video(tiny_model, pan, Logged(log), Recording(log, fail=True), None, progress=False)
    assert log[0] == ("prepare", 2, False) and log[-1] == "release" and log.count("release") == 1


def test_a_methods_own_cache_sits_beside_the_inversion_cache(tmp_path):
    """Catches: a method's entries written inside the inversion folder (where `python -m stem.runs.cache clean` and the
    inversion's key space would meet them), and a key function that differs from the inversion cache's."""
    cache = TensorCache(tmp_path / "cache" / "inversion")
    assert cache.sibling("depth").root == tmp_path / "cache" / "depth"
    a = cache.key(frames=torch.zeros(2, 3), seed=0)
    assert a == TensorCache.key(frames=torch.zeros(2, 3), seed=0) != cache.key(frames=torch.zeros(2, 3), seed=1)

"""Depth maps of a clip (stem.editing.baselines.depth): the estimator's own preprocessing, the map at the frames'
resolution, computed once per clip and cached under a key of the frames and the estimator."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DPTImageProcessor

from stem.core.errors import StemError
from stem.data.video import Video
from stem.diffusion.baseline_models import build_tiny_depth_estimator
from stem.editing.baselines.depth import depth_maps, depth_processor, estimate_depth
from stem.runs.cache import TensorCache

# Intel/dpt-hybrid-midas's preprocessor_config.json as the Hub serves it (8-bit images in, rescaled by 1/255).
DPT_HYBRID_MIDAS_CONFIG = {"do_normalize": True, "do_rescale": True, "do_resize": True, "ensure_multiple_of": 1,
                           "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "DPTImageProcessor",
                           "image_std": [0.5, 0.5, 0.5], "keep_aspect_ratio": False, "resample": 2,
                           "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}}


@pytest.fixture(scope="module")
def estimator():
    return build_tiny_depth_estimator(seed=0, device="cpu")


def _frames(n=3, height=40, width=56, seed=0) -> torch.Tensor:
    """Frames whose values are 8-bit levels (k / 255), so an 8-bit image of them is exact."""
    levels = torch.randint(0, 256, (n, 3, height, width), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 255


def _video(frames: torch.Tensor, name="clip") -> Video:
    return Video(frames=frames, fps=8.0, prompt="a clip", name=name)


class Calls:
    """Counts the estimator's forward calls and keeps the pixel values each received (a forward pre-hook)."""

    def __init__(self, module):
        self.pixels = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.pixels.append((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_preprocessing_is_dpt_hybrid_midas_image_processor(estimator):
    """Catches: frames fed at their own size or with the aspect ratio kept, [0, 1] frames rescaled again by 1/255,
    normalisation with ImageNet's mean/std instead of 0.5/0.5, channels in the wrong order."""
    frames = _frames()
    reference = DPTImageProcessor.from_dict(DPT_HYBRID_MIDAS_CONFIG)
    # As a user hands it images: 0-255 values, channels last (float, so no 8-bit rounding inside the resize).
    images = [(f.permute(1, 2, 0) * 255).numpy() for f in frames]
    expected = reference(images=images, return_tensors="pt").pixel_values
    with Calls(estimator) as calls:
        estimate_depth(estimator, frames, batch_size=8)
    assert len(calls.pixels) == 1
    got = calls.pixels[0]
    assert got.shape == expected.shape == (3, 3, 384, 384)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 resampling of values up to 255, / 255
    # Rescaled once, normalised by 0.5/0.5: pixels span [-1, 1] as the frames span [0, 1].
    assert -1 <= got.min() < -0.95 and 0.95 < got.max() <= 1


def test_depth_is_the_prediction_upsampled_bicubically_to_the_frames(estimator):
    """Catches: a map left at the estimator's 384x384, bilinear or nearest upsampling, (H, W) swapped, frames mixed
    or dropped between batches (3 frames in batches of 2)."""
    frames = _frames(n=3, height=40, width=56)
    depth = estimate_depth(estimator, frames, batch_size=2)
    assert depth.shape == (3, 1, 40, 56) and depth.dtype == torch.float32
    assert depth.abs().max() > 0
    pixels = depth_processor()(images=list(frames), return_tensors="pt").pixel_values
    with torch.no_grad():
        outputs = estimator(pixel_values=pixels)
    # transformers' own post-processing, frame by frame.
    post = DPTImageProcessor().post_process_depth_estimation(outputs, target_sizes=[(40, 56)] * 3)
    expected = torch.stack([p["predicted_depth"] for p in post])[:, None]
    torch.testing.assert_close(depth, expected, rtol=1e-5, atol=1e-6)
    naive = F.interpolate(outputs.predicted_depth[:, None], size=(40, 56), mode="bilinear", align_corners=False)
    assert (naive - depth).abs().max() > 1e-4  # the check above tells bicubic from bilinear
    # At a given size (the latent size, as diffusers' depth-to-image pipeline): straight from the prediction.
    latent = estimate_depth(estimator, frames, size=(5, 7))
    expected = F.interpolate(outputs.predicted_depth[:, None], size=(5, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-6)


def test_depth_maps_are_computed_once_per_clip(estimator, tmp_path):
    """Catches: depth recomputed on every run of a sweep (no cache, or a key that differs between identical calls),
    entries written into the inversion cache folder itself, stale maps after the frames change by one pixel."""
    cache = TensorCache(tmp_path / "inversion")
    video = _video(_frames(n=3))
    with Calls(estimator) as calls:
        first = depth_maps(estimator, video, cache, progress=False, batch_size=2)
        assert len(calls.pixels) == 2  # 3 frames, batches of 2
        second = depth_maps(estimator, video, cache, progress=False, batch_size=2)
        assert len(calls.pixels) == 2  # a cache hit
    assert torch.equal(first, second)
    assert len(list((tmp_path / "depth").iterdir())) == 1 and not (tmp_path / "inversion").exists()
    changed = video.frames.clone()
    changed[2, 0, 5, 7] = 1 - changed[2, 0, 5, 7]
    with Calls(estimator) as calls:
        third = depth_maps(estimator, _video(changed), cache, progress=False)
        assert len(calls.pixels) == 1
    assert not torch.equal(third[2], first[2])
    assert len(list((tmp_path / "depth").iterdir())) == 2
    with Calls(estimator) as calls:
        small = depth_maps(estimator, video, cache, progress=False, size=(5, 7))
        assert len(calls.pixels) == 1 and small.shape == (3, 1, 5, 7)  # another size, another entry


def test_depth_key_changes_with_the_estimator_and_no_cache_stores_nothing(estimator, tmp_path):
    """Catches: a key without the estimator's weights (another depth model reusing these maps), and a run with
    use_cache=false writing entries anyway."""
    cache = TensorCache(tmp_path / "inversion")
    video = _video(_frames(n=2))
    depth_maps(estimator, video, cache, progress=False)
    other = build_tiny_depth_estimator(seed=1, device="cpu")
    with Calls(other) as calls:
        depth_maps(other, video, cache, progress=False)
        assert len(calls.pixels) == 1
    assert len(list((tmp_path / "depth").iterdir())) == 2
    with Calls(estimator) as calls:
        uncached = depth_maps(estimator, video, None, progress=False)
        depth_maps(estimator, video, None, progress=False)
        assert len(calls.pixels) == 2
    assert len(list((tmp_path / "depth").iterdir())) == 2
    torch.testing.assert_close(uncached, depth_maps(estimator, video, cache, progress=False), rtol=0, atol=0)


def test_bad_frames_are_refused_in_one_line(estimator):
    """Catches: a (N, H, W, 3) array passed through silently (the estimator would read garbage)."""
    with pytest.raises(StemError) as info:
        estimate_depth(estimator, torch.from_numpy(np.zeros((2, 8, 8, 3), np.float32)))
    assert "\n" not in str(info.value) and "(N, 3, H, W)" in str(info.value)

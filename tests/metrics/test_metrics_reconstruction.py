"""PSNR/SSIM (stem.metrics.reconstruction) against scikit-image and known answers (spec/METRICS.md)."""

import math

import numpy as np
import pytest
import torch
from skimage.data import astronaut
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from stem.metrics.reconstruction import psnr, reconstruction_metrics, ssim

# The paper's SSIM (Wang et al.): Gaussian window sigma 1.5, population covariance.
SSIM_PAPER = dict(channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _crops(n: int = 3, size: int = 64) -> np.ndarray:
    """(n, size, size, 3) float32 crops of a real photograph, in [0, 1]."""
    image = astronaut().astype(np.float32) / 255
    return np.stack([image[40 * i:40 * i + size, 60 * i + 100:60 * i + 100 + size] for i in range(n)])


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """Real frames and a degraded copy: frame 0 blurred, frame 1 noisy, frame 2 blurred and noisy."""
    clean = _crops()
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.04, clean.shape).astype(np.float32)
    blurred = np.stack([gaussian(f, sigma=1.0, channel_axis=-1) for f in clean]).astype(np.float32)
    degraded = np.stack([blurred[0], clean[1] + noise[1], blurred[2] + noise[2]])
    return clean, np.clip(degraded, 0, 1).astype(np.float32)


def test_psnr_per_frame_equals_skimage(pair):
    a, b = pair
    expected = [peak_signal_noise_ratio(x.astype(np.float64), y.astype(np.float64), data_range=1.0)
                for x, y in zip(a, b)]
    got = psnr(a, b)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert len(set(np.round(got, 3))) == 3  # three different degradations, three different values


def test_ssim_per_frame_equals_skimage_gaussian_window(pair):
    a, b = pair
    expected = [structural_similarity(x.astype(np.float64), y.astype(np.float64), **SSIM_PAPER) for x, y in zip(a, b)]
    got = ssim(a, b)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert all(0 < s < 1 for s in got)


def test_ssim_differs_from_skimage_uniform_7x7_default(pair):
    # The spec's warning: skimage's default window gives different numbers on the same pair.
    a, b = pair
    x, y = a[1].astype(np.float64), b[1].astype(np.float64)
    uniform = structural_similarity(x, y, channel_axis=-1, data_range=1.0)
    ours = float(ssim(a[1:2], b[1:2])[0])
    assert abs(ours - uniform) > 5e-3, (ours, uniform)
    assert ours == pytest.approx(structural_similarity(x, y, **SSIM_PAPER), rel=1e-12)


def test_psnr_of_known_gaussian_noise_is_20_log10_one_over_sigma():
    sigma = 0.05
    clean = 0.25 + 0.5 * _crops(n=2, size=128).astype(np.float64)  # in [0.25, 0.75]: 5 sigma from 0 and 1
    noisy = clean + np.random.default_rng(1).normal(0, sigma, clean.shape)
    assert noisy.min() >= 0 and noisy.max() <= 1, "a pixel would be clipped; the known answer needs none"
    expected = 20 * math.log10(1 / sigma)  # 26.0206 dB
    got = psnr(clean, noisy)
    assert np.all(np.abs(got - expected) < 0.1), (got, expected)


def test_identical_frames_give_infinite_psnr_and_unit_ssim():
    a = _crops(n=2)
    b = a.copy()
    b[1] = np.clip(b[1] + 0.1, 0, 1)  # only the second frame differs
    p = psnr(a, b)
    assert p[0] == np.inf and np.isfinite(p[1])
    assert ssim(a, a) == pytest.approx([1.0, 1.0], abs=1e-12)


def test_torch_nchw_gives_the_same_numbers_as_numpy_nhwc(pair):
    a, b = pair
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in (a, b))
    assert ta.shape == (3, 3, 64, 64)
    # Same float32 values; the permuted (non-contiguous) array only changes summation order (last ulp).
    np.testing.assert_allclose(psnr(ta, tb), psnr(a, b), rtol=1e-12)
    np.testing.assert_allclose(ssim(ta, tb), ssim(a, b), rtol=1e-12)
    np.testing.assert_allclose(psnr(ta, b), psnr(a, b), rtol=1e-12)  # mixed inputs too


def test_shape_mismatch_raises_value_error_naming_both_shapes():
    a = _crops(n=2)
    with pytest.raises(ValueError, match=r"\(2, 64, 64, 3\).*\(1, 64, 64, 3\)"):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match=r"\(2, 64, 64, 3\).*\(2, 32, 64, 3\)"):
        ssim(a, a[:, :32])


def test_not_a_video_raises_value_error_naming_the_shape():
    a = _crops(n=1)
    with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
        psnr(a[0], a[0])


def test_torch_tensor_that_is_not_a_video_raises_value_error():
    t = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match=r"64, 64"):
        psnr(t, t)


def test_nan_raises_value_error_naming_nan():
    a = _crops(n=2)
    b = a.copy()
    b[1, 5, 7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        psnr(a, b)
    with pytest.raises(ValueError, match="NaN"):
        ssim(torch.from_numpy(b).permute(0, 3, 1, 2), a)


def test_reconstruction_metrics_per_frame_and_means_for_each_reference(pair):
    a, b = pair
    c = np.clip(a + 0.02, 0, 1).astype(np.float32)
    out = reconstruction_metrics(a, {"input": b, "vae": c})
    assert set(out) == {"input", "vae"}
    for name, ref in (("input", b), ("vae", c)):
        m = out[name]
        assert set(m) == {"psnr", "ssim", "psnr_per_frame", "ssim_per_frame"}
        psnr_ref = [peak_signal_noise_ratio(r.astype(np.float64), x.astype(np.float64), data_range=1.0)
                    for x, r in zip(a, ref)]
        ssim_ref = [structural_similarity(x.astype(np.float64), r.astype(np.float64), **SSIM_PAPER)
                    for x, r in zip(a, ref)]
        assert isinstance(m["psnr_per_frame"], list) and isinstance(m["ssim_per_frame"], list)
        np.testing.assert_allclose(m["psnr_per_frame"], psnr_ref, rtol=1e-12)
        np.testing.assert_allclose(m["ssim_per_frame"], ssim_ref, rtol=1e-12)
        assert isinstance(m["psnr"], float) and m["psnr"] == pytest.approx(sum(psnr_ref) / 3, rel=1e-12)
        assert isinstance(m["ssim"], float) and m["ssim"] == pytest.approx(sum(ssim_ref) / 3, rel=1e-12)
    assert out["input"]["psnr"] != out["vae"]["psnr"]

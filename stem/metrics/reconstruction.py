"""Reconstruction fidelity: PSNR and SSIM per frame (paper Tables 4-6, Fig. 4).

Definitions (spec/METRICS.md): RGB in [0, 1], data range 1.0, computed per frame, then
averaged over frames (and over videos by the caller).
- PSNR = 10 log10(1 / MSE), MSE over all pixels and channels of a frame; inf for equal frames.
- SSIM as Wang et al. 2004 with a Gaussian window (sigma 1.5) and population covariance:
  scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0, channel_axis=-1)`. The 7x7 uniform-window
  default gives visibly different numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from stem.core.errors import MetricError


def _frames(video: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """(N, 3, H, W) tensor or (N, H, W, 3) array in [0, 1] -> float64 (N, H, W, 3)."""
    if isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise MetricError(f"{name}: expected a video (N, 3, H, W) tensor, got {tuple(video.shape)}")
        video = video.detach().cpu().double().permute(0, 2, 3, 1).numpy()
    arr = np.asarray(video, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise MetricError(f"{name}: expected a video (N, 3, H, W) tensor or (N, H, W, 3) array, got {arr.shape}")
    if np.isnan(arr).any():
        raise MetricError(f"{name}: video contains NaN")
    return arr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = _frames(a, "first video"), _frames(b, "second video")
    if x.shape != y.shape:
        raise MetricError(f"videos differ in shape: {x.shape} vs {y.shape} (N, H, W, 3)")
    return x, y


def psnr(a, b) -> np.ndarray:
    """Per-frame PSNR in dB of two videos in [0, 1] (data range 1.0)."""
    x, y = _pair(a, b)
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def ssim(a, b) -> np.ndarray:
    """Per-frame SSIM (Gaussian window, sigma 1.5, data range 1.0) of two videos in [0, 1]."""
    x, y = _pair(a, b)
    return np.array([structural_similarity(f, g, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False) for f, g in zip(x, y)])


def reconstruction_metrics(reconstruction, references: dict) -> dict:
    """PSNR/SSIM of `reconstruction` against each named reference video.

    Returns {"<ref>": {"psnr": mean, "ssim": mean, "psnr_per_frame": [...], "ssim_per_frame": [...]}}.
    """
    out = {}
    for name, ref in references.items():
        p, s = psnr(reconstruction, ref), ssim(reconstruction, ref)
        out[name] = {"psnr": float(p.mean()), "ssim": float(s.mean()),
                     "psnr_per_frame": p.tolist(), "ssim_per_frame": s.tolist()}
    return out

"""Metrics with documented definitions (docs/METRICS.md), on videos (N, 3, H, W) in [0, 1]."""

from stem.metrics.reconstruction import psnr, reconstruction_metrics, ssim

__all__ = ["psnr", "ssim", "reconstruction_metrics"]

"""Metrics with documented definitions (docs/METRICS.md), on videos (N, 3, H, W) in [0, 1].

- reconstruction: PSNR, SSIM (paper Tables 4-6)
- warp error with RAFT or DIS flow of the source video (paper Table 2)
- CLIP score and frame-to-frame CLIP consistency (paper Table 2; open_clip imported on first use)
- feature temporal similarity of the last decoder self-attention (paper Figs. 6, 9)
"""

from stem.metrics.clip_score import ClipScorer, ClipWeightsError  # not clip_score(): it would shadow the module
from stem.metrics.feature_similarity import capture_features, feature_temporal_similarity, similarity_per_step
from stem.metrics.flow import estimate_flow
from stem.metrics.reconstruction import psnr, reconstruction_metrics, ssim
from stem.metrics.warp import consistency_mask, warp, warp_error

__all__ = ["psnr", "ssim", "reconstruction_metrics", "estimate_flow", "warp", "consistency_mask", "warp_error",
           "ClipScorer", "ClipWeightsError", "capture_features", "feature_temporal_similarity",
           "similarity_per_step"]

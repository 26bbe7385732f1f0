"""Warp error: temporal consistency of an edited video (paper Table 2; spec/METRICS.md).

Notation (spec/METRICS.md, "Temporal consistency: warp error"):
    S_t, E_t        source and edited frame t, RGB in [0, 1], t = 0..N-1
    F = F_{t->t+1}  forward flow of the SOURCE video, `S_{t+1}(p + F(p)) = S_t(p)`
    B = B_{t+1->t}  backward flow of the source video
    W_t(p)          = E_{t+1}(p + F(p)): frame t+1 pulled into frame t (bilinear, zero outside)
    valid_t(p)      = in-bounds: p + F(p) inside [0, W-1] x [0, H-1]
                      AND forward-backward consistent: |F + B(F)|^2 <= 0.01 (|F|^2 + |B(F)|^2) + 0.5,
                      with B(F)(p) = B(p + F(p))
    e_t             = sum_{p valid, c} (W_t - E_t)^2 / (3 * #valid)      per-channel MSE over valid pixels
    warp error      = mean_t e_t, reported x1e-3 (4.9 means MSE 4.9e-3); callers average over videos.

The unmasked value (all pixels, zero padding) and the valid fraction are reported beside it: border
handling alone moves the number by several x1e-3, which is why the mask is part of the definition.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from stem.core.errors import MetricError
from stem.diffusion.device import resolve_device
from stem.metrics.flow import RAFT_MIN_SIZE, check_frames, estimate_flow

log = logging.getLogger(__name__)

SCALE = 1e3  # report MSE x1e-3, as the paper's Table 2
FB_ALPHA, FB_BETA = 0.01, 0.5  # forward-backward test constants (Sundaram et al. 2010; Ruder et al. 2016)


def _grid(flow: torch.Tensor) -> torch.Tensor:
    """Sampling grid for `grid_sample(align_corners=True)`: pixel p + F(p) mapped to [-1, 1].

    With align_corners=True pixel centre 0 maps to -1 and pixel centre W-1 to +1:
    x_norm = 2 x / (W - 1) - 1 (same for y with H).
    """
    _, _, h, w = flow.shape
    x, y = _targets(flow)
    return torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)


def _targets(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates p + F(p): x (B, H, W) and y (B, H, W)."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                            torch.arange(w, dtype=flow.dtype, device=flow.device), indexing="ij")
    return xs + flow[:, 0], ys + flow[:, 1]


def warp(frames: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """`out(p) = frames(p + flow(p))`, bilinear; `frames (B, C, H, W)`, `flow (B, 2, H, W)` in pixels.

    Pulls frame t+1 into frame t when given F_{t->t+1}. Outside the frame: zeros (or `padding_mode`).
    """
    if frames.shape[0] != flow.shape[0] or frames.shape[-2:] != flow.shape[-2:] or flow.shape[1] != 2:
        raise MetricError(f"warp: frames {tuple(frames.shape)} and flow {tuple(flow.shape)} do not match "
                         "(expected (B, C, H, W) and (B, 2, H, W))")
    return F.grid_sample(frames, _grid(flow.to(frames.dtype)), mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


def in_bounds_mask(flow: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` bool: p + flow(p) lies inside [0, W-1] x [0, H-1] (pixel centres)."""
    _, _, h, w = flow.shape
    x, y = _targets(flow)
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def consistency_mask(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` bool valid mask: in-bounds AND forward-backward consistent (spec/METRICS.md).

    Consistent: |F + B(F)|^2 <= 0.01 (|F|^2 + |B(F)|^2) + 0.5 with B(F)(p) = B(p + F(p)) (bilinear).
    Pixels occluded in frame t+1 fail it: the flow of whatever covers them points elsewhere.
    """
    if forward.shape != backward.shape:
        raise MetricError(f"consistency mask: forward {tuple(forward.shape)} and backward "
                         f"{tuple(backward.shape)} flows differ in shape")
    b_at_f = warp(backward, forward, padding_mode="border")  # out-of-bounds pixels are masked anyway
    lhs = (forward + b_at_f).pow(2).sum(1)
    rhs = FB_ALPHA * (forward.pow(2).sum(1) + b_at_f.pow(2).sum(1)) + FB_BETA
    return (lhs <= rhs) & in_bounds_mask(forward)


def _check_flow(flow, name: str, shape: tuple) -> torch.Tensor:
    n, _, h, w = shape
    if not isinstance(flow, torch.Tensor) or tuple(flow.shape) != (n - 1, 2, h, w):
        got = tuple(flow.shape) if hasattr(flow, "shape") else type(flow).__name__
        raise MetricError(f"warp error: {name} must be (N-1, 2, H, W) = {(n - 1, 2, h, w)} for source "
                         f"{tuple(shape)}, got {got}")
    if not torch.isfinite(flow).all():
        raise MetricError(f"warp error: {name} {tuple(flow.shape)} contains NaN or inf")
    return flow.detach().cpu().float()


def warp_error(edited, source, *, flow_backend: str = "auto", flow: torch.Tensor | None = None,
               backward_flow: torch.Tensor | None = None, device: str | torch.device = "auto",
               raft_iters: int = 12, batch_size: int = 8, model: torch.nn.Module | None = None,
               cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Warp error of `edited` with the flow of `source` (spec/METRICS.md), in units of 1e-3 MSE.

    Args:
        edited, source: `(N, 3, H, W)` tensors (or `(N, H, W, 3)` arrays) in [0, 1] of equal shape, N >= 2.
        flow_backend: "auto", "raft" or "dis" (see `stem.metrics.flow.estimate_flow`).
        flow, backward_flow: precomputed `(N-1, 2, H, W)` flows of the source (e.g. the exact flow of
            `stem.data.synthetic.camera_pan`); skip estimation. Without `backward_flow` the mask is in-bounds only.
        device: where flow and warping run ("auto": cuda when available).
        raft_iters, batch_size, model, cache_dir, progress: passed to `estimate_flow`.

    Returns: {"warp_error": masked mean over pairs x1e-3, "warp_error_unmasked": zero-padded, all pixels
    x1e-3, "valid_fraction": mean over pairs, "backend": flow backend ("given" for `flow=`),
    "per_pair", "per_pair_unmasked", "per_pair_valid_fraction": lists over the N-1 pairs}.
    """
    src = check_frames(source, "source", "warp error")
    edit = check_frames(edited, "edited", "warp error")
    if edit.shape != src.shape:
        raise MetricError(f"warp error: edited {tuple(edit.shape)} and source {tuple(src.shape)} videos differ "
                         "in shape (N, 3, H, W)")
    if flow is None and flow_backend == "raft" and min(src.shape[-2:]) < RAFT_MIN_SIZE:
        raise MetricError(f"warp error: RAFT needs frames of at least {RAFT_MIN_SIZE}x{RAFT_MIN_SIZE}, got "
                         f"{tuple(src.shape)} (N, 3, H, W); use flow_backend='dis'")
    if flow is None:
        if backward_flow is not None:
            raise MetricError("warp error: backward_flow given without flow")
        fwd, bwd, backend = estimate_flow(src, flow_backend, device=device, raft_iters=raft_iters,
                                          batch_size=batch_size, model=model, cache_dir=cache_dir,
                                          progress=progress)
    else:
        fwd, backend = _check_flow(flow, "flow", src.shape), "given"
        bwd = None if backward_flow is None else _check_flow(backward_flow, "backward_flow", src.shape)

    dev = resolve_device(device)
    dtype = torch.float64  # cheap per pair; integer shifts then warp to within ~1e-30 of exact
    masked, unmasked, fractions = [], [], []
    for t in range(len(src) - 1):  # one pair at a time: memory stays at a few frames
        f = fwd[t:t + 1].to(dev, dtype)
        valid = in_bounds_mask(f) if bwd is None else consistency_mask(f, bwd[t:t + 1].to(dev, dtype))
        pulled = warp(edit[t + 1:t + 2].to(dev, dtype), f)
        sq = (pulled - edit[t:t + 1].to(dev, dtype)).pow(2)  # (1, 3, H, W)
        n_valid = int(valid.sum())
        masked.append(float((sq * valid[:, None]).sum() / (3 * n_valid)) * SCALE if n_valid else float("nan"))
        unmasked.append(float(sq.mean()) * SCALE)
        fractions.append(n_valid / valid.numel())
    empty = [t for t, v in enumerate(masked) if v != v]
    if empty:
        log.warning("warp error: pairs %s have no valid pixel (flow leaves the frame or is inconsistent); "
                    "they are left out of the mean", empty)
    kept = [v for v in masked if v == v]
    return {
        "warp_error": sum(kept) / len(kept) if kept else float("nan"),
        "warp_error_unmasked": sum(unmasked) / len(unmasked),
        "valid_fraction": sum(fractions) / len(fractions),
        "backend": backend,
        "per_pair": masked,
        "per_pair_unmasked": unmasked,
        "per_pair_valid_fraction": fractions,
    }

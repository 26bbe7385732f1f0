"""Feature temporal similarity: flow-aligned cosine similarity of UNet features (paper Fig. 6, Fig. 9).

Notation (spec/METRICS.md, "Feature temporal similarity"):
    phi_t           features of frame t at the last decoder self-attention layer (output of the
                    last `up_blocks...attn1`), (C, h, w) on the layer's token grid
    F = F_{t->t+1}  forward flow of the video at pixel resolution (H, W), `frame_{t+1}(p + F(p)) = frame_t(p)`
    f               F resized bilinearly to (h, w), vectors scaled by (w / W, h / H)
    W_t(p)          = phi_{t+1}(p + f(p)): features of frame t+1 pulled into frame t (`stem.metrics.warp.warp`)
    valid_t(p)      p + f(p) inside [0, w-1] x [0, h-1]
    s_t             = mean_{p valid} cos(phi_t(p), W_t(p)), cosine along channels
    similarity      = mean_t s_t; `similarity_per_step` reports it once per DDIM inversion step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from stem.inversion import self_attention_tokens
from stem.metrics.warp import in_bounds_mask, warp

METRIC = "feature temporal similarity"


def self_attention_layers(unet) -> list[str]:
    """Module paths of every self-attention (`attn1`) of the UNet, in `named_modules` order."""
    return [name for name, _ in unet.named_modules() if name.endswith("attn1")]


def last_decoder_self_attention(unet) -> str:
    """Path of the last `attn1` under `up_blocks` (the layer of paper Fig. 6 and Fig. 9)."""
    layers = [name for name in self_attention_layers(unet) if name.startswith("up_blocks.")]
    if not layers:
        raise ValueError(f"{METRIC}: the UNet has no self-attention (attn1) layer under up_blocks")
    return layers[-1]


def feature_grid(unet, layer: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) token grid of `layer` for latents of size `latent_hw` (the latent size for the last up block)."""
    grids = self_attention_tokens(unet, *latent_hw)
    if layer not in grids:
        raise ValueError(f"{METRIC}: {layer!r} is not a self-attention (attn1) layer of the UNet")
    return grids[layer]


@contextmanager
def capture_features(unet, layer: str | None = None, grid: tuple[int, int] | None = None,
                     latent_hw: tuple[int, int] | None = None) -> Iterator[list[torch.Tensor]]:
    """Record the output of self-attention `layer` (default: the last decoder attn1) at every UNet call.

    Yields a list that gains one CPU float tensor (frames, C, h, w) per UNet call. The token grid
    (h, w) is `grid`, else derived from `latent_hw` (the latent size of the calls), else assumed
    square. A forward hook observes the output; the UNet's computation is unchanged.
    """
    layer = last_decoder_self_attention(unet) if layer is None else layer
    modules = dict(unet.named_modules())
    if layer not in modules or not layer.endswith("attn1"):
        raise ValueError(f"{METRIC}: {layer!r} is not a self-attention (attn1) layer of the UNet; "
                         f"choose one of {self_attention_layers(unet)}")
    if grid is None and latent_hw is not None:
        grid = feature_grid(unet, layer, latent_hw)
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.ndim == 4:  # (B, C, h, w) already
            captured.append(out.detach().float().cpu().clone())
            return
        b, s, c = out.shape
        h, w = grid if grid is not None else (round(s ** 0.5),) * 2
        if h * w != s:
            raise ValueError(f"{METRIC}: layer {layer} has {s} tokens, not the grid {h}x{w}; pass grid=(h, w) "
                             "or latent_hw=(h, w)")
        captured.append(out.detach().float().cpu().reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous())

    handle = modules[layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _resize_flow(flow: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flow (B, 2, H, W) in pixels -> (B, 2, h, w) in feature cells: bilinear field, vectors scaled."""
    big_h, big_w = flow.shape[-2:]
    if (big_h, big_w) == (h, w):
        return flow
    small = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    scale = torch.tensor([w / big_w, h / big_h], dtype=flow.dtype, device=flow.device)
    return small * scale[None, :, None, None]


def feature_temporal_similarity(features: torch.Tensor, flow: torch.Tensor) -> dict:
    """Mean flow-aligned cosine similarity of consecutive frames' features (spec/METRICS.md).

    Args:
        features: (N, C, h, w), N >= 2, e.g. one entry of `capture_features`.
        flow: (N-1, 2, H, W) forward flow F_{t->t+1} at pixel resolution (H, W), e.g. `Video.flow`.

    Returns: {"mean": mean over pairs, "per_pair": list of the N-1 pair means (nan for a pair
    with no valid position; left out of the mean)}.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] < 2:
        got = tuple(features.shape) if hasattr(features, "shape") else type(features).__name__
        raise ValueError(f"{METRIC}: features must be (N, C, h, w) with N >= 2 frames, got {got}")
    n, _, h, w = features.shape
    if not isinstance(flow, torch.Tensor) or flow.ndim != 4 or tuple(flow.shape[:2]) != (n - 1, 2):
        got = tuple(flow.shape) if hasattr(flow, "shape") else type(flow).__name__
        raise ValueError(f"{METRIC}: flow must be (N-1, 2, H, W) = ({n - 1}, 2, H, W) for features "
                         f"{tuple(features.shape)}, got {got}")
    if not (torch.isfinite(features).all() and torch.isfinite(flow).all()):
        raise ValueError(f"{METRIC}: features {tuple(features.shape)} or flow {tuple(flow.shape)} contain NaN or inf")
    feats = features.detach().cpu().double()
    small = _resize_flow(flow.detach().cpu().double(), h, w)
    per_pair = []
    for t in range(n - 1):
        f = small[t:t + 1]
        pulled = warp(feats[t + 1:t + 2], f)
        cos = F.cosine_similarity(feats[t:t + 1], pulled, dim=1, eps=1e-12)  # (1, h, w)
        valid = in_bounds_mask(f)
        per_pair.append(float(cos[valid].mean()) if valid.any() else float("nan"))
    kept = [v for v in per_pair if v == v]
    return {"mean": sum(kept) / len(kept) if kept else float("nan"), "per_pair": per_pair}


def similarity_per_step(model, latents: torch.Tensor, cond: torch.Tensor, method, flow: torch.Tensor,
                        layer: str | None = None, progress: bool = False) -> list[float]:
    """Feature temporal similarity at every inversion step of `method` (paper Fig. 9's x-axis).

    Args:
        model: a `stem.models.DiffusionModel`. latents: clean latents (N, 4, h, w). cond: prompt embedding.
        method: a `stem.inversion.InversionMethod` (its `invert` runs with the hook installed).
        flow: (N-1, 2, H, W) forward flow of the video at pixel resolution.
        layer: attn1 module path; default the last decoder self-attention.

    Returns: one mean similarity per DDIM inversion step (one UNet call each).
    """
    with capture_features(model.unet, layer, latent_hw=tuple(latents.shape[-2:])) as captured:
        method.invert(model, latents, cond, progress=progress)
    if len(captured) != method.num_steps:
        raise ValueError(f"{METRIC}: captured {len(captured)} UNet calls for {method.num_steps} inversion steps")
    return [feature_temporal_similarity(features, flow)["mean"] for features in captured]

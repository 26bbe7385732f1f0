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

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from stem.core.errors import MetricError
from stem.inversion.methods import self_attention_tokens
from stem.metrics.warp import in_bounds_mask, warp

METRIC = "feature temporal similarity"


def self_attention_layers(unet) -> list[str]:
    """Module paths of every self-attention (`attn1`) of the UNet, in `named_modules` order."""
    return [name for name, _ in unet.named_modules() if name.endswith("attn1")]


def last_decoder_self_attention(unet) -> str:
    """Path of the last `attn1` under `up_blocks` (the layer of paper Fig. 6 and Fig. 9)."""
    layers = [name for name in self_attention_layers(unet) if name.startswith("up_blocks.")]
    if not layers:
        raise MetricError(f"{METRIC}: the UNet has no self-attention (attn1) layer under up_blocks")
    return layers[-1]


def feature_grid(unet, layer: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) token grid of `layer` for latents of size `latent_hw` (the latent size for the last up block)."""
    grids = self_attention_tokens(unet, *latent_hw)
    if layer not in grids:
        raise MetricError(f"{METRIC}: {layer!r} is not a self-attention (attn1) layer of the UNet")
    return grids[layer]


def _grid_features(output, grid: tuple[int, int] | None, layer: str) -> torch.Tensor:
    """An attn1 output (B, h*w, C) (or (B, C, h, w)) as detached (B, C, h, w) float32 on its device."""
    out = output[0] if isinstance(output, tuple) else output
    if out.ndim == 4:
        return out.detach().float()
    b, s, c = out.shape
    h, w = grid if grid is not None else (round(s ** 0.5),) * 2
    if h * w != s:
        raise MetricError(f"{METRIC}: layer {layer} has {s} tokens, not the grid {h}x{w}; pass grid=(h, w) "
                          "or latent_hw=(h, w)")
    return out.detach().float().reshape(b, h, w, c).permute(0, 3, 1, 2)


@contextmanager
def feature_hook(unet, on_features: Callable[[torch.Tensor], None], layer: str | None = None,
                 grid: tuple[int, int] | None = None, latent_hw: tuple[int, int] | None = None) -> Iterator[str]:
    """Call `on_features(features)` with the (B, C, h, w) float32 output of self-attention `layer`
    (default: the last decoder attn1) at every UNet call; yields the layer path.

    The token grid (h, w) is `grid`, else derived from `latent_hw` (the latent size of the calls),
    else assumed square. A forward hook observes the output; the UNet's computation is unchanged.
    """
    layer = last_decoder_self_attention(unet) if layer is None else layer
    modules = dict(unet.named_modules())
    if layer not in modules or not layer.endswith("attn1"):
        raise MetricError(f"{METRIC}: {layer!r} is not a self-attention (attn1) layer of the UNet; "
                          f"choose one of {self_attention_layers(unet)}")
    if grid is None and latent_hw is not None:
        grid = feature_grid(unet, layer, latent_hw)
    handle = modules[layer].register_forward_hook(lambda module, args, out: on_features(_grid_features(out, grid,
                                                                                                         layer)))
    try:
        yield layer
    finally:
        handle.remove()


@contextmanager
def capture_features(unet, layer: str | None = None, grid: tuple[int, int] | None = None,
                     latent_hw: tuple[int, int] | None = None) -> Iterator[list[torch.Tensor]]:
    """Record the output of self-attention `layer` (default: the last decoder attn1) at every UNet call.

    Yields a list that gains one CPU float tensor (B, C, h, w) per UNet call (all of them are kept:
    for long videos use `FeatureRecorder`, which keeps only the similarity and a few frames).
    """
    captured: list[torch.Tensor] = []
    with feature_hook(unet, lambda f: captured.append(f.cpu().clone()), layer, grid, latent_hw):
        yield captured


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
        raise MetricError(f"{METRIC}: features must be (N, C, h, w) with N >= 2 frames, got {got}")
    n, _, h, w = features.shape
    if not isinstance(flow, torch.Tensor) or flow.ndim != 4 or tuple(flow.shape[:2]) != (n - 1, 2):
        got = tuple(flow.shape) if hasattr(flow, "shape") else type(flow).__name__
        raise MetricError(f"{METRIC}: flow must be (N-1, 2, H, W) = ({n - 1}, 2, H, W) for features "
                         f"{tuple(features.shape)}, got {got}")
    if not (torch.isfinite(features).all() and torch.isfinite(flow).all()):
        raise MetricError(f"{METRIC}: features {tuple(features.shape)} or flow {tuple(flow.shape)} contain NaN or inf")
    per_pair = _pair_similarities(features.detach(), flow.detach())
    kept = [v for v in per_pair if v == v]
    return {"mean": sum(kept) / len(kept) if kept else float("nan"), "per_pair": per_pair}


def _pair_similarities(features: torch.Tensor, flow: torch.Tensor, chunk: int = 8) -> list[float]:
    """s_t for t = 0..N-2 (nan where no position is valid), in float64 on the features' device,
    `chunk` pairs per warp call."""
    n, _, h, w = features.shape
    out = []
    for start in range(0, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        feats = features[start:stop + 1].double()
        small = _resize_flow(flow[start:stop].to(feats.device, torch.float64), h, w)
        cos = F.cosine_similarity(feats[:-1], warp(feats[1:], small), dim=1, eps=1e-12)  # (pairs, h, w)
        valid = in_bounds_mask(small)
        sums, counts = (cos * valid).sum((1, 2)), valid.sum((1, 2))
        out += [float(s / c) if c else float("nan") for s, c in zip(sums.tolist(), counts.tolist())]
    return out


class FeatureRecorder:
    """Streams the feature temporal similarity of every UNet call while installed (a context manager).

    Only the per-call similarity is kept, plus the features of `keep_frames` at the calls in `keep_calls`
    (for `feature_pca`), so memory does not grow with steps x frames:

        with FeatureRecorder(model.unet, flow, latent_hw=latents.shape[-2:], keep_calls={0, 49}) as rec:
            method.invert(model, latents, cond)
        rec.per_call            # [s per UNet call], paper Fig. 9
        rec.kept[49]            # (len(keep_frames), C, h, w) CPU features, paper Fig. 6

    A call with a batch of k*N latents (classifier-free guidance) is scored on its last N (the
    conditional branch in diffusers' [uncond, cond] order).
    """

    def __init__(self, unet, flow: torch.Tensor, layer: str | None = None, latent_hw: tuple[int, int] | None = None,
                 keep_calls=(), keep_frames=()):
        if not isinstance(flow, torch.Tensor) or flow.ndim != 4 or flow.shape[1] != 2 or flow.shape[0] < 1:
            got = tuple(flow.shape) if hasattr(flow, "shape") else type(flow).__name__
            raise MetricError(f"{METRIC}: flow must be (N-1, 2, H, W) with N >= 2 frames, got {got}")
        self.unet, self.flow, self.layer, self.latent_hw = unet, flow.detach(), layer, latent_hw
        self.num_frames = flow.shape[0] + 1
        bad = [f for f in keep_frames if not 0 <= f < self.num_frames]
        if bad:
            raise MetricError(f"{METRIC}: keep_frames {bad} are outside the video's {self.num_frames} frames")
        self.keep_calls, self.keep_frames = set(keep_calls), list(keep_frames)
        self.per_call: list[float] = []
        self.kept: dict[int, torch.Tensor] = {}
        self._hook = None

    def _record(self, features: torch.Tensor) -> None:
        n = self.num_frames
        if features.shape[0] % n:
            raise MetricError(f"{METRIC}: a UNet call of batch {features.shape[0]} is not a multiple of the "
                              f"flow's {n} frames")
        features = features[-n:]
        call = len(self.per_call)
        self.per_call.append(feature_temporal_similarity(features, self.flow)["mean"])
        if call in self.keep_calls and self.keep_frames:
            self.kept[call] = features[self.keep_frames].cpu().clone()

    def __enter__(self) -> FeatureRecorder:
        self._hook = feature_hook(self.unet, self._record, self.layer, latent_hw=self.latent_hw)
        self.layer = self._hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hook.__exit__(*exc)


def similarity_per_step(model, latents: torch.Tensor, cond: torch.Tensor, method, flow: torch.Tensor,
                        layer: str | None = None, progress: bool = False) -> list[float]:
    """Feature temporal similarity at every inversion step of `method` (paper Fig. 9's x-axis).

    Args:
        model: a `stem.diffusion.models.DiffusionModel`. latents: clean latents (N, 4, h, w). cond: prompt embedding.
        method: a `stem.inversion.methods.InversionMethod` (its `invert` runs with the hook installed).
        flow: (N-1, 2, H, W) forward flow of the video at pixel resolution.
        layer: attn1 module path; default the last decoder self-attention.

    Returns: one mean similarity per DDIM inversion step (one UNet call each).
    """
    with FeatureRecorder(model.unet, flow, layer, latent_hw=tuple(latents.shape[-2:])) as rec:
        method.invert(model, latents, cond, progress=progress)
    if len(rec.per_call) != method.num_steps:
        raise MetricError(f"{METRIC}: captured {len(rec.per_call)} UNet calls for {method.num_steps} inversion steps")
    return rec.per_call


def feature_pca(features: torch.Tensor, components: int = 3) -> torch.Tensor:
    """Features (F, C, h, w) -> (F, components, h, w) in [0, 1]: their top principal components (paper Fig. 6).

    One PCA over the tokens of all F frames together (so colours mean the same thing in every
    frame): centre the F*h*w token vectors, project on the top eigenvectors of their C x C
    covariance, scale each component to [0, 1] with its min/max over all frames. Each
    eigenvector's sign is fixed so that its largest-magnitude entry is positive (deterministic).
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or 0 in features.shape:
        got = tuple(features.shape) if hasattr(features, "shape") else type(features).__name__
        raise MetricError(f"{METRIC}: PCA needs features (F, C, h, w), got {got}")
    f, c, h, w = features.shape
    if c < components:
        raise MetricError(f"{METRIC}: PCA to {components} components needs at least {components} channels, "
                          f"got features {tuple(features.shape)}")
    tokens = features.detach().double().permute(0, 2, 3, 1).reshape(-1, c)
    if not torch.isfinite(tokens).all():
        raise MetricError(f"{METRIC}: features {tuple(features.shape)} contain NaN or inf")
    tokens = tokens - tokens.mean(0)
    _, vectors = torch.linalg.eigh(tokens.T @ tokens)         # ascending eigenvalues
    top = vectors[:, -components:].flip(1)                    # (C, components), largest first
    top = top * torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    proj = tokens @ top
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return proj.reshape(f, h, w, components).permute(0, 3, 1, 2).float().cpu()

"""FateZero's spatio-temporal self-attention (Qi et al. 2023; spec/EDITING.md, FateZero section).

The queries of frame n attend to the keys/values of a list of frames, each entry one of
    "first" -> 0,  "last" -> N-1,  "mid" -> (N-1)//2,  an integer r -> clip(n + r, 0, N-1),
concatenated on the token axis. `mode` chooses between the two published behaviours:
    "replace": only the listed frames (the released code: ['mid'] replaces the frame's own K/V),
    "concat":  the frame itself, then the listed frames (the paper: [own, mid]).
Layers narrower than `min_channels` (FateZero's editing configs: blocks with >= 640 channels use
['mid']) keep per-frame attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stem.core.errors import ConfigError, check_choice
from stem.inversion.attention import FrameContextAttnProcessor, SelfAttnProcessor, gather_frames

FRAME_NAMES = ("first", "last", "mid")
MODES = ("replace", "concat")


def fatezero_frames(num_frames: int, frames, mode: str = "replace") -> torch.Tensor:
    """(N, L) table: row n lists the frames whose keys/values frame n attends to."""
    check_choice("editing.attention_mode", mode, MODES)
    frames = list(frames)
    if not frames:
        raise ConfigError("editing.attention_frames is empty; use e.g. [mid] (or [] with mode=concat is 1-frame)")
    n = torch.arange(num_frames)
    columns = [n] if mode == "concat" else []
    for entry in frames:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)) or (
                isinstance(entry, str) and entry not in FRAME_NAMES):
            raise ConfigError(f"editing.attention_frames entry {entry!r}: use first, last, mid or an integer offset")
        if entry == "first":
            columns.append(torch.zeros_like(n))
        elif entry == "last":
            columns.append(torch.full_like(n, num_frames - 1))
        elif entry == "mid":
            columns.append(torch.full_like(n, (num_frames - 1) // 2))
        else:
            columns.append((n + entry).clamp(0, num_frames - 1))
    return torch.stack(columns, dim=1)


class SpatioTemporalAttnProcessor(SelfAttnProcessor):
    """attn1 where frame n attends to the frames of `fatezero_frames(N, frames, mode)[n]`."""

    def __init__(self, num_frames: int, frames=("mid",), mode: str = "replace"):
        super().__init__(num_frames)
        self.index = fatezero_frames(num_frames, frames, mode)

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(attn, x, "q", "k", "v")
        n = self.num_frames
        return F.scaled_dot_product_attention(q, gather_frames(k, self.index, n), gather_frames(v, self.index, n))


def layer_channels(unet, path: str) -> int:
    """Channels of the tokens an attention layer sees (its query dimension)."""
    return unet.get_submodule(path).to_q.in_features


def layer_frame_tables(unet, num_frames: int, frames=("mid",), mode: str = "replace", min_channels: int = 640):
    """attn1 module path -> its (N, L) frame table: `fatezero_frames(...)` in layers with at least
    `min_channels` channels, None (per-frame attention) in the narrower ones."""
    table = fatezero_frames(num_frames, frames, mode)  # validates now
    return lambda path: table if layer_channels(unet, path) >= min_channels else None


def spatio_temporal_processors(unet, num_frames: int, frames=("mid",), mode: str = "replace",
                               min_channels: int = 640):
    """Per-layer factory for `self_attention_processors(per_layer=...)`: spatio-temporal attention in
    layers with at least `min_channels` channels, per-frame attention in the others."""
    tables = layer_frame_tables(unet, num_frames, frames, mode, min_channels)

    def make(path: str):
        if tables(path) is not None:
            return SpatioTemporalAttnProcessor(num_frames, frames, mode)
        return FrameContextAttnProcessor(num_frames, "1frame")
    return make

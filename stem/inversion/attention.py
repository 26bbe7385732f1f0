"""Self-attention processors that choose which frames' keys/values each frame attends to.

Frames sit in the batch dimension: a UNet call on a video of N frames has batch G*N
(G = 1 for inversion, 2-3 for guided editing), ordered group-major. Processors are
installed on every `attn1` (self-attention) of the UNet through
`unet.set_attn_processor` (see `self_attention_processors`); cross-attention (`attn2`)
keeps diffusers' default processor.

Notation (paper Sec. 3 / Eq. 6): X^n are the tokens of frame n (S = h*w tokens of C
channels), Q = X^n W_Q, and K = [X^h; X^l; ...] W_K, V = [X^h; X^l; ...] W_V gather the
tokens of the context frames, so attention is softmax(Q K^T / sqrt(d)) V per head.

Contexts (spec/STEM.md section 2), frame indices 0-based:
- "1frame"   (Pix2Video/TokenFlow): each frame attends to itself.
- "2frame"   pairing "fatezero":   frames n and (N-1)//2 (the paper's l = round(N/2), 1-based);
             pairing "tuneavideo": frames 0 (first) and max(n-1, 0) (previous).
- "allframe": all N frames. Cost O((N S)^2) per layer; queries are processed in chunks of
  `query_chunk` tokens so the score matrix in memory is at most query_chunk x N*S.

Frame-sharded (`shard`, a `stem.distributed.sharding.FrameShard`): the processor holds frames
start .. stop - 1 of the N-frame video (frame indices above are those of the whole video) and
fetches the keys/values its context needs from the other processes:
- "1frame": nothing.
- "2frame" fatezero: the middle frame (N-1)//2, broadcast by the process holding it.
- "2frame" tuneavideo: frame 0, broadcast by the first process, and each process's last frame,
  all-gathered (one frame per process), for the previous frame across a slice boundary.
- "allframe": every frame's keys and values, all-gathered (slices padded to the longest); the
  local queries keep their chunking.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from stem.core.errors import ConfigError, check_choice, check_token_count
from stem.distributed.sharding import FrameShard

CONTEXTS = ("1frame", "2frame", "allframe")
PAIRINGS = ("fatezero", "tuneavideo")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, h*d) -> (B, h, S, d)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with SDPA, queries in chunks of `query_chunk` tokens (None: one call).

    Bounds the score matrix held at once to query_chunk x keys on any SDPA backend.
    """
    step = query_chunk or q.shape[2]
    if step >= q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v)
                      for i in range(0, q.shape[2], step)], dim=2)


class SelfAttnProcessor:
    """Base processor: input/output handling as diffusers' `AttnProcessor2_0`.

    Subclasses implement `attend(attn, x) -> (B, h, S, d)` on the (B, S, C) tokens `x` of a
    batch of B = G * N frames, using the module's projections `attn.to_q/to_k/to_v`.
    """

    def __init__(self, num_frames: int):
        if num_frames < 1:
            raise ConfigError(f"num_frames={num_frames} must be at least 1")
        self.num_frames = num_frames

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, attn, x: torch.Tensor, *names: str) -> list[torch.Tensor]:
        """The named projections ("q", "k", "v") of `x`, split into heads (with norm_q/norm_k)."""
        return project_heads(attn, x, None, *names)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is a self-attention processor (attn1): "
                             "it takes neither encoder_hidden_states nor attention_mask")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError(f"{type(self).__name__} supports transformer-block attention on (B, S, C) "
                             "tokens without spatial/group norm (as in SD's attn1)")
        batch, tokens, _ = hidden_states.shape
        if batch % self.num_frames:
            raise ValueError(f"batch {batch} is not a multiple of num_frames={self.num_frames}")
        return finish_attention(attn, self.attend(attn, hidden_states), hidden_states)


def project_heads(attn, x: torch.Tensor, context: torch.Tensor | None = None, *names: str) -> list[torch.Tensor]:
    """Projections of a diffusers Attention module split into heads (B, h, S, d), with norm_q/norm_k:
    "q" from `x`, "k" and "v" from `context` (cross-attention) or `x` (self-attention)."""
    out = []
    for name in names or ("q", "k", "v"):
        y = split_heads(getattr(attn, f"to_{name}")(x if name == "q" or context is None else context), attn.heads)
        norm = getattr(attn, f"norm_{name}", None)
        out.append(norm(y) if norm is not None else y)
    return out


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: (B, h, queries, keys), for processors that read or edit the maps."""
    return ((q.float() @ k.float().transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))).softmax(-1)


def finish_attention(attn, heads_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Head outputs (B, h, S, d) -> the module's output as diffusers computes it: output projection,
    dropout, residual connection and rescale."""
    out = heads_out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1).to(x.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def sharded(shard: FrameShard | None, num_frames: int) -> FrameShard | None:
    """The shard a processor for `num_frames` local frames works with: None for one process (then the
    processor runs its single-process code, bit for bit)."""
    if shard is None or not shard.dist.active:
        return None
    if shard.num_frames != num_frames:
        raise ConfigError(f"num_frames={num_frames} but this process holds {shard.num_frames} frames "
                          f"({shard.start}..{shard.stop - 1} of {shard.total}): pass the local frame count")
    return shard


def context_frames(num_frames: int, context: str, pairing: str = "fatezero") -> torch.Tensor | None:
    """Index table (N, k): row n lists the frames whose keys/values frame n attends to.

    None for "allframe" (every frame attends to all frames; no table needed).
    """
    n = torch.arange(num_frames)
    if context == "1frame":
        return n[:, None]
    if context == "allframe":
        return None
    if pairing == "fatezero":
        return torch.stack([n, torch.full_like(n, (num_frames - 1) // 2)], dim=1)
    return torch.stack([torch.zeros_like(n), (n - 1).clamp(min=0)], dim=1)  # tuneavideo


class FrameContextAttnProcessor(SelfAttnProcessor):
    """1-frame, 2-frame or all-frame self-attention for DDIM inversion (paper Eq. 6).

    `shard`: this process's frames of a frame-sharded video (module docstring); num_frames is then
    the local frame count. None (or a one-process shard): the whole video is here."""

    def __init__(self, num_frames: int, context: str = "1frame", pairing: str = "fatezero",
                 query_chunk: int | None = 2048, shard: FrameShard | None = None):
        super().__init__(num_frames)
        check_choice("context", context, CONTEXTS)
        check_choice("pairing", pairing, PAIRINGS)
        check_token_count("query_chunk", query_chunk)
        self.context, self.pairing, self.query_chunk = context, pairing, query_chunk
        self.index = context_frames(num_frames, context, pairing)
        self.shard = sharded(shard, num_frames)

    def attend(self, attn, x):
        q, k, v = self.project(attn, x, "q", "k", "v")
        batch, h, s, d = q.shape
        n = self.num_frames
        if self.context == "1frame":
            return F.scaled_dot_product_attention(q, k, v)
        if self.shard is not None:
            return self.attend_sharded(q, k, v)
        if self.context == "2frame":
            return F.scaled_dot_product_attention(q, gather_frames(k, self.index, n), gather_frames(v, self.index, n))
        # allframe: one sequence of N*S tokens per group; every query sees all of them
        out = chunked_attention(*(frames_to_tokens(y, n) for y in (q, k, v)), self.query_chunk)
        return tokens_to_frames(out, n)


    def attend_sharded(self, q, k, v):
        """2-frame / all-frame attention of this process's frames, with the other processes' keys/values."""
        sh, n = self.shard, self.num_frames
        kv = torch.stack([k, v]).unflatten(1, (-1, n))                 # (2, G, n, h, S, d) local frames
        if self.context == "allframe":
            kv = sh.dist.all_gather_slices(kv, sh.sizes, dim=2)           # (2, G, N, h, S, d)
            k_all, v_all = (y.flatten(0, 1) for y in kv)
            out = chunked_attention(frames_to_tokens(q, n), frames_to_tokens(k_all, sh.total),
                                    frames_to_tokens(v_all, sh.total), self.query_chunk)
            return tokens_to_frames(out, n)
        if self.pairing == "fatezero":                                  # [frame n, middle frame]
            mid = (sh.total - 1) // 2
            shared = kv[:, :, mid - sh.start] if sh.owner(mid) == sh.dist.rank else torch.zeros_like(kv[:, :, 0])
            shared = sh.dist.broadcast(shared.contiguous(), src=sh.owner(mid))
            first, second = kv, shared[:, :, None].expand_as(kv)
        else:                                                           # tuneavideo: [frame 0, frame n - 1]
            first = sh.dist.broadcast(kv[:, :, 0].contiguous(), src=0)[:, :, None].expand_as(kv)
            last = sh.dist.all_gather(kv[:, :, -1].contiguous())          # every process's last frame
            before = last[sh.dist.rank - 1] if sh.dist.rank else kv[:, :, 0]   # frame start - 1 (or frame 0 itself)
            second = torch.cat([before[:, :, None], kv[:, :, :-1]], 2)
        k2, v2 = (torch.cat([a, b], dim=-2).flatten(0, 1) for a, b in zip(first, second, strict=True))
        return F.scaled_dot_product_attention(q, k2, v2)


def gather_frames(y: torch.Tensor, index: torch.Tensor, frames: int) -> torch.Tensor:
    """Keys/values of the context frames: (G*N, h, S, d) with an (N, L) index table -> (G*N, h, L*S, d),
    row n holding the tokens of frames index[n, 0], ..., index[n, L-1] one after the other."""
    b, h, s, d = y.shape
    y = y.view(b // frames, frames, h, s, d)[:, index.to(y.device)]  # (G, N, L, h, S, d)
    return y.permute(0, 1, 3, 2, 4, 5).reshape(b, h, -1, d)


def frames_to_tokens(y: torch.Tensor, frames: int) -> torch.Tensor:
    """(G*F, h, S, d) -> (G, h, F*S, d): the tokens of F consecutive frames as one sequence."""
    b, h, s, d = y.shape
    return y.view(b // frames, frames, h, s, d).transpose(1, 2).reshape(b // frames, h, frames * s, d)


def tokens_to_frames(y: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of `frames_to_tokens`: (G, h, F*S, d) -> (G*F, h, S, d)."""
    g, h, t, d = y.shape
    return y.view(g, h, frames, t // frames, d).transpose(1, 2).reshape(g * frames, h, t // frames, d)


@contextlib.contextmanager
def self_attention_processors(unet, processor=None, *, per_layer=None, cross_per_layer=None) -> Iterator[None]:
    """Install `processor` on every `attn1` of `unet` for the duration of the block.

    Or `per_layer(path)`: a function of the attention module's path (e.g.
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1") returning one processor per layer.
    A `processor` with a `for_layer(path)` method (STEM's, which records per layer) is installed
    as `processor.for_layer(path)` on each layer.
    Cross-attention processors are left as they are, unless `cross_per_layer(path)` returns one
    for an `attn2` (None keeps it). All processors are restored on exit.
    """
    if (processor is None) == (per_layer is None):
        raise ValueError("self_attention_processors: give either processor or per_layer")
    original = dict(unet.attn_processors)
    per_layer = per_layer or getattr(processor, "for_layer", None) or (lambda name: processor)
    cross = cross_per_layer or (lambda name: None)

    def choose(name, proc):
        path = name.removesuffix(".processor")
        return per_layer(path) if ".attn1." in name else (cross(path) or proc)

    unet.set_attn_processor({name: choose(name, proc) for name, proc in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)

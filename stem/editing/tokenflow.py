"""TokenFlow editing, plug-and-play variant (Geyer et al. 2024), on any inversion (spec/EDITING.md).

`python run.py editing=tokenflow inversion=ddim_1frame` is "TokenFlow"; with `inversion=stem`
(or `stem_official`) it is the paper's "STEM-TokenFlow": the editing is the same, only the
inverted latents differ (STEM self-attention is used in inversion, not in editing).

Notation (N frames, chunk size B = `batch_size`, S tokens per frame in a layer, D channels):
    chunk c        frames [c B, min((c+1) B, N)), c = 0..C-1; the last may be shorter (edited too)
    k_c            the keyframe of chunk c: a frame drawn uniformly in the chunk at every step
    branches       0 source (z_t^inv, source prompt), 1 uncond (x_t, negative prompt), 2 cond (x_t, target)
    X^b_n          input of an attn1 (the block's norm1 output) for frame n of branch b, (S, D)
    O^b_n          output of that attn1 (after to_out), (S, D)

Per DDIM step t (eps from the uncond/cond branches with guidance g; the source branch, on the
inverted latent z_t^inv saved at the same timestep t, only feeds the injections and the nearest
neighbours):
 1. Pivot pass on the C keyframes: in every attn1, the queries of keyframe k_c of the uncond and
    cond branches (b = 1, 2) attend to the keys/values of all C keyframes of branch b (extended
    attention); the source branch (b = 0) attends per frame, each keyframe to itself, as released.
    Each layer caches X^0_{k_c} (C x S x D) and O^b_{k_c} (3 x C x S x D): sized by the keyframes, not by N.
 2. Chunk passes: for the frames n of chunk c, attn1 is not computed. Each token p takes
    O^b_{k_c}[q*] with q* = argmax_q cos(X^0_n[p], X^0_{k_c}[q]) (nearest neighbour in the source
    branch, the same index for all branches), and for c > 0 blends it with the same from k_{c-1}:
        O = w O(k_c) + (1 - w) O(k_{c-1}),   w = sigmoid(d_{c-1} / (d_c + d_{c-1})),
    d_j = |n - m_j|, m_j = the first frame of chunk j + (its length // 2) (as released).
 3. Plug-and-play injection (Tumanyan et al. 2023) from branch 0 into branches 1 and 2: Q and K of
    the attn1 layers in `qk_layers` during the first `pnp_attn_t` of the steps (this happens in the
    pivot pass, the only one that computes attention), and the residual-branch output (conv2,
    before the shortcut is added) of the resnets in `conv_layers` during the first `pnp_f_t`.

Everything is injected through `unet.set_attn_processor` (attn1) and forward hooks (conv2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stem.core.errors import ConfigError, check_choice, check_number, check_token_count
from stem.diffusion.ddim import Trajectory, ddim_sample_with
from stem.editing.base import DEFAULT_NEGATIVE, Editor, Prompts, check_fraction, editing_indices, guided, start_latents
from stem.inversion.attention import (
    SelfAttnProcessor,
    chunked_attention,
    frames_to_tokens,
    self_attention_processors,
    tokens_to_frames,
)

BRANCHES = 3  # source, uncond, cond
# the released layer choices: up_blocks[1].attentions[1:], up_blocks[2..3].attentions[*]; up_blocks[1].resnets[1]
QK_LAYERS = ("up_blocks.1.attentions.1", "up_blocks.1.attentions.2", "up_blocks.2.attentions.0",
             "up_blocks.2.attentions.1", "up_blocks.2.attentions.2", "up_blocks.3.attentions.0",
             "up_blocks.3.attentions.1", "up_blocks.3.attentions.2")
CONV_LAYERS = ("up_blocks.1.resnets.1",)
MODES = ("pivot", "propagate", "plain")


def chunk_spans(num_frames: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive chunks of `batch_size` frames; the last one may be shorter."""
    return [(a, min(a + batch_size, num_frames)) for a in range(0, num_frames, batch_size)]


def draw_keyframes(chunks: list[tuple[int, int]], generator: torch.Generator) -> torch.Tensor:
    """One frame per chunk, uniform within the chunk (CPU generator, so any device draws alike)."""
    return torch.stack([a + torch.randint(b - a, (), generator=generator) for a, b in chunks])


def blend_weights(chunks: list[tuple[int, int]], c: int) -> torch.Tensor:
    """w for the frames of chunk c > 0: the weight of keyframe k_c against k_{c-1} (step 2 above)."""
    (a, b), (pa, pb) = chunks[c], chunks[c - 1]
    n = torch.arange(a, b, dtype=torch.float32)
    d_cur, d_prev = (n - (a + (b - a) // 2)).abs(), (n - (pa + (pb - pa) // 2)).abs()
    return torch.sigmoid(d_prev / (d_cur + d_prev))


def nearest_tokens(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(F, S) index of the most cosine-similar row of `keys` (S', D) for every token of `x` (F, S, D).

    One frame at a time: the similarity matrix held is S x S', whatever F is.
    """
    keys = F.normalize(keys, dim=-1)
    return torch.stack([(F.normalize(frame, dim=-1) @ keys.T).argmax(-1) for frame in x])


@dataclass
class TokenFlowState:
    """What the processors and hooks of one edit need to know about the current UNet call."""

    chunks: list[tuple[int, int]]
    mode: str = "plain"        # pivot (keyframes) | propagate (chunk `chunk`) | plain (per-frame attention)
    chunk: int = 0
    inject_qk: bool = False    # this step is within the first pnp_attn_t
    inject_conv: bool = False  # this step is within the first pnp_f_t
    cache_bytes: dict = field(default_factory=dict)  # layer -> bytes of its keyframe cache (for memory reports)


class TokenFlowAttnProcessor(SelfAttnProcessor):
    """attn1 of one layer: extended keyframe attention (pivot), propagation (chunks), or per-frame (plain)."""

    def __init__(self, state: TokenFlowState, layer: str, inject_qk: bool, query_chunk: int | None = 65536):
        super().__init__(num_frames=1)
        self.state, self.layer, self.inject_qk, self.query_chunk = state, layer, inject_qk, query_chunk
        self.kf_in: torch.Tensor | None = None    # (C, S, D) source-branch attn1 input of the keyframes
        self.kf_out: torch.Tensor | None = None   # (3, C, S, D) attn1 output of the keyframes, every branch

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mode = self.state.mode
        if hidden_states.ndim != 3 or hidden_states.shape[0] % BRANCHES:
            raise ValueError(f"TokenFlow attn1 {self.layer}: expected (3 * frames, S, D) tokens of the "
                             f"source/uncond/cond branches, got {tuple(hidden_states.shape)}")
        if mode == "propagate":
            return self.propagate(hidden_states)
        out = super().__call__(attn, hidden_states, *args, **kwargs)
        if mode == "pivot":
            c = hidden_states.shape[0] // BRANCHES
            self.kf_in = hidden_states[:c].detach()
            self.kf_out = out.detach().view(BRANCHES, c, *out.shape[1:])
            self.state.cache_bytes[self.layer] = (self.kf_in.numel() + self.kf_out.numel()) * out.element_size()
        return out

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(attn, x, "q", "k", "v")
        b = x.shape[0] // BRANCHES
        if self.inject_qk and self.state.inject_qk:  # PnP: uncond and cond take the source's Q and K
            q, k = (y[:b].repeat(BRANCHES, 1, 1, 1) for y in (q, k))
        if self.state.mode == "plain":
            return F.scaled_dot_product_attention(q, k, v)
        # pivot: the source branch attends per keyframe (each to itself); for uncond and cond, the b keyframes'
        # tokens of the branch form one sequence every keyframe query of that branch sees (extended attention)
        source = F.scaled_dot_product_attention(q[:b], k[:b], v[:b])
        guided_out = chunked_attention(*(frames_to_tokens(y[b:], b) for y in (q, k, v)), self.query_chunk)
        return torch.cat([source, tokens_to_frames(guided_out, b)])

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk pass: each token takes the cached keyframe output at its nearest source-branch token."""
        if self.kf_in is None:
            raise RuntimeError(f"TokenFlow attn1 {self.layer}: propagation before any pivot pass")
        c, b = self.state.chunk, x.shape[0] // BRANCHES
        src = x[:b]

        def from_keyframe(j: int) -> torch.Tensor:  # (3, b, S, D)
            return self.kf_out[:, j][:, nearest_tokens(src, self.kf_in[j])]

        out = from_keyframe(c)
        if c > 0:
            w = blend_weights(self.state.chunks, c).to(out.device, out.dtype)[None, :, None, None]
            out = w * out + (1 - w) * from_keyframe(c - 1)
        return out.reshape(x.shape)


@contextlib.contextmanager
def conv_injection(unet, layers, state: TokenFlowState):
    """Forward hooks on `<layer>.conv2`: while `state.inject_conv`, uncond and cond take the source's output."""
    def hook(module, args, output):
        if not state.inject_conv:
            return None
        b = output.shape[0] // BRANCHES
        return output[:b].repeat(BRANCHES, 1, 1, 1)

    handles = [unet.get_submodule(f"{layer}.conv2").register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TokenFlowEditor(Editor):
    """TokenFlow (PnP) editing of a video from its inverted trajectory.

    Args:
        prompt: target prompt; None edits towards the source prompt ("TokenFlow reconstruction", Figs. 4/10).
        negative_prompt, guidance_scale (7.5), num_steps (50; the inversion's, or a subset of its timesteps),
        seed, freeu (None: off), freeu_sites ("release" | "diffusers"): see `Editor`.
        batch_size: frames per chunk, one keyframe each (8, as released).
        pnp_attn_t: fraction of the steps with Q/K injection (0.5); pnp_f_t: with conv injection (0.8).
        start_from: "renoise" (as released) or "inverted" (start from the inverted z_T).
        propagate: False disables keyframes and propagation (per-frame attention; for tests and ablations).
        qk_layers, conv_layers: attention blocks / resnets that receive the injections (released defaults).
        query_chunk: query tokens per extended-attention call (memory bound; results unchanged).
    """

    name = "TokenFlow"

    def __init__(self, prompt: str | None = None, negative_prompt: str = DEFAULT_NEGATIVE,
                 guidance_scale: float = 7.5, num_steps: int = 50, batch_size: int = 8, pnp_attn_t: float = 0.5,
                 pnp_f_t: float = 0.8, start_from: str = "renoise", seed: int = 0, propagate: bool = True,
                 qk_layers=QK_LAYERS, conv_layers=CONV_LAYERS, query_chunk: int | None = 65536,
                 freeu: dict | None = None,
                 freeu_sites: str = "release"):
        super().__init__(prompt, negative_prompt, guidance_scale, num_steps, seed, freeu, freeu_sites)
        check_number("editing.batch_size", batch_size, low=1, integer=True, fix="frames per chunk (released: 8)")
        for name, value in (("pnp_attn_t", pnp_attn_t), ("pnp_f_t", pnp_f_t)):
            check_fraction(name, value)
        check_choice("editing.start_from", start_from, ("renoise", "inverted"))
        check_token_count("editing.query_chunk", query_chunk)
        self.batch_size, self.pnp_attn_t, self.pnp_f_t = batch_size, pnp_attn_t, pnp_f_t
        self.start_from, self.propagate, self.query_chunk = start_from, bool(propagate), query_chunk
        self.qk_layers, self.conv_layers = tuple(qk_layers), tuple(conv_layers)

    def settings(self) -> dict:
        return {**super().settings(), "batch_size": self.batch_size, "pnp_attn_t": self.pnp_attn_t,
                "pnp_f_t": self.pnp_f_t, "start_from": self.start_from, "propagate": self.propagate,
                "qk_layers": list(self.qk_layers), "conv_layers": list(self.conv_layers)}

    def check_layers(self, unet) -> None:
        """ConfigError naming any configured layer the UNet does not have."""
        modules = dict(unet.named_modules())
        attn = sorted({n.rsplit(".transformer_blocks", 1)[0] for n in modules if n.endswith(".attn1")})
        for name, layers, ok in (("qk_layers", self.qk_layers, lambda la: la in attn),
                                 ("conv_layers", self.conv_layers, lambda la: f"{la}.conv2" in modules)):
            bad = [la for la in layers if not ok(la)]
            if bad:
                known = attn if name == "qk_layers" else sorted(n[:-6] for n in modules if n.endswith(".conv2"))
                raise ConfigError(f"editing.{name}: {bad} not in the UNet; choose from {known}")

    def processors(self, state: TokenFlowState):
        """The per-layer attn1 processor factory for `self_attention_processors(per_layer=...)`."""
        def make(path: str) -> TokenFlowAttnProcessor:
            inject = any(path.startswith(f"{layer}.") for layer in self.qk_layers)
            return TokenFlowAttnProcessor(state, path, inject, self.query_chunk)
        return make

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed=None) -> tuple[torch.Tensor, dict]:
        unet, steps = model.unet, self.num_steps
        self.check_layers(unet)
        n = trajectory.latents.shape[1]
        state = TokenFlowState(chunk_spans(n, self.batch_size))
        generator = torch.Generator().manual_seed(self.seed)
        qk_steps, conv_steps = int(steps * self.pnp_attn_t), int(steps * self.pnp_f_t)  # as released: int(T * p)
        keyframes: list[list[int]] = []
        source_index = editing_indices(model.scheduler, trajectory, steps)  # step i -> z^inv at its timestep

        def unet_call(src: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = len(z)
            emb = torch.cat([e.expand(b, -1, -1) for e in (prompts.source, prompts.negative, prompts.target)])
            return unet(torch.cat([src, z, z]), t, encoder_hidden_states=emb).sample

        def eps_fn(z: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            state.inject_qk, state.inject_conv = i < qk_steps, i < conv_steps
            src = trajectory.latents[source_index[i]].to(z.device, z.dtype)
            if self.propagate:
                keys = draw_keyframes(state.chunks, generator)
                keyframes.append(keys.tolist())
                state.mode = "pivot"
                unet_call(src[keys.to(z.device)], z[keys.to(z.device)], t)  # fills the keyframe caches
                state.mode = "propagate"
            else:
                state.mode = "plain"
            eps = torch.empty_like(z)
            for c, (a, b) in enumerate(state.chunks):
                state.chunk = c
                _, eps_uncond, eps_cond = unet_call(src[a:b], z[a:b], t).chunk(BRANCHES)
                eps[a:b] = guided(eps_uncond, eps_cond, self.guidance_scale)
            return eps

        x = start_latents(model.scheduler, trajectory, steps, self.start_from)
        with self_attention_processors(unet, per_layer=self.processors(state)), \
                conv_injection(unet, self.conv_layers, state):
            latents = ddim_sample_with(eps_fn, x, model.scheduler, steps, progress=progress, desc="TokenFlow editing")
        return latents, {"keyframes": keyframes, "chunks": state.chunks,
                         "keyframe_cache_bytes": sum(state.cache_bytes.values())}

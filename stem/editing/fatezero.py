"""FateZero editing with attention fusion (Qi et al. 2023) on any inversion (spec/EDITING.md).

`python run.py editing=fatezero inversion=fatezero` is "FateZero"; `editing=stem_fatezero
inversion=stem` is the paper's "STEM-FateZero" (STEM latents and the attention maps recorded
during STEM inversion, appendix D's fusion ranges); `editing=fatezero_reconstruct` is the
"FateZero reconstruction" fashion of Figs. 4/10.

Notation (N frames; T steps; editing step j = 0..T-1 runs at timestep t_j, descending):
    A_src(t)   attention probabilities recorded while inverting at timestep t (stem.editing.attention_store),
               self-attention in the editing layout (FateZero's spatio-temporal frame list), cross over 77 tokens
    A_edit     the editing pass's own probabilities, conditional branch (the unconditional branch is
               never fused: P2P's convention)
    M          blend mask (N, 1, h, w) in {0, 1} from `blend_words`, or none

Per step j (classifier-free guidance g, unconditional prompt `negative_prompt`, "" as released):
    cross-attention, j < cross_replace_steps * T:
        replace: A = A_src Mapper;  refine: A = A_src[..., mapper] a + A_edit (1 - a)   (stem.editing.p2p)
        then reweight: A[..., word] *= scale
    self-attention, j < self_replace_steps * T:
        A = M A_edit + (1 - M) A_src   (A = A_src without a mask)
    eps = eps_u + g (eps_c - eps_u);  x <- DDIM step
    latent blend (optional): x = z_inv(t_{j+1}) + M (x - z_inv(t_{j+1}))
Blend mask at step j: the recorded cross-attention of the source prompt's `blend_words` tokens in
the layers at 1/32 of the image size (the five 16x16 layers at 512^2), summed over the words,
averaged over heads and layers, 3x3 max-pooled, resized to the latent, divided by its per-frame
maximum, and thresholded: M = [value >= blend_threshold].

Editing starts from the inverted z_T. Attention behaviour goes through `unet.set_attn_processor`;
the optional clip-level GroupNorm (statistics over all frames, as FateZero's pseudo-3D UNet) through
forward hooks on every GroupNorm, active in the inversion (part of its cache key) and in the edit.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from stem.attention import (
    attention_probabilities,
    finish_attention,
    gather_frames,
    project_heads,
    self_attention_processors,
)
from stem.ddim import Trajectory, ddim_sample_with
from stem.editing.attention_store import AttentionRecorder, AttentionStore, stored_layers
from stem.editing.base import Editor, Observers, Prompts, guided
from stem.editing.p2p import refine_mapper, replace_mapper, reweight_equalizer, word_tokens
from stem.errors import ConfigError, check_choice
from stem.fatezero_attention import fatezero_frames, layer_frame_tables, spatio_temporal_processors

CROSS_EDITS = ("refine", "replace")
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class FusionState:
    """What the fusion processors need at the current editing step."""

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}   # recorded maps at this step's timestep
        self.self_on = self.cross_on = False
        self.mask: torch.Tensor | None = None      # (N, 1, h, w) latent-size blend mask
        self.cross_edit = None                     # callable (A_src, A_edit) -> A


class FusionAttnProcessor:
    """attn1 or attn2 of a recorded layer: FateZero's fusion of the conditional branch with A_src."""

    def __init__(self, key: str, state: FusionState, num_frames: int, frame_table: torch.Tensor | None = None,
                 grid: tuple[int, int] | None = None):
        self.key, self.state, self.num_frames, self.table, self.grid = key, state, num_frames, frame_table, grid
        self.cross = key.endswith("attn2")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x = hidden_states
        q, k, v = project_heads(attn, x, encoder_hidden_states if self.cross else None)
        if not self.cross and self.table is not None:
            k, v = gather_frames(k, self.table, self.num_frames), gather_frames(v, self.table, self.num_frames)
        on = self.state.cross_on if self.cross else self.state.self_on
        if not on:
            return finish_attention(attn, F.scaled_dot_product_attention(q, k, v), x)
        b = x.shape[0] - self.num_frames  # the conditional branch is the last N of the batch
        uncond = F.scaled_dot_product_attention(q[:b], k[:b], v[:b])
        src = self.state.maps[self.key].to(q.device, torch.float32)
        edit = attention_probabilities(q[b:], k[b:])
        if self.cross:
            probs = self.state.cross_edit(src, edit)
        elif self.state.mask is not None:
            m = F.interpolate(self.state.mask, size=self.grid, mode="nearest").flatten(1)[:, None, :, None]
            probs = m * edit + (1 - m) * src
        else:
            probs = src
        cond = (probs @ v[b:].float()).to(v.dtype)
        return finish_attention(attn, torch.cat([uncond, cond]), x)


@contextlib.contextmanager
def clip_groupnorm(unet, num_frames: int):
    """Forward hooks making every GroupNorm pool its statistics over the N frames of each batch group."""
    def hook(module, args, output):
        x = args[0]
        if x.ndim != 4 or x.shape[0] % num_frames:
            return None
        g, c, h, w = x.shape[0] // num_frames, *x.shape[1:]
        clip = x.view(g, num_frames, c, h, w).transpose(1, 2).reshape(g, c, num_frames * h, w)
        out = F.group_norm(clip, module.num_groups, module.weight, module.bias, module.eps)
        return out.view(g, c, num_frames, h, w).transpose(1, 2).reshape(x.shape)

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def blend_mask(maps: dict, keys: list[str], grids: dict, tokens: list[int], latent_hw: tuple[int, int],
               threshold: float) -> torch.Tensor:
    """(N, 1, h, w) float mask in {0, 1} from the recorded cross-attention of `tokens` (module docstring)."""
    acc = None
    for key in keys:
        a = maps[key].float()[..., tokens].sum(-1).mean(1)  # (N, q)
        a = a.view(a.shape[0], 1, *grids[key])
        acc = a if acc is None else acc + a
    acc = F.max_pool2d(acc / len(keys), 3, stride=1, padding=1)
    acc = F.interpolate(acc, size=latent_hw, mode="bilinear", align_corners=False)
    acc = acc / acc.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return (acc >= threshold).float()


class FateZeroEditor(Editor):
    """FateZero editing with attention fusion, from the inverted latents and the maps recorded meanwhile.

    Args:
        prompt: target prompt; None edits towards the source prompt (reconstruction fashion).
        negative_prompt: the unconditional prompt ("" as released). guidance_scale 7.5. num_steps: the inversion's.
        cross_edit: "refine" (any prompts; own word alignment) or "replace" (same word count).
        cross_replace_steps, self_replace_steps: fractions of the steps (from the start) with fusion.
        reweight: {target word: scale} applied to the fused cross-attention (e.g. {"watercolor": 10}).
        blend_words: source-prompt words whose cross-attention makes the blend mask (None: no mask).
        blend_threshold: mask threshold on the per-frame-normalised map (0.3). latent_blend: also blend latents.
        attention_frames, attention_mode, min_channels: FateZero's spatio-temporal self-attention
            (`stem.fatezero_attention`) of the editing pass, and the layout of the recorded self maps.
        store_max_tokens: record the layers whose query length is at most this (32x32, as released at 512^2).
        attention_store: "memory" or "disk" (a temporary folder under `store_dir`, removed after the run).
        store_budget_gib: refuse (with the ways out) a store larger than this. store_dtype: of the maps.
        clip_groupnorm: GroupNorm statistics over all frames (FateZero's pseudo-3D UNet); off = stock per frame.
    """

    name = "FateZero"

    def __init__(self, prompt: str | None = None, negative_prompt: str = "", guidance_scale: float = 7.5,
                 num_steps: int = 50, seed: int = 0, cross_edit: str = "refine", cross_replace_steps: float = 0.8,
                 self_replace_steps: float = 0.8, reweight: dict | None = None, blend_words=None,
                 blend_threshold: float = 0.3, latent_blend: bool = False, attention_frames=("mid",),
                 attention_mode: str = "replace", min_channels: int = 640, store_max_tokens: int = 1024,
                 attention_store: str = "memory", store_dir: str | None = None, store_budget_gib: float = 16.0,
                 store_dtype: str = "float16", clip_groupnorm: bool = False):
        super().__init__(prompt, negative_prompt, guidance_scale, num_steps, seed)
        check_choice("editing.cross_edit", cross_edit, CROSS_EDITS)
        check_choice("editing.attention_store", attention_store, ("memory", "disk"))
        check_choice("editing.store_dtype", store_dtype, tuple(DTYPES))
        for name, value in (("cross_replace_steps", cross_replace_steps), ("self_replace_steps", self_replace_steps)):
            if not 0 <= value <= 1:
                raise ConfigError(f"editing.{name}={value} must be a fraction of the steps in [0, 1]")
        if store_max_tokens < 1:
            raise ConfigError(f"editing.store_max_tokens={store_max_tokens} must be at least 1")
        if latent_blend and not blend_words:
            raise ConfigError("editing.latent_blend needs editing.blend_words (the words whose region is edited)")
        fatezero_frames(2, attention_frames, attention_mode)  # validates the frame list now
        self.cross_edit, self.cross_replace_steps, self.self_replace_steps = cross_edit, cross_replace_steps, \
            self_replace_steps
        self.reweight, self.blend_words = dict(reweight or {}), list(blend_words or [])
        self.blend_threshold, self.latent_blend = float(blend_threshold), bool(latent_blend)
        self.attention_frames, self.attention_mode, self.min_channels = list(attention_frames), attention_mode, \
            min_channels
        self.store_max_tokens, self.attention_store, self.store_dir = store_max_tokens, attention_store, store_dir
        self.store_budget_gib, self.store_dtype, self.clip_groupnorm = store_budget_gib, store_dtype, clip_groupnorm

    def settings(self) -> dict:
        return {**super().settings(), "cross_edit": self.cross_edit, "cross_replace_steps": self.cross_replace_steps,
                "self_replace_steps": self.self_replace_steps, "reweight": self.reweight,
                "blend_words": self.blend_words, "blend_threshold": self.blend_threshold,
                "latent_blend": self.latent_blend, "attention_frames": self.attention_frames,
                "attention_mode": self.attention_mode, "min_channels": self.min_channels,
                "store_max_tokens": self.store_max_tokens, "attention_store": self.attention_store,
                "clip_groupnorm": self.clip_groupnorm}

    # ---- inversion side --------------------------------------------------------------------
    def frame_table(self, unet, num_frames: int):
        """Block path -> the (N, L) frame table of its editing self-attention (None: per frame)."""
        tables = layer_frame_tables(unet, num_frames, self.attention_frames, self.attention_mode, self.min_channels)
        return lambda block: tables(f"{block}.attn1")

    def inversion_observer(self, model, num_frames: int, latent_hw: tuple[int, int]):
        layers = stored_layers(model.unet, latent_hw, self.store_max_tokens)
        if not layers:
            raise ConfigError(f"editing.store_max_tokens={self.store_max_tokens} selects no attention layer "
                              f"for latents of {latent_hw[0]}x{latent_hw[1]}; raise it")
        store = AttentionStore(self.attention_store, self.store_dir, self.store_budget_gib)
        recorder = AttentionRecorder(model.unet, store, layers, self.frame_table(model.unet, num_frames),
                                     DTYPES[self.store_dtype])
        try:
            store.check_size(recorder.size_bytes(num_frames, self.num_steps),
                             f"{len(layers)} layers x 2 kinds x {self.num_steps} steps x {num_frames} frames")
        except ConfigError:
            store.close()
            raise
        if not self.clip_groupnorm:
            return recorder
        return Observers([clip_groupnorm(model.unet, num_frames), recorder])  # GroupNorm hooks first

    def inversion_key(self) -> dict | None:
        return {"groupnorm": "clip"} if self.clip_groupnorm else None

    # ---- editing -----------------------------------------------------------------------------
    def _cross_edit(self, tokenizer, source: str, target: str):
        if self.cross_edit == "replace":
            mapper = replace_mapper(tokenizer, source, target)
            edit = lambda src, own: src @ mapper.to(src.device, src.dtype)  # noqa: E731
        else:
            index, alphas = refine_mapper(tokenizer, source, target)

            def edit(src, own):
                a = alphas.to(src.device, src.dtype)
                return src[..., index.to(src.device)] * a + own * (1 - a)
        if not self.reweight:
            return edit
        scale = reweight_equalizer(tokenizer, target, self.reweight)
        return lambda src, own: edit(src, own) * scale.to(src.device, src.dtype)

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed=None) -> tuple[torch.Tensor, dict]:
        recorder = observed.find(AttentionRecorder) if isinstance(observed, Observers) else observed
        if not isinstance(recorder, AttentionRecorder):
            raise ConfigError("FateZero needs the attention maps of the inversion: edit through "
                              "stem.editing.pipeline.edit_video (or enter editor.inversion_observer(...) "
                              "around the inversion and pass it as observed=)")
        unet, steps, n = model.unet, self.num_steps, trajectory.latents.shape[1]
        latent_hw = tuple(trajectory.latents.shape[-2:])
        source = prompts.source_text
        tokenizer = model.tokenizer
        state = FusionState()
        state.cross_edit = self._cross_edit(tokenizer, source, prompts.target_text)
        tables = self.frame_table(unet, n)
        blend_keys, blend_tokens = [], []
        if self.blend_words:
            small = (math.ceil(latent_hw[0] / 4), math.ceil(latent_hw[1] / 4))
            blend_keys = [f"{b}.attn2" for b, grid in recorder.layers.items() if grid == small]
            if not blend_keys:
                raise ConfigError(f"editing.blend_words: no recorded cross-attention layer at {small[0]}x{small[1]} "
                                  "(1/32 of the frame); raise editing.store_max_tokens")
            blend_tokens = word_tokens(tokenizer, source, self.blend_words)
        grids = {f"{b}.attn2": g for b, g in recorder.layers.items()}
        cross_steps, self_steps = int(steps * self.cross_replace_steps), int(steps * self.self_replace_steps)
        timesteps = trajectory.timesteps.flip(0).tolist()
        masks: list[float] = []

        def eps_fn(z: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            state.cross_on, state.self_on = i < cross_steps, i < self_steps
            state.maps = recorder.store.step(int(t), device=z.device) if (state.cross_on or state.self_on
                                                                            or blend_keys) else {}
            state.mask = blend_mask(state.maps, blend_keys, grids, blend_tokens, latent_hw, self.blend_threshold) \
                if blend_keys else None
            if state.mask is not None:
                masks.append(float(state.mask.mean()))
            b = len(z)
            emb = torch.cat([prompts.negative.expand(b, -1, -1), prompts.target.expand(b, -1, -1)])
            eps_uncond, eps_cond = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            return guided(eps_uncond, eps_cond, self.guidance_scale)

        def after_step(z: torch.Tensor, i: int) -> torch.Tensor:
            if not (self.latent_blend and state.mask is not None):
                return z
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            z_inv = trajectory.at(t_next).to(z.device, z.dtype)
            m = state.mask.to(z.dtype)
            return z_inv + m * (z - z_inv)

        unrecorded = spatio_temporal_processors(unet, n, self.attention_frames, self.attention_mode,
                                                self.min_channels)

        def per_layer(path: str):
            block = path.removesuffix(".attn1")
            if block in recorder.layers:
                return FusionAttnProcessor(path, state, n, tables(block), recorder.layers[block])
            return unrecorded(path)

        def cross_per_layer(path: str):
            block = path.removesuffix(".attn2")
            return FusionAttnProcessor(path, state, n) if block in recorder.layers else None

        with contextlib.ExitStack() as stack:
            stack.enter_context(self_attention_processors(unet, per_layer=per_layer, cross_per_layer=cross_per_layer))
            if self.clip_groupnorm:
                stack.enter_context(clip_groupnorm(unet, n))
            latents = ddim_sample_with(eps_fn, trajectory.latents[-1].clone(), model.scheduler, steps,
                                       progress=progress, desc="FateZero editing", after_step=after_step)
        return latents, {"recorded_layers": sorted(recorder.layers), "recorded_timesteps": recorder.store.timesteps(),
                         "mask_fraction_per_step": masks}

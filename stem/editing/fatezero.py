"""FateZero editing with attention fusion (Qi et al. 2023) on any inversion (spec/EDITING.md).

`python run.py editing=fatezero_paper` is the "FateZero" of paper Table 2 (appendix D: its own
inversion, cross- and self-attention fusion for t in [0.5T, T]); `editing=fatezero` is the released
teaser setting (0.8 / 0.8); `editing=stem_fatezero` / `stem_fatezero_smaller` are the two readings
of appendix D's "STEM-FateZero" (STEM latents and the maps recorded during STEM inversion);
`editing=fatezero_reconstruct` is the "FateZero reconstruction" fashion of Figs. 4/10.

Notation (N frames; T editing steps; step j = 0..T-1 runs at timestep t_j, descending):
    A_src(t)   attention probabilities recorded while inverting, at the UNet call of timestep t
               (stem.editing.attention_store; looked up by the timestep's value), self-attention in the
               editing layout (FateZero's spatio-temporal frame list), cross over 77 tokens
    A_edit     the editing pass's own probabilities, conditional branch (the unconditional branch is
               never fused: P2P's convention)
    M_g        blend mask (N, 1, g_h, g_w) in {0, 1} at a layer's token grid g, from `blend_words`

Per step j (classifier-free guidance g, unconditional prompt `negative_prompt`, "" as released; with
g = 1 only the conditional branch is computed):
    cross-attention, j < int(cross_replace_steps * (T + 1)) (as released: prompt-to-prompt's per-step
    weights have T + 1 rows, so at T = 5, 0.5 fuses 3 steps; at T = 50 the same as int(p T) for 0.2/0.5/0.8):
        replace: A = A_src Mapper;  refine: A = A_src[..., mapper] a + A_edit (1 - a)   (stem.editing.p2p)
        then reweight: A[..., word] *= scale
    self-attention, j < int(self_replace_steps * T) (as released):
        A = M_g A_edit + (1 - M_g) A_src   (A = A_src without blend words)
    eps = eps_u + g (eps_c - eps_u);  x <- DDIM step from t_j to t_{j+1}
    latent blend (optional), after step j when int(s T) < j + 1 < int(e T), (s, e) = latent_blend_steps
    (0.2, 0.8 as released: steps 10..38 of 50):
        x = z_ref + M (x - z_ref),   z_ref = z_inv(t_j) (released, "step_start") or z_inv(t_{j+1}) ("step_end")
Blend maps (as released): S = the cross-attention of the blend-word tokens in the layers at 1/32 of the
image size (the five 16x16 layers at 512^2), summed over the words, averaged over heads and layers,
3x3 max-pooled. A mask at grid g: S resized straight to g (nearest), divided by its per-frame maximum,
M_g = [value > blend_threshold].
    self-attention mask: S of A_src(t_j) and the source prompt's blend words, at each layer's grid;
    latent mask ("source_or_edit", released): M_src OR M_edit at the latent size, M_edit from S of the
        edit's own A_edit summed over steps 0..j and the target prompt's blend words; "source": M_src.

Editing starts from the inverted latent at t_0. Attention behaviour goes through
`unet.set_attn_processor`; the clip-level GroupNorm (statistics over all frames, as FateZero's
pseudo-3D UNet always does; on in the configs' presets, off by default here) through forward hooks on the
ResNet and output GroupNorms (the transformer input norms stay per frame, as released), active in the
inversion (part of its cache key) and in the edit.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from stem.core.errors import ConfigError, check_choice, check_number
from stem.diffusion.ddim import Trajectory, ddim_sample_with, sampling_timesteps
from stem.editing.attention_store import AttentionRecorder, AttentionStore, check_store_budget, stored_layers
from stem.editing.base import Editor, Observers, Prompts, check_fraction, guided
from stem.editing.p2p import cross_edit_kind, refine_mapper, replace_mapper, reweight_equalizer, word_tokens
from stem.inversion.attention import (
    attention_probabilities,
    finish_attention,
    gather_frames,
    project_heads,
    self_attention_processors,
)
from stem.inversion.fatezero_attention import fatezero_frames, layer_frame_tables, spatio_temporal_processors

CROSS_EDITS = ("auto", "refine", "replace")
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
BLEND_MASKS = ("source_or_edit", "source")
BLEND_REFERENCES = ("step_start", "step_end")


class FusionState:
    """What the fusion processors need at the current editing step."""

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}    # recorded maps at this step's timestep
        self.self_on = self.cross_on = False
        self.blend: torch.Tensor | None = None      # (N, 1, h, w) pooled source blend map S, or None
        self.threshold = 0.3
        self.cross_edit = None                      # callable (A_src, A_edit) -> A
        self.edit_tokens: list[int] = []            # target tokens whose A_edit is accumulated (latent blend)
        self.edit_sums: dict[str, torch.Tensor] = {}  # layer -> sum over steps of A_edit[..., tokens], (N, q)
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def set_blend(self, pooled: torch.Tensor | None) -> None:
        self.blend, self._masks = pooled, {}

    def mask(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """M_g of this step's source blend map at a layer's token grid (computed once per grid and step)."""
        if self.blend is None:
            return None
        if grid not in self._masks:
            self._masks[grid] = blend_mask(self.blend, grid, self.threshold)
        return self._masks[grid]


class FusionAttnProcessor:
    """attn1 or attn2 of a recorded layer: FateZero's fusion of the conditional branch with A_src."""

    def __init__(self, key: str, state: FusionState, num_frames: int, frame_table: torch.Tensor | None = None,
                 grid: tuple[int, int] | None = None, accumulate: bool = False):
        self.key, self.state, self.num_frames, self.table, self.grid = key, state, num_frames, frame_table, grid
        self.cross, self.accumulate = key.endswith("attn2"), accumulate

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x = hidden_states
        q, k, v = project_heads(attn, x, encoder_hidden_states if self.cross else None)
        if not self.cross and self.table is not None:
            k, v = gather_frames(k, self.table, self.num_frames), gather_frames(v, self.table, self.num_frames)
        on = self.state.cross_on if self.cross else self.state.self_on
        if not on and not self.accumulate:
            return finish_attention(attn, F.scaled_dot_product_attention(q, k, v), x)
        b = x.shape[0] - self.num_frames  # the conditional branch is the last N of the batch (all of it at g=1)
        edit = attention_probabilities(q[b:], k[b:])
        if self.accumulate:  # the edit's own cross-attention of the target blend tokens, summed over steps
            own = token_map(edit, self.state.edit_tokens)
            sums = self.state.edit_sums
            sums[self.key] = own if self.key not in sums else sums[self.key] + own
        if not on:
            return finish_attention(attn, F.scaled_dot_product_attention(q, k, v), x)
        if self.cross:
            probs = self.state.cross_edit(self.state.maps[self.key].float(), edit)
        else:
            src = self.state.maps[self.key].float()
            m = self.state.mask(self.grid)
            if m is not None:
                m = m.flatten(1)[:, None, :, None]  # (N, 1, queries, 1)
            probs = src if m is None else m * edit + (1 - m) * src
        cond = (probs @ v[b:].float()).to(v.dtype)
        if b == 0:
            return finish_attention(attn, cond, x)
        uncond = F.scaled_dot_product_attention(q[:b], k[:b], v[:b])
        return finish_attention(attn, torch.cat([uncond, cond]), x)


def groupnorms(unet) -> list[torch.nn.GroupNorm]:
    """The GroupNorms that FateZero's pseudo-3D UNet applies to the whole clip: every GroupNorm except the
    input norms of the transformer blocks (`Transformer2DModel.norm`), which the release runs per frame."""
    per_frame = {id(m.norm) for m in unet.modules() if isinstance(getattr(m, "norm", None), torch.nn.GroupNorm)
                 and hasattr(m, "transformer_blocks")}
    return [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm) and id(m) not in per_frame]


@contextlib.contextmanager
def clip_groupnorm(unet, num_frames: int):
    """Forward hooks making the `groupnorms(unet)` pool their statistics over the N frames of each batch group."""
    def hook(module, args, output):
        x = args[0]
        if x.ndim != 4 or x.shape[0] % num_frames:
            return None
        g, c, h, w = x.shape[0] // num_frames, *x.shape[1:]
        clip = x.view(g, num_frames, c, h, w).transpose(1, 2).reshape(g, c, num_frames * h, w)
        out = F.group_norm(clip, module.num_groups, module.weight, module.bias, module.eps)
        return out.view(g, c, num_frames, h, w).transpose(1, 2).reshape(x.shape)

    handles = [m.register_forward_hook(hook) for m in groupnorms(unet)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_map(maps: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(N, heads, queries, 77) cross-attention -> (N, queries): summed over `tokens`, averaged over heads."""
    return maps.float()[..., tokens].sum(-1).mean(1)


def pooled_blend_map(maps: dict, grids: dict) -> torch.Tensor:
    """S (N, 1, h, w): per-layer (N, queries) token maps (`token_map`) averaged over the layers (all at one
    grid, `grids[layer]`), 3x3 max-pooled (module docstring)."""
    acc = sum(m.float().view(m.shape[0], 1, *grids[key]) for key, m in maps.items())
    return F.max_pool2d(acc / len(maps), 3, stride=1, padding=1)


def blend_mask(pooled: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(N, 1, *size) float mask in {0, 1}: S resized straight to `size` (nearest), divided by its
    per-frame maximum, [value > threshold] (the release's geometry)."""
    m = F.interpolate(pooled, size=tuple(size), mode="nearest")
    m = m / m.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return (m > threshold).float()


def fusion_steps(cross_replace_steps: float, self_replace_steps: float, num_steps: int) -> tuple[int, int]:
    """How many steps (from the first) fuse cross- and self-attention, as released: int(p (T + 1)) for
    cross-attention (prompt-to-prompt's per-step word weights have T + 1 rows, the first int(p (T + 1))
    of them on; at most T steps run) and int(p T) for self-attention (FateZero's own counter)."""
    return min(int(cross_replace_steps * (num_steps + 1)), num_steps), int(self_replace_steps * num_steps)


def latent_blend_window(num_steps: int, window) -> list[bool]:
    """Per step j: whether the latent blend follows it, int(s T) < j + 1 < int(e T) (the release's counter)."""
    lo, hi = int(window[0] * num_steps), int(window[1] * num_steps)
    return [lo < j + 1 < hi for j in range(num_steps)]


def split_blend_words(blend_words) -> tuple[list[str], list[str] | None]:
    """[source words] or [[source words], [target words]] (the release's form) -> (source, target or None)."""
    words = list(blend_words or [])
    if words and all(not isinstance(w, str) for w in words):
        if len(words) != 2:
            raise ConfigError(f"editing.blend_words={words}: give [source words] or [[source words], "
                              "[target words]]")
        return [str(w) for w in words[0]], [str(w) for w in words[1]]
    if any(not isinstance(w, str) for w in words):
        raise ConfigError(f"editing.blend_words={words}: mixes words and lists; give [source words] or "
                          "[[source words], [target words]]")
    return words, None


class FateZeroEditor(Editor):
    """FateZero editing with attention fusion, from the inverted latents and the maps recorded meanwhile.

    Args:
        prompt: target prompt; None edits towards the source prompt (reconstruction fashion).
        negative_prompt: the unconditional prompt ("" as released). guidance_scale 7.5 (1: no unconditional
            branch is computed). num_steps: editing steps, timesteps among the inversion's.
        cross_edit: "auto" (FateZero's release: "replace" when the prompts have the same number of words,
            else "refine"), "refine" (any prompts; prompt-to-prompt's token alignment) or "replace" (same
            word count).
        cross_replace_steps, self_replace_steps: fractions of the steps (from the start) with fusion (paper
            appendix D, Table 2 FateZero: 0.5 / 0.5; released teaser: 0.8 / 0.8); cross fuses the first
            int(p (T + 1)) steps, self the first int(p T), as released (module docstring).
        reweight: {target word: scale} applied to the fused cross-attention (e.g. {"watercolor": 10}).
        blend_words: source-prompt words whose cross-attention makes the blend masks, or
            [[source words], [target words]] as released (the target words for the latent mask's M_edit;
            a flat list uses the same words in the target prompt). None: no mask.
        blend_threshold: mask threshold on the per-frame-normalised map (0.3, `>` as released).
        latent_blend: also blend latents with the inversion's. latent_blend_steps: its window (s, e) of
            fractions, int(sT) < j + 1 < int(eT) (released 0.2, 0.8). latent_blend_mask: "source_or_edit"
            (released) or "source". latent_blend_reference: "step_start" (released: z_inv at the timestep the
            step starts from) or "step_end" (z_inv at the timestep it arrives at).
        attention_frames, attention_mode, min_channels: FateZero's spatio-temporal self-attention
            (`stem.inversion.fatezero_attention`) of the editing pass, and the layout of the recorded self maps.
        store_max_tokens: record the layers whose query length is at most this (32x32, as released at 512^2).
        attention_store: "memory" (host RAM, pinned with CUDA) or "disk" (a temporary folder under
            `store_dir`, removed after the run).
        store_budget_gib: refuse (with the ways out) a store larger than this (48). store_dtype: of the maps.
        clip_groupnorm: ResNet/output GroupNorm statistics over all frames (FateZero's pseudo-3D UNet; the
            transformer input norms stay per frame, as released; on in the configs' FateZero presets);
            off = stock per frame.
    """

    name = "FateZero"

    def __init__(self, prompt: str | None = None, negative_prompt: str = "", guidance_scale: float = 7.5,
                 num_steps: int = 50, seed: int = 0, cross_edit: str = "auto", cross_replace_steps: float = 0.5,
                 self_replace_steps: float = 0.5, reweight: dict | None = None, blend_words=None,
                 blend_threshold: float = 0.3, latent_blend: bool = False, latent_blend_steps=(0.2, 0.8),
                 latent_blend_mask: str = "source_or_edit", latent_blend_reference: str = "step_start",
                 attention_frames=("mid",), attention_mode: str = "replace", min_channels: int = 640,
                 store_max_tokens: int = 1024, attention_store: str = "memory", store_dir: str | None = None,
                 store_budget_gib: float = 48.0, store_dtype: str = "float16", clip_groupnorm: bool = False,
                 freeu: dict | None = None,
                 freeu_sites: str = "release"):
        super().__init__(prompt, negative_prompt, guidance_scale, num_steps, seed, freeu, freeu_sites)
        check_choice("editing.cross_edit", cross_edit, CROSS_EDITS)
        check_choice("editing.attention_store", attention_store, ("memory", "disk"))
        check_choice("editing.store_dtype", store_dtype, tuple(DTYPES))
        check_choice("editing.latent_blend_mask", latent_blend_mask, BLEND_MASKS)
        check_choice("editing.latent_blend_reference", latent_blend_reference, BLEND_REFERENCES)
        for name, value in (("cross_replace_steps", cross_replace_steps), ("self_replace_steps", self_replace_steps)):
            check_fraction(name, value)
        window = list(latent_blend_steps)
        if len(window) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                       for v in window) or not 0 <= window[0] <= window[1]:
            raise ConfigError(f"editing.latent_blend_steps={window} must be [start, end] finite numbers with "
                              "0 <= start <= end: fractions of the steps (released: [0.2, 0.8])")
        window = [float(v) for v in window]
        check_number("editing.store_max_tokens", store_max_tokens, low=1, integer=True,
                     fix="layers with at most this many query tokens are recorded (released: 1024)")
        check_number("editing.blend_threshold", blend_threshold, low=0, high=1,
                     fix="the blend mask is where the cross-attention, divided by its maximum, exceeds it "
                         "(released: 0.3)")
        check_number("editing.min_channels", min_channels, low=0, integer=True,
                     fix="layers with fewer channels attend per frame (SD: 640; 0 = every layer)")
        check_store_budget(store_budget_gib)
        for word, scale in dict(reweight or {}).items():
            check_number(f"editing.reweight.{word}", scale, low=0, fix="a scale of the word's cross-attention "
                         "(released teaser: {watercolor: 10}; 0 removes the word)")
        self.source_blend_words, self.target_blend_words = split_blend_words(blend_words)
        if latent_blend and not self.source_blend_words:
            raise ConfigError("editing.latent_blend needs editing.blend_words (the words whose region is edited)")
        fatezero_frames(2, attention_frames, attention_mode)  # validates the frame list now
        self.cross_edit, self.cross_replace_steps, self.self_replace_steps = cross_edit, cross_replace_steps, \
            self_replace_steps
        self.reweight = dict(reweight or {})
        self.blend_threshold, self.latent_blend = float(blend_threshold), bool(latent_blend)
        self.latent_blend_steps, self.latent_blend_mask = window, latent_blend_mask
        self.latent_blend_reference = latent_blend_reference
        self.attention_frames, self.attention_mode, self.min_channels = list(attention_frames), attention_mode, \
            min_channels
        self.store_max_tokens, self.attention_store, self.store_dir = store_max_tokens, attention_store, store_dir
        self.store_budget_gib, self.store_dtype, self.clip_groupnorm = store_budget_gib, store_dtype, clip_groupnorm

    @property
    def blend_words(self) -> list:
        if self.target_blend_words is None:
            return list(self.source_blend_words)
        return [list(self.source_blend_words), list(self.target_blend_words)]

    def settings(self) -> dict:
        return {**super().settings(), "cross_edit": self.cross_edit, "cross_replace_steps": self.cross_replace_steps,
                "self_replace_steps": self.self_replace_steps, "reweight": self.reweight,
                "blend_words": self.blend_words, "blend_threshold": self.blend_threshold,
                "latent_blend": self.latent_blend, "latent_blend_steps": self.latent_blend_steps,
                "latent_blend_mask": self.latent_blend_mask, "latent_blend_reference": self.latent_blend_reference,
                "attention_frames": self.attention_frames, "attention_mode": self.attention_mode,
                "min_channels": self.min_channels, "store_max_tokens": self.store_max_tokens,
                "attention_store": self.attention_store, "clip_groupnorm": self.clip_groupnorm}

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
                             f"{len(layers)} layers x 2 kinds x {self.num_steps} steps x {num_frames} frames",
                             recorder.step_bytes(num_frames), next(model.unet.parameters()).device)
        except ConfigError:
            store.close()
            raise
        if not self.clip_groupnorm:
            return recorder
        return Observers([clip_groupnorm(model.unet, num_frames), recorder])  # GroupNorm hooks first

    def inversion_key(self) -> dict | None:
        return {"groupnorm": "clip_resnets"} if self.clip_groupnorm else None

    # ---- editing -----------------------------------------------------------------------------
    def _cross_edit(self, tokenizer, source: str, target: str):
        if cross_edit_kind(source, target, self.cross_edit) == "replace":
            mapper = replace_mapper(tokenizer, source, target)
            edit = lambda src, own: src @ mapper.to(src.device, src.dtype)  # noqa: E731
        else:
            index, alphas = refine_mapper(tokenizer, source, target)

            def edit(src, own):
                a = alphas.to(src.device, src.dtype)
                return src[..., index.to(src.device)] * a + own * (1 - a)
        if not self.reweight:
            return edit
        scale = reweight_equalizer(tokenizer, target, self.reweight)  # on the mapped map, as released
        return lambda src, own: edit(src, own) * scale.to(src.device, src.dtype)

    def _blend_layers(self, recorder, latent_hw: tuple[int, int]) -> list[str]:
        small = (math.ceil(latent_hw[0] / 4), math.ceil(latent_hw[1] / 4))
        keys = [f"{b}.attn2" for b, grid in recorder.layers.items() if grid == small]
        if not keys:
            raise ConfigError(f"editing.blend_words: no recorded cross-attention layer at {small[0]}x{small[1]} "
                              "(1/32 of the frame); raise editing.store_max_tokens")
        return keys

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed=None) -> tuple[torch.Tensor, dict]:
        recorder = observed.find(AttentionRecorder) if isinstance(observed, Observers) else observed
        if not isinstance(recorder, AttentionRecorder):
            raise ConfigError("FateZero needs the attention maps of the inversion: edit through "
                              "stem.runs.edit.edit_video (or enter editor.inversion_observer(...) "
                              "around the inversion and pass it as observed=)")
        unet, steps, n = model.unet, self.num_steps, trajectory.latents.shape[1]
        latent_hw = tuple(trajectory.latents.shape[-2:])
        timesteps = [int(t) for t in sampling_timesteps(model.scheduler, steps)]
        missing = sorted(set(timesteps) - set(recorder.store.timesteps()))
        if missing:
            raise ConfigError(f"FateZero: no attention maps recorded at timesteps {missing[:3]}...; the editing "
                              "timesteps must be among the inversion's (editing.num_steps vs inversion.num_steps)")
        tokenizer = model.tokenizer
        state = FusionState()
        state.threshold = self.blend_threshold
        state.cross_edit = self._cross_edit(tokenizer, prompts.source_text, prompts.target_text)
        tables = self.frame_table(unet, n)
        blend_keys, source_tokens = [], []
        if self.source_blend_words:
            blend_keys = self._blend_layers(recorder, latent_hw)
            source_tokens = word_tokens(tokenizer, prompts.source_text, self.source_blend_words)
        edit_blend = self.latent_blend and self.latent_blend_mask == "source_or_edit"
        if edit_blend:
            state.edit_tokens = word_tokens(tokenizer, prompts.target_text,
                                            self.target_blend_words or self.source_blend_words)
        grids = {f"{b}.attn2": g for b, g in recorder.layers.items()}
        cross_steps, self_steps = fusion_steps(self.cross_replace_steps, self.self_replace_steps, steps)
        blend_after = latent_blend_window(steps, self.latent_blend_steps) if self.latent_blend else [False] * steps
        guidance = self.guidance_scale != 1
        dtype = next(unet.parameters()).dtype
        schedule: list[dict] = []

        def eps_fn(z: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            state.cross_on, state.self_on = i < cross_steps, i < self_steps
            needs_maps = state.cross_on or state.self_on or blend_after[i]
            state.maps = recorder.store.step(int(t), device=z.device, dtype=dtype) if needs_maps else {}
            state.set_blend(pooled_blend_map({k: token_map(state.maps[k], source_tokens) for k in blend_keys}, grids)
                            if blend_keys and needs_maps else None)
            schedule.append({"t": int(t), "cross": state.cross_on, "self": state.self_on,
                             "latent_blend": blend_after[i]})
            b = len(z)
            if not guidance:  # g = 1: eps = eps_c, no unconditional branch
                return unet(z, t, encoder_hidden_states=prompts.target.expand(b, -1, -1)).sample
            emb = torch.cat([prompts.negative.expand(b, -1, -1), prompts.target.expand(b, -1, -1)])
            eps_uncond, eps_cond = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            return guided(eps_uncond, eps_cond, self.guidance_scale)

        masks: list[float] = []

        def after_step(z: torch.Tensor, i: int) -> torch.Tensor:
            if not blend_after[i]:
                return z
            m = blend_mask(state.blend, latent_hw, self.blend_threshold)
            if edit_blend:
                own = pooled_blend_map(state.edit_sums, grids)
                m = torch.maximum(m, blend_mask(own, latent_hw, self.blend_threshold))
            masks.append(float(m.mean()))
            t_ref = timesteps[i] if self.latent_blend_reference == "step_start" else \
                (timesteps[i + 1] if i + 1 < steps else 0)
            z_ref = trajectory.at(t_ref).to(z.device, z.dtype)
            return z_ref + m.to(z.dtype) * (z - z_ref)

        unrecorded = spatio_temporal_processors(unet, n, self.attention_frames, self.attention_mode,
                                                self.min_channels)

        def per_layer(path: str):
            block = path.removesuffix(".attn1")
            if block in recorder.layers:
                return FusionAttnProcessor(path, state, n, tables(block), recorder.layers[block])
            return unrecorded(path)

        def cross_per_layer(path: str):
            block = path.removesuffix(".attn2")
            if block not in recorder.layers:
                return None
            return FusionAttnProcessor(path, state, n, accumulate=edit_blend and path in blend_keys)

        with contextlib.ExitStack() as stack:
            stack.enter_context(self_attention_processors(unet, per_layer=per_layer, cross_per_layer=cross_per_layer))
            if self.clip_groupnorm:
                stack.enter_context(clip_groupnorm(unet, n))
            start = trajectory.at(timesteps[0]).clone()
            latents = ddim_sample_with(eps_fn, start, model.scheduler, steps, progress=progress,
                                       desc="FateZero editing", after_step=after_step)
        return latents, {"recorded_layers": sorted(recorder.layers), "recorded_timesteps": recorder.store.timesteps(),
                         "fusion_schedule": schedule, "mask_fraction_per_step": masks}

"""Pix2Video (Ceylan et al., ICCV 2023): frame-by-frame editing of a depth-conditioned Stable Diffusion.

`python run.py editing=pix2video inversion=ddim_1frame` is the "Pix2Video" row of paper Table 2 (docs/BASELINES.md).
The job runs on the model preset's `baseline_models.sd2_depth` (Stable Diffusion 2 depth, as the official code),
inversion included, and estimates the depth maps with `baseline_models.depth_estimator` (MiDaS DPT-hybrid).

Notation (N frames, T editing steps; step i = 0..T-1 runs at timestep t_i, descending; frame k = 0..N-1):
    D_k        depth of frame k at the latent size (h, w): the estimator's map resized (bilinear, as the official
               `load_depth`) and min-max normalised per frame to [-1, 1]; the UNet's 5th input channel
    z^k_i      latent of frame k entering step i; z^k_0 = its own inverted latent at t_0 (per-frame DDIM inversion
               under the source prompt, depth-conditioned, as released)
    X^k_{i,L}  input of the self-attention (attn1, the block's norm1 output) of layer L when editing frame k at
               step i, per classifier-free-guidance branch (unconditional "", conditional target prompt)
    x0^k_i     predicted clean latent of step i: (z^k_i - sqrt(1 - a_{t_i}) eps) / sqrt(a_{t_i}), eps the guided one

Frames are edited one after the other, k = 0, 1, ..., N-1 (frame 0 is the anchor), each with T DDIM steps:
  - self-attention feature injection in the decoder (the UNet's up blocks: the official code injects in the
    transformer layers from index 7 of SD 2's 16, i.e. the 9 of the up blocks): for k >= 1 the queries of frame k
    attend to keys/values projected from [X^0_{i,L}; X^{k-1}_{i,L}] (anchor then previous edited frame, same step and
    branch; frame 1 thus sees frame 0 twice, as released), not to its own tokens; frame 0 and the encoder/middle
    layers attend to their own tokens (plain self-attention).
  - guided latent update (the official "classifier guidance"): after DDIM step i of frame k >= 1, for i <
    `latent_update_steps` (26 of 50 as released: the weight is zeroed once i > 25),
        z^k_{i+1} <- z^k_{i+1} - grad_{x0} [ s * mean((x0^{k-1}_i - x0)^2) ] at x0 = x0^k_i
                   = z^k_{i+1} - (2 s / M) (x0^k_i - x0^{k-1}_i),   s = `latent_update_scale` (100), M = 4 h w,
    the pull of this frame's predicted clean latent towards the previous frame's at the same step.

The depth channel enters through a forward pre-hook on the UNet (`DepthConditioning`) that `prepare` installs and
`release` removes, so the inversion, the edit and the run's reconstruction all see it; attention through
`unet.set_attn_processor` for the duration of the edit.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stem.core.errors import ConfigError, check_choice, check_number
from stem.diffusion.ddim import Trajectory, ddim_sample_with
from stem.editing.base import Editor, Prompts, guided, start_latents
from stem.editing.baselines.depth import depth_maps
from stem.inversion.attention import SelfAttnProcessor, project_heads, self_attention_processors

INJECTION_LAYERS = ("decoder", "all")
DEPTH_INTERPOLATIONS = ("bilinear", "bicubic")
LATENT_CHANNELS = 4


def normalise_depth(raw: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(N, 1, H, W) raw depth -> (N, 1, *size) float32 in [-1, 1]: resized (`mode`, align_corners=False), then min-max
    per frame, 2 (d - min) / (max - min) - 1 (the official `load_depth`: bilinear; diffusers' depth2img: bicubic).
    A constant map (max = min) gives 0 where the official code would divide by zero."""
    check_choice("editing.depth_interpolation", mode, DEPTH_INTERPOLATIONS)
    if raw.ndim != 4 or raw.shape[1] != 1:
        raise ValueError(f"depth maps must be (N, 1, H, W), got {tuple(raw.shape)}")
    d = F.interpolate(raw.float(), size=tuple(size), mode=mode, align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, 2 * (d - lo) / span.clamp_min(torch.finfo(d.dtype).tiny) - 1, torch.zeros_like(d))


class DepthConditioning:
    """Forward pre-hook on a depth-conditioned UNet: appends the depth channel of the frames in the batch.

    `depth`: (N, 1, h, w), one map per frame of the clip. A UNet call on B latents of 4 channels gets
    concat(latents, depth) with the maps of `frames` (all N when None) tiled B / len(frames) times, group-major as
    the batches of this project are laid out (inversion: frames 0..N-1; guidance: [uncond frames; cond frames]).
    """

    def __init__(self, unet, depth: torch.Tensor):
        self.unet, self.depth, self.frames, self.handle = unet, depth, None, None

    def install(self) -> DepthConditioning:
        if self.handle is None:
            self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @contextlib.contextmanager
    def only(self, frames: list[int]):
        """Inside the block, UNet calls carry the maps of `frames` (tiled over the batch's groups)."""
        before, self.frames = self.frames, list(frames)
        try:
            yield
        finally:
            self.frames = before

    def maps_for(self, batch: int) -> torch.Tensor:
        depth = self.depth if self.frames is None else self.depth[self.frames]
        if batch % len(depth):
            raise ValueError(f"Pix2Video depth conditioning: a UNet batch of {batch} is not a whole number of groups "
                             f"of the {len(depth)} frames whose depth maps are active")
        return depth.repeat(batch // len(depth), 1, 1, 1)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        expected = module.config.in_channels - 1
        if sample.shape[1] != expected:
            raise ValueError(f"Pix2Video depth conditioning: the UNet's input has {sample.shape[1]} channels; the hook "
                             f"appends depth to {expected}-channel latents (is the depth hook installed twice?)")
        depth = self.maps_for(sample.shape[0])
        if depth.shape[-2:] != sample.shape[-2:]:
            raise ValueError(f"Pix2Video depth maps are {tuple(depth.shape[-2:])}, the latents "
                             f"{tuple(sample.shape[-2:])}: prepare() on the same video")
        sample = torch.cat([sample, depth.to(sample.device, sample.dtype)], dim=1)
        if args:
            return (sample, *args[1:]), kwargs
        return args, {**kwargs, "sample": sample}


@contextlib.contextmanager
def depth_conditioning(unet, depth: torch.Tensor):
    """`DepthConditioning` installed on `unet` for the duration of the block (removed on exit, also on errors)."""
    hook = DepthConditioning(unet, depth).install()
    try:
        yield hook
    finally:
        hook.remove()


class FeatureStore:
    """attn1 inputs X_{i,L} (branches stacked in the batch) of the anchor frame, the previous frame and the frame
    being edited, keyed by (layer, step)."""

    def __init__(self):
        self.anchor: dict | None = None
        self.previous: dict | None = None
        self.current: dict = {}
        self.step = 0
        self.record = True

    def context(self, layer: str) -> torch.Tensor | None:
        """[X^0; X^{k-1}] along the tokens at this step (B, 2S, C), or None while the anchor is edited."""
        if self.anchor is None:
            return None
        key = (layer, self.step)
        return torch.cat([self.anchor[key], self.previous[key]], dim=1)

    def finish_frame(self) -> None:
        """The frame just edited becomes the previous one (and the anchor if it is the first)."""
        if self.anchor is None:
            self.anchor = self.current
        self.previous, self.current = self.current, {}

    def nbytes(self) -> int:
        stores = {id(s): s for s in (self.anchor, self.previous, self.current) if s}
        return sum(x.numel() * x.element_size() for s in stores.values() for x in s.values())


class Pix2VideoAttnProcessor(SelfAttnProcessor):
    """attn1 of an injected layer: records its input and attends to the anchor's and previous frame's features."""

    def __init__(self, layer: str, store: FeatureStore):
        super().__init__(num_frames=1)
        self.layer, self.store = layer, store

    def attend(self, attn, x):
        if self.store.record:
            self.store.current[(self.layer, self.store.step)] = x.detach().clone()
        q, k, v = project_heads(attn, x, self.store.context(self.layer))
        return F.scaled_dot_product_attention(q, k, v)


def injected(path: str, layers: str) -> bool:
    """Whether the attn1 at `path` takes the anchor/previous features: the up blocks ("decoder", as released) or
    every layer ("all")."""
    return layers == "all" or path.startswith("up_blocks.")


class Pix2VideoEditor(Editor):
    """Pix2Video editing: frame by frame on a depth-conditioned UNet, with anchor/previous-frame self-attention
    injection and the guided latent update (module docstring).

    Args:
        prompt: target prompt; None edits towards the source prompt.
        negative_prompt: unconditional prompt ("" as released). guidance_scale: 7.5 (released). num_steps: DDIM
            steps (50 released; the inversion's or a subset of its timesteps). seed: recorded (the sampler is
            deterministic; the released seed 2147483647 draws nothing either).
        latent_update_scale: s, the weight of the loss s * mean((x0_prev - x0)^2) whose gradient is subtracted from
            the latent after each step (released: 100); 0 switches the update off.
        latent_update_steps: the update follows steps i < this (released: 26, the weight is zeroed once i > 25).
        injection_layers: "decoder" (the up blocks' attn1, as released) or "all" (an ablation).
        depth_interpolation: how the estimator's map is resized to the latent size before the per-frame min-max:
            "bilinear" (the official code) or "bicubic" (diffusers' StableDiffusionDepth2ImgPipeline).
        freeu, freeu_sites: see `Editor` (off as released).
    """

    name = "Pix2Video"
    base_model = "sd2_depth"
    needs = ("depth_estimator",)

    def __init__(self, prompt: str | None = None, negative_prompt: str = "", guidance_scale: float = 7.5,
                 num_steps: int = 50, seed: int = 0, latent_update_scale: float = 100.0, latent_update_steps: int = 26,
                 injection_layers: str = "decoder", depth_interpolation: str = "bilinear",
                 freeu: dict | None = None, freeu_sites: str = "release"):
        super().__init__(prompt, negative_prompt, guidance_scale, num_steps, seed, freeu, freeu_sites)
        check_number("editing.latent_update_scale", latent_update_scale, low=0,
                     fix="the weight of the pull towards the previous frame's x0 (released: 100; 0 = off)")
        check_number("editing.latent_update_steps", latent_update_steps, low=0, integer=True,
                     fix="the update follows the steps i < this (released: 26 of 50)")
        check_choice("editing.injection_layers", injection_layers, INJECTION_LAYERS)
        check_choice("editing.depth_interpolation", depth_interpolation, DEPTH_INTERPOLATIONS)
        self.latent_update_scale, self.latent_update_steps = float(latent_update_scale), int(latent_update_steps)
        self.injection_layers, self.depth_interpolation = injection_layers, depth_interpolation
        self.depth: torch.Tensor | None = None
        self.depth_hook: DepthConditioning | None = None   # installed by prepare, removed by release

    def settings(self) -> dict:
        return {**super().settings(), "latent_update_scale": self.latent_update_scale,
                "latent_update_steps": self.latent_update_steps, "injection_layers": self.injection_layers,
                "depth_interpolation": self.depth_interpolation}

    # ---- depth ---------------------------------------------------------------------------------
    def prepare(self, model, video, cache, progress: bool = True) -> None:
        """Depth maps of the clip (estimated once, cached beside the inversion cache) and the depth hook on the UNet,
        active until `release`: the inversion, the edit and the reconstruction are all depth-conditioned. (No
        `inversion_observer`: an observer makes `invert_video` invert again on a cache hit, and this hook already
        conditions the inversion; `inversion_key` puts the depth into its cache key.)"""
        channels = model.unet.config.in_channels
        if channels != LATENT_CHANNELS + 1:
            raise ConfigError(f"Pix2Video edits with a depth-conditioned UNet (5 input channels: latents and depth); "
                              f"this model's has {channels}: run it through run.py (it loads baseline_models."
                              f"{self.base_model}) or build the model with stem.diffusion.baseline_models")
        if "depth_estimator" not in self.models:
            raise ConfigError("Pix2Video needs the depth estimator: editor.attach({'depth_estimator': ...}) "
                              "(run.py builds it from the model preset's baseline_models)")
        self.release(model)
        raw = depth_maps(self.models["depth_estimator"], video, cache, progress)
        self.depth = normalise_depth(raw, (video.height // 8, video.width // 8), self.depth_interpolation)
        self.depth_hook = DepthConditioning(model.unet, self.depth.to(model.device, model.dtype)).install()

    def release(self, model) -> None:
        if self.depth_hook is not None:
            self.depth_hook.remove()
            self.depth_hook = None

    def inversion_key(self) -> dict | None:
        """The inversion is depth-conditioned: the normalisation and a hash of the maps themselves (which carry the
        estimator, its weights and the frames) go into the inversion cache key."""
        key = {"conditioning": "depth channel (SD 2 depth)", "estimator": "depth_estimator",
               "interpolation": self.depth_interpolation}
        if self.depth is not None:
            key["depth_sha256"] = hashlib.sha256(self.depth.float().cpu().numpy().tobytes()).hexdigest()[:16]
        return {"depth": key}

    # ---- editing -------------------------------------------------------------------------------
    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed=None) -> tuple[torch.Tensor, dict]:
        hook = self.depth_hook
        if hook is None or hook.handle is None:
            raise ConfigError("Pix2Video needs the video's depth maps on the UNet: edit through "
                              "stem.runs.edit.edit_video (or call editor.prepare(model, video, cache) first)")
        unet, steps, n = model.unet, self.num_steps, trajectory.latents.shape[1]
        if len(hook.depth) != n:
            raise ConfigError(f"Pix2Video: depth maps of {len(hook.depth)} frames for a trajectory of {n}; "
                              "prepare() on the same video")
        guidance = self.guidance_scale != 1
        emb = torch.cat([prompts.negative, prompts.target]) if guidance else prompts.target
        start = start_latents(model.scheduler, trajectory, steps, "inverted")  # each frame's own inverted z at t_0
        store = FeatureStore()
        original = dict(unet.attn_processors)
        layers = [p.removesuffix(".processor") for p in original if ".attn1." in p
                  and injected(p.removesuffix(".processor"), self.injection_layers)]
        if not layers:
            raise ConfigError(f"editing.injection_layers={self.injection_layers} selects no self-attention layer")
        chosen = set(layers)

        def per_layer(path: str):
            return Pix2VideoAttnProcessor(path, store) if path in chosen else original[f"{path}.processor"]

        x0_prev: list[torch.Tensor] | None = None
        pulls: list[list[float]] = []
        out, peak = torch.empty_like(start), 0
        with self_attention_processors(unet, per_layer=per_layer):
            for k in tqdm(range(n), desc="Pix2Video editing (frames)", disable=not progress):
                store.record = k < n - 1   # the last frame's features are never read
                with hook.only([k]):
                    out[k:k + 1], x0_prev, pull = self._edit_frame(model, start[k:k + 1], emb, store, x0_prev)
                peak = max(peak, store.nbytes())
                store.finish_frame()
                pulls.append(pull)
        return out, {"anchor_frame": 0, "injected_layers": layers,
                     "latent_update_steps": [i for i in range(steps) if i < self.latent_update_steps]
                     if self.latent_update_scale else [],
                     "latent_pull_rms": pulls, "feature_store_mib": round(peak / 2**20, 3)}

    def _edit_frame(self, model, z: torch.Tensor, emb: torch.Tensor, store: FeatureStore,
                    x0_prev: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
        """T DDIM steps of one frame from its inverted latent z (1, 4, h, w): its edited latent, its x0 per step
        and the RMS of the latent update applied after each step of the window (none for the anchor)."""
        unet, alphas, guidance = model.unet, model.scheduler.alphas_cumprod, emb.shape[0] == 2
        x0_cur: list[torch.Tensor] = []
        pull: list[float] = []

        def eps_fn(z: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            store.step = i
            if guidance:
                eps_uncond, eps_cond = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
                eps = guided(eps_uncond, eps_cond, self.guidance_scale)
            else:
                eps = unet(z, t, encoder_hidden_states=emb).sample
            a_t = alphas[int(t)].to(z.device, torch.float32)
            x0_cur.append((z.float() - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt())
            return eps

        def after_step(z: torch.Tensor, i: int) -> torch.Tensor:
            if x0_prev is None or i >= self.latent_update_steps or not self.latent_update_scale:
                return z
            x0 = x0_cur[i]
            delta = (2 * self.latent_update_scale / x0.numel()) * (x0 - x0_prev[i])  # grad of s * MSE at x0
            pull.append(float(delta.pow(2).mean().sqrt()))
            return (z.float() - delta).to(z.dtype)

        z = ddim_sample_with(eps_fn, z, model.scheduler, self.num_steps, progress=False, after_step=after_step)
        return z, x0_cur, pull

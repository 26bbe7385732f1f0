"""Text2Video-Zero (Khachatryan et al., ICCV 2023), depth-conditioned, as its official repository edits a video
(Picsart-AI-Research/Text2Video-Zero, `Model.process_controlnet_depth`; docs/BASELINES.md).

Text2Video-Zero does not invert: it generates the edited video from noise, guided by the input's depth maps
through a depth ControlNet on Stable Diffusion 1.5 and by the target prompt, and keeps the frames consistent by
two choices only:
 1. one start noise for every frame: z_T ~ N(0, I) of one frame (4, h, w) from a generator seeded with `seed`,
    repeated N times (the official depth/canny/pose paths repeat it; the paper's conditional-generation section
    describes latents enriched with motion dynamics, which the code uses on its text-to-video path only: the
    code is followed);
 2. cross-frame attention: in every self-attention layer (attn1) of the UNet AND of the ControlNet, each frame's
    queries attend to the keys/values of frame 0 of its UNet call, per classifier-free-guidance branch.

Frames go through in chunks as the official `Model.inference(split_to_chunks=True)`: chunk starts
0, c - 1, 2 (c - 1), ... (c = `chunk_size`); chunk i holds frame 0 followed by the frames from its start up to the
next start, and is sampled as a whole DDIM run (20 steps, guidance 9, eta 0); frame 0 is dropped from every
chunk's output (the first chunk holds it twice). Frame 0 therefore anchors every chunk's cross-frame attention.

Per DDIM step t of a chunk with frames F (|F| = b, latents z (b, 4, h, w), control images D_F (b, 3, H, W)):
    down, mid = ControlNet([z; z], t, [e_neg; e_tgt], D = [D_F; D_F]) * controlnet_conditioning_scale
    [eps_u; eps_c] = UNet([z; z], t, [e_neg; e_tgt], + down, + mid)
    eps = eps_u + g (eps_c - eps_u);  z <- DDIM step (eta 0)
with e_tgt the embedding of "<target prompt>, best quality, extremely detailed" (the official added prompt) and
e_neg that of the official negative prompt. The ControlNet runs in a forward pre-hook of the UNet that adds
`down_block_additional_residuals` / `mid_block_additional_residual` to its call (diffusers' ControlNetModel
applies the scale, as the official pipeline does after the call).

Control images (the official annotator, `MidasDetector` + `pre_process_depth`): the MiDaS relative inverse depth
of each frame (`stem.editing.baselines.depth.depth_maps`, computed once per clip and cached) min-max normalised per
frame to [0, 1], quantised to 8 bits (floor of 255 d, as its uint8 image), repeated to 3 channels, / 255.

The job still inverts the video (the Table 2 row sets inversion=ddim_1frame with inversion.num_steps equal to
editing.num_steps, so `check_timesteps` passes, and the inversion is cached): this editor reads nothing of the
inverted trajectory but its shape (frames and latent size). Attention through `unet.set_attn_processor`, the
ControlNet through a forward pre-hook; both are installed for the edit only and removed when it ends or fails
(and by `release`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stem.core.errors import check_number
from stem.diffusion.ddim import Trajectory, ddim_sample_with
from stem.diffusion.prompts import encode_prompt
from stem.editing.base import Edit, Editor, Prompts, guided
from stem.editing.baselines.depth import depth_maps
from stem.inversion.attention import SelfAttnProcessor, gather_frames, self_attention_processors

# official process_controlnet_depth: `added_prompt` joined to the prompt with ", ", and `negative_prompts`
ADDED_PROMPT = "best quality, extremely detailed"
NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                   "worst quality, low quality")
GROUPS = 2  # UNet batch = [uncond frames; cond frames] (the official unet_chunk_size=2)


def frame_chunks(num_frames: int, chunk_size: int) -> list[list[int]]:
    """Frame ids of each official chunk: [0, a_i, a_i + 1, ..., a_{i+1} - 1] with a_i = i (chunk_size - 1)
    (the last chunk ends at frame N - 1). Frame 0 is prepended to every chunk as the cross-frame anchor."""
    check_number("editing.chunk_size", chunk_size, low=2, integer=True,
                 fix="frames per UNet call, frame 0 included (official: 8; the official minimum is 2)")
    starts = list(range(0, num_frames, chunk_size - 1))
    ends = [*starts[1:], num_frames]
    return [[0, *range(a, b)] for a, b in zip(starts, ends, strict=True)]


def control_images(depth: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) raw MiDaS depth -> (N, 3, H, W) ControlNet images in [0, 1] as the official annotator makes
    them: per frame d - min, / max (a flat frame gives 0), 8-bit quantised (floor(255 d) / 255), 3 channels."""
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth maps must be (N, 1, H, W), got {tuple(depth.shape)}")
    d = depth.float()
    d = d - d.amin(dim=(1, 2, 3), keepdim=True)
    top = d.amax(dim=(1, 2, 3), keepdim=True)
    d = torch.where(top > 0, d / top.clamp(min=torch.finfo(d.dtype).tiny), torch.zeros_like(d))
    return (torch.floor((d * 255).clamp(0, 255)) / 255).expand(-1, 3, -1, -1).contiguous()


def start_noise(num_frames: int, latent_shape: tuple[int, int, int], seed: int, device=None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """z_T shared by all frames: one (1, 4, h, w) draw of a CPU generator seeded with `seed` (any device draws
    alike; the official code draws on the GPU), repeated to (N, 4, h, w)."""
    z = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(int(seed)))
    return z.to(device=device, dtype=dtype).repeat(num_frames, 1, 1, 1)


class FirstFrameAttnProcessor(SelfAttnProcessor):
    """Cross-frame self-attention: the queries of every frame attend to the keys/values of frame 0 of its group.

    The batch is `groups` groups of equally many frames (group-major, e.g. [uncond frames; cond frames]); the
    frame count is read from each call (a chunk may be shorter), as the official processor does."""

    def __init__(self, groups: int = GROUPS):
        super().__init__(num_frames=1)
        check_number("groups", groups, low=1, integer=True, fix="classifier-free-guidance branches in the batch")
        self.groups = groups

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.groups:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of groups={self.groups}")
        frames = x.shape[0] // self.groups
        q, k, v = self.project(attn, x, "q", "k", "v")
        first = torch.zeros((frames, 1), dtype=torch.long)   # row n: frame n attends to frame 0
        return F.scaled_dot_product_attention(q, gather_frames(k, first, frames), gather_frames(v, first, frames))


@dataclass
class ControlState:
    """What the ControlNet pre-hook needs for the current UNet call."""

    cond: torch.Tensor | None = None    # (B, 3, H, W) control images in the UNet batch's order
    calls: int = 0


def _unet_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timestep, encoder_hidden_states) of a UNet2DConditionModel call, positional or keyword."""
    names = ("sample", "timestep", "encoder_hidden_states")
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    if any(v is None for v in values):
        raise ValueError("the ControlNet hook needs the UNet's sample, timestep and encoder_hidden_states")
    return tuple(values)


@contextlib.contextmanager
def controlnet_residuals(unet, controlnet, state: ControlState, scale: float):
    """A forward pre-hook on `unet` for the duration of the block: every call first runs `controlnet` on the same
    (sample, timestep, text embeddings) with `state.cond` and adds its residuals, scaled by `scale`, through
    `down_block_additional_residuals` / `mid_block_additional_residual`. Removed on exit, also on errors."""

    def hook(module, args, kwargs):
        sample, t, emb = _unet_inputs(args, kwargs)
        cond = state.cond
        if cond is None or cond.shape[0] != sample.shape[0]:
            raise RuntimeError(f"ControlNet hook: control images {None if cond is None else tuple(cond.shape)} "
                               f"do not match the UNet batch {tuple(sample.shape)}")
        down, mid = controlnet(sample, t, encoder_hidden_states=emb,
                               controlnet_cond=cond.to(sample.device, controlnet.dtype),
                               conditioning_scale=scale, return_dict=False)
        state.calls += 1
        return args, {**kwargs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Text2VideoZeroEditor(Editor):
    """Text2Video-Zero with depth control (module docstring), official defaults.

    Args:
        prompt: target prompt (None: the source prompt); `added_prompt` is joined to it with ", " for the UNet
            (the CLIP score is measured against the prompt itself).
        negative_prompt: the official negative prompt; guidance_scale: 9.0; num_steps: 20 DDIM steps (eta 0).
        seed: the start noise's generator seed (official: 42).
        controlnet_conditioning_scale: scale of the ControlNet residuals (official: 1.0).
        chunk_size: frames per UNet call, frame 0 included (official: 8).
        cross_frame: cross-frame attention to frame 0 in the UNet and the ControlNet (official use_cf_attn=True).
        freeu, freeu_sites: see `Editor` (off: not in Text2Video-Zero).
    """

    name = "Text2Video-Zero"
    needs = ("controlnet_depth", "depth_estimator")

    def __init__(self, prompt: str | None = None, negative_prompt: str = NEGATIVE_PROMPT,
                 added_prompt: str | None = ADDED_PROMPT, guidance_scale: float = 9.0, num_steps: int = 20,
                 seed: int = 42, controlnet_conditioning_scale: float = 1.0, chunk_size: int = 8,
                 cross_frame: bool = True, freeu: dict | None = None, freeu_sites: str = "release"):
        super().__init__(prompt, negative_prompt, guidance_scale, num_steps, seed, freeu, freeu_sites)
        check_number("editing.seed", seed, integer=True, fix="the start noise's generator seed (official: 42)")
        check_number("editing.controlnet_conditioning_scale", controlnet_conditioning_scale,
                     fix="scale of the ControlNet residuals (official: 1.0; 0 = no depth control)")
        frame_chunks(1, chunk_size)
        self.added_prompt = (added_prompt or "").strip()
        self.controlnet_conditioning_scale = float(controlnet_conditioning_scale)
        self.chunk_size, self.cross_frame = chunk_size, bool(cross_frame)
        self.control: torch.Tensor | None = None   # (N, 3, H, W) control images of the prepared video
        self._stack: contextlib.ExitStack | None = None
        self._overflow = "error"

    def settings(self) -> dict:
        return {**super().settings(), "added_prompt": self.added_prompt, "chunk_size": self.chunk_size,
                "controlnet_conditioning_scale": self.controlnet_conditioning_scale, "cross_frame": self.cross_frame,
                "start": "one seeded noise shared by all frames (the inversion is not used)"}

    def label(self, inversion_name: str) -> str:
        """Always "Text2Video-Zero": it does not use the inverted latents, whatever the inversion."""
        return self.name

    def unet_prompt(self, prompt: str) -> str:
        """The prompt the UNet sees: `prompt, added_prompt` (official), or `prompt` without an added prompt."""
        return f"{prompt}, {self.added_prompt}" if self.added_prompt else prompt

    def prepare(self, model, video, cache, progress: bool = True) -> None:
        """The control images of `video`'s frames from its depth maps (cached per clip by `depth_maps`)."""
        depth = depth_maps(self.models["depth_estimator"], video, cache, progress)
        if depth.shape[0] != video.num_frames or tuple(depth.shape[-2:]) != (video.height, video.width):
            raise ValueError(f"depth maps {tuple(depth.shape)} do not match the video's {video.num_frames} frames "
                             f"of {video.height}x{video.width}")
        self.control = control_images(depth)

    def release(self, model) -> None:
        """Remove the hook and restore the processors if an edit left them; forget the control images."""
        self._close()
        self.control = None

    def _close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def edit(self, model, trajectory: Trajectory, source_prompt: str, prompt_overflow: str = "error",
             progress: bool = True, observed=None) -> Edit:
        self._overflow = prompt_overflow   # for the prompt with the added words, encoded in `_edit`
        return super().edit(model, trajectory, source_prompt, prompt_overflow, progress, observed)

    def install(self, unet, controlnet, state: ControlState) -> None:
        """Cross-frame processors (UNet and ControlNet attn1) and the ControlNet pre-hook, until `_close`."""
        self._close()
        stack = contextlib.ExitStack()
        try:
            if self.cross_frame:
                processor = FirstFrameAttnProcessor(GROUPS)
                stack.enter_context(self_attention_processors(unet, processor))
                stack.enter_context(self_attention_processors(controlnet, processor))
            stack.enter_context(controlnet_residuals(unet, controlnet, state, self.controlnet_conditioning_scale))
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed=None) -> tuple[torch.Tensor, dict]:
        if self.control is None:
            raise RuntimeError("Text2Video-Zero: prepare(model, video, ...) must compute the depth maps first")
        n, latent_shape = trajectory.latents.shape[1], tuple(trajectory.latents.shape[2:])
        if self.control.shape[0] != n:
            raise ValueError(f"{self.control.shape[0]} depth maps for a trajectory of {n} frames")
        controlnet = self.models["controlnet_depth"]
        device, dtype = model.device, model.dtype
        target = encode_prompt(model, self.unet_prompt(prompts.target_text), self._overflow)
        x = start_noise(n, latent_shape, self.seed, device, dtype)
        control = self.control.to(device)
        chunks = frame_chunks(n, self.chunk_size)
        state = ControlState()
        latents = torch.empty_like(x)
        self.install(model.unet, controlnet, state)
        try:
            for c, ids in enumerate(chunks):
                index = torch.tensor(ids, device=device)
                state.cond = torch.cat([control[index]] * GROUPS)
                emb = torch.cat([prompts.negative.expand(len(ids), -1, -1), target.expand(len(ids), -1, -1)])

                def eps_fn(z: torch.Tensor, t: torch.Tensor, i: int, emb=emb) -> torch.Tensor:
                    eps_uncond, eps_cond = model.unet(torch.cat([z] * GROUPS), t,
                                                      encoder_hidden_states=emb).sample.chunk(GROUPS)
                    return guided(eps_uncond, eps_cond, self.guidance_scale)

                out = ddim_sample_with(eps_fn, x[index], model.scheduler, self.num_steps, progress=progress,
                                       desc=f"Text2Video-Zero chunk {c + 1}/{len(chunks)}")
                latents[index[1:]] = out[1:]   # frame 0 is each chunk's anchor; the first chunk holds it twice
        finally:
            self._close()
        return latents, {"chunks": chunks, "controlnet_calls": state.calls,
                         "unet_prompt": self.unet_prompt(prompts.target_text)}


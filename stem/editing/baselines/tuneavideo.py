"""Tune-A-Video (Wu et al., ICCV 2023): one-shot tuning of an inflated Stable Diffusion UNet on the input video,
then DDIM inversion with the tuned model and sampling with the target prompt (docs/BASELINES.md).

The official code (github.com/showlab/Tune-A-Video) inflates SD's 2D UNet to a pseudo-3D one. Here the stock
diffusers UNet is kept and inflated from outside:
- Sparse-causal self-attention (SC-Attn): every `attn1` of frame i takes the keys/values of frame 0 and of frame
  max(i - 1, 0) (frame 0 attends to itself twice, frame 1 to frame 0 twice, as released): the project's 2-frame
  "tuneavideo" pairing, `stem.inversion.attention.FrameContextAttnProcessor`, through `unet.set_attn_processor`.
- Temporal self-attention (T-Attn): after the feed-forward of every transformer block, the N tokens that one
  spatial position has over the N frames attend to each other: h <- h + attn_temp(norm_temp(h)), no positional
  encoding, no causal mask (as released). The layers are held by the editor (`temporal`, an nn.ModuleDict) and
  act through forward hooks on the blocks (the block's output is the released block's input to T-Attn).
  Initialised as released: default init, then to_out[0].weight zeroed (its bias keeps its default init).
- Pseudo-3D GroupNorm (`clip_groupnorm`): the released ResNet and output GroupNorms see the 5-D clip tensor, so
  their statistics pool over all frames; the transformer input norms run per frame (FateZero's `clip_groupnorm`
  hooks implement exactly this split).

Tuning (`prepare`, released `train_tuneavideo.py`): per step, one draw from the VAE posterior of every frame
(z0 = (mean + std e) * scaling factor), one timestep t ~ U{0..T-1} for the whole clip, eps ~ N(0, I),
z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, and loss = MSE(eps_theta(z_t, t, c_source), eps) (v for v-prediction
models), AdamW on the modules whose names end with `trainable_modules` ("attn1.to_q", "attn2.to_q", "attn_temp"),
gradients clipped to norm 1, constant learning rate. Every draw comes from one CPU torch.Generator seeded with
`seed` (the temporal layers' init too), so a run is deterministic for a seed on CPU, and a checkpoint (trainable
weights, optimizer, step, generator state) resumes bit-for-bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn
from tqdm.auto import tqdm

from stem.core.atomic import atomic_file
from stem.core.errors import ConfigError, check_choice, check_number
from stem.diffusion.ddim import Trajectory, ddim_sample_with
from stem.diffusion.prompts import encode_prompt
from stem.editing.base import Editor, Prompts, guided, start_latents
from stem.editing.fatezero import clip_groupnorm
from stem.inversion.attention import FrameContextAttnProcessor, self_attention_processors

log = logging.getLogger(__name__)

TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp")   # released configs' trainable_modules
CACHE_NAME = "tuneavideo"


def sparse_causal(num_frames: int) -> FrameContextAttnProcessor:
    """SC-Attn: frame i attends to frames 0 and max(i - 1, 0) (the 2-frame "tuneavideo" pairing)."""
    return FrameContextAttnProcessor(num_frames, context="2frame", pairing="tuneavideo", query_chunk=None)


def transformer_blocks(unet) -> dict[str, BasicTransformerBlock]:
    """Path -> block for every transformer block of the UNet (the blocks the release inflates with T-Attn)."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}


def module_key(path: str) -> str:
    """A UNet path as an nn.ModuleDict key (no dots): "down_blocks.0...transformer_blocks.0" -> "down_blocks/0/..."."""
    return path.replace(".", "/")


class TemporalAttention(nn.Module):
    """T-Attn of one transformer block: tokens (G*N, S, C), frames group-major, -> the same, each spatial position
    attending over the N frames of its group: h + attn_temp(norm_temp(h)).

    Built as released: `attn_temp` an attention layer of the block's heads and head size (no bias on q/k/v), default
    init, then `to_out[0].weight` zeroed; `norm_temp` a LayerNorm (not trained: not in `trainable_modules`)."""

    def __init__(self, dim: int, heads: int, dim_head: int, bias: bool = False):
        super().__init__()
        self.norm_temp = nn.LayerNorm(dim)
        self.attn_temp = Attention(query_dim=dim, heads=heads, dim_head=dim_head, bias=bias)
        nn.init.zeros_(self.attn_temp.to_out[0].weight)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        b, s, c = x.shape
        if b % num_frames:
            raise ValueError(f"Tune-A-Video temporal attention: batch {b} is not a multiple of the clip's "
                             f"{num_frames} frames")
        g = b // num_frames
        y = x.reshape(g, num_frames, s, c).transpose(1, 2).reshape(g * s, num_frames, c)   # (G*S, N, C)
        y = y + self.attn_temp(self.norm_temp(y))
        return y.reshape(g, s, num_frames, c).transpose(1, 2).reshape(b, s, c)


def build_temporal(unet, seed: int) -> nn.ModuleDict:
    """One `TemporalAttention` per transformer block, initialised from `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = nn.ModuleDict()
        for path, block in transformer_blocks(unet).items():
            attn = block.attn1
            dim = attn.to_q.in_features
            layers[module_key(path)] = TemporalAttention(dim, attn.heads, attn.to_q.out_features // attn.heads,
                                                         bias=attn.to_q.bias is not None)
    return layers.to(unet.device, unet.dtype)


@contextlib.contextmanager
def _frozen_except(unet, params: list[nn.Parameter]):
    """Only `params` require gradients inside the block; every flag of the UNet is restored on exit."""
    flags = {p: p.requires_grad for p in unet.parameters()}
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


class TuneAVideoEditor(Editor):
    """Tune-A-Video: one-shot tuning on the clip (`prepare`), then CFG DDIM sampling from the inverted z_T.

    Args (defaults: the released configs, configs/editing/tuneavideo.yaml):
        prompt, negative_prompt (""), guidance_scale (12.5), num_steps (50), seed (33): see `Editor`; the seed
            draws the tuning's timesteps, noise and VAE posterior samples and the temporal layers' init.
        train_steps (500), learning_rate (3e-5), adam_beta1/adam_beta2/adam_weight_decay/adam_epsilon (0.9, 0.999,
            1e-2, 1e-8), max_grad_norm (1.0): the tuning (AdamW, constant learning rate, one clip per step).
        trainable_modules: suffixes of the trained modules' names ("attn1.to_q", "attn2.to_q", "attn_temp").
        checkpoint_every: save a resumable checkpoint every this many steps (in the tuning cache folder).
        gradient_checkpointing: recompute activations in the backward pass (memory; results unchanged).
        clip_groupnorm: ResNet/output GroupNorms pool over the frames as in the released pseudo-3D UNet.
        start_from: "inverted" (released: sampling starts from the DDIM-inverted z_T) | "renoise".
    """

    name = "Tune-A-Video"

    def __init__(self, prompt: str | None = None, negative_prompt: str = "", guidance_scale: float = 12.5,
                 num_steps: int = 50, seed: int = 33, train_steps: int = 500, learning_rate: float = 3e-5,
                 adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_weight_decay: float = 1e-2,
                 adam_epsilon: float = 1e-8, max_grad_norm: float = 1.0, trainable_modules=TRAINABLE,
                 checkpoint_every: int = 100, gradient_checkpointing: bool = True, clip_groupnorm: bool = True,
                 start_from: str = "inverted", freeu: dict | None = None, freeu_sites: str = "release"):
        super().__init__(prompt, negative_prompt, guidance_scale, num_steps, seed, freeu, freeu_sites)
        check_number("editing.train_steps", train_steps, low=1, integer=True, fix="tuning steps (released: 500)")
        check_number("editing.learning_rate", learning_rate, low=0, low_open=True, fix="AdamW's (released: 3e-5)")
        for key, value in (("adam_beta1", adam_beta1), ("adam_beta2", adam_beta2)):
            check_number(f"editing.{key}", value, low=0, high=1, high_open=True, fix="released: 0.9 / 0.999")
        check_number("editing.adam_weight_decay", adam_weight_decay, low=0, fix="released: 1e-2")
        check_number("editing.adam_epsilon", adam_epsilon, low=0, low_open=True, fix="released: 1e-8")
        check_number("editing.max_grad_norm", max_grad_norm, low=0, low_open=True, fix="released: 1.0")
        check_number("editing.checkpoint_every", checkpoint_every, low=1, integer=True,
                     fix="tuning steps between resumable checkpoints, e.g. 100")
        check_choice("editing.start_from", start_from, ("inverted", "renoise"))
        if isinstance(trainable_modules, str) or not trainable_modules:
            raise ConfigError(f"editing.trainable_modules={trainable_modules!r} must be a non-empty list of module "
                              f"name suffixes, e.g. {list(TRAINABLE)} (released)")
        self.train_steps, self.learning_rate = int(train_steps), float(learning_rate)
        self.adam = {"betas": (float(adam_beta1), float(adam_beta2)), "weight_decay": float(adam_weight_decay),
                     "eps": float(adam_epsilon)}
        self.max_grad_norm, self.checkpoint_every = float(max_grad_norm), int(checkpoint_every)
        self.trainable_modules = tuple(str(m) for m in trainable_modules)
        self.gradient_checkpointing, self.clip_groupnorm = bool(gradient_checkpointing), bool(clip_groupnorm)
        self.start_from = start_from
        self.temporal: nn.ModuleDict | None = None   # the T-Attn layers, installed by `prepare`
        self.tuned_key: str | None = None             # content key of the installed tuned weights
        self.num_frames: int | None = None
        self.losses: list[float] = []                  # loss of each step run by the last `prepare`
        self.optimizer_steps = 0                       # optimizer steps run by the last `prepare` (0: cache hit)
        self._original: dict[str, torch.Tensor] = {}   # UNet parameter name -> its weights before `prepare`
        self._handles: list = []

    def settings(self) -> dict:
        return {**super().settings(), **self.training_settings(), "clip_groupnorm": self.clip_groupnorm,
                "start_from": self.start_from, "checkpoint_every": self.checkpoint_every,
                "gradient_checkpointing": self.gradient_checkpointing}

    def training_settings(self) -> dict:
        """Everything that changes the tuned weights (goes into their cache key with the clip, prompt and model)."""
        return {"train_steps": self.train_steps, "learning_rate": self.learning_rate,
                "adam": {k: list(v) if isinstance(v, tuple) else v for k, v in self.adam.items()},
                "max_grad_norm": self.max_grad_norm, "trainable_modules": list(self.trainable_modules),
                "clip_groupnorm": self.clip_groupnorm, "attention": "sparse_causal", "seed": self.seed}

    # ---- what is trained -------------------------------------------------------------------------------------

    def _is_trainable(self, module_name: str) -> bool:
        return module_name.endswith(self.trainable_modules)

    def unet_trainables(self, unet) -> dict[str, nn.Parameter]:
        """UNet parameter name -> parameter, for the parameters of modules named with a `trainable_modules` suffix."""
        out = {}
        for name, module in unet.named_modules():
            if name and self._is_trainable(name):
                out.update({f"{name}.{p}": param for p, param in module.named_parameters()})
        return out

    def temporal_trainables(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, module in self.temporal.named_modules():
            if name and self._is_trainable(name):
                out.update({f"{name}.{p}": param for p, param in module.named_parameters()})
        return out

    def tuned_state(self, unet) -> dict[str, torch.Tensor]:
        """The trainable weights as named tensors ("unet.<name>", "temporal.<name>"), detached copies on the CPU."""
        state = {f"unet.{k}": p for k, p in self.unet_trainables(unet).items()}
        state.update({f"temporal.{k}": p for k, p in self.temporal.state_dict().items()})
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_tuned_state(self, unet, state: dict[str, torch.Tensor]) -> None:
        unet_params = self.unet_trainables(unet)
        expected = {f"unet.{k}" for k in unet_params} | {f"temporal.{k}" for k in self.temporal.state_dict()}
        if set(state) != expected:
            raise ValueError("tuned Tune-A-Video weights do not match this UNet and trainable_modules")
        with torch.no_grad():
            for k, p in unet_params.items():
                p.copy_(state[f"unet.{k}"])
        self.temporal.load_state_dict({k.removeprefix("temporal."): v for k, v in state.items()
                                       if k.startswith("temporal.")})

    # ---- install / release -------------------------------------------------------------------------------------

    def _install(self, model, num_frames: int) -> None:
        """Keep the original query weights, build the temporal layers (init from the seed) and hook them."""
        unet = model.unet
        if not transformer_blocks(unet):
            raise ConfigError("editing=tuneavideo needs a UNet with transformer blocks (SD-style)")
        self.num_frames = num_frames
        self._original = {k: p.detach().clone() for k, p in self.unet_trainables(unet).items()}
        self.temporal = build_temporal(unet, self.seed)
        if not self._original and not self.temporal_trainables():
            raise ConfigError(f"editing.trainable_modules={list(self.trainable_modules)} matches no module of the "
                              f"UNet; use module name suffixes such as {list(TRAINABLE)} (released)")
        for path, block in transformer_blocks(unet).items():
            layer = self.temporal[module_key(path)]
            self._handles.append(block.register_forward_hook(
                lambda module, args, output, layer=layer: layer(output, self.num_frames)))

    def release(self, model) -> None:
        """Restore the original query weights, remove the temporal hooks and layers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._original:
            params = dict(model.unet.named_parameters())
            with torch.no_grad():
                for k, value in self._original.items():
                    params[k].copy_(value)
        self._original, self.temporal, self.tuned_key, self.num_frames = {}, None, None, None

    def inversion_key(self) -> dict | None:
        """The inversion runs on the tuned UNet: its key names the tuned weights (and the GroupNorm pooling)."""
        return {"tuneavideo": self.tuned_key, "clip_groupnorm": self.clip_groupnorm}

    def inversion_observer(self, model, num_frames: int, latent_hw: tuple[int, int]):
        """Released pseudo-3D GroupNorm statistics during the inversion too (None when `clip_groupnorm` is off)."""
        return clip_groupnorm(model.unet, num_frames) if self.clip_groupnorm else None

    def _groupnorm(self, unet, num_frames: int):
        return clip_groupnorm(unet, num_frames) if self.clip_groupnorm else contextlib.nullcontext()

    # ---- tuning ------------------------------------------------------------------------------------------------

    def prepare(self, model, video, cache, progress: bool = True) -> None:
        """One-shot tuning on `video` with its source prompt (or the cached result), installed on `model.unet`."""
        self.release(model)
        self.losses, self.optimizer_steps = [], 0
        model.fingerprint   # computed now, on the weights as loaded (later cache keys must not see tuned weights)
        self._install(model, video.num_frames)
        store = cache.sibling(CACHE_NAME) if cache is not None else None
        key = None
        if store is not None:
            key = store.key(frames=video.frames, prompt=video.prompt, model=model.fingerprint,
                            training=self.training_settings())
            hit = store.load(key)
            if hit is not None:
                self.load_tuned_state(model.unet, hit[0])
                self.tuned_key = key
                log.info("Tune-A-Video: tuned weights %s from the cache", key)
                return
        self.tune(model, video, None if store is None else Path(store.root) / f"{key}.checkpoint.pt", progress)
        if store is not None:
            if store.save_or_warn(key, self.tuned_state(model.unet),
                                  {"losses": self.losses, "settings": self.training_settings()}, "Tune-A-Video"):
                (Path(store.root) / f"{key}.checkpoint.pt").unlink(missing_ok=True)   # kept if the entry was not
        self.tuned_key = key or "uncached"

    def tune(self, model, video, checkpoint: Path | None, progress: bool = True) -> None:
        """The released training loop on the installed layers (module docstring); resumes from `checkpoint`."""
        unet, n = model.unet, video.num_frames
        generator = torch.Generator().manual_seed(self.seed)
        unet_params, temporal_params = self.unet_trainables(unet), self.temporal_trainables()
        params = [*unet_params.values(), *temporal_params.values()]
        mixed = model.dtype != torch.float32   # fp16/bf16 model: fp32 trainable weights, autocast (as released)
        if mixed:
            for p in params:
                p.data = p.data.float()
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, **self.adam)
        start = 0
        if checkpoint is not None and checkpoint.is_file():
            start = self._resume(checkpoint, unet, optimizer, generator)
        with torch.no_grad():
            x = video.frames.to(model.device, model.vae.dtype) * 2 - 1
            posterior = model.vae.encode(x).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
        scale = model.vae.config.scaling_factor
        cond = encode_prompt(model, video.prompt).expand(n, -1, -1)
        scheduler = model.scheduler
        steps = tqdm(range(start, self.train_steps), desc="Tune-A-Video tuning", disable=not progress,
                     initial=start, total=self.train_steps)
        autocast = torch.autocast(model.device.type, dtype=model.dtype) if mixed else contextlib.nullcontext()
        was_training = unet.training
        with _frozen_except(unet, params), self_attention_processors(unet, sparse_causal(n)), \
                self._groupnorm(unet, n), self._checkpointing(unet):
            unet.train(self.gradient_checkpointing)  # diffusers checkpoints only in train mode (dropout is 0 in SD)
            try:
                for step in steps:
                    z0, t, noise = self.draw(generator, mean, std, scale, scheduler.config.num_train_timesteps)
                    zt = scheduler.add_noise(z0, noise, t)
                    target = noise if scheduler.config.prediction_type == "epsilon" else \
                        scheduler.get_velocity(z0, noise, t)
                    with autocast:
                        pred = unet(zt.to(model.dtype), t.to(model.device), encoder_hidden_states=cond).sample
                    loss = F.mse_loss(pred.float(), target.float())
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.optimizer_steps += 1
                    self.losses.append(loss.item())
                    steps.set_postfix(loss=f"{self.losses[-1]:.4f}")
                    done = step + 1
                    if checkpoint is not None and done % self.checkpoint_every == 0 and done < self.train_steps:
                        self._save_checkpoint(checkpoint, done, unet, optimizer, generator)
            finally:
                unet.train(was_training)
                if mixed:
                    for p in params:
                        p.data = p.data.to(model.dtype)

    @staticmethod
    def draw(generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor, scale: float,
             num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step's draws, as released: z0 = (mean + std e) * scale from the VAE posterior of every frame, one
        timestep t ~ U{0..T-1} for the clip, eps ~ N(0, I); all from `generator` (CPU), in this order."""
        e = torch.randn(mean.shape, generator=generator).to(mean.device)
        z0 = (mean + std * e) * scale
        t = torch.randint(0, num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return z0, t, noise

    @contextlib.contextmanager
    def _checkpointing(self, unet):
        if not self.gradient_checkpointing or unet.is_gradient_checkpointing:
            yield
            return
        unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            unet.disable_gradient_checkpointing()

    def _save_checkpoint(self, path: Path, step: int, unet, optimizer, generator: torch.Generator) -> None:
        """Trainable weights, optimizer state, step and generator state, written atomically."""
        state = {"step": step, "weights": self.tuned_state(unet), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state(), "losses": list(self.losses),
                 "settings": json.dumps(self.training_settings(), sort_keys=True)}
        with atomic_file(path) as tmp:
            torch.save(state, tmp)

    def _resume(self, path: Path, unet, optimizer, generator: torch.Generator) -> int:
        """Load a checkpoint written by `_save_checkpoint`; the step to go on from (0 when it is unusable)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["settings"] != json.dumps(self.training_settings(), sort_keys=True):
                raise ValueError("written with other training settings")
            self.load_tuned_state(unet, state["weights"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            log.warning("Tune-A-Video checkpoint %s is unusable (%s); tuning from the start", path, e)
            return 0
        self.losses = list(state["losses"])
        log.info("Tune-A-Video: resuming the tuning at step %d from %s", state["step"], path)
        return int(state["step"])

    # ---- editing -----------------------------------------------------------------------------------------------

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed=None) -> tuple[torch.Tensor, dict]:
        if self.temporal is None:
            raise RuntimeError("Tune-A-Video: call prepare(model, video, cache) before editing (stem.runs.edit does)")
        unet, n = model.unet, trajectory.latents.shape[1]
        if n != self.num_frames:
            raise ValueError(f"Tune-A-Video was prepared on {self.num_frames} frames, the trajectory has {n}")
        emb = torch.cat([prompts.negative.expand(n, -1, -1), prompts.target.expand(n, -1, -1)])

        def eps_fn(z: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            eps_uncond, eps_cond = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            return guided(eps_uncond, eps_cond, self.guidance_scale)

        x = start_latents(model.scheduler, trajectory, self.num_steps, self.start_from)
        with self_attention_processors(unet, sparse_causal(n)), self._groupnorm(unet, n):
            latents = ddim_sample_with(eps_fn, x, model.scheduler, self.num_steps, progress=progress,
                                       desc="Tune-A-Video editing")
        return latents, {"tuned_key": self.tuned_key, "tuning_losses": self.losses,
                         "optimizer_steps": self.optimizer_steps}

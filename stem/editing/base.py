"""What every editing method shares: prompts, guidance, the start latent, the result.

An editor consumes the inverted trajectory of a video (from any `stem.inversion` method,
usually through the cache of `stem.reconstruction.invert_video`) and samples an edited video
with classifier-free guidance (Ho & Salimans 2022):

    eps = eps_uncond + g (eps_cond - eps_uncond)

The sampling timesteps are the inversion's own (50 DDIM steps: 981, 961, ..., 1), so the
inverted latent z_t^inv exists at every editing step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from stem.ddim import Trajectory, sampling_timesteps
from stem.errors import ConfigError, check_choice
from stem.prompts import encode_prompt

START_FROM = ("renoise", "inverted")
DEFAULT_NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"


@dataclass
class Edit:
    """An edited video: latents (N, 4, h, w), the prompt it was edited towards, timings and a log."""

    latents: torch.Tensor
    prompt: str
    seconds: float
    info: dict = field(default_factory=dict)   # method-specific facts (e.g. the keyframes drawn per step)


@dataclass
class Prompts:
    """Text embeddings (1, 77, C) of the source, target and negative (unconditional) prompts."""

    source: torch.Tensor
    target: torch.Tensor
    negative: torch.Tensor
    target_text: str
    source_text: str


def encode_prompts(model, source: str, target: str | None, negative: str, overflow: str = "error") -> Prompts:
    """Embeddings of the three prompts; `target=None` edits towards the source prompt (reconstruction)."""
    target = source if target is None else target
    return Prompts(encode_prompt(model, source, overflow), encode_prompt(model, target, overflow),
                   encode_prompt(model, negative, overflow), target, source)


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + g (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def check_timesteps(scheduler, trajectory: Trajectory, num_steps: int) -> None:
    """ConfigError unless the editing schedule is the inversion's, reversed (z_t^inv needed at every step)."""
    wanted = sampling_timesteps(scheduler, num_steps)
    have = trajectory.timesteps.flip(0).to(wanted.device)
    if len(wanted) != len(have) or not torch.equal(wanted, have):
        raise ConfigError(f"editing.num_steps={num_steps} does not match the inversion's {len(have)} steps "
                          f"(timesteps {have[:3].tolist()}...); set editing.num_steps=inversion.num_steps")


def start_latents(scheduler, trajectory: Trajectory, num_steps: int, start_from: str = "renoise") -> torch.Tensor:
    """x_T, the latent editing starts from.

    - "inverted": the inverted z_T itself.
    - "renoise" (the TokenFlow release): eps = (z_T - sqrt(a_T) z_0) / sqrt(1 - a_T) from the last
      inverted latent and the clean one, then z_0 noised with it to the first sampling timestep
      (`scheduler.add_noise`). Equal to "inverted" when both schedules end at the same timestep.
    """
    check_choice("editing.start_from", start_from, START_FROM)
    z0, z_top = trajectory.latents[0], trajectory.latents[-1]
    if start_from == "inverted":
        return z_top.clone()
    a_top = scheduler.alphas_cumprod[int(trajectory.timesteps[-1])].to(torch.float32)
    eps = (z_top.float() - a_top.sqrt() * z0.float()) / (1 - a_top).sqrt()
    first = sampling_timesteps(scheduler, num_steps)[:1]
    return scheduler.add_noise(z0.float(), eps, first).to(z0.dtype)


class Observers(contextlib.AbstractContextManager):
    """Several observers (context managers around an inversion) entered and left as one.

    `close()` closes every member that can be closed; `find(cls)` returns the first member of a type.
    """

    def __init__(self, observers: list):
        self.observers, self._stack = list(observers), None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        for observer in self.observers:
            self._stack.enter_context(observer)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def find(self, cls):
        return next((o for o in self.observers if isinstance(o, cls)), None)

    def close(self) -> None:
        for observer in self.observers:
            if hasattr(observer, "close"):
                observer.close()


class Editor:
    """Base of editing methods: knobs shared by all, checks, timing. Subclasses implement `_edit`."""

    name = "edit"

    def __init__(self, prompt: str | None = None, negative_prompt: str = DEFAULT_NEGATIVE,
                 guidance_scale: float = 7.5, num_steps: int = 50, seed: int = 0):
        if num_steps < 1:
            raise ConfigError(f"editing.num_steps={num_steps} must be at least 1")
        if prompt is not None and not str(prompt).strip():
            raise ConfigError("editing.prompt is empty; give the target prompt, e.g. editing.prompt='a fox', "
                              "or null to edit towards the source prompt (reconstruction)")
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.guidance_scale, self.num_steps, self.seed = float(guidance_scale), num_steps, seed

    @property
    def reconstructs(self) -> bool:
        """True when the target is the source prompt (the method's "reconstruction" mode)."""
        return self.prompt is None

    def label(self, inversion_name: str) -> str:
        """Paper-style name of this editor on top of an inversion (e.g. STEM-TokenFlow)."""
        return f"STEM-{self.name}" if inversion_name.startswith("stem") else self.name

    def settings(self) -> dict:
        return {"method": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "guidance_scale": self.guidance_scale, "num_steps": self.num_steps, "seed": self.seed}

    def check(self, num_frames: int) -> None:
        """Refuse, before model work, settings that cannot run on `num_frames` frames."""

    def inversion_observer(self, model, num_frames: int, latent_hw: tuple[int, int]):
        """A context manager to enter around the inversion (e.g. recording attention maps), or None."""
        return None

    def inversion_key(self) -> dict | None:
        """What the observer changes in the inversion itself (goes into the inversion cache key), or None."""
        return None

    def edit(self, model, trajectory: Trajectory, source_prompt: str, prompt_overflow: str = "error",
             progress: bool = True, observed=None) -> Edit:
        """Edit the video whose inverted trajectory is `trajectory` (inverted under `source_prompt`;
        `observed`: the `inversion_observer` that was entered around that inversion)."""
        self.check(trajectory.latents.shape[1])
        check_timesteps(model.scheduler, trajectory, self.num_steps)
        prompts = encode_prompts(model, source_prompt, self.prompt, self.negative_prompt, prompt_overflow)
        start = time.perf_counter()
        latents, info = self._edit(model, trajectory, prompts, progress, observed)
        return Edit(latents, prompts.target_text, time.perf_counter() - start, info)

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

"""What every editing method shares: prompts, guidance, the start latent, the result.

An editor consumes the inverted trajectory of a video (from any `stem.inversion.methods` method,
usually through the cache of `stem.runs.reconstruction.invert_video`) and samples an edited video
with classifier-free guidance (Ho & Salimans 2022):

    eps = eps_uncond + g (eps_cond - eps_uncond)

The editing timesteps (`num_steps` DDIM steps, e.g. 981, 961, ..., 1 for 50) must each be one of
the inversion's, so the inverted latent z_t^inv exists at every editing step: the same schedule
(the paper and the STEM release: 50/50) or a subset of it (TokenFlow's release inverts with 500
steps, 1, 3, ..., 999, and edits with 50, whose timesteps 1, 21, ..., 981 are among them with
SD's "leading" spacing and steps_offset=1). `editing_indices` maps each editing step to the
inverted latent saved at that same timestep.

FreeU (Si et al. 2024; `stem.editing.freeu`) can be switched on for the edit only (`freeu`): the
STEM release edits with it (b1 1.2, b2 1.4, s1 0.9, s2 0.2), TokenFlow's release does not, and the
paper does not mention it (default off). `freeu_sites` picks the resnets it acts on: "release" (by
channel count, as the STEM release) or "diffusers" (by up-block index, as `unet.enable_freeu`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from stem.core.errors import ConfigError, check_choice, check_number
from stem.diffusion.ddim import Trajectory, sampling_timesteps
from stem.diffusion.prompts import encode_prompt
from stem.editing.freeu import FREEU_SITES, freeu_hooks

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


def editing_indices(scheduler, trajectory: Trajectory, num_steps: int) -> list[int]:
    """For each of the `num_steps` editing steps (descending timesteps t), the index into `trajectory.latents`
    of the inverted latent z_t^inv saved at that same timestep t.

    ConfigError (one line: both step counts and the fix) when an editing timestep is not an inversion
    timestep, e.g. 3 editing steps (667, 334, 1) on a 4-step inversion (1, 251, 501, 751).
    """
    wanted = [int(t) for t in sampling_timesteps(scheduler, num_steps)]
    _check_saved(wanted, set(trajectory.timesteps.tolist()), num_steps)
    return [trajectory.index(t) for t in wanted]


def _check_saved(wanted: list[int], saved: set[int], num_steps: int) -> None:
    missing = [t for t in wanted if t not in saved]
    if missing:
        have = len(saved)
        raise ConfigError(f"editing.num_steps={num_steps} needs timesteps {missing[:3]} that the inversion's "
                          f"{have} steps (timesteps {sorted(saved)[:3]}...) did not save; set editing.num_steps="
                          f"inversion.num_steps={have}, or a count whose timesteps are a subset of the inversion's "
                          f"(e.g. 50 of 500)")


def check_timesteps(scheduler, trajectory: Trajectory, num_steps: int) -> None:
    """ConfigError unless every editing timestep is an inversion timestep (z_t^inv needed at every step)."""
    editing_indices(scheduler, trajectory, num_steps)


def check_steps(scheduler, inversion_steps: int, num_steps: int) -> None:
    """`check_timesteps` from the step counts alone, before any inversion: ConfigError unless every timestep of
    `num_steps` editing steps is one of the `inversion_steps` inversion steps' (same scheduler settings)."""
    saved = {int(t) for t in sampling_timesteps(scheduler, inversion_steps)}
    _check_saved([int(t) for t in sampling_timesteps(scheduler, num_steps)], saved, num_steps)


def start_latents(scheduler, trajectory: Trajectory, num_steps: int, start_from: str = "renoise") -> torch.Tensor:
    """x_T, the latent editing starts from.

    - "inverted": the inverted latent at the first editing timestep (z_T itself when the editing
      schedule is the inversion's; z_981 of a 500-step inversion edited with 50 steps).
    - "renoise" (the TokenFlow release): eps = (z_T - sqrt(a_T) z_0) / sqrt(1 - a_T) from the last
      (noisiest) inverted latent, at the inversion's top timestep T (999 for 500 steps), and the clean
      one, then z_0 noised with it to the first editing timestep t_1 (981 for 50 steps):
      sqrt(a_t1) z_0 + sqrt(1 - a_t1) eps (`scheduler.add_noise`). Equal to "inverted" when T = t_1.
    """
    check_choice("editing.start_from", start_from, START_FROM)
    z0, z_top = trajectory.latents[0], trajectory.latents[-1]
    if start_from == "inverted":
        return trajectory.latents[editing_indices(scheduler, trajectory, num_steps)[0]].clone()
    a_top = scheduler.alphas_cumprod[int(trajectory.timesteps[-1])].to(torch.float32)
    eps = (z_top.float() - a_top.sqrt() * z0.float()) / (1 - a_top).sqrt()
    first = sampling_timesteps(scheduler, num_steps)[:1]
    return scheduler.add_noise(z0.float(), eps, first).to(z0.dtype)


def check_fraction(name: str, value) -> None:
    """ConfigError unless `editing.<name>` is a fraction of the steps in [0, 1]."""
    check_number(f"editing.{name}", value, low=0, high=1, fix="a fraction of the steps")


FREEU_KEYS = ("b1", "b2", "s1", "s2")


def check_freeu(freeu) -> dict | None:
    """None (off) or {b1, b2, s1, s2} as floats, each finite and >= 0 (scales of the decoder's backbone features and
    skip connections); ConfigError naming the problem otherwise."""
    if freeu is None:
        return None
    if not hasattr(freeu, "keys") or set(freeu.keys()) != set(FREEU_KEYS):
        raise ConfigError(f"editing.freeu={freeu!r} must be null (off) or give exactly b1, b2, s1, s2, "
                          "e.g. {b1: 1.2, b2: 1.4, s1: 0.9, s2: 0.2} (the STEM release)")
    return {k: float(check_number(f"editing.freeu.{k}", freeu[k], low=0, fix="a feature scale, e.g. {b1: 1.2, "
                                  "b2: 1.4, s1: 0.9, s2: 0.2} (the STEM release)")) for k in FREEU_KEYS}


@contextlib.contextmanager
def freeu_enabled(unet, freeu: dict | None, sites: str = "release"):
    """FreeU on the UNet's decoder at `sites` (`stem.editing.freeu.freeu_sites`) inside the block, removed
    on exit, also when the block raises; `freeu=None` changes nothing."""
    if freeu is None:
        yield
        return
    with freeu_hooks(unet, **freeu, sites=sites):
        yield


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
    # Weights beyond the job's model that the method needs: names of entries of the model preset's
    # `baseline_models` (e.g. "depth_estimator"); the job builds them after its checks and hands them to `attach`.
    needs: tuple[str, ...] = ()
    # An entry of `baseline_models` that replaces the job's model for this method, inversion included (Pix2Video
    # runs on a depth-conditioned Stable Diffusion 2), or None.
    base_model: str | None = None
    models: dict = {}

    def __init__(self, prompt: str | None = None, negative_prompt: str = DEFAULT_NEGATIVE,
                 guidance_scale: float = 7.5, num_steps: int = 50, seed: int = 0, freeu: dict | None = None,
                 freeu_sites: str = "release"):
        check_number("editing.num_steps", num_steps, low=1, integer=True, fix="DDIM steps (paper: 50)")
        check_number("editing.guidance_scale", guidance_scale, fix="the classifier-free guidance scale (paper: 7.5; "
                     "1 = no guidance)")
        if prompt is not None and not str(prompt).strip():
            raise ConfigError("editing.prompt is empty; give the target prompt, e.g. editing.prompt='a fox', "
                              "or null to edit towards the source prompt (reconstruction)")
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.guidance_scale, self.num_steps, self.seed = float(guidance_scale), num_steps, seed
        self.freeu = check_freeu(freeu)
        check_choice("editing.freeu_sites", freeu_sites, FREEU_SITES)
        self.freeu_sites = freeu_sites

    @property
    def reconstructs(self) -> bool:
        """True when the target is the source prompt (the method's "reconstruction" mode)."""
        return self.prompt is None

    def label(self, inversion_name: str) -> str:
        """Paper-style name of this editor on top of an inversion (e.g. STEM-TokenFlow)."""
        return f"STEM-{self.name}" if inversion_name.startswith("stem") else self.name

    def settings(self) -> dict:
        return {"method": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "guidance_scale": self.guidance_scale, "num_steps": self.num_steps, "seed": self.seed,
                "freeu": self.freeu, "freeu_sites": self.freeu_sites}

    def check(self, num_frames: int) -> None:
        """Refuse, before model work, settings that cannot run on `num_frames` frames."""

    def attach(self, models: dict) -> None:
        """The extra weights named in `needs`, built by the job (name -> module)."""
        missing = [n for n in self.needs if n not in models]
        if missing:
            raise ConfigError(f"{self.name} needs the weights {', '.join(missing)}; give them in the model preset's "
                              f"baseline_models (configs/model/*.yaml)")
        self.models = dict(models)

    def prepare(self, model, video, cache, progress: bool = True) -> None:
        """Work on the input video before its inversion (depth maps, one-shot tuning); nothing by default.
        `cache`: the job's inversion cache (`stem.runs.cache.TensorCache`; None with use_cache=false): a method
        keeps its own entries in `cache.sibling("<method>")`, keyed by `cache.key(**parts)`."""

    def release(self, model) -> None:
        """Undo what `prepare` installed on `model` (hooks, tuned weights); called when the edit ends or fails."""

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
        with freeu_enabled(model.unet, self.freeu, self.freeu_sites):
            latents, info = self._edit(model, trajectory, prompts, progress, observed)
        return Edit(latents, prompts.target_text, time.perf_counter() - start, info)

    def _edit(self, model, trajectory: Trajectory, prompts: Prompts, progress: bool,
              observed) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

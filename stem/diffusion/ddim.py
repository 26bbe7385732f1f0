"""DDIM inversion and sampling (paper Eq. 3), one step function for both directions.

Notation (paper Sec. 3, Eq. 3; diffusers' names in brackets):
    z_t      latent at timestep t                          [sample]
    eps      UNet noise prediction eps_theta(z_t, t, c)     [model_output]
    a_t      cumulative product of (1 - beta) up to t      [alphas_cumprod[t]]
    x0       predicted clean latent                         [pred_original_sample]

One deterministic DDIM move from a noise level a_from to a_to (eta = 0):
    x0  = (z - sqrt(1 - a_from) eps) / sqrt(a_from)
    z'  = sqrt(a_to) x0 + sqrt(1 - a_to) eps
Inversion walks the timesteps upwards (1, 21, ..., 981 for 50 steps), evaluating eps at
the target timestep with a_from the previous (less noisy) timestep's alpha, or the final
alpha (alphas_cumprod[0] with set_alpha_to_one=False) on the first step: the convention
of diffusers' DDIMInverseScheduler. Sampling walks them downwards, as DDIMScheduler.step.

Both loops take a k-diffusion style `callback(info: dict)` called after every step with
keys i, t, latents, eps, and show a tqdm progress bar unless `progress=False`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

Callback = Callable[[dict], None]


def ddim_step(z: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor | float,
              a_to: torch.Tensor | float) -> torch.Tensor:
    """Move `z` from noise level a_from to a_to along the predicted noise `eps` (Eq. 3).

    Arithmetic in fp32 whatever the model dtype; the result has `z`'s dtype.
    """
    a_from = torch.as_tensor(a_from, dtype=torch.float32, device=z.device)
    a_to = torch.as_tensor(a_to, dtype=torch.float32, device=z.device)
    zf, ef = z.float(), eps.float()
    x0 = (zf - (1 - a_from).sqrt() * ef) / a_from.sqrt()
    return (a_to.sqrt() * x0 + (1 - a_to).sqrt() * ef).to(z.dtype)


def sampling_timesteps(scheduler: DDIMScheduler, num_steps: int) -> torch.Tensor:
    """Descending DDIM timesteps (981, 961, ..., 1 for 50 steps with SD's settings)."""
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone()


def _alpha(scheduler: DDIMScheduler, t: int | None) -> torch.Tensor:
    """a_t, or the final alpha for t=None (the clean end of the chain)."""
    return scheduler.final_alpha_cumprod if t is None else scheduler.alphas_cumprod[int(t)]


def _eps(unet, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return unet(z, t, encoder_hidden_states=cond.expand(z.shape[0], -1, -1)).sample


@dataclass
class Trajectory:
    """Inverted latents: latents[0] is z_0 (clean), latents[i + 1] is z at timesteps[i]."""

    latents: torch.Tensor    # (num_steps + 1, N, 4, h, w)
    timesteps: torch.Tensor  # (num_steps,) ascending

    def index(self, t: int) -> int:
        """Position in `latents` of the inverted latent at timestep t (0 for the clean latent);
        KeyError when t is not one of the inversion timesteps."""
        if t == 0:
            return 0
        (hits,) = (self.timesteps == t).nonzero(as_tuple=True)
        if len(hits) != 1:
            raise KeyError(f"timestep {t} is not one of the inversion timesteps")
        return int(hits[0]) + 1

    def at(self, t: int) -> torch.Tensor:
        """The inverted latent at timestep t (0 for the clean latent)."""
        return self.latents[self.index(t)]


@torch.no_grad()
def ddim_invert(unet, latents: torch.Tensor, cond: torch.Tensor, scheduler: DDIMScheduler,
                num_steps: int = 50, callback: Callback | None = None, progress: bool = True) -> Trajectory:
    """DDIM-invert clean latents (N, 4, h, w) under text embedding `cond` (1, L, C), no CFG.

    Returns every intermediate latent (editing methods consume all of them).
    """
    timesteps = sampling_timesteps(scheduler, num_steps).flip(0)
    z, kept = latents, [latents]
    for i, t in enumerate(tqdm(timesteps, desc="DDIM inversion", disable=not progress)):
        eps = _eps(unet, z, t, cond)
        z = ddim_step(z, eps, _alpha(scheduler, timesteps[i - 1] if i else None), _alpha(scheduler, t))
        kept.append(z)
        if callback is not None:
            callback({"i": i, "t": int(t), "latents": z, "eps": eps})
    return Trajectory(torch.stack(kept), timesteps)


@torch.no_grad()
def ddim_sample(unet, latents: torch.Tensor, cond: torch.Tensor, scheduler: DDIMScheduler,
                num_steps: int = 50, callback: Callback | None = None, progress: bool = True) -> torch.Tensor:
    """Deterministic DDIM sampling (eta 0) from z_T at the top timestep down to z_0, no CFG."""
    return ddim_sample_with(lambda z, t, i: _eps(unet, z, t, cond), latents, scheduler, num_steps, callback, progress)


EpsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (z_t, t, step index i) -> eps


@torch.no_grad()
def ddim_sample_with(eps_fn: EpsFn, latents: torch.Tensor, scheduler: DDIMScheduler, num_steps: int = 50,
                     callback: Callback | None = None, progress: bool = True, desc: str = "DDIM sampling",
                     after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM sampling (eta 0) with any noise predictor: `eps_fn(z_t, t, i)` (guidance, editing branches...);
    `after_step(z, i)` may replace the latent after step i (e.g. a latent blend)."""
    timesteps = sampling_timesteps(scheduler, num_steps)
    z = latents
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress)):
        eps = eps_fn(z, t, i)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
        z = ddim_step(z, eps, _alpha(scheduler, t), _alpha(scheduler, t_next))
        if after_step is not None:
            z = after_step(z, i)
        if callback is not None:
            callback({"i": i, "t": int(t), "latents": z, "eps": eps})
    return z

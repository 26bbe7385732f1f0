"""Pixels <-> latents with the VAE: posterior mean x scaling factor (spec/STEM.md section 1)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def encode_frames(model, frames: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 4, H/8, W/8) latents = E(x).mean * scaling_factor."""
    vae, out = model.vae, []
    for i in tqdm(range(0, len(frames), batch_size), desc="VAE encode", disable=not progress):
        x = frames[i:i + batch_size].to(model.device, model.dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """(N, 4, h, w) latents -> (N, 3, 8h, 8w) float32 RGB in [0, 1] on the CPU."""
    vae, out = model.vae, []
    for i in tqdm(range(0, len(latents), batch_size), desc="VAE decode", disable=not progress):
        z = latents[i:i + batch_size].to(model.device, model.dtype) / vae.config.scaling_factor
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)

"""Inversion and reconstruction of a frame-sharded video: each process holds a slice.

`shard_video` splits the video (ConfigError before any model work for impossible splits);
`invert_sharded` runs DDIM inversion on this process's latents with every `attn1` configured for
the shard, and gathers the trajectory of all N frames on rank 0; `reconstruct_sharded` samples
this process's frames back. With one process both equal `method.invert` / `method.reconstruct`
bit for bit (the processors then take their single-process code path).

Supported methods: `DDIMInversion` (1-frame, 2-frame, all-frame) and `STEMInversion`;
FateZero's inversion stays single-process.
"""

from __future__ import annotations

import torch

from stem.core.errors import ConfigError
from stem.diffusion.ddim import Callback, Trajectory, ddim_invert, ddim_sample
from stem.distributed.sharding import Distributed, FrameShard
from stem.inversion.attention import FrameContextAttnProcessor, self_attention_processors
from stem.inversion.methods import DDIMInversion, InversionMethod, STEMInversion


def shard_video(dist: Distributed, method: InversionMethod, num_frames: int) -> FrameShard:
    """This process's frames for `method` (STEM's EM groups never straddle processes)."""
    if dist.active and not isinstance(method, (DDIMInversion, STEMInversion)):
        raise ConfigError(f"inversion {getattr(method, 'name', type(method).__name__)} runs on one process only: "
                          "launch it without torchrun (or use a DDIM or STEM inversion)")
    group = method.kwargs["group"] if isinstance(method, STEMInversion) else None
    return dist.shard(num_frames, group)


def shard_processor(method: InversionMethod, shard: FrameShard, reconstruction: bool = False):
    """The attn1 processor of `method` for this process's frames."""
    n = shard.num_frames
    if isinstance(method, STEMInversion):  # stem_in_reconstruction=False samples back per frame
        return method.phase_processor(n, reconstruction, shard)  # its K per layer goes to method.bases_report()
    if isinstance(method, DDIMInversion):
        return FrameContextAttnProcessor(n, method.context, method.pairing, method.query_chunk, shard=shard)
    raise ConfigError(f"inversion {getattr(method, 'name', type(method).__name__)} has no frame-sharded form: "
                      "use a DDIM or STEM inversion, or one process")


def _local(latents: torch.Tensor, shard: FrameShard) -> None:
    if len(latents) != shard.num_frames:
        raise ConfigError(f"{len(latents)} latents given but this process holds {shard.num_frames} frames "
                          f"({shard.start}..{shard.stop - 1} of {shard.total}): pass shard.local(all_latents)")


def invert_sharded(method: InversionMethod, model, latents: torch.Tensor, cond: torch.Tensor, shard: FrameShard,
                   callback: Callback | None = None, progress: bool = True) -> Trajectory | None:
    """DDIM-invert this process's clean latents (n, 4, h, w), frames shard.start .. shard.stop - 1.

    Returns on rank 0 the trajectory of all N frames, (num_steps + 1, N, 4, h, w) as `method.invert`
    returns it; None on the other ranks. `callback` sees this process's latents."""
    _local(latents, shard)
    if not isinstance(method, (DDIMInversion, STEMInversion)) and not shard.dist.active:
        return method.invert(model, latents, cond, callback, progress)
    method.check(model.unet, shard.total, *latents.shape[-2:])  # the whole video's EM groups
    with self_attention_processors(model.unet, shard_processor(method, shard)):
        traj = ddim_invert(model.unet, latents, cond, model.scheduler, method.num_steps, callback, progress)
    full = shard.dist.gather_slices(traj.latents, shard.sizes, dim=1)
    return Trajectory(full, traj.timesteps) if full is not None else None


def reconstruct_sharded(method: InversionMethod, model, noise: torch.Tensor, cond: torch.Tensor, shard: FrameShard,
                        callback: Callback | None = None, progress: bool = True) -> torch.Tensor | None:
    """DDIM-sample this process's frames back from their z_T (n, 4, h, w); rank 0 gets all N frames' z_0
    (as `method.reconstruct` returns them), the other ranks None."""
    _local(noise, shard)
    if not isinstance(method, (DDIMInversion, STEMInversion)) and not shard.dist.active:
        return method.reconstruct(model, noise, cond, callback, progress)
    with self_attention_processors(model.unet, shard_processor(method, shard, reconstruction=True)):
        z0 = ddim_sample(model.unet, noise, cond, model.scheduler, method.num_steps, callback, progress)
    return shard.dist.gather_slices(z0, shard.sizes, dim=0)

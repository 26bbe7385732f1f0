"""Invert a video, reconstruct it, and measure how close the reconstruction is.

`invert_video` is the cached entry point every editing method starts from: it returns the
full DDIM trajectory of a video under its source prompt, reusing a cache entry keyed by a
content hash of (frames, weights, dtype, device type, prompt, method settings) and of the
inversion code's version (`stem.runs.cache_version.INVERSION_CACHE_VERSION`).
`reconstruct_video` adds DDIM sampling back from z_T and decodes both the reconstruction and
the VAE round trip of the input (the VAE alone caps PSNR); `stem.metrics.evaluation` scores them.

Frame-sharded jobs (`dist`, a `stem.distributed.sharding.Distributed` with several processes, docs/SCALING.md):
every process encodes, inverts, samples back and decodes its own contiguous slice of the frames
(`stem.inversion.sharded`); rank 0 alone reads and writes the cache and receives every frame's trajectory
and decoded frames (the other ranks get None there). The cache entry is the one a single-process
run writes and reuses: same key (the same inputs), same tensors up to float summation order.

STEM inversions also record how many bases each layer used (`method.bases_report()`, adaptive K:
`inversion.num_bases=auto`): the inversion's record is stored in the cache entry's meta.json (key
`BASES_META`, beside the key's inputs, never in the key), so a cache hit reports the K per layer of the
run that inverted (`Inverted.bases`); `bases_section` is metrics.json's "bases".
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stem.core.errors import ConfigError
from stem.data.video import Video
from stem.diffusion.ddim import Trajectory, ddim_sample
from stem.diffusion.prompts import encode_prompt
from stem.diffusion.vae import decode_latents, encode_frames
from stem.distributed.sharding import Distributed
from stem.inversion.attention import self_attention_processors
from stem.inversion.sharded import invert_sharded, shard_processor, shard_video
from stem.runs import cache_version
from stem.runs.benchmarking import measure, time_inversion, warm_up
from stem.runs.cache import TensorCache, content_key

log = logging.getLogger(__name__)
BASES_META = "bases"  # key of a cache entry's meta.json: the STEM inversion's bases record (not part of the key)


@dataclass
class Inverted:
    trajectory: Trajectory | None  # None on ranks > 0 of a frame-sharded job (rank 0 holds every frame)
    cond: torch.Tensor        # source prompt embedding (1, 77, C)
    key: str                  # cache key
    entry: Path | None        # cache entry folder (None without a cache)
    cache_hit: bool
    seconds: float            # the inversion loop (`benchmarking.time_inversion`; VAE excluded); 0 on a cache hit
    peak_mib: float | None = None  # peak memory increase while inverting (CUDA allocated / CPU RSS); None if cached
    encode_seconds: float = 0.0    # VAE encoding of the frames (0 on a cache hit)
    bases: dict | None = None      # STEM: K per layer of the inversion (`method.bases_report()["inversion"]`; on a
                                   # cache hit the record stored with the entry, None if it has none); else None


@dataclass
class Reconstruction:
    inverted: Inverted
    vae_frames: torch.Tensor | None  # VAE round trip of the input, (N, 3, H, W) in [0, 1]; None on ranks > 0
    frames: torch.Tensor | None      # reconstruction, (N, 3, H, W) in [0, 1]; None on ranks > 0
    seconds: float


def invert_video(model, video: Video, method, cache: TensorCache | None = None, prompt_overflow: str = "error",
                 progress: bool = True, observer: contextlib.AbstractContextManager | None = None,
                 cache_extra: dict | None = None, warmup_steps: int = 0, dist: Distributed | None = None) -> Inverted:
    """The inverted trajectory of `video` under `video.prompt` with `method` (cached).

    `observer` (e.g. a `stem.metrics.feature_similarity.FeatureRecorder`) is entered around the
    inversion. It needs the UNet calls, so with an observer the inversion runs even on a cache
    hit; the cached latents are returned then, and nothing is written. `cache_extra`: anything else
    that changes the inversion (e.g. hooks an observer installs that alter the UNet), added to the key.
    `warmup_steps`: untimed inversion steps run first (timing jobs, `stem.runs.benchmarking.warm_up`).
    `dist`: a frame-sharded job (module docstring); None or one process: the single-process code.
    """
    cond = encode_prompt(model, video.prompt, prompt_overflow)  # refuses a bad prompt before any work
    method.check(model.unet, video.num_frames, video.height // 8, video.width // 8)
    key = content_key(kind="inversion", version=cache_version.INVERSION_CACHE_VERSION,
                      frames=video.frames, model=model.fingerprint, dtype=str(model.dtype), device=model.device.type,
                      prompt=video.prompt, method=method.settings(),
                      scheduler={k: model.scheduler.config[k] for k in sorted(model.scheduler.config)
                                 if not k.startswith("_")}, **({"extra": cache_extra} if cache_extra else {}))
    if dist is not None and dist.active:
        return _invert_sharded(model, video, method, cache, cond, key, dist, progress, observer, warmup_steps)
    hit = cache.load(key) if cache is not None else None
    if hit is not None and observer is None:
        log.info("inversion cache hit %s", cache.path(key))
        return Inverted(_trajectory(hit[0], model), cond, key, cache.path(key), True, 0.0, bases=hit[1].get(BASES_META))
    if hit is None and cache is not None:
        cache.check_writable()  # before the inversion, not when saving its result
    start = time.perf_counter()
    latents = encode_frames(model, video.frames, progress=progress)
    encode_seconds = time.perf_counter() - start
    warm_up(method, model, latents, cond, warmup_steps)
    log.info("inverting %d frames with %s (%d DDIM steps)", video.num_frames, method.name, method.num_steps)
    traj, seconds, peak = time_inversion(method, model, latents, cond, progress, observer)
    traj = _trajectory({"latents": traj.latents, "timesteps": traj.timesteps}, model)
    peak_mib = peak / 2**20
    if hit is not None:
        log.info("inversion cache hit %s (inverted again for %s)", cache.path(key), type(observer).__name__)
        return Inverted(_trajectory(hit[0], model), cond, key, cache.path(key), True, seconds, peak_mib,
                        encode_seconds, hit[1].get(BASES_META))
    entry = _save(cache, key, traj, video, model, method, seconds)
    return Inverted(traj, cond, key, entry, False, seconds, peak_mib, encode_seconds, _report(method).get("inversion"))


def _save(cache: TensorCache | None, key: str, traj: Trajectory, video: Video, model, method,
          seconds: float) -> Path | None:
    """Write the cache entry of a finished inversion (None without a cache, or when it cannot be written)."""
    if cache is None:
        return None
    meta = {"video": video.name, "source": video.source, "prompt": video.prompt, "model": model.name,
            "fingerprint": model.fingerprint, "dtype": str(model.dtype), "method": method.settings(),
            "frames": list(video.frames.shape), "seconds": seconds}
    record = _report(method).get("inversion")
    if record is not None:
        meta[BASES_META] = record
    entry = cache.save_or_warn(key, {"latents": traj.latents, "timesteps": traj.timesteps}, meta, "inversion")
    if entry is not None:  # else a failed write (a full disk): the inversion is done, the run keeps it
        log.info("inverted latents cached in %s", entry)
    return entry


def _invert_sharded(model, video: Video, method, cache: TensorCache | None, cond: torch.Tensor, key: str,
                    dist: Distributed, progress: bool, observer, warmup_steps: int) -> Inverted:
    """`invert_video` of a frame-sharded job: rank 0 looks the key up and tells the others; on a miss every
    rank encodes and inverts its slice (`stem.inversion.sharded.invert_sharded`),
    rank 0 receives and caches all N frames.
    `seconds` and `peak_mib` are this rank's."""
    if observer is not None:
        raise ConfigError(f"{type(observer).__name__} records the UNet of one process: run feature metrics "
                          "without torchrun (one process)")
    shard = shard_video(dist, method, video.num_frames)
    hit = cache.load(key) if cache is not None and dist.rank == 0 else None
    if _from_rank0(dist, hit is not None):
        if dist.rank != 0:
            return Inverted(None, cond, key, None, True, 0.0)
        log.info("inversion cache hit %s", cache.path(key))
        return Inverted(_trajectory(hit[0], model), cond, key, cache.path(key), True, 0.0, bases=hit[1].get(BASES_META))
    if cache is not None and dist.rank == 0:
        cache.check_writable()  # before the inversion, not when saving its result
    start = time.perf_counter()
    latents = encode_frames(model, shard.local(video.frames), progress=progress)
    encode_seconds = time.perf_counter() - start
    if warmup_steps > 0:  # as `stem.runs.benchmarking.warm_up`, sharded: every rank takes part
        short = copy.copy(method)
        short.num_steps = warmup_steps
        invert_sharded(short, model, latents, cond, shard, progress=False)
    out = {}
    seconds, peak = measure(lambda: out.update(traj=invert_sharded(method, model, latents, cond, shard,
                                                                   progress=progress)), model.device)
    if out["traj"] is None:  # ranks > 0
        return Inverted(None, cond, key, None, False, seconds, peak / 2**20, encode_seconds)
    traj = _trajectory({"latents": out["traj"].latents, "timesteps": out["traj"].timesteps}, model)
    entry = _save(cache, key, traj, video, model, method, seconds)
    return Inverted(traj, cond, key, entry, False, seconds, peak / 2**20, encode_seconds,
                    _report(method).get("inversion"))


def _report(method) -> dict:
    """`method.bases_report()` (STEM), or {} (other methods, or before any STEM attention ran)."""
    report = getattr(method, "bases_report", None)
    return (report() if report is not None else None) or {}


def bases_section(method, inverted: Inverted, sampled_back: bool = True) -> dict | None:
    """metrics.json's "bases" of a STEM run (None for other methods): {"auto": the adaptive-K settings or
    None (fixed K), "inversion": `inverted.bases`, and with `sampled_back` (a reconstruction, not an
    edit) "reconstruction": the record of the sampling back when it used STEM attention}."""
    if getattr(method, "bases_report", None) is None:
        return None
    section = {"auto": method.settings().get("auto"), "inversion": inverted.bases}
    reconstruction = _report(method).get("reconstruction") if sampled_back else None
    if reconstruction is not None:
        section["reconstruction"] = reconstruction
    return section


def _from_rank0(dist: Distributed, flag: bool) -> bool:
    """Rank 0's `flag` on every rank."""
    return bool(dist.broadcast(torch.tensor([int(flag)], device=dist.device)).item())


def _broadcast_from_rank0(dist: Distributed, tensor: torch.Tensor | None, ndim: int, device, dtype) -> torch.Tensor:
    """Rank 0's `tensor` (None elsewhere) on every rank: its shape first, then its values."""
    shape = torch.tensor(tensor.shape if dist.rank == 0 else [0] * ndim, device=dist.device)
    dist.broadcast(shape)
    out = tensor.contiguous() if dist.rank == 0 else torch.empty(shape.tolist(), device=device, dtype=dtype)
    return dist.broadcast(out)


def _trajectory(tensors: dict, model) -> Trajectory:
    """The trajectory on the model's device and dtype in the contiguous memory format, both when just inverted
    (`torch.stack` keeps the UNet's channels-last output) and when loaded from the cache: the convolutions then
    sum in the same order, so a cache hit reconstructs bit-identically to the miss that wrote it."""
    latents = tensors["latents"].to(model.device, model.dtype).contiguous()  # `.to` alone keeps the strides
    return Trajectory(latents, tensors["timesteps"])


def reconstruct_video(model, video: Video, method, cache: TensorCache | None = None,
                      prompt_overflow: str = "error", progress: bool = True,
                      observer: contextlib.AbstractContextManager | None = None,
                      warmup_steps: int = 0, dist: Distributed | None = None) -> Reconstruction:
    """Invert (cached; `observer`, `warmup_steps` and `dist` as in `invert_video`), reconstruct with guidance 1,
    decode both the reconstruction and the clean latents (the VAE round trip of the input)."""
    inverted = invert_video(model, video, method, cache, prompt_overflow, progress, observer,
                            warmup_steps=warmup_steps, dist=dist)
    if dist is not None and dist.active:
        return _reconstruct_sharded(model, video, method, inverted, dist, progress)
    start = time.perf_counter()
    latents = method.reconstruct(model, inverted.trajectory.latents[-1], inverted.cond, progress=progress)
    frames = decode_latents(model, latents, progress=progress)
    seconds = time.perf_counter() - start
    vae_frames = decode_latents(model, inverted.trajectory.latents[0], progress=progress)
    return Reconstruction(inverted, vae_frames, frames, seconds)


def _reconstruct_sharded(model, video: Video, method, inverted: Inverted, dist: Distributed,
                         progress: bool) -> Reconstruction:
    """`reconstruct_video` of a frame-sharded job: rank 0 sends every rank z_T and z_0 of the video (it alone
    holds the trajectory, inverted or cached); each rank samples back and decodes its slice; rank 0 receives
    all decoded frames. The STEM bases of the sampling are global, as in the inversion (`stem.inversion.sharded`)."""
    shard = shard_video(dist, method, video.num_frames)
    ends = inverted.trajectory.latents[[0, -1]] if dist.rank == 0 else None
    ends = _broadcast_from_rank0(dist, ends, 5, model.device, model.dtype)  # (2, N, c, h, w): z_0, z_T
    clean, noise = (shard.local(z).contiguous() for z in ends)
    start = time.perf_counter()
    with self_attention_processors(model.unet, shard_processor(method, shard, reconstruction=True)):
        latents = ddim_sample(model.unet, noise, inverted.cond, model.scheduler, method.num_steps, progress=progress)
    frames = _gather_frames(dist, shard, decode_latents(model, latents, progress=progress))
    seconds = time.perf_counter() - start
    vae_frames = _gather_frames(dist, shard, decode_latents(model, clean, progress=progress))
    return Reconstruction(inverted, vae_frames, frames, seconds)


def _gather_frames(dist: Distributed, shard, frames: torch.Tensor) -> torch.Tensor | None:
    """Every rank's decoded frames (CPU) concatenated on rank 0; None on the others."""
    full = dist.gather_slices(frames.to(dist.device), shard.sizes)
    return None if full is None else full.cpu()

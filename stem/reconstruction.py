"""Invert a video, reconstruct it, and measure how close the reconstruction is.

`invert_video` is the cached entry point every editing method starts from: it returns the
full DDIM trajectory of a video under its source prompt, reusing a cache entry keyed by a
content hash of (frames, weights, dtype, device type, prompt, method settings) and of the
inversion code's version (`stem.cache_version.INVERSION_CACHE_VERSION`).
`reconstruct_video` adds DDIM sampling back from z_T and decodes both the reconstruction and
the VAE round trip of the input (the VAE alone caps PSNR); `stem.evaluation` scores them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stem import cache_version
from stem.benchmarking import time_inversion, warm_up
from stem.cache import TensorCache, content_key
from stem.ddim import Trajectory
from stem.prompts import encode_prompt
from stem.vae import decode_latents, encode_frames
from stem.video import Video

log = logging.getLogger(__name__)


@dataclass
class Inverted:
    trajectory: Trajectory
    cond: torch.Tensor        # source prompt embedding (1, 77, C)
    key: str                  # cache key
    entry: Path | None        # cache entry folder (None without a cache)
    cache_hit: bool
    seconds: float            # the inversion loop (`stem.benchmarking.time_inversion`; VAE excluded); 0 on a cache hit
    peak_mib: float | None = None  # peak memory increase while inverting (CUDA allocated / CPU RSS); None if cached
    encode_seconds: float = 0.0    # VAE encoding of the frames (0 on a cache hit)


@dataclass
class Reconstruction:
    inverted: Inverted
    vae_frames: torch.Tensor      # VAE round trip of the input, (N, 3, H, W) in [0, 1]
    frames: torch.Tensor          # reconstruction, (N, 3, H, W) in [0, 1]
    seconds: float


def invert_video(model, video: Video, method, cache: TensorCache | None = None, prompt_overflow: str = "error",
                 progress: bool = True, observer: contextlib.AbstractContextManager | None = None,
                 cache_extra: dict | None = None, warmup_steps: int = 0) -> Inverted:
    """The inverted trajectory of `video` under `video.prompt` with `method` (cached).

    `observer` (e.g. a `stem.metrics.feature_similarity.FeatureRecorder`) is entered around the
    inversion. It needs the UNet calls, so with an observer the inversion runs even on a cache
    hit; the cached latents are returned then, and nothing is written. `cache_extra`: anything else
    that changes the inversion (e.g. hooks an observer installs that alter the UNet), added to the key.
    `warmup_steps`: untimed inversion steps run first (timing jobs, `stem.benchmarking.warm_up`).
    """
    cond = encode_prompt(model, video.prompt, prompt_overflow)  # refuses a bad prompt before any work
    method.check(model.unet, video.num_frames, video.height // 8, video.width // 8)
    key = content_key(kind="inversion", version=cache_version.INVERSION_CACHE_VERSION,
                      frames=video.frames, model=model.fingerprint, dtype=str(model.dtype), device=model.device.type,
                      prompt=video.prompt, method=method.settings(),
                      scheduler={k: model.scheduler.config[k] for k in sorted(model.scheduler.config)
                                 if not k.startswith("_")}, **({"extra": cache_extra} if cache_extra else {}))
    hit = cache.load(key) if cache is not None else None
    if hit is not None and observer is None:
        log.info("inversion cache hit %s", cache.path(key))
        return Inverted(_trajectory(hit[0], model), cond, key, cache.path(key), True, 0.0)
    if hit is None and cache is not None:
        cache.check_writable()  # before the inversion, not when saving its result
    start = time.perf_counter()
    latents = encode_frames(model, video.frames, progress=progress)
    encode_seconds = time.perf_counter() - start
    warm_up(method, model, latents, cond, warmup_steps)
    traj, seconds, peak = time_inversion(method, model, latents, cond, progress, observer)
    traj = _trajectory({"latents": traj.latents, "timesteps": traj.timesteps}, model)
    peak_mib = peak / 2**20
    if hit is not None:
        log.info("inversion cache hit %s (inverted again for %s)", cache.path(key), type(observer).__name__)
        return Inverted(_trajectory(hit[0], model), cond, key, cache.path(key), True, seconds, peak_mib,
                        encode_seconds)
    entry = None
    if cache is not None:
        meta = {"video": video.name, "source": video.source, "prompt": video.prompt, "model": model.name,
                "fingerprint": model.fingerprint, "dtype": str(model.dtype), "method": method.settings(),
                "frames": list(video.frames.shape), "seconds": seconds}
        try:
            entry = cache.save(key, {"latents": traj.latents, "timesteps": traj.timesteps}, meta)
            log.info("inverted latents cached in %s", entry)
        except OSError as e:  # e.g. a full disk: the inversion is done, keep it for this run
            log.warning("could not write the inversion cache entry %s (%s); continuing without caching it",
                        cache.path(key), e)
    return Inverted(traj, cond, key, entry, False, seconds, peak_mib, encode_seconds)


def _trajectory(tensors: dict, model) -> Trajectory:
    """The trajectory on the model's device and dtype in the contiguous memory format, both when just inverted
    (`torch.stack` keeps the UNet's channels-last output) and when loaded from the cache: the convolutions then
    sum in the same order, so a cache hit reconstructs bit-identically to the miss that wrote it."""
    latents = tensors["latents"].to(model.device, model.dtype).contiguous()  # `.to` alone keeps the strides
    return Trajectory(latents, tensors["timesteps"])


def reconstruct_video(model, video: Video, method, cache: TensorCache | None = None,
                      prompt_overflow: str = "error", progress: bool = True,
                      observer: contextlib.AbstractContextManager | None = None,
                      warmup_steps: int = 0) -> Reconstruction:
    """Invert (cached; `observer` and `warmup_steps` as in `invert_video`), reconstruct with guidance 1,
    decode both the reconstruction and the clean latents (the VAE round trip of the input)."""
    inverted = invert_video(model, video, method, cache, prompt_overflow, progress, observer,
                            warmup_steps=warmup_steps)
    start = time.perf_counter()
    latents = method.reconstruct(model, inverted.trajectory.latents[-1], inverted.cond, progress=progress)
    frames = decode_latents(model, latents, progress=progress)
    seconds = time.perf_counter() - start
    vae_frames = decode_latents(model, inverted.trajectory.latents[0], progress=progress)
    return Reconstruction(inverted, vae_frames, frames, seconds)

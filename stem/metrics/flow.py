"""Optical flow of a source video for the warp error (spec/METRICS.md, "Temporal consistency").

Convention (as `stem.data.video.Video.flow` and torchvision's RAFT): forward flow `F_{t->t+1}` of shape
`(N-1, 2, H, W)` in pixels, channel 0 = x, 1 = y, such that `frame_{t+1}(p + F(p)) = frame_t(p)`;
backward flow `B_{t+1->t}` the same with the frames swapped.

Backends:
- `raft`: torchvision `raft_large` with `Raft_Large_Weights.C_T_SKHT_V2` (the spec's model); inputs
  through the weights' transforms ([0, 1] -> [-1, 1]), replicate-padded to multiples of 8 (854 -> 856)
  and cropped back exactly; frames at least 128x128. An explicit `model=` (tests: a randomly
  initialised `raft_small(weights=None)`) is reported as `raft-custom`.
- `dis`: OpenCV DIS, preset MEDIUM, on grayscale uint8; needs no weights (the offline fallback).
- `auto`: `raft` when its weights load (torchvision's hub cache, or a download), else `dis` with a
  logged warning. Offline without cached weights the load fails and `dis` is used.

Flows are cached by content hash of the source frames and the settings (`stem.runs.cache`), because every
method is scored against the same source video.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stem.core.errors import MetricError
from stem.diffusion.device import resolve_device
from stem.runs.cache import TensorCache, content_key

log = logging.getLogger(__name__)

RAFT_WEIGHTS = "Raft_Large_Weights.C_T_SKHT_V2"
RAFT_MIN_SIZE = 128  # torchvision's RAFT meta "min_size": the correlation pyramid needs H, W >= 128
BACKENDS = ("auto", "raft", "dis")
FLOW_CACHE_VERSION = 1  # bump when the flow computation changes, so old cache entries miss
# what each flow source's numbers rest on (metrics.json `flow_weights`): the paper's RAFT weights, or not
FLOW_WEIGHTS = {"raft": RAFT_WEIGHTS, "raft-custom": "custom model, not the official weights",
                "dis": "none: OpenCV DIS, no learned weights", "exact": "none: exact ground-truth flow"}


def flow_weights(backend: str) -> str:
    """The weights behind a flow `backend` as `estimate_flow` (or the evaluator: "exact") names it."""
    return FLOW_WEIGHTS.get(backend, "unknown")


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad the last two dims of `x` up to multiples of `multiple`, split evenly (RAFT's
    InputPadder). Returns the padded tensor and `(left, right, top, bottom)` for `unpad`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if not any(pads):
        return x, pads
    return F.pad(x, pads, mode="replicate"), pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Crop what `pad_to_multiple` added: the exact inverse on the original pixels."""
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]


@functools.lru_cache(maxsize=1)
def load_raft() -> torch.nn.Module:
    """torchvision `raft_large` with `C_T_SKHT_V2` weights (hub cache or download; raises offline)."""
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

    return raft_large(weights=Raft_Large_Weights.C_T_SKHT_V2, progress=False).eval()


def _raft_transforms():
    from torchvision.models.optical_flow import Raft_Large_Weights

    return Raft_Large_Weights.C_T_SKHT_V2.transforms()  # building the preset loads no weights


@torch.inference_mode()
def raft_flow(frames: torch.Tensor, model: torch.nn.Module, *, device: torch.device, iters: int = 12,
              batch_size: int = 8, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward RAFT flow of consecutive frames `(N, 3, H, W)` in [0, 1] (CPU float32 out).

    The 2(N-1) directed pairs run in batches of at most `batch_size`; each batch is padded to
    multiples of 8 and the flow cropped back to `(H, W)`. A batch that runs out of GPU memory is
    retried at half the size (logged), down to one pair, so the batch fits the memory there is.
    """
    model = model.to(device).eval()
    transforms = _raft_transforms()
    n = len(frames)
    first = torch.cat([frames[:-1], frames[1:]])  # forward pairs (t, t+1), then backward (t+1, t)
    second = torch.cat([frames[1:], frames[:-1]])
    out, i = [], 0
    with tqdm(total=len(first), desc="RAFT flow (directed pairs)", disable=not progress) as bar:
        while i < len(first):
            try:
                a, b = transforms(first[i:i + batch_size].to(device), second[i:i + batch_size].to(device))
                (a, pads), (b, _) = pad_to_multiple(a), pad_to_multiple(b)
                flow = model(a, b, num_flow_updates=iters)[-1]
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("RAFT: out of memory on %s; retrying with batches of %d pairs (metrics.flow.batch_size)",
                            device, batch_size)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            out.append(unpad(flow, pads).float().cpu())
            i += len(a)
            bar.update(len(a))
    flows = torch.cat(out)
    return flows[:n - 1].contiguous(), flows[n - 1:].contiguous()


def _gray_uint8(frame: torch.Tensor) -> np.ndarray:
    rgb = (frame.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def dis_flow(frames: torch.Tensor, *, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward OpenCV DIS flow (preset MEDIUM, grayscale uint8) of `(N, 3, H, W)` in [0, 1].

    `calc(I0, I1)` returns `u` with `I1(p + u(p)) ~ I0(p)`: the same convention as RAFT's.
    """
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [_gray_uint8(f) for f in frames.cpu().float()]
    fwd, bwd = [], []
    for t in tqdm(range(len(gray) - 1), desc="DIS flow (pairs)", disable=not progress):
        fwd.append(torch.from_numpy(dis.calc(gray[t], gray[t + 1], None)).permute(2, 0, 1))
        bwd.append(torch.from_numpy(dis.calc(gray[t + 1], gray[t], None)).permute(2, 0, 1))
    return torch.stack(fwd).float(), torch.stack(bwd).float()


def check_frames(frames, name: str = "frames", metric: str = "optical flow") -> torch.Tensor:
    """(N, 3, H, W) tensor or (N, H, W, 3) array in [0, 1] -> CPU float32 (N, 3, H, W); clear ValueErrors."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise MetricError(f"{metric}: {name} must be (N, H, W, 3) arrays or (N, 3, H, W) tensors, "
                             f"got array {frames.shape}")
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise MetricError(f"{metric}: {name} must be an (N, 3, H, W) tensor, got {shape}")
    frames = frames.detach().cpu().float()
    if len(frames) < 2:
        raise MetricError(f"{metric}: {name} {tuple(frames.shape)} has {len(frames)} frame(s); it needs >= 2 "
                         "(one consecutive pair)")
    if torch.isnan(frames).any():
        raise MetricError(f"{metric}: {name} {tuple(frames.shape)} contains NaN")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise MetricError(f"{metric}: {name} {tuple(frames.shape)} has values in [{lo:.3g}, {hi:.3g}]; "
                         "expected RGB in [0, 1]")
    return frames.clamp(0, 1)


def _model_key(model: torch.nn.Module) -> str:
    return content_key(cls=type(model).__name__, **{f"p:{k}": v for k, v in model.state_dict().items()})


def estimate_flow(frames, backend: str = "auto", *, device: str | torch.device = "auto", raft_iters: int = 12,
                  batch_size: int = 8, model: torch.nn.Module | None = None, cache_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Forward `(N-1, 2, H, W)` and backward `(N-1, 2, H, W)` flow of a video, and the backend used.

    Args:
        frames: `(N, 3, H, W)` tensor (or `(N, H, W, 3)` array) in [0, 1], N >= 2.
        backend: "auto" (raft if its weights load, else dis), "raft" or "dis".
        device: where RAFT runs ("auto": cuda when available). DIS runs on the CPU.
        raft_iters: RAFT refinement iterations (12: torchvision's and RAFT's default).
        batch_size: directed frame pairs per RAFT call (memory vs speed).
        model: an explicit RAFT module instead of the official weights (reported as "raft-custom").
        cache_dir: a `TensorCache` folder: flows are stored by content hash of frames and settings.
        progress: show a tqdm bar over pairs.

    Returns: `(forward, backward, backend_name)` with backend_name in {"raft", "raft-custom", "dis"};
    flows are CPU float32.
    """
    frames = check_frames(frames, "source frames")
    if backend not in BACKENDS:
        raise MetricError(f"optical flow: backend={backend!r}; use one of {', '.join(BACKENDS)}")
    if model is not None and backend == "dis":
        raise MetricError("optical flow: a RAFT model was given with backend='dis'; use backend='raft' or 'auto'")
    h, w = frames.shape[-2:]
    auto = backend == "auto"
    if auto:
        backend = "raft" if model is not None or min(h, w) >= RAFT_MIN_SIZE else "dis"
        if backend == "dis":
            log.warning("warp error: frames %s are below RAFT's %dx%d minimum; using OpenCV DIS flow",
                        tuple(frames.shape), RAFT_MIN_SIZE, RAFT_MIN_SIZE)
    if backend == "raft" and min(h, w) < RAFT_MIN_SIZE:
        raise MetricError(f"optical flow: RAFT needs frames of at least {RAFT_MIN_SIZE}x{RAFT_MIN_SIZE}, "
                         f"got {tuple(frames.shape)} (N, 3, H, W); use backend='dis'")
    cache = TensorCache(cache_dir) if cache_dir is not None else None
    settings = {"raft": dict(weights=RAFT_WEIGHTS if model is None else _model_key(model), iters=raft_iters),
                "dis": dict(preset="MEDIUM")}

    def key(name: str) -> str:
        return content_key(kind="flow", version=FLOW_CACHE_VERSION, frames=frames, backend=name, **settings[name])

    def lookup(name: str):
        hit = cache.load(key(name)) if cache is not None else None
        return None if hit is None else (hit[0]["forward"], hit[0]["backward"], hit[1]["backend"])

    if backend == "raft":
        if (hit := lookup("raft")) is not None:  # auto: a cached RAFT flow is used even offline
            return hit
        label = "raft" if model is None else "raft-custom"
        if model is None:
            try:
                model = load_raft()
            except Exception as e:  # offline: weights neither in torchvision's hub cache nor downloadable
                if not auto:
                    raise MetricError(f"optical flow: RAFT weights {RAFT_WEIGHTS} could not be loaded ({e}); "
                                       "put them in torchvision's hub cache or use backend='dis'") from e
                log.warning("warp error: RAFT weights %s could not be loaded (%s: %s); using OpenCV DIS flow "
                            "instead (numbers are not comparable with RAFT ones)", RAFT_WEIGHTS,
                            type(e).__name__, e)
                backend = "dis"
    if backend == "raft":
        fwd, bwd = raft_flow(frames, model, device=resolve_device(device), iters=raft_iters,
                             batch_size=batch_size, progress=progress)
    else:
        if (hit := lookup("dis")) is not None:
            return hit
        fwd, bwd = dis_flow(frames, progress=progress)
        label = "dis"
    if cache is not None:
        cache.save_or_warn(key(backend), {"forward": fwd, "backward": bwd},
                           {"backend": label, "frames_shape": list(frames.shape), **settings[backend]}, "flow")
    return fwd, bwd, label

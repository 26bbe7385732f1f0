"""A known-answer video: a camera pan cut from a real photo, with exact ground-truth flow.

Frame `t` is the crop window of a scikit-image photo whose top-left corner sits at
`(x0 + t*dx, y0 + t*dy)` (integer pixels). Content moves by `(-dx, -dy)` between frames, so the
forward flow is constant, `F_{t->t+1}(p) = (-dx, -dy)`, and `frame_{t+1}(p + F(p)) = frame_t(p)`
holds exactly wherever `p + F(p)` is inside the frame.
"""

from __future__ import annotations

import numpy as np
import skimage.data
import torch

from stem.core.errors import ConfigError
from stem.data.video import Video, cap_indices, check_multiple_of_8, from_uint8

# RGB photos shipped inside scikit-image (no download needed)
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def _photo(image: str) -> np.ndarray:
    if image not in PHOTOS:
        raise ConfigError(f"image={image!r} is not a shipped RGB photo of skimage.data: use one of {', '.join(PHOTOS)}")
    return getattr(skimage.data, image)()


def _start(*, size: int, window: int, step: int, n_frames: int, dim: str, shift: str) -> int:
    """Offset of the first window so the whole path is centred in the photo; checks it fits."""
    travel = abs(step) * (n_frames - 1)
    if window + travel > size:
        if window > size:
            hint = f"use {dim} <= {size}"
        else:
            hint = f"use n_frames <= {(size - window) // abs(step) + 1}, a smaller {dim} or a smaller |{shift}|"
        raise ConfigError(
            f"camera pan leaves the photo ({dim} {size} px): a {window}-px window moved {n_frames - 1} x {step} px "
            f"needs {window + travel} px; {hint}"
        )
    return (size - window - travel) // 2 + (travel if step < 0 else 0)


def camera_pan(
    n_frames: int = 8,
    width: int = 256,
    height: int = 256,
    dx: int = 4,
    dy: int = 2,
    prompt: str = "a portrait photo of an astronaut",
    fps: float = 10,
    image: str = "astronaut",
    edit_prompt: str | None = None,
    max_frames: int | None = None,
    max_frames_keep: str = "even",
) -> Video:
    """A camera pan over `skimage.data.<image>()` with exact flow `(-dx, -dy)` in `Video.flow`.

    Args:
        n_frames: number of frames (>= 1).
        width, height: window size, positive multiples of 8 (the VAE downsamples by 8).
        dx, dy: integer shift of the window per frame in pixels (may be negative).
        prompt: source prompt describing the photo.
        fps: frame rate recorded in the video.
        image: an RGB photo shipped with `skimage.data` (see `PHOTOS`), e.g. "astronaut" (512x512).
        edit_prompt: a target prompt for editing experiments (kept in `Video.edit_prompt`).
        max_frames: at most this many of the `n_frames` frames (`stem.data.video.cap_indices`, as
            `data.max_frames` of real clips); None or a value >= n_frames keeps all of them.
        max_frames_keep: which frames the cap keeps: "even" (spread, first and last kept) or "first"
            (the first `max_frames`, consecutive).
    """
    width = check_multiple_of_8(width, name="width")
    height = check_multiple_of_8(height, name="height")
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise ConfigError(f"n_frames={n_frames!r} must be an integer >= 1: use e.g. 8")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in (dx, dy)):
        raise ConfigError(f"dx={dx!r}, dy={dy!r} must be integers (pixels): round them")
    photo = _photo(image)
    x0 = _start(size=photo.shape[1], window=width, step=dx, n_frames=n_frames, dim="width", shift="dx")
    y0 = _start(size=photo.shape[0], window=height, step=dy, n_frames=n_frames, dim="height", shift="dy")
    ts = cap_indices(n_frames, max_frames, max_frames_keep)
    crops = np.stack([
        photo[y0 + t * dy : y0 + t * dy + height, x0 + t * dx : x0 + t * dx + width] for t in ts
    ])  # fmt: skip
    gaps = torch.from_numpy(np.diff(ts)).float()  # frames between consecutive picks: the flow scales with them
    flow = torch.empty(len(ts) - 1, 2, height, width)
    flow[:, 0], flow[:, 1] = -dx * gaps[:, None, None], -dy * gaps[:, None, None]
    return Video(
        frames=from_uint8(crops),
        fps=float(fps),
        prompt=prompt,
        name="synthetic_pan" if image == "astronaut" else f"synthetic_pan_{image}",
        source=f"skimage.data.{image}() camera pan: {width}x{height} window from ({x0}, {y0}), "
        f"dx={dx}, dy={dy} px/frame",
        flow=flow,
        edit_prompt=edit_prompt,
        source_indices=tuple(int(t) for t in ts),
    )

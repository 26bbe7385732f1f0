"""Invert (cached) and edit a video: the editing counterpart of `stem.runs.reconstruction.reconstruct_video`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stem.data.video import Video
from stem.diffusion.vae import decode_latents
from stem.editing.base import Edit, Editor, Observers
from stem.runs.cache import TensorCache
from stem.runs.reconstruction import Inverted, invert_video


@dataclass
class EditedVideo:
    inverted: Inverted
    edit: Edit
    frames: torch.Tensor              # edited video (N, 3, H, W) in [0, 1]
    vae_frames: torch.Tensor | None   # VAE round trip of the input (reconstruction mode or report_reconstruction)
    reconstruction: torch.Tensor | None = None  # plain reconstruction of the inversion (report_reconstruction)


def edit_video(model, video: Video, method, editor: Editor, cache: TensorCache | None = None,
               prompt_overflow: str = "error", progress: bool = True,
               observer: contextlib.AbstractContextManager | None = None,
               report_reconstruction: bool = False) -> EditedVideo:
    """Invert `video` with `method` (cached; `observer` as in `invert_video`), edit it with `editor`, decode.

    `report_reconstruction`: also sample the inverted latents back with the inversion's own
    `method.reconstruct` (DDIM from z_T, source prompt, guidance 1, the inversion's self-attention: the
    reconstruction of the STEM release's preprocessing), so the run reports how faithful the latents it
    edited are. It reuses the inverted latents; no second inversion.

    `editor.prepare` sees the video first (a baseline's depth maps or one-shot tuning); `editor.release`
    undoes what it installed when the edit is done or fails. The editor's own observer (e.g. FateZero's
    attention recorder) is entered around the inversion too, and closed (its store freed or removed from disk)
    when the edit is done or fails.
    """
    editor.check(video.num_frames)
    try:
        editor.prepare(model, video, cache, progress)
        inverted, edit = _invert_and_edit(model, video, method, editor, cache, prompt_overflow, progress, observer)
        frames = decode_latents(model, edit.latents, progress=progress)
        reconstruction = None
        if report_reconstruction:   # with what `prepare` installed: the UNet the latents were inverted with
            latents = method.reconstruct(model, inverted.trajectory.latents[-1], inverted.cond, progress=progress)
            reconstruction = decode_latents(model, latents, progress=progress)
    finally:
        editor.release(model)
    vae = decode_latents(model, inverted.trajectory.latents[0], progress=progress) \
        if editor.reconstructs or report_reconstruction else None
    return EditedVideo(inverted, edit, frames, vae, reconstruction)


def _invert_and_edit(model, video: Video, method, editor: Editor, cache, prompt_overflow: str, progress: bool,
                     observer) -> tuple[Inverted, Edit]:
    recorder = editor.inversion_observer(model, video.num_frames, (video.height // 8, video.width // 8))
    observers = [o for o in (observer, recorder) if o is not None]
    try:
        inverted = invert_video(model, video, method, cache, prompt_overflow, progress,
                                Observers(observers) if observers else None, editor.inversion_key())
        return inverted, editor.edit(model, inverted.trajectory, video.prompt, prompt_overflow, progress, recorder)
    finally:
        if recorder is not None and hasattr(recorder, "close"):
            recorder.close()

"""FreeU (diffusers' enable_freeu) on exactly during an edit's UNet calls, off afterwards, also after a failure."""

import pytest
import torch

from stem.editing.tokenflow import TokenFlowEditor
from stem.inversion import DDIMInversion
from stem.reconstruction import invert_video
from stem.synthetic import camera_pan

RELEASED = {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}


def _freeu_of(unet):
    return {k: getattr(unet.up_blocks[0], k, None) for k in RELEASED}


def test_freeu_is_on_in_every_edit_call_and_off_after_also_after_an_exception(tiny_model):
    """Catches: FreeU never enabled, left enabled after the edit, or left enabled when the edit raises."""
    unet = tiny_model.unet
    video = camera_pan(n_frames=2, width=32, height=32)
    traj = invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=2), progress=False).trajectory
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, a: seen.append(_freeu_of(unet)))
    try:
        editor = TokenFlowEditor("a robot", num_steps=2, freeu=RELEASED)
        editor.edit(tiny_model, traj, video.prompt, progress=False)
    finally:
        handle.remove()
    assert seen and all(s == RELEASED for s in seen)
    assert all(v is None for v in _freeu_of(unet).values())
    assert editor.settings()["freeu"] == RELEASED

    def boom(module, args):
        raise RuntimeError("boom")
    handle = unet.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            editor.edit(tiny_model, traj, video.prompt, progress=False)
    finally:
        handle.remove()
    assert all(v is None for v in _freeu_of(unet).values())
    assert torch.is_grad_enabled()

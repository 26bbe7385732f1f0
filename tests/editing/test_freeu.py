"""FreeU at the STEM release's sites (by channel count), diffusers' rule as an option, on exactly during an
edit's UNet calls and gone afterwards, also after a failure."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from stem.data.synthetic import camera_pan
from stem.editing.freeu import freeu_hooks, freeu_sites
from stem.editing.tokenflow import TokenFlowEditor
from stem.inversion.methods import DDIMInversion
from stem.runs.reconstruction import invert_video

RELEASED = {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}

# The STEM release (TokenFlow-Edit/free_u/free_lunch_utils.py) acts on every up-block resnet input whose
# backbone part h has 1280 channels (b1, s1) or 640 (b2, s2). In SD 1.5 (block_out_channels 320, 640, 1280,
# 1280; 3 resnets per up block) h comes from the mid block (1280) into up_blocks.0.resnets.0, from the previous
# up block into resnets.0 of blocks 1-3 (1280, 1280, 640), and from the previous resnet elsewhere (the
# block's own width: 1280, 1280, 640, 320 for blocks 0-3).
SD15_RELEASE_SITES = {
    "up_blocks.0.resnets.0": 1, "up_blocks.0.resnets.1": 1, "up_blocks.0.resnets.2": 1,
    "up_blocks.1.resnets.0": 1, "up_blocks.1.resnets.1": 1, "up_blocks.1.resnets.2": 1,
    "up_blocks.2.resnets.0": 1, "up_blocks.2.resnets.1": 2, "up_blocks.2.resnets.2": 2,
    "up_blocks.3.resnets.0": 2,
}   # up_blocks.3.resnets.1-2 (h of 320): nothing
# diffusers' enable_freeu: by block index, up_blocks.0 -> (b1, s1), up_blocks.1 -> (b2, s2).
SD15_DIFFUSERS_SITES = {f"up_blocks.{i}.resnets.{j}": i + 1 for i in (0, 1) for j in range(3)}
SD15_HIDDEN = {"up_blocks.0.resnets.0": 1280, "up_blocks.0.resnets.1": 1280, "up_blocks.0.resnets.2": 1280,
               "up_blocks.1.resnets.0": 1280, "up_blocks.1.resnets.1": 1280, "up_blocks.1.resnets.2": 1280,
               "up_blocks.2.resnets.0": 1280, "up_blocks.2.resnets.1": 640, "up_blocks.2.resnets.2": 640,
               "up_blocks.3.resnets.0": 640}


def sd15_unet_on_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, sample_size=64)


def test_release_sites_on_an_sd15_shaped_unet_are_keyed_by_channel_count():
    """Catches: sites by up-block index (diffusers' rule: 7 of the 10 release sites differ), h's width at
    resnets.0 taken as its own block's width instead of the block below's (up_blocks.2.resnets.0 and
    up_blocks.3.resnets.0 change stage), or (b1, s1) and (b2, s2) swapped."""
    unet = sd15_unet_on_meta()
    release = freeu_sites(unet, "release")
    assert {name: stage for name, (stage, _) in release.items()} == SD15_RELEASE_SITES
    assert {name: hidden for name, (_, hidden) in release.items()} == SD15_HIDDEN
    diffusers = freeu_sites(unet, "diffusers")
    assert {name: stage for name, (stage, _) in diffusers.items()} == SD15_DIFFUSERS_SITES
    differ = {n for n in SD15_RELEASE_SITES if SD15_DIFFUSERS_SITES.get(n) != SD15_RELEASE_SITES[n]}
    assert len(differ) == 7


def reference_freeu_input(x, hidden, b, s):
    """The release's FreeU on a resnet input x = [h, r] (h: the first `hidden` channels): h's first half of
    channels times b; r's 2-D spectrum scaled by s at the frequencies {0, -1} x {0, -1} (the 2x2 square
    left of and above the centre after fftshift, threshold 1), real part of the inverse."""
    h, r = x[:, :hidden].clone(), x[:, hidden:]
    h[:, :hidden // 2] *= b
    spectrum = torch.fft.fft2(r.double())
    H, W = r.shape[-2:]
    for row in {0, H - 1}:
        for col in {0, W - 1}:
            spectrum[..., row, col] *= s
    return torch.cat([h, torch.fft.ifft2(spectrum).real.to(x.dtype)], dim=1)


def _unet_call(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 981, encoder_hidden_states=text).sample


# tiny UNet (block_out_channels 32, 32, 64, 64): the release's widths read as 64 (b1, s1) and 32 (b2, s2)
@pytest.mark.parametrize("site, hidden, stage", [("up_blocks.2.resnets.0", 64, 1), ("up_blocks.2.resnets.1", 32, 2),
                                                 ("up_blocks.1.resnets.2", 64, 1)])
def test_hooked_resnet_input_equals_the_release_formula_and_hooks_leave(tiny_model, site, hidden, stage):
    """Catches: all of h scaled instead of its first half, the skip r left unfiltered, a filtered square of
    another size (threshold 2; {0, 1} x {0, 1} instead of {0, -1} x {0, -1} gives the same real part), b/s
    of the wrong stage, or hooks left on after the block (the UNet's output then differs from an unhooked
    call)."""
    unet = tiny_model.unet
    resnet = unet.get_submodule(site)
    seen = {}
    before = resnet.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0].clone()))
    try:
        plain = _unet_call(unet)
        with freeu_hooks(unet, **RELEASED, sites="release") as plan:
            after = resnet.register_forward_pre_hook(lambda m, a: seen.__setitem__("hooked", a[0].clone()))
            try:
                hooked = _unet_call(unet)
            finally:
                after.remove()
        raw, hooked_input = seen["raw"], seen["hooked"]   # of the same (hooked) call
        again = _unet_call(unet)
    finally:
        before.remove()
    assert plan[site] == (stage, hidden)
    b, s = (RELEASED["b1"], RELEASED["s1"]) if stage == 1 else (RELEASED["b2"], RELEASED["s2"])
    expected = reference_freeu_input(raw, hidden, b, s)
    # float32 FFT round trip on an 8x8 or 4x4 map of O(1) values: errors ~1e-6
    torch.testing.assert_close(hooked_input, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(hooked, plain, atol=1e-4)
    assert torch.equal(again, plain)
    assert all(not m._forward_pre_hooks for m in unet.modules())


def test_diffusers_sites_equal_diffusers_enable_freeu(tiny_model):
    """Catches: the `diffusers` option not being diffusers' rule (other blocks, other halves)."""
    unet = tiny_model.unet
    with freeu_hooks(unet, **RELEASED, sites="diffusers"):
        ours = _unet_call(unet, seed=1)
    unet.enable_freeu(**RELEASED)
    try:
        theirs = _unet_call(unet, seed=1)
    finally:
        unet.disable_freeu()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, _unet_call(unet, seed=1), atol=1e-4)


def _hook_count(unet):
    return sum(len(m._forward_pre_hooks) for m in unet.up_blocks.modules())


def test_freeu_is_on_in_every_edit_call_and_off_after_also_after_an_exception(tiny_model):
    """Catches: FreeU never enabled, left enabled after the edit, or left enabled when the edit raises."""
    unet = tiny_model.unet
    sites = len(freeu_sites(unet, "release"))
    video = camera_pan(n_frames=2, width=32, height=32)
    traj = invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=2), progress=False).trajectory
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, a: seen.append(_hook_count(unet)))
    try:
        editor = TokenFlowEditor("a robot", num_steps=2, freeu=RELEASED)
        editor.edit(tiny_model, traj, video.prompt, progress=False)
    finally:
        handle.remove()
    # tiny widths 32, 32, 64, 64: h of 64 or 32 at every up-block resnet input but none of the 12 is skipped
    assert seen and all(n == sites for n in seen) and sites == 12
    assert _hook_count(unet) == 0
    assert editor.settings()["freeu"] == RELEASED and editor.settings()["freeu_sites"] == "release"

    def boom(module, args):
        raise RuntimeError("boom")
    handle = unet.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            editor.edit(tiny_model, traj, video.prompt, progress=False)
    finally:
        handle.remove()
    assert _hook_count(unet) == 0
    assert torch.is_grad_enabled()

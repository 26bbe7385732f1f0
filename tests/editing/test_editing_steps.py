"""Editing with fewer steps than the inversion: editing timesteps a subset of the inversion's
(TokenFlow's release: 500 inversion steps, 50 editing steps); each step reads z^inv at its own timestep."""

import pytest
import torch
from diffusers import DDIMScheduler

from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.diffusion.ddim import Trajectory, sampling_timesteps
from stem.diffusion.prompts import encode_prompt
from stem.editing.base import check_timesteps, editing_indices, start_latents
from stem.editing.tokenflow import TokenFlowEditor
from stem.inversion.methods import DDIMInversion
from stem.runs.reconstruction import invert_video


@pytest.fixture(scope="module")
def four_steps(tiny_model):
    video = camera_pan(n_frames=2, width=64, height=64)
    return video, invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=4), progress=False).trajectory


def _fake_trajectory(scheduler, steps: int) -> Trajectory:
    """A trajectory with the timesteps of a `steps`-step inversion and random latents (1 frame, 4x2x2)."""
    timesteps = sampling_timesteps(scheduler, steps).flip(0)
    latents = torch.randn(steps + 1, 1, 4, 2, 2, generator=torch.Generator().manual_seed(steps))
    return Trajectory(latents, timesteps)


def test_release_setting_50_of_500_steps_is_a_subset_and_maps_each_step_to_its_own_timestep(tiny_model):
    """With SD's scheduler (leading spacing, steps_offset=1) 50 steps are 981, 961, ..., 1 and 500 steps
    1, 3, ..., 999: a subset. Catches: a subset refused, or step i mapped to the i-th latent of the inversion."""
    sched = tiny_model.scheduler
    assert (sched.config.timestep_spacing, sched.config.steps_offset) == ("leading", 1)  # SD 1.5's settings
    traj = _fake_trajectory(sched, 500)
    index = editing_indices(sched, traj, 50)
    expected = list(range(981, 0, -20))
    assert [int(traj.timesteps[i - 1]) for i in index] == expected
    assert index == [(t - 1) // 2 + 1 for t in expected]  # timestep 1 + 2j is inversion step j: latents[j + 1]
    check_timesteps(sched, traj, 50)


def test_start_latents_renoise_from_the_inversions_top_timestep_to_the_first_editing_timestep(tiny_model):
    """Release setting: eps from z_999 and z_0, z_0 re-noised to 981 (explicit formula); `inverted` takes
    z^inv at 981. Catches: the editing schedule's alpha used for z_999 (or the inversion's 999 as target),
    or `inverted` returning the top latent z_999 while editing starts at 981."""
    sched = tiny_model.scheduler
    traj = _fake_trajectory(sched, 500)
    a = sched.alphas_cumprod.double()
    z0, z999 = traj.latents[0].double(), traj.latents[-1].double()
    eps = (z999 - a[999].sqrt() * z0) / (1 - a[999]).sqrt()
    expected = a[981].sqrt() * z0 + (1 - a[981]).sqrt() * eps
    torch.testing.assert_close(start_latents(sched, traj, 50, "renoise"), expected.float(), atol=1e-6, rtol=1e-5)
    assert torch.equal(start_latents(sched, traj, 50, "inverted"), traj.latents[(981 - 1) // 2 + 1])


def test_non_subset_editing_steps_are_a_one_line_config_error(tiny_model, four_steps):
    """3 editing steps (667, 334, 1) on a 4-step inversion (1, 251, 501, 751). Catches: accepting it (the
    edit would read latents of other timesteps) or an error that names neither count nor the fix."""
    video, traj = four_steps
    with pytest.raises(ConfigError) as err:
        TokenFlowEditor("a robot", num_steps=3).edit(tiny_model, traj, video.prompt, progress=False)
    message = str(err.value)
    assert "\n" not in message
    for part in ("editing.num_steps=3", "[667, 334]", "inversion's 4 steps", "editing.num_steps=inversion.num_steps=4"):
        assert part in message, part


def _reference_pnp_edit(model, traj, prompt_source, prompt_target, negative, steps, guidance):
    """PnP editing with conv injection at every step and per-frame attention, written out: diffusers'
    DDIMScheduler, the source latent of each step looked up by timestep value, the release's re-noised start,
    and a test-owned hook putting the source's up_blocks.1.resnets.1 conv2 output into uncond/cond."""
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    saved = {int(t): traj.latents[j + 1] for j, t in enumerate(traj.timesteps)}
    top = max(saved)
    a = sched.alphas_cumprod
    z0 = traj.latents[0]
    eps0 = (saved[top] - a[top].sqrt() * z0) / (1 - a[top]).sqrt()
    t1 = int(sched.timesteps[0])
    x = a[t1].sqrt() * z0 + (1 - a[t1]).sqrt() * eps0
    n = len(z0)
    emb = torch.cat([encode_prompt(model, p).expand(n, -1, -1) for p in (prompt_source, negative, prompt_target)])

    def inject(module, args, output):
        return torch.cat([output[:n]] * 3)

    handle = model.unet.get_submodule("up_blocks.1.resnets.1.conv2").register_forward_hook(inject)
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                src = saved[int(t)]
                _, u, c = model.unet(torch.cat([src, x, x]), t, encoder_hidden_states=emb).sample.chunk(3)
                x = sched.step(u + guidance * (c - u), t, x).prev_sample
    finally:
        handle.remove()
    return x


def test_two_of_four_steps_edit_equals_the_reference_indexing_the_inversion_by_timestep(tiny_model, four_steps):
    """2 editing steps (501, 1) on a 4-step inversion (1, 251, 501, 751). Catches: step i reading the
    inversion's i-th (or (T-i)-th) latent instead of the one saved at its timestep, and a renoised start
    taken from the wrong latent or timestep."""
    video, traj = four_steps
    editor = TokenFlowEditor("a portrait photo of a robot", num_steps=2, pnp_attn_t=0, pnp_f_t=1, propagate=False)
    edit = editor.edit(tiny_model, traj, video.prompt, progress=False)
    expected = _reference_pnp_edit(tiny_model, traj, video.prompt, editor.prompt, editor.negative_prompt, 2, 7.5)
    torch.testing.assert_close(edit.latents, expected, atol=1e-5, rtol=1e-5)

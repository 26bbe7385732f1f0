"""DDIM inversion/sampling against diffusers' schedulers, and inversion round trips."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from stem.data.synthetic import camera_pan
from stem.diffusion.ddim import ddim_invert, ddim_sample
from stem.diffusion.prompts import encode_prompt
from stem.diffusion.vae import encode_frames
from stem.inversion.methods import DDIMInversion


@pytest.fixture(scope="module")
def setup(tiny_model):
    video = camera_pan(n_frames=4, width=64, height=64, dx=3, dy=1)
    latents = encode_frames(tiny_model, video.frames)
    cond = encode_prompt(tiny_model, video.prompt)
    return tiny_model, latents, cond


def test_inversion_timesteps_ascend_1_to_981(setup):
    model, latents, cond = setup
    traj = ddim_invert(model.unet, latents[:1], cond, model.scheduler, 50, progress=False)
    assert traj.timesteps.tolist() == list(range(1, 1000, 20))
    assert traj.latents.shape == (51, *latents[:1].shape)
    assert torch.equal(traj.latents[0], latents[:1])
    assert torch.equal(traj.at(981), traj.latents[-1]) and torch.equal(traj.at(0), latents[:1])


def test_every_inversion_step_equals_diffusers_inverse_scheduler(setup):
    model, latents, cond = setup
    seen = []
    traj = ddim_invert(model.unet, latents, cond, model.scheduler, 50, progress=False,
                       callback=lambda info: seen.append((info["t"], info["eps"])))
    ref = DDIMInverseScheduler.from_config(model.scheduler.config)
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == traj.timesteps.tolist()
    for i, (t, eps) in enumerate(seen):
        expected = ref.step(eps, t, traj.latents[i]).prev_sample
        torch.testing.assert_close(traj.latents[i + 1], expected, rtol=0, atol=1e-6)


def test_every_sampling_step_equals_diffusers_ddim_scheduler(setup):
    model, latents, cond = setup
    start = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    seen, states = [], [start]
    ddim_sample(model.unet, start, cond, model.scheduler, 50, progress=False,
                callback=lambda info: (seen.append((info["t"], info["eps"])), states.append(info["latents"])))
    ref = DDIMScheduler.from_config(model.scheduler.config)
    ref.set_timesteps(50)
    assert [t for t, _ in seen] == list(range(981, 0, -20))
    for i, (t, eps) in enumerate(seen):
        expected = ref.step(eps, t, states[i], eta=0.0).prev_sample
        torch.testing.assert_close(states[i + 1], expected, rtol=0, atol=1e-6)


# |z_0 - reconstruction| of unit-variance latents (4 frames, 8x8 latents, 50 steps), measured with
# the tiny model: max 0.0826 / mean 0.0147 (1frame), 0.0830 / 0.0148 (2frame fatezero),
# 0.0834 / 0.0148 (2frame tuneavideo), 0.0831 / 0.0147 (allframe); z_T differs from z_0 by
# a mean of ~0.8. Bounds: max 0.09, mean 0.016.
@pytest.mark.parametrize("context,pairing", [("1frame", "fatezero"), ("2frame", "fatezero"),
                                             ("2frame", "tuneavideo"), ("allframe", "fatezero")])
def test_inversion_then_reconstruction_returns_the_latents(setup, context, pairing):
    model, latents, cond = setup
    method = DDIMInversion(context=context, pairing=pairing, query_chunk=100)
    traj = method.invert(model, latents, cond, progress=False)
    rec = method.reconstruct(model, traj.latents[-1], cond, progress=False)
    assert (traj.latents[-1] - latents).abs().mean() > 0.5  # the round trip went somewhere
    error = (rec - latents).abs()
    assert error.max() < 0.09 and error.mean() < 0.016

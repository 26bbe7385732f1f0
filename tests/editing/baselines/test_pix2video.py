"""Pix2Video: anchor/previous-frame self-attention, the guided latent update, depth conditioning, release, runs.

The mechanism tests run the official setting (50 steps, update window 26 steps, scale 100) on 3 frames of 64x64
(8x8 latents) of the tiny depth model, and check every UNet call of the edit against references written here from
what the UNet saw and returned (diffusers' DDIMScheduler, autograd of an MSE, a loop over heads).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from diffusers import DDIMScheduler

from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.diffusion.baseline_models import build_tiny_depth_estimator, build_tiny_depth_model
from stem.diffusion.prompts import encode_prompt
from stem.editing.baselines.depth import depth_maps
from stem.editing.baselines.pix2video import Pix2VideoEditor, depth_conditioning
from stem.inversion.methods import DDIMInversion
from stem.runs.cache import TensorCache
from stem.runs.edit import edit_video
from stem.runs.reconstruction import invert_video

N_FRAMES, STEPS, GUIDANCE = 3, 50, 7.5
WINDOW, SCALE = 26, 100.0   # the official window (steps 0..25) and weight, pinned by value


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these many tiny UNet calls (8x8 latents): as fast alone, and 20-40x faster than two
    threads when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def depth_model():
    return build_tiny_depth_model(seed=0, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def estimator():
    return build_tiny_depth_estimator(seed=0, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip():
    return camera_pan(n_frames=N_FRAMES, width=64, height=64)


def reference_depth(estimator, video) -> torch.Tensor:
    """The official normalisation written out: the estimator's map resized bilinearly to the latent size, then
    2 (d - min) / (max - min) - 1 per frame."""
    raw = depth_maps(estimator, video, None, False).float()
    d = F.interpolate(raw, size=(video.height // 8, video.width // 8), mode="bilinear", align_corners=False)
    out = torch.empty_like(d)
    for n in range(len(d)):
        lo, hi = d[n].min(), d[n].max()
        out[n] = 2 * (d[n] - lo) / (hi - lo) - 1
    return out


class Capture:
    """Every UNet call: the 5-channel input of conv_in and the noise prediction; every attn1: input and output."""

    def __init__(self, unet):
        self.unet, self.inputs, self.eps, self.attn, self.handles = unet, [], [], {}, []

    def __enter__(self):
        self.handles.append(self.unet.conv_in.register_forward_pre_hook(
            lambda m, args: self.inputs.append(args[0].detach().clone())))
        self.handles.append(self.unet.register_forward_hook(
            lambda m, args, out: self.eps.append(out.sample.detach().clone())))
        for name, module in self.unet.named_modules():
            if name.endswith(".attn1"):
                calls = self.attn.setdefault(name, [])
                self.handles.append(module.register_forward_hook(
                    lambda m, args, kwargs, out, calls=calls: calls.append(
                        ((args[0] if args else kwargs["hidden_states"]).detach().clone(), out.detach().clone())),
                    with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def edited(depth_model, estimator, clip):
    """The official setting edited step by step: the inversion's and the edit's UNet calls recorded apart."""
    editor = Pix2VideoEditor(prompt="a red fox", num_steps=STEPS)
    editor.attach({"depth_estimator": estimator})
    editor.prepare(depth_model, clip, None, progress=False)
    try:
        with Capture(depth_model.unet) as inversion:
            inverted = invert_video(depth_model, clip, DDIMInversion("1frame", num_steps=STEPS), progress=False,
                                    cache_extra=editor.inversion_key())
        with Capture(depth_model.unet) as edit:
            result = editor.edit(depth_model, inverted.trajectory, clip.prompt, progress=False)
    finally:
        editor.release(depth_model)
    return {"inversion": inversion, "edit": edit, "result": result, "trajectory": inverted.trajectory}


def test_edit_runs_frame_by_frame_with_cfg_pairs(edited):
    """Catches: frames edited together in one batch (Pix2Video edits one frame after the other, each on
    [uncond, cond]), or a step count other than num_steps per frame."""
    calls = edited["edit"].inputs
    assert len(calls) == N_FRAMES * STEPS
    assert all(x.shape == (2, 5, 8, 8) for x in calls)


def naive_attention(attn, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """attn1 output for the tokens x (S, C) attending to `context` (S', C): a loop over heads, softmax(q k^T /
    sqrt(d)) v, then the output projection (residual/rescale as in SD: none)."""
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // attn.heads
    heads = []
    for h in range(attn.heads):
        sl = slice(h * d, (h + 1) * d)
        heads.append(torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1) @ v[:, sl])
    return attn.to_out[1](attn.to_out[0](torch.cat(heads, dim=-1)))


def test_self_attention_keys_values_from_anchor_and_previous_frame_in_the_decoder(edited, depth_model):
    """Catches: frame k attending to itself (or adding its own tokens) instead of [frame 0; frame k-1]; the previous
    *source* frame or frame k-2 instead of the previous edited one; features of another step or of the other guidance
    branch; injection outside the decoder (official: the up blocks' layers only) or into frame 0."""
    unet = depth_model.unet
    attn_calls = edited["edit"].attn
    decoder = [name for name in attn_calls if name.startswith("up_blocks.")]
    assert decoder and len(decoder) < len(attn_calls)
    differs = 0
    with torch.no_grad():
        for name, calls in attn_calls.items():
            attn = unet.get_submodule(name)
            assert len(calls) == N_FRAMES * STEPS
            x = lambda k, i: calls[k * STEPS + i][0]  # noqa: E731  attn1 input of frame k at step i: (2, S, C)
            for k in range(N_FRAMES):
                for i in (0, 25, 26, STEPS - 1):
                    out = calls[k * STEPS + i][1]
                    for b in range(2):  # uncond, cond
                        own = x(k, i)[b]
                        if name.startswith("up_blocks.") and k > 0:
                            context = torch.cat([x(0, i)[b], x(k - 1, i)[b]])   # anchor, then previous edited frame
                            differs += not torch.allclose(out[b], naive_attention(attn, own, own), atol=1e-4)
                        else:
                            context = own
                        torch.testing.assert_close(out[b], naive_attention(attn, own, context), atol=2e-5, rtol=1e-4)
    assert differs > 0  # the injection changes the result: the comparison above can fail


def _ddim(z, eps, t, scheduler):
    step = scheduler.step(eps, t, z)
    return step.prev_sample, step.pred_original_sample


def test_latent_update_pulls_x0_towards_previous_frame_in_the_official_window(edited, depth_model):
    """Catches: the update in the wrong steps (official: after steps 0..25 of 50), with another scale than 100 or
    another loss normalisation (mean over the latent's elements), towards the anchor or the previous frame's x0
    at another step, before instead of after the DDIM step, or on frame 0."""
    scheduler = DDIMScheduler.from_config(depth_model.scheduler.config)
    scheduler.set_timesteps(STEPS)
    inputs, outputs = edited["edit"].inputs, edited["edit"].eps
    final = edited["result"].latents
    x0 = {}
    pulled = []
    for k in range(N_FRAMES):
        for i, t in enumerate(scheduler.timesteps):
            z = inputs[k * STEPS + i][:1, :4]
            u, c = outputs[k * STEPS + i].chunk(2)
            plain, x0[k, i] = _ddim(z, u + GUIDANCE * (c - u), t, scheduler)
            expected = plain
            if k > 0 and i < WINDOW:
                pred = x0[k, i].clone().requires_grad_(True)
                (SCALE * F.mse_loss(x0[k - 1, i], pred)).backward()
                expected = plain - pred.grad
                pulled.append(float(pred.grad.abs().max()))
            got = inputs[k * STEPS + i + 1][:1, :4] if i + 1 < STEPS else final[k:k + 1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=f"frame {k} step {i}")
    assert len(pulled) == (N_FRAMES - 1) * WINDOW and min(pulled) > 1e-3  # every update in the window moves z
    rms = edited["result"].info["latent_pull_rms"]
    assert [len(r) for r in rms] == [0] + [WINDOW] * (N_FRAMES - 1)


def test_depth_channel_is_each_frames_normalised_depth_in_inversion_and_edit(edited, estimator, clip):
    """Catches: depth missing from some UNet calls, the maps of other frames (or all frames' in one frame's call),
    the CFG batch not tiled, or another normalisation (bicubic, unnormalised, global instead of per-frame min-max)."""
    depth = reference_depth(estimator, clip)
    inversion = edited["inversion"].inputs
    assert len(inversion) == STEPS
    for x in inversion:  # the whole clip in one batch
        assert x.shape == (N_FRAMES, 5, 8, 8)
        torch.testing.assert_close(x[:, 4:], depth, atol=1e-6, rtol=1e-5)
    for j, x in enumerate(edited["edit"].inputs):
        k = j // STEPS
        torch.testing.assert_close(x[:, 4:], depth[k:k + 1].expand(2, -1, -1, -1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(depth[0], depth[-1])  # the pan's frames have different maps


def test_depth_conditioning_tiles_groups_and_refuses_bad_batches(depth_model):
    """Catches: the depth of the CFG batch laid out frame-major instead of group-major ([uncond frames; cond
    frames]), or a batch that is not a whole number of groups silently conditioned on wrong maps."""
    depth = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 8, 8).contiguous()
    seen = []
    handle = depth_model.unet.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 4, 0, 0]))
    cond = torch.zeros(6, 77, depth_model.unet.config.cross_attention_dim)
    try:
        with depth_conditioning(depth_model.unet, depth), torch.no_grad():
            depth_model.unet(torch.zeros(6, 4, 8, 8), 1, encoder_hidden_states=cond)
            with pytest.raises(ValueError, match="whole number"):
                depth_model.unet(torch.zeros(4, 4, 8, 8), 1, encoder_hidden_states=cond[:4])
    finally:
        handle.remove()
    assert seen[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert not depth_model.unet._forward_pre_hooks


def _hooks(model):
    unet = model.unet
    return (len(unet._forward_pre_hooks), len(unet._forward_hooks),
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules()),
            {k: type(p) for k, p in unet.attn_processors.items()})


def _count_frames(estimator):
    seen = []
    handle = estimator.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(len((args or (kwargs["pixel_values"],))[0])), with_kwargs=True)
    return seen, handle


def test_edit_video_end_to_end_depth_once_per_clip_cache_hits_and_release(depth_model, estimator, tmp_path):
    """Catches: depth estimated per frame edit or per UNet call instead of once per clip; an inversion that cannot
    hit the cache on a rerun (an observer forcing re-inversion, or an unstable key); hooks or processors left on
    the UNet after the edit; an output that is not a video."""
    video = camera_pan(n_frames=2, width=64, height=64)
    cache = TensorCache(tmp_path / "cache" / "inversion")
    before = _hooks(depth_model)
    seen, handle = _count_frames(estimator)
    try:
        runs = []
        for _ in range(2):
            editor = Pix2VideoEditor(prompt="a red fox", num_steps=4)
            editor.attach({"depth_estimator": estimator})
            runs.append(edit_video(depth_model, video, DDIMInversion("1frame", num_steps=4), editor, cache,
                                   progress=False, report_reconstruction=True))
            assert _hooks(depth_model) == before
    finally:
        handle.remove()
    assert sum(seen) == video.num_frames     # the first run estimated each frame once; the second read the cache
    first, second = runs
    assert not first.inverted.cache_hit and second.inverted.cache_hit
    assert first.frames.shape == (2, 3, 64, 64) and first.reconstruction.shape == (2, 3, 64, 64)
    assert torch.isfinite(first.frames).all() and first.frames.min() >= 0 and first.frames.max() <= 1
    torch.testing.assert_close(second.edit.latents, first.edit.latents)
    assert first.edit.info["latent_update_steps"] == [0, 1, 2, 3]


def test_release_on_failure_leaves_no_hook(depth_model, estimator):
    """Catches: the depth hook or the attention processors left installed when the edit raises."""
    video = camera_pan(n_frames=2, width=64, height=64)
    before = _hooks(depth_model)
    calls = []

    def fail(module, args, out):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom")

    handle = depth_model.unet.register_forward_hook(fail)
    editor = Pix2VideoEditor(prompt="a red fox", num_steps=3)
    editor.attach({"depth_estimator": estimator})
    try:
        with pytest.raises(RuntimeError, match="boom"):
            edit_video(depth_model, video, DDIMInversion("1frame", num_steps=3), editor, None, progress=False)
    finally:
        handle.remove()
    assert _hooks(depth_model) == before


def test_anchor_is_plain_depth_ddim_and_scale_zero_turns_the_update_off(depth_model, estimator):
    """Catches: the anchor (frame 0) edited with anything but plain depth-conditioned DDIM, or a latent update that
    acts with scale 0. With injection in no layer of frame 0, the anchor equals diffusers' DDIM sampling."""
    video = camera_pan(n_frames=2, width=64, height=64)
    editor = Pix2VideoEditor(prompt="a red fox", num_steps=4, latent_update_scale=0.0)
    editor.attach({"depth_estimator": estimator})
    editor.prepare(depth_model, video, None, progress=False)
    try:
        inverted = invert_video(depth_model, video, DDIMInversion("1frame", num_steps=4), progress=False)
        result = editor.edit(depth_model, inverted.trajectory, video.prompt, progress=False)
        scheduler = DDIMScheduler.from_config(depth_model.scheduler.config)
        scheduler.set_timesteps(4)
        neg, tgt = (encode_prompt(depth_model, p) for p in ("", "a red fox"))
        z = inverted.trajectory.latents[-1][:1]
        with torch.no_grad(), editor.depth_hook.only([0]):
            for t in scheduler.timesteps:
                u = depth_model.unet(z, t, encoder_hidden_states=neg).sample
                c = depth_model.unet(z, t, encoder_hidden_states=tgt).sample
                z = scheduler.step(u + GUIDANCE * (c - u), t, z).prev_sample
    finally:
        editor.release(depth_model)
    torch.testing.assert_close(result.latents[:1], z, atol=1e-5, rtol=1e-4)
    assert result.info["latent_pull_rms"] == [[], []]


def test_bad_settings_and_a_model_without_depth_input_are_refused(tiny_model, estimator):
    """Catches: a negative scale, an unknown layer set or interpolation accepted, or a 4-channel model edited
    without its depth channel (a shape error deep in the UNet instead of a one-line ConfigError)."""
    for kwargs, word in (({"latent_update_scale": -1}, "latent_update_scale"),
                         ({"latent_update_steps": 2.5}, "latent_update_steps"),
                         ({"injection_layers": "encoder"}, "injection_layers"),
                         ({"depth_interpolation": "nearest"}, "depth_interpolation")):
        with pytest.raises(ConfigError, match=word):
            Pix2VideoEditor(prompt="x", **kwargs)
    editor = Pix2VideoEditor(prompt="x")
    editor.attach({"depth_estimator": estimator})
    with pytest.raises(ConfigError, match="5 input channels"):
        editor.prepare(tiny_model, camera_pan(n_frames=2, width=64, height=64), None, progress=False)


def test_config_defaults_are_the_official_values(tmp_path):
    """Catches: a default drifting from the official code (github duyguceylan/pix2video: test_cfg.py GUIDANCE_SCALE
    7.5, NUM_DDIM_STEPS 50, unconditional prompt ""; decode(): per_step_weight 100 zeroed once i > 25;
    COND_LAYER 7 = the decoder; load_depth: bilinear; SD 2 depth), or the row inverting with another method."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_config(tmp_path, "editing=pix2video", "editing.prompt=a fox", "model=sd15", fast=False)
    editor = instantiate(cfg.editing)
    assert type(editor) is Pix2VideoEditor
    assert (editor.guidance_scale, editor.num_steps, editor.negative_prompt) == (7.5, 50, "")
    assert (editor.latent_update_scale, editor.latent_update_steps) == (100.0, 26)
    assert (editor.injection_layers, editor.depth_interpolation, editor.freeu) == ("decoder", "bilinear", None)
    assert editor.base_model == "sd2_depth" and editor.needs == ("depth_estimator",)
    inversion = OmegaConf.to_container(cfg.inversion, resolve=True)
    assert inversion["_target_"] == "stem.inversion.methods.DDIMInversion" and inversion["context"] == "1frame"
    assert inversion["num_steps"] == 50
    assert cfg.baseline_models.sd2_depth.path == "stabilityai/stable-diffusion-2-depth"


def test_run_job_edits_on_the_depth_model(tmp_path):
    """Catches: the job running Pix2Video on the preset's 4-channel model instead of baseline_models.sd2_depth, or
    not handing it the depth estimator."""
    from stem.app.job import run_job

    cfg = compose_config(tmp_path, "editing=pix2video", "editing.prompt=a red fox", "data.n_frames=2",
                         "data.width=64", "data.height=64", "metrics.clip.pretrained=null")
    assert cfg.model._target_ == "stem.diffusion.models.build_tiny"   # the preset's model is the 4-channel one
    metrics = run_job(cfg, tmp_path / "run")
    assert metrics["method"] == "Pix2Video" and metrics["inversion_method"] == "ddim_1frame"
    assert metrics["edit_info"]["anchor_frame"] == 0
    assert (tmp_path / "run" / "edited.mp4").is_file()

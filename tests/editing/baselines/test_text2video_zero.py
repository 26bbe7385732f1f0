"""Text2Video-Zero (depth): cross-frame attention to frame 0, per-frame ControlNet depth, the shared start noise,
the official chunks and defaults, release, and an end-to-end edit on the tiny models."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

import stem.editing.baselines.text2video_zero as t2vz
from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.diffusion.ddim import Trajectory
from stem.editing.baselines.text2video_zero import (
    ControlState,
    FirstFrameAttnProcessor,
    Text2VideoZeroEditor,
    control_images,
    controlnet_residuals,
    frame_chunks,
    start_noise,
)
from stem.inversion.methods import DDIMInversion
from stem.runs.cache import TensorCache
from stem.runs.edit import edit_video

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
# the official process_controlnet_depth strings (written out here, not imported from the code under test)
OFFICIAL_ADDED = "best quality, extremely detailed"
OFFICIAL_NEGATIVE = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                     "worst quality, low quality")
# The tiny tokenizer has one token per character: the official negative prompt (105 characters) exceeds its 77
# tokens, so the tiny edits truncate (as the pipeline reference does silently); CLIP's BPE needs ~30 tokens for it.
TRUNCATE = "truncate"


@pytest.fixture(scope="module")
def controlnet():
    """The tiny ControlNet with its conditioning embedding redrawn (He-normal convolutions, zero biases): with the
    default init its 8 convolutions shrink the image's contribution to ~1e-4 of the biases', so the frames' depth
    maps would hardly change the edit and no test of the whole loop could see per-frame effects."""
    from stem.diffusion.baseline_models import build_tiny_controlnet

    net = build_tiny_controlnet(seed=0, device="cpu", dtype="float32")
    embedding, g = net.controlnet_cond_embedding, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks, embedding.conv_out):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2 / conv.weight[0].numel()))
            conv.bias.zero_()
    return net


@pytest.fixture(scope="module")
def estimator():
    from stem.diffusion.baseline_models import build_tiny_depth_estimator

    return build_tiny_depth_estimator(seed=0, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pan():
    return camera_pan(n_frames=5, width=64, height=64)


def distinct_depth(n: int, h: int, w: int) -> torch.Tensor:
    """Raw depth maps that differ per frame after min-max normalisation (a ramp whose direction turns with n)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([(math.cos(k) * x + math.sin(k) * y + 0.1 * k * x * y)[None] * (k + 2.0) for k in range(n)])


def fake_trajectory(n: int, h: int, w: int, steps: int, scheduler, fill: float = 0.0) -> Trajectory:
    scheduler.set_timesteps(steps)
    return Trajectory(torch.full((steps + 1, n, 4, h, w), fill), scheduler.timesteps.flip(0).clone())


def _heads(y, heads):  # (F, S, C) -> (F, h, S, d)
    return y.view(y.shape[0], y.shape[1], heads, -1).transpose(1, 2)


def naive_first_frame(attn, x: torch.Tensor, groups: int, anchor_of=lambda f: 0) -> torch.Tensor:
    """attn1 written out: frame f of group g takes its keys/values from frame anchor_of(f) of group g. Loops."""
    n = x.shape[0] // groups
    q, k, v = (_heads(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    d = q.shape[-1]
    out = torch.empty(x.shape[0], x.shape[1], attn.heads * d)
    for g in range(groups):
        for f in range(n):
            src = g * n + anchor_of(f)
            for h in range(attn.heads):
                w = torch.softmax(q[g * n + f, h] @ k[src, h].T / math.sqrt(d), dim=-1)
                out[g * n + f, :, h * d:(h + 1) * d] = w @ v[src, h]
    return attn.to_out[1](attn.to_out[0](out))


def test_every_frames_self_attention_takes_keys_and_values_from_frame_0_of_its_branch(tiny_model):
    """Catches: a frame attending to itself (plain self-attention), to frame 0 of the batch for both guidance
    branches (the cond branch must use the cond frame 0), or to the previous frame (sparse-causal, Tune-A-Video)."""
    attn = tiny_model.unet.get_submodule(LAYER)
    n, s, dim = 4, 6, attn.to_q.in_features
    x = torch.randn(2 * n, s, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = FirstFrameAttnProcessor(groups=2)(attn, x)
        want = naive_first_frame(attn, x, 2)
        own = naive_first_frame(attn, x, 2, anchor_of=lambda f: f)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[[0, n]], own[[0, n]], atol=1e-5, rtol=1e-5)   # frame 0 attends to itself
    for f in range(1, n):   # frame k: not its own keys (the test can tell the two apart)
        assert (got[f] - own[f]).abs().max() > 1e-3


def test_chunks_prepend_frame_0_as_the_official_inference():
    """Catches: chunks of chunk_size new frames (official: chunk_size - 1 new + frame 0), frame 0 missing from later
    chunks, or a frame lost or doubled at a chunk boundary."""
    assert frame_chunks(5, 3) == [[0, 0, 1], [0, 2, 3], [0, 4]]
    assert frame_chunks(8, 8) == [[0, 0, 1, 2, 3, 4, 5, 6], [0, 7]]
    assert frame_chunks(7, 8) == [[0, 0, 1, 2, 3, 4, 5, 6]]
    assert frame_chunks(16, 8) == [[0, 0, 1, 2, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11, 12, 13], [0, 14, 15]]
    with pytest.raises(ConfigError, match="chunk_size"):
        frame_chunks(5, 1)


def test_control_images_follow_the_official_midas_annotator():
    """Catches: no per-frame normalisation (one min/max over the clip), no 8-bit quantisation, or 1 channel for a
    ControlNet that takes RGB."""
    depth = distinct_depth(3, 5, 7) + torch.tensor([0.0, 3.0, -1.0])[:, None, None, None]
    got = control_images(depth)
    ref = []
    for frame in depth[:, 0].numpy():   # the annotator: d -= min; d /= max; (d * 255).clip.astype(uint8); / 255
        d = frame - frame.min()
        d = d / d.max()
        ref.append(np.repeat(((d * 255.0).clip(0, 255).astype(np.uint8).astype(np.float32) / 255.0)[None], 3, 0))
    assert got.shape == (3, 3, 5, 7)
    torch.testing.assert_close(got, torch.from_numpy(np.stack(ref)), atol=1e-6, rtol=0)
    assert torch.equal(control_images(torch.ones(1, 1, 4, 4)), torch.zeros(1, 3, 4, 4))   # a flat map: no NaN


def test_start_noise_is_one_seeded_draw_shared_by_every_frame():
    """Catches: a fresh draw per frame (the official code repeats one), or a seed that is not used."""
    z = start_noise(5, (4, 3, 2), seed=42)
    ref = torch.randn((1, 4, 3, 2), generator=torch.Generator().manual_seed(42))
    assert z.shape == (5, 4, 3, 2)
    assert torch.equal(z, ref.repeat(5, 1, 1, 1))
    assert torch.equal(start_noise(5, (4, 3, 2), seed=42), z)
    assert not torch.equal(start_noise(5, (4, 3, 2), seed=43), z)


def test_controlnet_residuals_enter_the_unet_with_the_conditioning_scale(tiny_model, controlnet):
    """Catches: residuals added unscaled, scaled twice, or not passed to the UNet; and scale 0 changing the UNet."""
    unet, g = tiny_model.unet, torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    cond = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor(501)
    with torch.no_grad():
        down, mid = controlnet(sample, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        plain = unet(sample, t, encoder_hidden_states=emb).sample
        for scale in (0.7, 0.0):
            want = unet(sample, t, encoder_hidden_states=emb, down_block_additional_residuals=[d * scale for d in down],
                        mid_block_additional_residual=mid * scale).sample
            with controlnet_residuals(unet, controlnet, ControlState(cond=cond), scale):
                got = unet(sample, t, encoder_hidden_states=emb).sample
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            assert not unet._forward_pre_hooks
        assert (want - plain).abs().max() == 0   # scale 0 = the plain UNet
        with controlnet_residuals(unet, controlnet, ControlState(cond=cond), 1.0):
            assert (unet(sample, t, encoder_hidden_states=emb).sample - plain).abs().max() > 1e-4


def _editor(controlnet, steps, **kw):
    editor = Text2VideoZeroEditor(prompt="a red fox", num_steps=steps, **kw)
    editor.attach({"controlnet_depth": controlnet, "depth_estimator": object()})
    return editor


def _record_cond(controlnet):
    seen = []
    handle = controlnet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True)
    return seen, handle


def test_controlnet_sees_each_frames_own_depth_map_and_follows_a_permutation(tiny_model, controlnet, pan, monkeypatch):
    """Catches: every frame conditioned on frame 0's depth (or the chunk's first), maps shifted by the prepended
    frame 0, the uncond and cond halves given different maps, or depth in another order than the frames."""
    n, steps, h, w = pan.num_frames, 1, pan.height, pan.width
    raw = distinct_depth(n, h, w)
    chunks = [[0, 0, 1], [0, 2, 3], [0, 4]]     # official chunks of 5 frames with chunk_size 3
    for perm in (list(range(n)), [3, 0, 4, 1, 2]):
        maps = raw[perm]
        monkeypatch.setattr(t2vz, "depth_maps", lambda est, video, cache, progress, maps=maps: maps)
        editor = _editor(controlnet, steps, chunk_size=3)
        editor.prepare(tiny_model, pan, None, progress=False)
        seen, handle = _record_cond(controlnet)
        try:
            editor.edit(tiny_model, fake_trajectory(n, h // 8, w // 8, steps, tiny_model.scheduler), "a fox",
                        TRUNCATE, progress=False)
        finally:
            handle.remove()
        assert len(seen) == steps * len(chunks)
        for call, cond in enumerate(seen):
            ids = chunks[call // steps]
            frames = [perm[i] for i in ids]   # the raw map of the video frame at each position
            want = control_images(raw[frames])
            torch.testing.assert_close(cond, torch.cat([want, want]), atol=0, rtol=0)


def test_edit_equals_diffusers_controlnet_pipeline_chunk_by_chunk(tiny_model, controlnet, pan, monkeypatch):
    """The whole official loop against diffusers' StableDiffusionControlNetPipeline with diffusers' own (deprecated)
    CrossFrameAttnProcessor on the UNet and the ControlNet, one pipeline call per official chunk from one repeated
    seeded noise, prompt + ", best quality, extremely detailed", the official negative prompt, guidance 9, eta 0.
    Catches: a missing cross-frame ControlNet, the wrong prompt or negative prompt, guidance or scale, chunk
    outputs written to the wrong frames, a per-frame noise, or the inverted latents used as the start."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
            CrossFrameAttnProcessor,
        )
    n, steps, h, w, scale = pan.num_frames, 2, pan.height, pan.width, 0.8
    raw = distinct_depth(n, h, w)
    monkeypatch.setattr(t2vz, "depth_maps", lambda est, video, cache, progress: raw)
    editor = _editor(controlnet, steps, chunk_size=3, controlnet_conditioning_scale=scale)
    editor.prepare(tiny_model, pan, None, progress=False)
    traj = fake_trajectory(n, h // 8, w // 8, steps, tiny_model.scheduler, fill=3.0)   # must not matter
    got = editor.edit(tiny_model, traj, "a fox", TRUNCATE, progress=False).latents

    m = tiny_model
    pipe = StableDiffusionControlNetPipeline(m.vae, m.text_encoder, m.tokenizer, m.unet, controlnet,
                                             DDIMScheduler.from_config(m.scheduler.config), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    saved = (dict(m.unet.attn_processors), dict(controlnet.attn_processors))
    m.unet.set_attn_processor(CrossFrameAttnProcessor(batch_size=2))
    controlnet.set_attn_processor(CrossFrameAttnProcessor(batch_size=2))
    want = torch.empty_like(got)
    noise = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(42))
    depth_images = control_images(raw)
    try:
        for ids in ([0, 0, 1], [0, 2, 3], [0, 4]):
            b = len(ids)
            out = pipe(prompt=[f"a red fox, {OFFICIAL_ADDED}"] * b, negative_prompt=[OFFICIAL_NEGATIVE] * b,
                       image=depth_images[ids], height=h, width=w, num_inference_steps=steps, guidance_scale=9.0,
                       controlnet_conditioning_scale=scale, eta=0.0, latents=noise.repeat(len(ids), 1, 1, 1),
                       output_type="latent").images
            want[ids[1:]] = out[1:]
    finally:
        m.unet.set_attn_processor(saved[0])
        controlnet.set_attn_processor(saved[1])
    assert (got[1:] - got[:1]).abs().amax(dim=(1, 2, 3)).min() > 1e-3   # the frames differ: per-frame effects show
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_hook_and_processors_are_removed_after_the_edit_on_error_and_by_release(tiny_model, controlnet, pan,
                                                                                 monkeypatch):
    """Catches: the ControlNet hook or the cross-frame processors left on the shared UNet/ControlNet (the next job's
    inversion would run conditioned and cross-frame), or removed only on success."""
    unet = tiny_model.unet
    before = (dict(unet.attn_processors), dict(controlnet.attn_processors))
    monkeypatch.setattr(t2vz, "depth_maps", lambda est, video, cache, progress: distinct_depth(5, 64, 64))
    editor = _editor(controlnet, 1)
    editor.prepare(tiny_model, pan, None, progress=False)
    state = ControlState()
    editor.install(unet, controlnet, state)
    for net in (unet, controlnet):   # during the edit: every attn1 cross-frame, every attn2 untouched
        procs, orig = net.attn_processors, (before[0] if net is unet else before[1])
        assert all(isinstance(p, FirstFrameAttnProcessor) == (".attn1." in k) for k, p in procs.items())
        assert all(procs[k] is orig[k] for k in procs if ".attn2." in k)
    assert len(unet._forward_pre_hooks) == 1
    editor.release(tiny_model)
    _assert_clean(unet, controlnet, before)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    editor.prepare(tiny_model, pan, None, progress=False)   # release forgot the control images
    handle = controlnet.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            editor.edit(tiny_model, fake_trajectory(5, 8, 8, 1, tiny_model.scheduler), "a fox", TRUNCATE,
                        progress=False)
    finally:
        handle.remove()
    _assert_clean(unet, controlnet, before)


def _assert_clean(unet, controlnet, before):
    assert not unet._forward_pre_hooks
    assert all(p is before[0][k] for k, p in unet.attn_processors.items())
    assert all(p is before[1][k] for k, p in controlnet.attn_processors.items())


def test_defaults_are_the_official_process_controlnet_depth_settings(tmp_path):
    """Catches: a default drifting from the official code (steps 20, guidance 9, scale 1, seed 42, chunk 8,
    cross-frame on, the added and negative prompts), in the class or in configs/editing/text2video_zero.yaml."""
    official = {"num_steps": 20, "guidance_scale": 9.0, "controlnet_conditioning_scale": 1.0, "seed": 42,
                "chunk_size": 8, "cross_frame": True, "added_prompt": OFFICIAL_ADDED,
                "negative_prompt": OFFICIAL_NEGATIVE, "freeu": None}
    settings = Text2VideoZeroEditor(prompt="x").settings()
    assert {k: settings[k] for k in official} == official
    assert Text2VideoZeroEditor.needs == ("controlnet_depth", "depth_estimator")
    cfg = compose_config(tmp_path, "editing=text2video_zero", "editing.prompt=a fox", fast=False)
    node = OmegaConf.to_container(cfg.editing, resolve=True)
    assert node["_target_"] == "stem.editing.baselines.text2video_zero.Text2VideoZeroEditor"
    assert {k: node[k] for k in official} == official


@pytest.mark.parametrize("kwargs, fragment", [({"chunk_size": 1}, "editing.chunk_size=1"),
                                              ({"controlnet_conditioning_scale": float("nan")},
                                               "editing.controlnet_conditioning_scale=nan"),
                                              ({"seed": 1.5}, "editing.seed=1.5")])
def test_bad_settings_are_refused_in_one_line(kwargs, fragment):
    """Catches: a chunk size of 1 (the official chunking steps by chunk_size - 1: an endless loop), a NaN scale."""
    with pytest.raises(ConfigError) as info:
        Text2VideoZeroEditor(prompt="x", **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_end_to_end_edit_on_the_tiny_models(tiny_model, controlnet, estimator, pan, tmp_path):
    """edit_video on the tiny SD, ControlNet and DPT: runs the (cached) inversion, the depth maps and the chunked
    edit, returns frames in [0, 1], and leaves the UNet as it was. Catches: a broken wiring between prepare
    (depth), the job's inversion and the edit, or hooks left behind by the job path."""
    before = (dict(tiny_model.unet.attn_processors), dict(controlnet.attn_processors))
    editor = Text2VideoZeroEditor(prompt="a red fox", num_steps=2, chunk_size=3)
    editor.attach({"controlnet_depth": controlnet, "depth_estimator": estimator})
    cache = TensorCache(tmp_path / "inversion")
    seen, handle = _record_cond(controlnet)
    try:
        result = edit_video(tiny_model, pan, DDIMInversion("1frame", num_steps=2), editor, cache, TRUNCATE,
                            progress=False)
    finally:
        handle.remove()
    first = control_images(t2vz.depth_maps(estimator, pan, None, False))[[0, 0, 1]]   # the estimator's own maps
    torch.testing.assert_close(seen[0], torch.cat([first, first]), atol=1e-6, rtol=0)
    assert result.frames.shape == pan.frames.shape
    assert torch.isfinite(result.frames).all() and result.frames.min() >= 0 and result.frames.max() <= 1
    assert result.edit.prompt == "a red fox"
    assert result.edit.info["chunks"] == [[0, 0, 1], [0, 2, 3], [0, 4]]
    assert result.edit.info["controlnet_calls"] == 3 * 2   # chunks x steps
    assert editor.control is None   # released
    _assert_clean(tiny_model.unet, controlnet, before)


@pytest.mark.slow   # ~30 s on 2 busy cores: opt in with -m slow
def test_run_py_job_builds_the_baseline_models_and_writes_the_edit(tmp_path):
    """`python run.py editing=text2video_zero` on the tiny preset: the job builds the ControlNet and depth estimator
    named in `needs`, inverts (unused), edits and scores. Catches: a config the job cannot build, `needs` names the
    preset lacks, or the run labelled with the inversion's name (it is Text2Video-Zero whatever the inversion)."""
    from stem.app.job import run_job

    cfg = compose_config(tmp_path, "editing=text2video_zero", "editing.prompt=a robot", "inversion=stem",
                         "inversion.num_bases=4", "inversion.num_steps=2", "editing.num_steps=2",
                         "editing.chunk_size=3", "prompt_overflow=truncate", "data.width=64", "data.height=64",
                         "metrics.clip.pretrained=null")
    metrics = run_job(cfg, tmp_path / "run")
    assert metrics["method"] == "Text2Video-Zero" and metrics["edit_prompt"] == "a robot"
    assert metrics["editing"]["seed"] == 42 and metrics["edit_info"]["chunks"] == [[0, 0, 1], [0, 2, 3]]
    assert (tmp_path / "run" / "edited.mp4").exists() and {"clip", "warp_error"} <= set(metrics)
    assert any((tmp_path / "cache" / "depth").rglob("*.safetensors"))   # the depth maps were cached

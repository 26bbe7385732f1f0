"""TokenFlow editing: extended attention, propagation, PnP injection, keyframes, remainders, runs."""

import json
import math

import pytest
import torch
from conftest import FAST, cfg_ddim_reference, compose_config, run_cli

from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.data.video import load_video
from stem.diffusion.prompts import encode_prompt
from stem.editing.base import check_timesteps, start_latents
from stem.editing.tokenflow import (
    TokenFlowAttnProcessor,
    TokenFlowEditor,
    TokenFlowState,
    blend_weights,
    chunk_spans,
    conv_injection,
    draw_keyframes,
    nearest_tokens,
)
from stem.inversion.attention import self_attention_processors
from stem.inversion.methods import DDIMInversion
from stem.runs.reconstruction import invert_video

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def pan():
    return camera_pan(n_frames=5, width=64, height=64)


@pytest.fixture(scope="module")
def trajectory(tiny_model, pan):
    return invert_video(tiny_model, pan, DDIMInversion("1frame", num_steps=3), progress=False).trajectory


def _attn(tiny_model):
    return tiny_model.unet.get_submodule(LAYER)


def _heads(x, heads):  # (F, S, C) -> (F, h, S, d)
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def reference_pivot(attn, x: torch.Tensor, inject: bool) -> torch.Tensor:
    """attn1 of the pivot pass, written out as the TokenFlow release computes it, for (3C, S, D) keyframe
    tokens of the source/uncond/cond branches: source keyframe f attends to itself only; uncond/cond
    keyframe f attends to the keys/values of all C keyframes of its branch; with `inject` the uncond and
    cond branches use the source branch's Q and K (their own V). A loop over branches, frames and heads."""
    c = x.shape[0] // 3
    q, k, v = (_heads(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    if inject:
        q, k = (torch.cat([y[:c]] * 3) for y in (q, k))
    d = q.shape[-1]
    heads_out = torch.empty(x.shape[0], x.shape[1], attn.heads * d)
    for b in range(3):
        for f in range(c):
            context = [f] if b == 0 else list(range(c))  # keyframes whose keys/values keyframe f sees
            keys = torch.cat([k[b * c + j] for j in context], dim=1)  # (h, len(context)*S, d)
            values = torch.cat([v[b * c + j] for j in context], dim=1)
            for h in range(attn.heads):
                w = torch.softmax(q[b * c + f, h] @ keys[h].T / math.sqrt(d), dim=-1)
                heads_out[b * c + f, :, h * d:(h + 1) * d] = w @ values[h]
    return attn.to_out[1](attn.to_out[0](heads_out))


def test_pivot_pass_is_extended_attention_for_uncond_and_cond_and_per_frame_for_the_source(tiny_model):
    """Catches: extended attention on the source branch too (the source must attend per keyframe), or
    Q/K injected into the wrong branches."""
    attn = _attn(tiny_model)
    c, s, dim = 3, 6, attn.to_q.in_features
    x = torch.randn(3 * c, s, dim, generator=torch.Generator().manual_seed(0))
    for inject in (False, True):
        state = TokenFlowState(chunk_spans(c, 1), mode="pivot", inject_qk=inject)
        with torch.no_grad():
            proc = TokenFlowAttnProcessor(state, LAYER, inject_qk=True)
            out = proc(attn, x)
            expected = reference_pivot(attn, x, inject)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(proc.kf_out, out.view(3, c, s, dim)) and torch.equal(proc.kf_in, x[:c])  # the caches
        assert state.cache_bytes[LAYER] == (proc.kf_in.numel() + proc.kf_out.numel()) * 4


def test_one_chunk_one_keyframe_pivot_equals_plain_attention_in_the_unet(tiny_model, trajectory, pan):
    unet = tiny_model.unet
    z = trajectory.latents[2]
    cond = encode_prompt(tiny_model, pan.prompt).expand(3, -1, -1)
    batch = torch.cat([z[2:3]] * 3)  # one keyframe (batch_size = number of frames: a single chunk)
    state = TokenFlowState(chunk_spans(5, 5), mode="pivot")
    editor = TokenFlowEditor("x", batch_size=5)
    with torch.no_grad():
        plain = unet(batch, 401, encoder_hidden_states=cond).sample
        with self_attention_processors(unet, per_layer=editor.processors(state)):
            pivot = unet(batch, 401, encoder_hidden_states=cond).sample
    torch.testing.assert_close(pivot, plain, atol=1e-5, rtol=1e-5)


def test_propagation_of_a_frame_identical_to_its_keyframe_is_the_keyframe_output_exactly(tiny_model):
    attn = _attn(tiny_model)
    gen = torch.Generator().manual_seed(1)
    n, s, dim = 6, 8, attn.to_q.in_features
    frames = torch.randn(3, n, s, dim, generator=gen)  # (branch, frame, token, channel)
    chunks = chunk_spans(n, 3)
    keys = torch.tensor([1, 5])
    state = TokenFlowState(chunks, mode="pivot")
    proc = TokenFlowAttnProcessor(state, LAYER, inject_qk=False)
    with torch.no_grad():
        kf_out = proc(attn, frames[:, keys].reshape(-1, s, dim)).view(3, 2, s, dim)
        state.mode, state.chunk = "propagate", 0
        out = proc(attn, frames[:, 0:3].reshape(-1, s, dim)).view(3, 3, s, dim)
    assert torch.equal(out[:, 1], kf_out[:, 0])  # frame 1 is keyframe k_0: its own output, bit for bit
    # the other frames: each token takes the keyframe output at its nearest source-branch token
    for f in (0, 2):
        for p in range(s):
            cos = torch.nn.functional.cosine_similarity(frames[0, f, p][None], frames[0, 1], dim=-1)
            assert torch.equal(out[:, f, p], kf_out[:, 0, int(cos.argmax())])
    # chunk 1 blends its keyframe with chunk 0's
    with torch.no_grad():
        state.chunk = 1
        out1 = proc(attn, frames[:, 3:6].reshape(-1, s, dim)).view(3, 3, s, dim)
    w = blend_weights(chunks, 1)
    src = frames[0, 3:6]
    cur = kf_out[:, 1][:, nearest_tokens(src, frames[0, 5])]
    prev = kf_out[:, 0][:, nearest_tokens(src, frames[0, 1])]
    torch.testing.assert_close(out1, w[None, :, None, None] * cur + (1 - w[None, :, None, None]) * prev)
    torch.testing.assert_close(out1[:, 2], w[2] * kf_out[:, 1] + (1 - w[2]) * prev[:, 2])


def test_blend_weights_and_chunks_follow_the_formula():
    chunks = chunk_spans(13, 4)
    assert chunks == [(0, 4), (4, 8), (8, 12), (12, 13)]
    for c in (1, 2, 3):
        (a, b), (pa, pb) = chunks[c], chunks[c - 1]
        for i, n in enumerate(range(a, b)):
            d1, d2 = abs(n - (a + (b - a) // 2)), abs(n - (pa + (pb - pa) // 2))
            assert blend_weights(chunks, c)[i].item() == pytest.approx(1 / (1 + math.exp(-d2 / (d1 + d2))))


def test_nearest_tokens_equals_a_naive_loop():
    gen = torch.Generator().manual_seed(2)
    x, keys = torch.randn(2, 7, 5, generator=gen), torch.randn(9, 5, generator=gen)
    got = nearest_tokens(x, keys)
    for f in range(2):
        for p in range(7):
            cos = [float(x[f, p] @ keys[q] / (x[f, p].norm() * keys[q].norm())) for q in range(9)]
            assert got[f, p].item() == max(range(9), key=cos.__getitem__)


def test_conv_injection_replaces_the_residual_branch_before_the_shortcut(tiny_model, trajectory, pan):
    unet = tiny_model.unet
    resnet = unet.get_submodule("up_blocks.1.resnets.1")
    seen = {}
    z = trajectory.latents[2][:2]
    batch = torch.cat([z, torch.randn_like(z), torch.randn_like(z)])
    cond = encode_prompt(tiny_model, pan.prompt).expand(6, -1, -1)
    state = TokenFlowState(chunk_spans(2, 2), inject_conv=True)
    with torch.no_grad(), conv_injection(unet, ["up_blocks.1.resnets.1"], state):
        # observers registered after the injection see what the rest of the resnet sees
        hooks = [resnet.conv2.register_forward_hook(lambda m, a, o: seen.__setitem__("conv2", o.clone())),
                 resnet.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.clone()))]
        try:
            unet(batch, 401, encoder_hidden_states=cond)
        finally:
            for h in hooks:
                h.remove()
    conv2, out = seen["conv2"].chunk(3), seen["out"].chunk(3)
    assert torch.equal(conv2[1], conv2[0]) and torch.equal(conv2[2], conv2[0])
    assert not torch.allclose(out[1], out[0])  # the shortcut (the branch's own input) is still added
    assert not resnet.conv2._forward_hooks


def test_no_injection_no_propagation_equals_plain_cfg_ddim_sampling(tiny_model, trajectory, pan):
    editor = TokenFlowEditor("a portrait photo of a robot", num_steps=3, pnp_attn_t=0, pnp_f_t=0,
                             start_from="inverted", propagate=False, batch_size=2, guidance_scale=7.5)
    edit = editor.edit(tiny_model, trajectory, pan.prompt, progress=False)
    x = cfg_ddim_reference(tiny_model, trajectory.latents[-1], 3, editor.negative_prompt, editor.prompt, 7.5)
    torch.testing.assert_close(edit.latents, x, atol=1e-4, rtol=1e-4)


def test_renoise_start_equals_inverted_when_schedules_end_alike(tiny_model, trajectory):
    a = start_latents(tiny_model.scheduler, trajectory, 3, "renoise")
    torch.testing.assert_close(a, trajectory.latents[-1], atol=1e-5, rtol=1e-5)


def test_keyframe_draws_are_reproducible_from_the_seed_and_differ_between_seeds():
    chunks = chunk_spans(13, 4)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([draw_keyframes(chunks, gen) for _ in range(20)])

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    keys = draw(0)
    for c, (a, b) in enumerate(chunks):
        assert ((keys[:, c] >= a) & (keys[:, c] < b)).all()
    assert len(set(keys[:, 0].tolist())) > 1  # redrawn at every step


def test_thirteen_frames_with_batch_size_four_are_all_edited(tiny_model):
    video = camera_pan(n_frames=13, width=32, height=32)
    traj = invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=2), progress=False).trajectory
    runs = [TokenFlowEditor("a robot", num_steps=2, batch_size=4, seed=s).edit(tiny_model, traj, video.prompt,
                                                                                progress=False) for s in (0, 0, 1)]
    edit = runs[0]
    assert edit.latents.shape == traj.latents[0].shape == (13, 4, 4, 4)
    assert edit.info["chunks"] == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert all(len(k) == 4 and k[3] == 12 for k in edit.info["keyframes"])
    assert torch.isfinite(edit.latents).all()
    assert not torch.allclose(edit.latents[12], traj.latents[-1][12])  # the remainder frame was denoised
    assert runs[1].info["keyframes"] == edit.info["keyframes"] and torch.equal(runs[1].latents, edit.latents)
    assert runs[2].info["keyframes"] != edit.info["keyframes"]


def test_keyframe_caches_are_sized_by_keyframes_not_frames(tiny_model):
    sizes = []
    for n, batch in ((4, 2), (8, 4)):  # two keyframes either way
        video = camera_pan(n_frames=n, width=32, height=32)
        traj = invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=1), progress=False).trajectory
        sizes.append(TokenFlowEditor("a robot", num_steps=1, batch_size=batch).edit(
            tiny_model, traj, video.prompt, progress=False).info["keyframe_cache_bytes"])
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "editing.batch_size=0"),
    (dict(pnp_attn_t=1.5), r"editing.pnp_attn_t=1.5 must be a number in \[0, 1\]: a fraction of the steps"),
    (dict(start_from="noise"), "editing.start_from='noise' is not one of renoise, inverted"),
    (dict(prompt="  "), "editing.prompt is empty"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TokenFlowEditor(**{"prompt": "x", **kwargs})


def test_unknown_layers_and_mismatched_steps_are_refused(tiny_model, trajectory, pan):
    with pytest.raises(ConfigError, match=r"editing.qk_layers: \['up_blocks.9.attentions.0'\] not in the UNet"):
        TokenFlowEditor("x", num_steps=3, qk_layers=["up_blocks.9.attentions.0"]).edit(
            tiny_model, trajectory, pan.prompt, progress=False)
    with pytest.raises(ConfigError, match=r"editing.num_steps=5 needs timesteps .* the inversion's 3 steps"):
        check_timesteps(tiny_model.scheduler, trajectory, 5)


def test_run_writes_the_edit_run_directory(tmp_path):
    from stem.app.job import run_job

    cfg = compose_config(tmp_path, "editing=tokenflow", "editing.prompt=a portrait photo of a robot",
                         "data.n_frames=8", "editing.batch_size=3", "metrics.clip.pretrained=null")
    metrics = run_job(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    for name in ("edited.mp4", "comparison.mp4", "metrics.json", "git.json", "inverted_latents"):
        assert (run_dir / name).exists(), name
    edited, comparison = (load_video(run_dir / f, prompt="") for f in ("edited.mp4", "comparison.mp4"))
    assert (edited.num_frames, edited.width, edited.height) == (8, 256, 256)
    assert (comparison.num_frames, comparison.width) == (8, 512)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["method"] == "TokenFlow" and saved["inversion_method"] == "ddim_1frame"
    assert saved["edit_prompt"] == "a portrait photo of a robot" and saved["clip"]["prompt"] == saved["edit_prompt"]
    assert saved["editing"]["batch_size"] == 3 and len(saved["edit_info"]["keyframes"]) == 5
    assert {"clip", "warp_error"} <= set(saved) and "vs_input" not in saved  # no PSNR for an edit
    assert metrics["seconds"]["editing"] > 0


def test_stem_tokenflow_and_tokenflow_reconstruction_mode(tmp_path):
    from stem.app.job import run_job

    stem = run_job(compose_config(tmp_path, "editing=tokenflow", "editing.prompt=a robot", "inversion=stem",
                                  "inversion.num_bases=16", "metrics.clip.pretrained=null"), tmp_path / "stem")
    assert stem["method"] == "STEM-TokenFlow" and stem["inversion_method"] == "stem_k16"
    recon = run_job(compose_config(tmp_path, "editing=tokenflow_recon"), tmp_path / "recon")
    assert recon["method"] == "TokenFlow" and recon["edit_prompt"] == "a portrait photo of an astronaut"
    assert {"vs_input", "vs_vae", "vae_vs_input"} <= set(recon) and "clip" not in recon
    assert (tmp_path / "recon" / "edited.mp4").is_file()


def test_cli_without_an_edit_prompt_is_one_line_and_exit_2(tmp_path):
    proc = run_cli(*FAST, "editing=tokenflow", f"hydra.run.dir={tmp_path / 'run'}",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2
    (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert "editing.prompt" in line and "editing.prompt='...'" in line
    assert not (tmp_path / "cache").exists()

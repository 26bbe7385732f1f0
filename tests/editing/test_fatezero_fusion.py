"""FateZero fusion pinned down in time and space: which steps fuse, at which timestep's maps, the blend
tokens and masks, the latent blend's window and reference latent, where the store keeps its maps,
the guidance-1 branch, the GroupNorm scope and editing timesteps that are a subset of the inversion's."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cfg_ddim_reference

from stem.core.errors import ConfigError
from stem.diffusion.prompts import encode_prompt
from stem.editing.base import encode_prompts
from stem.editing.fatezero import FateZeroEditor, clip_groupnorm, groupnorms, latent_blend_window
from stem.inversion.methods import DDIMInversion

SOURCE = "a portrait photo of an astronaut"
TARGET = "a watercolor portrait photo of an astronaut"
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0"  # a recorded layer (8x8 tokens at 128^2, 4x4 at 64^2)


def record(model, editor, frames=2, size=8, steps=4, seed=0):
    """Invert random latents (frames, 4, size, size) with the editor's recorder around it: (trajectory, recorder)."""
    latents = torch.randn(frames, 4, size, size, generator=torch.Generator().manual_seed(seed))
    recorder = editor.inversion_observer(model, frames, (size, size))
    with recorder:
        traj = DDIMInversion("1frame", num_steps=steps).invert(model, latents, encode_prompt(model, SOURCE),
                                                               progress=False)
    return traj, recorder


def capture(module, calls: list):
    """Forward hook keeping (input, context, output) of every call of an attention module."""
    def hook(mod, args, kwargs, output):
        calls.append((args[0].clone(), kwargs.get("encoder_hidden_states"), output.clone()))
    return module.register_forward_hook(hook, with_kwargs=True)


def explicit_attention(attn, x, context, probs=None):
    """Per-head softmax(q k^T / sqrt(d)) v (or `probs` v), then the output projection: written out."""
    context = x if context is None else context
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // h
    split = lambda y: y.view(y.shape[0], y.shape[1], h, d).transpose(1, 2)  # noqa: E731
    if probs is None:
        probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (probs.float() @ split(v)).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.to_out[0](out)


def test_fusion_steps_and_the_timestep_of_the_fused_maps(tiny_model):
    """Step j fuses A_src(t_j), the maps recorded at the same timestep, during the first int(fraction * T)
    steps only. Catches a fusion window placed at the end of the denoising, and maps read at the mirrored
    timestep (t_{T-1-j})."""
    unet = tiny_model.unet
    ed = FateZeroEditor(prompt=None, num_steps=4, cross_replace_steps=0.25, self_replace_steps=0.5,
                        min_channels=10**6, store_max_tokens=16, store_dtype="float32")
    traj, recorder = record(tiny_model, ed)
    calls = {k: [] for k in ("attn1", "attn2")}
    hooks = [capture(unet.get_submodule(f"{LAYER}.{k}"), calls[k]) for k in calls]
    try:
        edit = ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder)
        timesteps = [s["t"] for s in edit.info["fusion_schedule"]]
        assert timesteps == [751, 501, 251, 1]
        assert [(s["cross"], s["self"]) for s in edit.info["fusion_schedule"]] == \
            [(True, True), (False, True), (False, False), (False, False)]
        n = 2
        with torch.no_grad():
            for kind, fused_steps in (("attn1", {0, 1}), ("attn2", {0})):
                attn = unet.get_submodule(f"{LAYER}.{kind}")
                for j, (x, context, out) in enumerate(calls[kind]):
                    ctx = None if context is None else context[n:]
                    plain = explicit_attention(attn, x[n:], ctx)
                    src = recorder.store.step(timesteps[j])[f"{LAYER}.{kind}"]
                    fused = explicit_attention(attn, x[n:], ctx, probs=src)
                    expected = fused if j in fused_steps else plain
                    torch.testing.assert_close(out[n:], expected, atol=1e-5, rtol=1e-5)
                    assert not torch.allclose(fused, plain, atol=1e-4)  # the two cases are distinguishable
                    torch.testing.assert_close(out[:n], explicit_attention(attn, x[:n], None if context is None
                                                                           else context[:n]), atol=1e-5, rtol=1e-5)
    finally:
        for hook in hooks:
            hook.remove()
        recorder.close()


def test_self_attention_blend_uses_the_source_prompt_tokens(tiny_model):
    """M at an 8x8 layer from the 4x4 (1/32) layers' A_src of the SOURCE prompt's "astronaut" tokens:
    A = M A_edit + (1 - M) A_src. Catches blend tokens taken from the target prompt (shifted by
    "watercolor"), and the geometry (a resize through the latent size, a bilinear resize)."""
    unet, n = tiny_model.unet, 2
    ed = FateZeroEditor(prompt=TARGET, num_steps=2, cross_replace_steps=0.0, self_replace_steps=1.0,
                        min_channels=10**6, store_max_tokens=64, store_dtype="float32",
                        blend_words=["astronaut"], blend_threshold=0.995)  # the random model's maps are flat
    traj, recorder = record(tiny_model, ed, size=16, steps=2)
    calls = []
    hook = capture(unet.get_submodule(f"{LAYER}.attn1"), calls)
    try:
        ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder)
        maps = recorder.store.step(501)
        before = len("".join(SOURCE.split()[:-1]))  # the tiny tokenizer: one token per character, BOS first
        tokens = list(range(1 + before, 1 + before + len("astronaut")))
        small = [k for k, g in recorder.layers.items() if g == (4, 4)]
        assert len(small) >= 2
        s = sum(maps[f"{b}.attn2"][..., tokens].sum(-1).mean(1).view(n, 1, 4, 4) for b in small) / len(small)
        s = F.max_pool2d(s, 3, stride=1, padding=1)
        up = s.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 4x4 -> 8x8
        mask = (up / up.amax(dim=(1, 2, 3), keepdim=True) > 0.995).float().flatten(1)[:, None, :, None]
        assert 0 < mask.mean() < 1  # a mask that keeps some tokens and replaces others
        attn = unet.get_submodule(f"{LAYER}.attn1")
        x = calls[0][0][n:]
        h = attn.heads
        d = attn.to_q.out_features // h
        q, k = (f(x).view(n, 64, h, d).transpose(1, 2) for f in (attn.to_q, attn.to_k))
        own = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        probs = mask * own + (1 - mask) * maps[f"{LAYER}.attn1"]
        with torch.no_grad():
            torch.testing.assert_close(calls[0][2][n:], explicit_attention(attn, x, None, probs=probs),
                                       atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()
        recorder.close()


def test_latent_blend_window_is_the_released_one():
    """Blend after step j when int(0.2 T) < j + 1 < int(0.8 T): steps 10..38 of 50 (released)."""
    assert [j for j, on in enumerate(latent_blend_window(50, (0.2, 0.8))) if on] == list(range(10, 39))
    assert [j for j, on in enumerate(latent_blend_window(10, (0.2, 0.8))) if on] == [2, 3, 4, 5, 6]
    assert all(latent_blend_window(4, (0.0, 2.0)))


@pytest.mark.parametrize("reference, offset", [("step_start", 0), ("step_end", 1)])
def test_latent_blend_steps_and_reference_latent(tiny_model, reference, offset):
    """With a mask that keeps nothing (threshold 1: no normalised value is above it) a blended step
    returns the reference latent itself, so the UNet's input at the next step is z_inv(t_j) (released,
    "step_start") or z_inv(t_{j+1}) ("step_end") after exactly the window's steps j = 2..6 of 10, and the
    edit's own latent after the others. Catches a window moved or widened, and a wrong reference latent."""
    ed = FateZeroEditor(prompt=TARGET, num_steps=10, cross_replace_steps=0.0, self_replace_steps=0.0,
                        min_channels=10**6, store_max_tokens=16, blend_words=["astronaut"], blend_threshold=1.0,
                        latent_blend=True, latent_blend_reference=reference)
    traj, recorder = record(tiny_model, ed, steps=10)
    inputs = []
    hook = tiny_model.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0][:2].clone()))
    try:
        edit = ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder)
    finally:
        hook.remove()
        recorder.close()
    timesteps = [s["t"] for s in edit.info["fusion_schedule"]]
    assert torch.equal(inputs[0], traj.at(timesteps[0]))
    for j in range(9):
        t_ref = timesteps[j + offset]
        if 2 <= j <= 6:
            assert torch.equal(inputs[j + 1], traj.at(t_ref)), j
        else:
            assert not torch.allclose(inputs[j + 1], traj.at(t_ref), atol=1e-3), j
    assert edit.info["mask_fraction_per_step"] == [0.0] * 5


def test_latent_blend_mask_adds_the_edits_own_target_word_region(tiny_model):
    """released "source_or_edit": M = M_src OR M_edit (the edit's accumulated attention to the target words)
    covers at least the source mask; "source" alone covers less here."""
    fractions = {}
    for mode in ("source", "source_or_edit"):
        ed = FateZeroEditor(prompt="a watercolor portrait photo of an astronaut", num_steps=5,
                            cross_replace_steps=0.0, self_replace_steps=0.0, min_channels=10**6,
                            store_max_tokens=64, blend_words=[["astronaut"], ["watercolor"]], blend_threshold=0.995,
                            latent_blend=True, latent_blend_steps=(0.0, 2.0), latent_blend_mask=mode)
        traj, recorder = record(tiny_model, ed, size=16, steps=5)
        try:
            fractions[mode] = ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder).info[
                "mask_fraction_per_step"]
        finally:
            recorder.close()
    assert all(u >= s for s, u in zip(fractions["source"], fractions["source_or_edit"]))
    assert any(u > s for s, u in zip(fractions["source"], fractions["source_or_edit"]))


def test_guidance_one_computes_only_the_conditional_branch(tiny_model):
    """fatezero_reconstruct's guidance 1: N rows per UNet call (no unconditional branch), and the result of
    plain DDIM sampling under the prompt. Catches the wasted unconditional branch."""
    ed = FateZeroEditor(prompt=None, guidance_scale=1.0, num_steps=3, cross_replace_steps=0.0,
                        self_replace_steps=0.0, min_channels=10**6, store_max_tokens=16)
    traj, recorder = record(tiny_model, ed, steps=3)
    rows = []
    hook = tiny_model.unet.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        edit = ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder)
    finally:
        hook.remove()
        recorder.close()
    assert rows == [2, 2, 2]
    x = cfg_ddim_reference(tiny_model, traj.latents[-1], 3, "", SOURCE, 1.0)
    torch.testing.assert_close(edit.latents, x, atol=1e-5, rtol=1e-5)


def test_store_keeps_maps_in_host_memory_and_reads_them_to_the_model_device(tiny_model):
    """Recorded maps live in host memory (pinned when CUDA is available), not on the UNet's device; what
    the edit reads is on the UNet's device and dtype. Catches maps kept where the UNet computed them."""
    unet = tiny_model.unet
    ed = FateZeroEditor(prompt=TARGET, num_steps=2, min_channels=10**6, store_max_tokens=16,
                        cross_replace_steps=1.0, self_replace_steps=1.0)
    traj, recorder = record(tiny_model, ed, steps=2)
    param = next(unet.parameters())
    read = []
    step = recorder.store.step
    recorder.store.step = lambda t, **kw: read.append(step(t, **kw)) or read[-1]
    try:
        ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder)
        for t in recorder.store.timesteps():
            for key, m in step(t).items():
                assert m.device.type == "cpu" and m.is_pinned() == torch.cuda.is_available(), key
                assert m.dtype == torch.float16
        assert len(read) == 2 and all(m.device == param.device and m.dtype == param.dtype
                                      for maps in read for m in maps.values())
    finally:
        recorder.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (maps pinned in host memory, UNet on GPU)")
def test_store_on_cuda_keeps_maps_pinned_on_the_host():
    from stem.diffusion.models import build_tiny

    model = build_tiny(device="cuda", dtype="float32")
    ed = FateZeroEditor(prompt=TARGET, num_steps=2, min_channels=10**6, store_max_tokens=16)
    latents = torch.randn(2, 4, 8, 8, device="cuda")
    recorder = ed.inversion_observer(model, 2, (8, 8))
    with recorder:
        traj = DDIMInversion("1frame", num_steps=2).invert(model, latents, encode_prompt(model, SOURCE),
                                                           progress=False)
    try:
        maps = recorder.store.step(traj.timesteps[0])
        assert all(m.device.type == "cpu" and m.is_pinned() for m in maps.values())
        read = recorder.store.step(traj.timesteps[0], device="cuda", dtype=torch.float32)
        assert all(m.device.type == "cuda" and m.dtype == torch.float32 for m in read.values())
        ed.edit(model, traj, SOURCE, progress=False, observed=recorder)
    finally:
        recorder.close()


def test_clip_groupnorm_keeps_the_transformer_input_norms_per_frame(tiny_model):
    """As released: ResNet and output GroupNorms pool over the clip, the transformer input norms stay per
    frame. Catches hooks on every GroupNorm (or none)."""
    unet, n = tiny_model.unet, 2
    transformer_norm = unet.get_submodule("down_blocks.1.attentions.0.norm")
    resnet_norm = unet.get_submodule("down_blocks.1.resnets.0.norm1")
    hooked = {id(m) for m in groupnorms(unet)}
    assert id(transformer_norm) not in hooked and id(resnet_norm) in hooked and id(unet.conv_norm_out) in hooked
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, (args[0], output))
        return hook

    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), clip_groupnorm(unet, n):  # our hooks after the clip hooks: they see the final output
        hooks = [m.register_forward_hook(keep(name)) for name, m in (("transformer", transformer_norm),
                                                                     ("resnet", resnet_norm))]
        try:
            unet(z, 501, encoder_hidden_states=encode_prompt(tiny_model, SOURCE).expand(n, -1, -1))
        finally:
            for h in hooks:
                h.remove()
    x, out = seen["transformer"]
    gn = transformer_norm
    torch.testing.assert_close(out, F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps), atol=1e-5, rtol=1e-5)
    x, out = seen["resnet"]
    gn = resnet_norm
    g, c = gn.num_groups, x.shape[1]
    grouped = x.view(n, g, c // g, -1).transpose(0, 1).reshape(g, -1)  # statistics over the frames too
    mean, var = grouped.mean(1), grouped.var(1, unbiased=False)
    norm = (x.view(n, g, -1) - mean[None, :, None]) / torch.sqrt(var[None, :, None] + gn.eps)
    expected = norm.view_as(x) * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_editing_timesteps_among_the_inversions_read_maps_by_value(tiny_model):
    """Inversion 4 steps (751, 501, 251, 1), editing 2 steps (501, 1): the edit starts from z_inv(501) and
    reads the maps recorded at 501 and 1 (by value, not by step index); a timestep without maps is refused."""
    ed = FateZeroEditor(prompt=TARGET, num_steps=2, min_channels=10**6, store_max_tokens=16,
                        cross_replace_steps=1.0, self_replace_steps=1.0)
    traj, recorder = record(tiny_model, ed, steps=4)
    read, inputs = [], []
    step = recorder.store.step
    recorder.store.step = lambda t, **kw: read.append(int(t)) or step(t, **kw)
    hook = tiny_model.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0][:2].clone()))
    prompts = encode_prompts(tiny_model, SOURCE, TARGET, "")
    try:
        ed._edit(tiny_model, traj, prompts, False, recorder)
        assert read == [501, 1] and torch.equal(inputs[0], traj.at(501))
        with pytest.raises(ConfigError, match=r"no attention maps recorded at timesteps \[334"):
            FateZeroEditor(prompt=TARGET, num_steps=3, min_channels=10**6, store_max_tokens=16)._edit(
                tiny_model, traj, prompts, False, recorder)
    finally:
        hook.remove()
        recorder.close()

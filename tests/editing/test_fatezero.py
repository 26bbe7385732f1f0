"""FateZero editing: attention store, fusion, blend mask, clip-level GroupNorm, runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cfg_ddim_reference, compose_config

from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.diffusion.prompts import encode_prompt
from stem.editing.fatezero import (
    FateZeroEditor,
    FusionAttnProcessor,
    FusionState,
    blend_mask,
    clip_groupnorm,
    pooled_blend_map,
    token_map,
)
from stem.inversion.methods import DDIMInversion, FateZeroInversion, self_attention_tokens
from stem.runs.edit import edit_video

TARGET = "a watercolor portrait photo of an astronaut"


@pytest.fixture(scope="module")
def pan():
    return camera_pan(n_frames=4, width=64, height=64)


def editor(**kwargs):
    return FateZeroEditor(**{"prompt": TARGET, "num_steps": 3, "min_channels": 64, **kwargs})


def test_store_records_exactly_the_configured_layers_and_steps(tiny_model, pan):
    ed = editor(store_max_tokens=16)
    recorder = ed.inversion_observer(tiny_model, 4, (8, 8))
    expected = {p.removesuffix(".attn1") for p, (h, w) in self_attention_tokens(tiny_model.unet, 8, 8).items()
                if h * w <= 16}
    assert set(recorder.layers) == expected and 0 < len(expected) < 16
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompt(tiny_model, pan.prompt)
    with recorder:
        traj = DDIMInversion("1frame", num_steps=3).invert(tiny_model, latents, cond, progress=False)
    store = recorder.store
    assert store.timesteps() == traj.timesteps.tolist()
    maps = store.step(traj.timesteps[0])
    assert set(maps) == {f"{b}.{k}" for b in expected for k in ("attn1", "attn2")}
    nbytes = sum(v.numel() * v.element_size() for t in store.timesteps() for v in store.step(t).values())
    assert nbytes == recorder.size_bytes(4, 3)  # the size announced before recording is the size recorded
    for key, m in maps.items():
        assert torch.allclose(m.float().sum(-1), torch.ones(()), atol=2e-3), key  # probabilities
    recorder.close()


def test_recorded_maps_equal_explicit_softmax_and_do_not_change_the_inversion(tiny_model, pan):
    unet = tiny_model.unet
    block = "up_blocks.1.attentions.0.transformer_blocks.0"
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = encode_prompt(tiny_model, pan.prompt)
    seen = {}

    def watch(kind):
        def hook(module, args, kwargs, output):  # observes only (returns None)
            seen.setdefault(kind, (args[0].clone(), kwargs.get("encoder_hidden_states")))
        return hook

    hooks = [unet.get_submodule(f"{block}.{k}").register_forward_hook(watch(k), with_kwargs=True)
             for k in ("attn1", "attn2")]
    ed = editor(store_max_tokens=16, min_channels=64)
    recorder = ed.inversion_observer(tiny_model, 4, (8, 8))
    method = DDIMInversion("1frame", num_steps=1)
    try:
        plain = method.invert(tiny_model, latents, cond, progress=False)
        seen.clear()
        with recorder:
            recorded = method.invert(tiny_model, latents, cond, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(plain.latents, recorded.latents)
    maps = recorder.store.step(recorded.timesteps[0])
    table = ed.frame_table(unet, 4)(block)
    for kind in ("attn1", "attn2"):
        attn = unet.get_submodule(f"{block}.{kind}")
        x, context = seen[kind]
        context = x if kind == "attn1" else context
        q, k = attn.to_q(x), attn.to_k(context)
        d = q.shape[-1] // attn.heads
        for n in range(4):
            keys = torch.cat([k[f] for f in table[n]]) if kind == "attn1" and table is not None else k[n]
            for h in range(attn.heads):
                sl = slice(h * d, (h + 1) * d)
                ref = torch.softmax(q[n, :, sl] @ keys[:, sl].T / math.sqrt(d), dim=-1)
                torch.testing.assert_close(maps[f"{block}.{kind}"][n, h].float(), ref, atol=2e-3, rtol=0)
    recorder.close()


def test_no_fusion_equals_plain_cfg_sampling(tiny_model, pan):
    ed = editor(cross_replace_steps=0, self_replace_steps=0, min_channels=10**6)  # per-frame attention everywhere
    result = edit_video(tiny_model, pan, DDIMInversion("1frame", num_steps=3), ed, progress=False)
    x = cfg_ddim_reference(tiny_model, result.inverted.trajectory.latents[-1], 3, "", TARGET, 7.5)
    torch.testing.assert_close(result.edit.latents, x, atol=1e-4, rtol=1e-4)


def test_disk_store_reproduces_memory_bitwise_and_is_removed(tiny_model, pan, tmp_path):
    method = FateZeroInversion(num_steps=3, min_channels=64)
    runs = {where: edit_video(tiny_model, pan, method, editor(attention_store=where, store_dir=tmp_path,
                                                               blend_words=["astronaut"], latent_blend=True),
                              progress=False) for where in ("memory", "disk")}
    assert torch.equal(runs["memory"].edit.latents, runs["disk"].edit.latents)
    assert runs["disk"].edit.info["recorded_timesteps"] == [1, 334, 667]
    assert list(tmp_path.iterdir()) == []  # the per-run folder is gone


def test_store_over_budget_is_refused_with_the_ways_out(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"attention store would hold .* GiB .*editing.attention_store=disk.*"
                                          r"editing.store_max_tokens"):
        editor(store_budget_gib=1e-6).inversion_observer(tiny_model, 4, (8, 8))
    with pytest.raises(ConfigError, match=r"attention store would hold .* GiB .*store_budget_gib=1e-06; lower "
                                          r"editing.store_max_tokens"):
        editor(store_budget_gib=1e-6, attention_store="disk", store_dir=tmp_path).inversion_observer(
            tiny_model, 4, (8, 8))
    assert list(tmp_path.iterdir()) == []


def test_fusion_processor_against_explicit_formulas(tiny_model):
    block = "up_blocks.1.attentions.0.transformer_blocks.0"
    attn = tiny_model.unet.get_submodule(f"{block}.attn1")
    gen = torch.Generator().manual_seed(2)
    n, s, dim = 2, 4, attn.to_q.in_features
    x = torch.randn(2 * n, s, dim, generator=gen)
    src = torch.rand(n, attn.heads, s, s, generator=gen).softmax(-1)
    state = FusionState()
    state.maps, state.self_on = {f"{block}.attn1": src}, True
    proc = FusionAttnProcessor(f"{block}.attn1", state, n, None, (2, 2))
    d = dim // attn.heads
    q, k, v = (f(x).view(2 * n, s, attn.heads, d).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    with torch.no_grad():
        out = proc(attn, x)
        cond = (src @ v[n:]).transpose(1, 2).reshape(n, s, dim)
        uncond = F.scaled_dot_product_attention(q[:n], k[:n], v[:n]).transpose(1, 2).reshape(n, s, dim)
        expected = attn.to_out[0](torch.cat([uncond, cond]))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # no mask: A = A_src
        state.set_blend(torch.ones(n, 1, 4, 4))  # M = 1 everywhere: the edit's own attention
        plain = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2 * n, s, dim))
        torch.testing.assert_close(proc(attn, x), plain, atol=1e-5, rtol=1e-5)


def test_blend_mask_thresholds_and_region():
    maps = {"a.attn2": torch.zeros(2, 2, 16, 77)}
    maps["a.attn2"][:, :, 5, 3] = 1.0  # token 3 attends from query 5 = cell (1, 1) of a 4x4 grid
    maps["a.attn2"][:, :, :, 3] += 0.01
    pooled = pooled_blend_map({k: token_map(v, [3]) for k, v in maps.items()}, {"a.attn2": (4, 4)})
    keep_all = blend_mask(pooled, (8, 8), 0.0)
    keep_none = blend_mask(pooled, (8, 8), 1.0)  # `>`: the maximum itself is not above 1
    assert keep_all.shape == (2, 1, 8, 8) and (keep_all == 1).all() and (keep_none == 0).all()
    region = blend_mask(pooled, (4, 4), 0.5)
    expected = torch.zeros(4, 4)
    expected[0:3, 0:3] = 1  # the 3x3 max-pool around cell (1, 1)
    assert torch.equal(region[0, 0], expected)


def test_blend_mask_geometry_against_a_written_out_reference():
    """The pooled 4x4 map goes straight to each grid by nearest neighbour (grid cell y takes row
    floor(y * 4 / g)), is divided by its per-frame maximum after the resize, and kept where `>` the
    threshold. Catches a bilinear resize, a resize through the latent size, normalising before the
    resize (8x8 -> 2x2 drops the peak) and `>=`."""
    s = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.2, 0.2, 0.2, 0.2], [0.9, 1.0, 0.0, 0.3]])
    pooled = torch.stack([s, s.flip(0) * 2])[:, None]  # 2 frames
    up = blend_mask(pooled, (8, 8), 0.6)
    expected = (s / 1.0 > 0.6).float().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(up[0, 0], expected)
    assert torch.equal(up[1, 0], (s.flip(0) > 0.6).float().repeat_interleave(2, 0).repeat_interleave(2, 1))
    down = blend_mask(pooled, (2, 2), 0.5)  # nearest keeps rows/columns 0 and 2: [[0.1, 0.3], [0.2, 0.2]]
    assert torch.equal(down[0, 0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # / 0.3: [[1/3, 1], [2/3, 2/3]]
    assert torch.equal(blend_mask(pooled, (4, 4), 0.7)[0, 0], (s > 0.7).float())  # 0.7 itself is not kept


def test_clip_groupnorm_pools_statistics_over_frames():
    gn = torch.nn.GroupNorm(2, 4)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(6, 4, 3, 5, generator=torch.Generator().manual_seed(3))  # 2 groups x 3 frames
    with clip_groupnorm(gn, 3):
        out = gn(x)
    expected = torch.empty_like(x)
    for g in range(2):
        clip = x[3 * g:3 * g + 3]
        for c in range(2):  # channels 2c, 2c+1 form a group; statistics over 3 frames x 2 channels x H x W
            vals = clip[:, 2 * c:2 * c + 2]
            mean, var = vals.mean(), vals.var(unbiased=False)
            norm = (vals - mean) / torch.sqrt(var + gn.eps)
            expected[3 * g:3 * g + 3, 2 * c:2 * c + 2] = norm * gn.weight[2 * c:2 * c + 2, None, None] + \
                gn.bias[2 * c:2 * c + 2, None, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with clip_groupnorm(gn, 1):
        torch.testing.assert_close(gn(x), F.group_norm(x, 2, gn.weight, gn.bias, gn.eps))


@pytest.mark.parametrize("kwargs, match", [
    (dict(cross_edit="swap"), "editing.cross_edit='swap'"),
    (dict(self_replace_steps=2), "editing.self_replace_steps=2"),
    (dict(latent_blend=True), "latent_blend needs editing.blend_words"),
    (dict(attention_frames=["middle"]), "attention_frames entry 'middle'"),
    (dict(attention_store="cloud"), "editing.attention_store='cloud'"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        editor(**kwargs)


def test_replace_needs_equal_word_counts_and_blend_words_must_exist(tiny_model, pan):
    with pytest.raises(ConfigError, match="same number of words"):
        edit_video(tiny_model, pan, DDIMInversion(num_steps=3), editor(cross_edit="replace"), progress=False)
    with pytest.raises(ConfigError, match=r"blend_words: \['fox'\]"):
        edit_video(tiny_model, pan, DDIMInversion(num_steps=3), editor(blend_words=["fox"]), progress=False)


def test_runs_write_the_edit_directory_for_fatezero_stem_fatezero_and_reconstruction(tmp_path):
    from stem.app.job import run_job

    common = ("data.n_frames=8", "metrics.clip.pretrained=null", f"editing.prompt={TARGET}")
    fz = run_job(compose_config(tmp_path, "editing=fatezero", "inversion.min_channels=64",
                                "editing.blend_words=[astronaut]", *common), tmp_path / "fz")
    for name in ("edited.mp4", "comparison.mp4", "metrics.json", "git.json"):
        assert (tmp_path / "fz" / name).exists(), name
    saved = json.loads((tmp_path / "fz" / "metrics.json").read_text())
    assert saved["method"] == "FateZero" and saved["inversion_method"] == "fatezero"
    assert {"clip", "warp_error"} <= set(saved) and saved["editing"]["cross_edit"] == "refine"
    assert len(saved["edit_info"]["fusion_schedule"]) == 5 and fz["video"]["frames"] == 8
    assert not (tmp_path / "cache" / "attention").exists() or not list((tmp_path / "cache" / "attention").iterdir())
    stem = run_job(compose_config(tmp_path, "editing=stem_fatezero", "inversion.num_bases=16", *common),
                   tmp_path / "stem")
    assert stem["method"] == "STEM-FateZero" and stem["editing"]["self_replace_steps"] == 0.5
    recon = run_job(compose_config(tmp_path, "editing=fatezero_reconstruct", "editing.attention_store=disk"),
                    tmp_path / "recon")
    assert {"vs_input", "vs_vae"} <= set(recon) and recon["edit_prompt"] == "a portrait photo of an astronaut"
    assert not list((tmp_path / "cache" / "attention").iterdir())

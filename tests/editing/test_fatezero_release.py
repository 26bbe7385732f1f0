"""FateZero against its release, point by point: the fusion step counts, the latent-blend masks (the average
of the 1/32 layers, the edit's attention summed over steps), clip-level GroupNorm in the inversion and
its place in the inversion cache key, and the presets' GroupNorm scope."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf

from stem.data.synthetic import camera_pan
from stem.diffusion.prompts import encode_prompt
from stem.editing.fatezero import FateZeroEditor, fusion_steps
from stem.inversion.methods import DDIMInversion
from stem.runs.cache import TensorCache
from stem.runs.edit import edit_video

SOURCE = "a portrait photo of an astronaut"
TARGET = "a watercolor portrait photo of an astronaut"
TH = 0.995  # mask threshold: the random model's maps are flat, so only the top values pass


def tokens_of(prompt: str, word: str) -> list[int]:
    """The tiny tokenizer: one token per character, BOS first, words joined without spaces."""
    words = prompt.split()
    start = 1 + len("".join(words[:words.index(word)]))
    return list(range(start, start + len(word)))


@pytest.mark.parametrize("p, steps", [(0.5, 5), (0.5, 50), (0.8, 50), (0.2, 50), (0.8, 7), (0.3, 9), (1.0, 4),
                                      (0.0, 5), (0.6, 10)])
def test_fusion_step_counts_follow_the_release(p, steps):
    """Cross-attention: prompt-to-prompt's per-step word weights have T + 1 rows, rows [0, int(p (T + 1)))
    on; self-attention: steps [0, int(p T)). At T = 5, p = 0.5: 3 cross steps, 2 self steps. Catches the
    cross count rounded as int(p T) (seen failing: (0.5, 5), (0.8, 7), (0.3, 9); equal at the others)."""
    rows = [1.0 if r < int(p * (steps + 1)) else 0.0 for r in range(steps + 1)]  # the release's alpha table
    cross_reference = sum(1 for j in range(steps) if rows[j] == 1.0)
    self_reference = sum(1 for j in range(steps) if 0 <= j < int(steps * p))
    assert fusion_steps(p, p, steps) == (cross_reference, self_reference)


def test_fusion_schedule_of_an_edit_at_an_odd_step_count(tiny_model):
    """The edit's own schedule at T = 5, 0.5 / 0.5: cross-attention fused at steps 0, 1, 2, self-attention
    at 0, 1 (as released). Catches the int(p T) rounding for cross-attention."""
    ed = FateZeroEditor(prompt=TARGET, num_steps=5, cross_replace_steps=0.5, self_replace_steps=0.5,
                        min_channels=10**6, store_max_tokens=16)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    recorder = ed.inversion_observer(tiny_model, 2, (8, 8))
    try:
        with recorder:
            traj = DDIMInversion("1frame", num_steps=5).invert(tiny_model, latents, encode_prompt(tiny_model, SOURCE),
                                                               progress=False)
        schedule = ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder).info["fusion_schedule"]
    finally:
        recorder.close()
    assert [s["cross"] for s in schedule] == [True, True, True, False, False]
    assert [s["self"] for s in schedule] == [True, True, False, False, False]


def written_out_mask(maps: list[torch.Tensor], tokens: list[int], grid, size, threshold):
    """The release's blend mask from (N, heads, queries, 77) cross-attention maps of the 1/32 layers:
    the tokens summed, heads and layers averaged, 3x3 max-pooled, nearest resize to `size`, divided by
    the per-frame maximum, > threshold."""
    n = maps[0].shape[0]
    s = torch.stack([m.float()[..., tokens].sum(-1).mean(1) for m in maps]).mean(0).view(n, 1, *grid)
    s = F.max_pool2d(s, 3, stride=1, padding=1)
    fy, fx = size[0] // grid[0], size[1] // grid[1]
    up = s.repeat_interleave(fy, 2).repeat_interleave(fx, 3)
    return (up / up.amax(dim=(1, 2, 3), keepdim=True) > threshold).float()


def softmax_probs(attn, x, context):
    """Per-head softmax(q k^T / sqrt(d)) of an attention module, written out: (B, heads, queries, keys)."""
    h = attn.heads
    q, k = attn.to_q(x), attn.to_k(context)
    d = q.shape[-1] // h
    split = lambda y: y.view(y.shape[0], y.shape[1], h, d).transpose(1, 2)  # noqa: E731
    return torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)


def test_latent_blend_masks_against_the_recorded_and_captured_maps(tiny_model):
    """Released latent blend, "source_or_edit", after every step (window 0..2): the UNet's input at step
    j + 1 equals z_inv(t_j) where M_j = 0 and differs from it where M_j = 1, with M_j written out here:
    M_src from the recorded maps of the 1/32 (4x4) layers at t_j (source word "astronaut") OR M_edit from
    the edit's own cross-attention of those layers to the target word "watercolor" (captured, softmax
    written out), summed over steps 0..j. Catches (seen failing) the blend map taken from the first 1/32
    layer instead of the average over them, and the edit's attention not accumulated over the steps
    (this step's alone)."""
    unet, n, size, steps = tiny_model.unet, 2, 16, 4
    ed = FateZeroEditor(prompt=TARGET, num_steps=steps, cross_replace_steps=0.0, self_replace_steps=0.0,
                        min_channels=10**6, store_max_tokens=64, store_dtype="float32",
                        blend_words=[["astronaut"], ["watercolor"]], blend_threshold=TH,
                        latent_blend=True, latent_blend_steps=(0.0, 2.0), latent_blend_mask="source_or_edit")
    latents = torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(3))
    recorder = ed.inversion_observer(tiny_model, n, (size, size))
    inputs, captured = [], {}
    try:
        with recorder:
            traj = DDIMInversion("1frame", num_steps=steps).invert(tiny_model, latents,
                                                                   encode_prompt(tiny_model, SOURCE), progress=False)
        small = sorted(b for b, g in recorder.layers.items() if g == (4, 4))
        assert len(small) >= 2  # an average over layers that differs from its first term
        hooks = [unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))]
        for b in small:
            captured[b] = []

            def keep(mod, args, kwargs, out, b=b):
                captured[b].append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))
            hooks.append(unet.get_submodule(f"{b}.attn2").register_forward_hook(keep, with_kwargs=True))
        try:
            edit = ed.edit(tiny_model, traj, SOURCE, progress=False, observed=recorder)
        finally:
            for h in hooks:
                h.remove()
        timesteps = [s["t"] for s in edit.info["fusion_schedule"]]
        src_tokens, edit_tokens = tokens_of(SOURCE, "astronaut"), tokens_of(TARGET, "watercolor")
        sums = {b: 0 for b in small}
        first_layer_differs = not_accumulated_differs = False
        with torch.no_grad():
            for j in range(steps - 1):
                maps = recorder.store.step(timesteps[j])
                src = [maps[f"{b}.attn2"] for b in small]
                m_src = written_out_mask(src, src_tokens, (4, 4), (size, size), TH)
                own = {}
                for b in small:
                    x, ctx = captured[b][j]
                    own[b] = softmax_probs(unet.get_submodule(f"{b}.attn2"), x[n:], ctx[n:])  # conditional rows
                    sums[b] = sums[b] + own[b]
                m_edit = written_out_mask([sums[b] for b in small], edit_tokens, (4, 4), (size, size), TH)
                m = torch.maximum(m_src, m_edit)
                assert 0 < m.mean() < 1
                z_ref, z_next = traj.at(timesteps[j]), inputs[j + 1][:n]
                keep_ref = (m == 0).expand_as(z_ref)
                assert torch.equal(z_next[keep_ref], z_ref[keep_ref]), j
                assert ((z_next - z_ref).abs()[~keep_ref] > 1e-6).all(), j
                # the two bugs give other masks here (so the checks above can tell them apart)
                first = torch.maximum(written_out_mask(src[:1], src_tokens, (4, 4), (size, size), TH),
                                      written_out_mask([sums[small[0]]], edit_tokens, (4, 4), (size, size), TH))
                first_layer_differs |= not torch.equal(first, m)
                alone = written_out_mask([own[b] for b in small], edit_tokens, (4, 4), (size, size), TH)
                not_accumulated_differs |= not torch.equal(torch.maximum(m_src, alone), m)
        assert first_layer_differs and not_accumulated_differs
    finally:
        recorder.close()


def clip_norm_reference(module, args, output, frames):
    """Clip-level GroupNorm written out: each group's statistics over (channels of the group x frames x
    height x width), i.e. torch's group_norm of the frames laid side by side."""
    x = args[0]
    g, c, h, w = x.shape[0] // frames, *x.shape[1:]
    clip = x.view(g, frames, c, h, w).permute(0, 2, 1, 3, 4).reshape(g, c, frames * h, w)
    out = F.group_norm(clip, module.num_groups, module.weight, module.bias, module.eps)
    return out.view(g, c, frames, h, w).permute(0, 2, 1, 3, 4).reshape(x.shape)


def clip_norm_hooks(unet, frames):
    """Hooks on the ResNet and output GroupNorms (every GroupNorm but the transformer blocks' input `norm`),
    chosen here by name."""
    names = [name for name, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)
             and not (".attentions." in name and name.endswith(".norm"))]
    assert any("resnets" in name for name in names) and "conv_norm_out" in names
    return [unet.get_submodule(name).register_forward_hook(
        lambda mod, args, out: clip_norm_reference(mod, args, out, frames)) for name in names]


def test_clip_groupnorm_is_active_in_the_inversion(tiny_model):
    """With clip_groupnorm the inversion run under the editor's observer equals a DDIM inversion whose
    ResNet/output GroupNorms are written out over the clip (torch's group_norm over frames x spatial per
    group), and differs from the per-frame inversion. Catches (seen failing) the GroupNorm hooks left out of
    the inversion observer."""
    unet, n, steps = tiny_model.unet, 3, 3
    ed = FateZeroEditor(prompt=TARGET, num_steps=steps, min_channels=10**6, store_max_tokens=16,
                        clip_groupnorm=True)
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = encode_prompt(tiny_model, SOURCE)
    recorder = ed.inversion_observer(tiny_model, n, (8, 8))
    try:
        with recorder:
            ours = DDIMInversion("1frame", num_steps=steps).invert(tiny_model, latents, cond, progress=False)
    finally:
        recorder.close()
    hooks = clip_norm_hooks(unet, n)
    try:
        reference = DDIMInversion("1frame", num_steps=steps).invert(tiny_model, latents, cond, progress=False)
    finally:
        for h in hooks:
            h.remove()
    per_frame = DDIMInversion("1frame", num_steps=steps).invert(tiny_model, latents, cond, progress=False)
    torch.testing.assert_close(ours.latents, reference.latents, atol=1e-5, rtol=1e-5)
    assert (ours.latents[-1] - per_frame.latents[-1]).abs().max() > 1e-3


def test_inversion_cache_key_carries_clip_groupnorm(tiny_model, tmp_path):
    """An inversion cached without clip GroupNorm is not reused with it: the second run inverts again
    (a cache miss) and its latents equal a fresh uncached inversion with clip GroupNorm. Catches (seen
    failing) clip_groupnorm left out of the inversion cache key (the stale per-frame inversion reused)."""
    pan = camera_pan(n_frames=3, width=64, height=64)
    cache = TensorCache(tmp_path / "cache")
    method = DDIMInversion("1frame", num_steps=3)

    def run(clip, cache):
        ed = FateZeroEditor(prompt=TARGET, num_steps=3, cross_replace_steps=0.0, self_replace_steps=0.0,
                            min_channels=10**6, store_max_tokens=16, clip_groupnorm=clip)
        return edit_video(tiny_model, pan, method, ed, cache=cache, progress=False)

    per_frame = run(False, cache)
    clip = run(True, cache)
    fresh = run(True, None)
    assert not per_frame.inverted.cache_hit and not clip.inverted.cache_hit
    assert per_frame.inverted.key != clip.inverted.key
    assert torch.equal(clip.inverted.trajectory.latents, fresh.inverted.trajectory.latents)  # the same computation
    assert run(True, cache).inverted.cache_hit  # and the clip inversion is reused by a clip edit


@pytest.mark.parametrize("preset", ["fatezero", "fatezero_paper", "fatezero_reconstruct", "stem_fatezero",
                                    "stem_fatezero_smaller"])
def test_fatezero_presets_normalise_over_the_clip_as_released(tmp_path, preset):
    """FateZero's release always runs its pseudo-3D UNet (ResNet/output GroupNorm over the clip); STEM-FateZero
    plugs STEM into FateZero, so its preset does too. Catches a preset left per frame."""
    cfg = OmegaConf.to_container(compose_config(tmp_path, f"editing={preset}", fast=False), resolve=True)
    assert cfg["editing"]["clip_groupnorm"] is True

"""Tune-A-Video (stem/editing/baselines/tuneavideo.py) on the tiny random model: what is trained, where the
sparse-causal and temporal attention act, the tuning's loss, determinism, cache and resume, release, and an edit."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.diffusion.models import build_tiny
from stem.editing.baselines.tuneavideo import TemporalAttention, TuneAVideoEditor, transformer_blocks
from stem.runs.cache import TensorCache

ROOT = Path(__file__).resolve().parents[3]
FRAMES = 3
FAST = {"train_steps": 1, "num_steps": 2, "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def model():
    """A model of this file's own: the tests tune its query weights in place (released after each)."""
    return build_tiny(seed=0, device="cpu")


@pytest.fixture(scope="module")
def video():
    return camera_pan(n_frames=FRAMES, width=64, height=64, dx=4, dy=2, prompt="a portrait photo of an astronaut")


def editor(**kwargs) -> TuneAVideoEditor:
    return TuneAVideoEditor(**{"prompt": "a watercolor painting of an astronaut", **FAST, **kwargs})


@pytest.fixture
def count_steps(monkeypatch):
    """A list that receives, at every AdamW step, the ids of the parameters holding a gradient."""
    calls = []
    step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        calls.append({id(p) for group in self.param_groups for p in group["params"] if p.grad is not None})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return calls


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def hook_count(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(L, h*d) -> (h, L, d)."""
    return x.view(x.shape[0], h, -1).transpose(0, 1)


def naive_attention(attn, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A diffusers Attention layer written out: softmax(Q K^T / sqrt(d)) V per head, then to_out (L, C)."""
    q, k, v = heads(attn.to_q(queries), attn.heads), heads(attn.to_k(context), attn.heads), \
        heads(attn.to_v(context), attn.heads)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.to_out[0]((w @ v).transpose(0, 1).reshape(queries.shape[0], -1))


def naive_temporal(layer: TemporalAttention, x: torch.Tensor, n: int) -> torch.Tensor:
    """Temporal attention with loops: for each group g and spatial position p, the N tokens x[g*N + f, p]
    (f = 0..N-1) go through LayerNorm and self-attention among themselves, plus the residual."""
    out = torch.empty_like(x)
    for g in range(x.shape[0] // n):
        for p in range(x.shape[1]):
            tokens = x[g * n:(g + 1) * n, p]
            normed = layer.norm_temp(tokens)
            out[g * n:(g + 1) * n, p] = tokens + naive_attention(layer.attn_temp, normed, normed)
    return out


def test_only_the_released_modules_are_trained_and_the_rest_is_bit_identical(model, video, count_steps, monkeypatch):
    """Catches: the whole UNet (or the temporal LayerNorm, or the key/value projections) trained; attn2.to_q
    forgotten; frozen weights nudged by weight decay or a stray in-place op; requires_grad flags left changed."""
    unet = model.unet
    built = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(True)   # as a model loaded for training would be: freezing is the editor's job
    before, flags = snapshot(unet), {n: p.requires_grad for n, p in unet.named_parameters()}
    tuner = editor(train_steps=2)
    with_grad_in_unet, step = [], torch.optim.AdamW.step

    def watching(self, *args, **kwargs):   # every UNet parameter holding a gradient, in the optimizer or not
        with_grad_in_unet.append({n for n, p in unet.named_parameters() if p.grad is not None})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", watching)
    try:
        tuner.prepare(model, video, None, progress=False)
        names = {id(p): f"unet.{n}" for n, p in unet.named_parameters()}
        names.update({id(p): f"temporal.{n}" for n, p in tuner.temporal.named_parameters()})
        q_names = {n for n, _ in unet.named_parameters() if n.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))}
        blocks = len(transformer_blocks(unet))
        temporal = {f"temporal.{n}" for n, _ in tuner.temporal.named_parameters() if ".attn_temp." in n}
        assert len(q_names) == 2 * blocks and len(temporal) == 5 * blocks   # to_q, to_k, to_v, to_out.0 w+b
        assert len(count_steps) == 2
        for with_grad in count_steps:
            assert {names[i] for i in with_grad} == {f"unet.{n}" for n in q_names} | temporal
        assert with_grad_in_unet == [q_names, q_names]   # no gradient computed for the frozen weights
        after = unet.state_dict()
        for name, value in before.items():
            if name in q_names:
                assert not torch.equal(after[name], value), f"{name} was not tuned"
            else:
                assert torch.equal(after[name], value), f"frozen {name} changed"
        for name, p in tuner.temporal.named_parameters():   # the LayerNorm stays at its init (ones, zeros)
            if ".norm_temp." in name:
                assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
        assert all(p.grad is None for p in unet.parameters())
    finally:
        tuner.release(model)
        for p, flag in zip(unet.parameters(), built, strict=True):
            p.requires_grad_(flag)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())


def test_temporal_layer_init_is_the_released_one(model):
    """Catches: the output projection not zero-initialised (T-Attn would perturb the pretrained UNet at step 0)
    or the whole to_out zeroed (the release zeroes the weight only, the bias keeps its default init)."""
    from stem.editing.baselines.tuneavideo import build_temporal

    layers = build_temporal(model.unet, seed=33)
    assert len(layers) == len(transformer_blocks(model.unet))
    for layer in layers.values():
        out = layer.attn_temp.to_out[0]
        assert torch.count_nonzero(out.weight) == 0
        assert torch.count_nonzero(out.bias) == out.bias.numel()
        assert torch.count_nonzero(layer.attn_temp.to_q.weight) == layer.attn_temp.to_q.weight.numel()
        assert layer.attn_temp.to_q.bias is None     # SD's attention_bias False, as the block's own attn1
    again = build_temporal(model.unet, seed=33)
    assert all(torch.equal(a, b) for a, b in zip(layers.state_dict().values(), again.state_dict().values()))


def test_temporal_attention_mixes_frames_and_not_positions():
    """Catches: attention over the spatial tokens of a frame instead of over the frames of a position (a wrong
    reshape), groups (uncond/cond) mixed with each other, a missing residual or LayerNorm."""
    torch.manual_seed(0)
    n, groups, positions, dim = 4, 2, 6, 32
    layer = TemporalAttention(dim, heads=2, dim_head=16)
    torch.nn.init.normal_(layer.attn_temp.to_out[0].weight, std=0.2)   # trained-like: not a no-op
    x = torch.randn(groups * n, positions, dim)
    with torch.no_grad():
        out = layer(x, n)
        torch.testing.assert_close(out, naive_temporal(layer, x, n), atol=1e-5, rtol=1e-5)
        g, f, p = 1, 2, 3
        x2 = x.clone()
        x2[g * n + f, p] += torch.randn(dim)   # not a constant shift: LayerNorm would remove that
        diff = (layer(x2, n) - out).abs()
    changed = torch.zeros_like(diff, dtype=torch.bool)
    changed[g * n:(g + 1) * n, p] = True
    assert diff[~changed].max() < 1e-6                       # other positions, the other group: untouched
    others = [g * n + k for k in range(n) if k != f]
    assert diff[others, p].amax(-1).min() > 1e-3            # every other frame of the group, at that position


def test_temporal_layers_act_on_each_block_output(model, video):
    """Catches: the temporal layer applied before the feed-forward or outside the transformer block (the release
    puts it at the end of each block), or applied to some blocks only."""
    unet, tuner = model.unet, editor(learning_rate=1e-2)
    blocks = transformer_blocks(unet)
    raw, seen = {}, {}
    handles = [b.register_forward_hook(lambda m, a, o, p=path: raw.setdefault(p, o.detach().clone()))
               for path, b in blocks.items()]
    try:
        tuner.prepare(model, video, None, progress=False)
        raw.clear()
        handles += [b.register_forward_hook(lambda m, a, o, p=path: seen.setdefault(p, o.detach().clone()))
                    for path, b in blocks.items()]
        z = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        cond = torch.randn(1, 77, unet.config.cross_attention_dim).expand(FRAMES, -1, -1)
        with torch.no_grad():
            unet(z, 500, encoder_hidden_states=cond)
            assert set(seen) == set(blocks)
            for path in blocks:
                layer = tuner.temporal[path.replace(".", "/")]
                assert torch.count_nonzero(layer.attn_temp.to_out[0].weight) > 0   # tuned: a real test
                torch.testing.assert_close(seen[path], naive_temporal(layer, raw[path], FRAMES), atol=1e-5,
                                           rtol=1e-5)
    finally:
        for h in handles:
            h.remove()
        tuner.release(model)


def test_sparse_causal_attention_per_frame(model, video):
    """Catches: frame i attending to itself or to all frames instead of [frame 0, frame i-1]; frame 0/1 not
    handled as released (frame 0: itself twice; frame 1: frame 0 twice); the uncond/cond groups of the guided batch
    mixed; the sparse-causal processors missing in the edit."""
    from stem.inversion.methods import DDIMInversion
    from stem.runs.edit import edit_video

    attn = model.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    context = {0: [0, 0], 1: [0, 0], 2: [0, 1]}     # frame -> the frames whose keys/values it sees (released)
    assert len(context) == FRAMES
    seen = []

    def check(module, args, kwargs, out):   # on the first guided (uncond | cond) call, with the tuned weights
        x = args[0]
        if x.shape[0] != 2 * FRAMES or seen:
            return
        seen.append(True)
        for g in range(2):
            for i, frames in context.items():
                kv = torch.cat([x[g * FRAMES + j] for j in frames])
                torch.testing.assert_close(out[g * FRAMES + i], naive_attention(module, x[g * FRAMES + i], kv),
                                           atol=1e-5, rtol=1e-5)
        last = FRAMES - 1
        assert (out[last] - naive_attention(module, x[last], x[last])).abs().max() > 1e-4   # the pattern matters

    handle = attn.register_forward_hook(check, with_kwargs=True)
    try:
        edit_video(model, video, DDIMInversion("2frame", "tuneavideo", num_steps=2), editor(num_steps=2),
                   progress=False)
    finally:
        handle.remove()
    assert seen


def test_tuning_lowers_the_loss_step_after_step(model, video, monkeypatch):
    """With the same draw (latent, timestep, noise) at every step, the released loss MSE(eps_theta(z_t), eps) must
    fall at every step. Catches: a gradient sign error, the optimizer stepping on copies the UNet never uses, the
    loss taken against another target than eps, the sparse-causal/temporal layers missing from the tuning."""
    first = {}

    def same_draw(generator, mean, std, scale, num_train_timesteps):
        if not first:
            z0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
            first["draw"] = (z0, torch.tensor([400]), torch.randn(z0.shape, generator=generator))
        return first["draw"]

    monkeypatch.setattr(TuneAVideoEditor, "draw", staticmethod(same_draw))
    tuner = editor(train_steps=5, learning_rate=1e-3)
    try:
        tuner.prepare(model, video, None, progress=False)
        z0, t, noise = first["draw"]
        a = model.scheduler.alphas_cumprod[400]
        with torch.no_grad():   # the loss of the first draw, recomputed by hand on the tuned model
            from stem.diffusion.prompts import encode_prompt
            from stem.editing.fatezero import clip_groupnorm
            from stem.inversion.attention import FrameContextAttnProcessor, self_attention_processors

            cond = encode_prompt(model, video.prompt).expand(FRAMES, -1, -1)
            with self_attention_processors(model.unet, FrameContextAttnProcessor(FRAMES, "2frame", "tuneavideo")), \
                    clip_groupnorm(model.unet, FRAMES):
                pred = model.unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond).sample
            final = F.mse_loss(pred, noise).item()
    finally:
        tuner.release(model)
    losses = tuner.losses
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert final < losses[-1], (final, losses)   # the last update lowered it too (and was installed)


def test_deterministic_for_a_seed(model, video):
    """Catches: draws from the global RNG (then a run depends on what ran before and changes what runs after),
    or an unseeded temporal-layer init."""
    states = []
    for seed in (7, 7, 8):
        torch.manual_seed(123)
        tuner = editor(seed=seed)
        try:
            tuner.prepare(model, video, None, progress=False)
            states.append(tuner.tuned_state(model.unet))
        finally:
            tuner.release(model)
        after = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(3)), "prepare consumed the global RNG"
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_tuned_weights_cache_hit_and_miss(model, video, tmp_path, count_steps):
    """Catches: a sweep re-tuning every job (no cache), or a cache key missing the prompt or the seed (another
    prompt would reuse weights tuned on the wrong text)."""
    cache = TensorCache(tmp_path / "inversion")
    runs = [("first", video, 11), ("again", video, 11),
            ("prompt", dataclasses.replace(video, prompt="a photo of a cat"), 11), ("seed", video, 12)]
    steps, keys, states = {}, {}, {}
    for name, clip, seed in runs:
        tuner = editor(seed=seed)
        start = len(count_steps)
        try:
            tuner.prepare(model, clip, cache, progress=False)
            states[name], keys[name] = tuner.tuned_state(model.unet), tuner.inversion_key()
        finally:
            tuner.release(model)
        steps[name] = len(count_steps) - start
    assert steps == {"first": 1, "again": 0, "prompt": 1, "seed": 1}
    assert all(torch.equal(states["first"][k], states["again"][k]) for k in states["first"])
    assert keys["first"] == keys["again"] and len({str(keys[k]) for k in ("first", "prompt", "seed")}) == 3
    assert not list((tmp_path / "tuneavideo").glob("*.checkpoint.pt"))   # finished runs leave no checkpoint


CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
torch.set_flush_denormal(True)
from stem.data.synthetic import camera_pan
from stem.diffusion.models import build_tiny
from stem.editing.baselines.tuneavideo import TuneAVideoEditor
from stem.runs.cache import TensorCache
step, count = torch.optim.AdamW.step, []
def slow(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    count.append(1)
    if len(count) == 3:   # after the first checkpoint (step 2), before the entry is written: wait for the kill
        time.sleep(600)
    return out
torch.optim.AdamW.step = slow
video = camera_pan(n_frames={frames}, width=64, height=64, dx=4, dy=2, prompt="a portrait photo of an astronaut")
TuneAVideoEditor(**{kwargs!r}).prepare(build_tiny(seed=0, device="cpu"), video, TensorCache({cache!r}),
                                      progress=False)
"""


def test_resume_after_a_kill(model, video, tmp_path, count_steps):
    """Catches: no checkpoint written, a resume that restarts from step 0, or one that does not restore the
    optimizer moments or the generator state (the resumed run would end with other weights than an uninterrupted
    one), a non-atomic checkpoint read half-written."""
    kwargs = {"prompt": "a watercolor painting", "train_steps": 3, "checkpoint_every": 2, "learning_rate": 1e-3,
              "gradient_checkpointing": False, "num_steps": 3}
    cache = tmp_path / "killed" / "inversion"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), frames=FRAMES, kwargs=kwargs, cache=str(cache)))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder, deadline = cache.parent / "tuneavideo", time.monotonic() + 150
    try:
        while not list(folder.glob("*.checkpoint.pt")):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not [p for p in folder.iterdir() if not p.name.endswith(".checkpoint.pt")]   # no finished entry

    resumed = TuneAVideoEditor(**kwargs)
    try:
        resumed.prepare(model, video, TensorCache(cache), progress=False)
        got = resumed.tuned_state(model.unet)
    finally:
        resumed.release(model)
    assert len(count_steps) == 1          # step 3 only
    whole = TuneAVideoEditor(**kwargs)
    try:
        whole.prepare(model, video, TensorCache(tmp_path / "whole" / "inversion"), progress=False)
        want = whole.tuned_state(model.unet)
    finally:
        whole.release(model)
    assert len(count_steps) == 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    assert resumed.losses[:2] == pytest.approx(whole.losses[:2]) and len(resumed.losses) == 3
    assert not list(folder.glob("*.checkpoint.pt"))


def test_release_leaves_the_unet_as_before(model, video):
    """Catches: hooks left on the blocks, processors not restored, tuned query weights left in the UNet, training
    mode or gradient checkpointing left on, requires_grad flags changed; also after a failing edit."""
    unet = model.unet
    before, procs = snapshot(unet), dict(unet.attn_processors)
    flags, hooks, training = [p.requires_grad for p in unet.parameters()], hook_count(unet), unet.training
    tuner = editor(gradient_checkpointing=True)
    tuner.prepare(model, video, None, progress=False)
    assert hook_count(unet) == hooks + len(transformer_blocks(unet))
    tuner.release(model)
    assert hook_count(unet) == hooks and tuner.temporal is None
    assert all(unet.attn_processors[k] is v for k, v in procs.items())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert unet.training == training and not unet.is_gradient_checkpointing


def test_edit_is_guided_ddim_from_the_inverted_latent_with_the_tuned_model(model, video, tmp_path):
    """End to end through stem.runs.edit.edit_video. Catches: sampling without the temporal layers or the tuned
    weights, another guidance scale or negative prompt than the released 12.5 / "", a start other than the
    inverted z_T, the inversion cache key blind to the tuned weights, the label taking the STEM prefix wrongly."""
    from conftest import cfg_ddim_reference

    from stem.editing.fatezero import clip_groupnorm
    from stem.inversion.attention import FrameContextAttnProcessor, self_attention_processors
    from stem.inversion.methods import DDIMInversion
    from stem.runs.edit import edit_video

    cache = TensorCache(tmp_path / "inversion")
    method = DDIMInversion("2frame", "tuneavideo", num_steps=2)
    tuner = editor()
    result = edit_video(model, video, method, tuner, cache, progress=False)
    assert result.frames.shape == (FRAMES, 3, 64, 64) and torch.isfinite(result.frames).all()
    assert tuner.temporal is None                          # released after the edit
    assert tuner.label("ddim_2frame_tuneavideo") == "Tune-A-Video" and tuner.label("stem") == "STEM-Tune-A-Video"
    # the reference: diffusers' DDIM with CFG on the same tuned UNet, sparse-causal attention and clip GroupNorm
    tuner.prepare(model, video, cache, progress=False)     # a cache hit: the same tuned weights
    try:
        z_t = result.inverted.trajectory.latents[-1]
        with self_attention_processors(model.unet, FrameContextAttnProcessor(FRAMES, "2frame", "tuneavideo")), \
                clip_groupnorm(model.unet, FRAMES):
            want = cfg_ddim_reference(model, z_t, 2, "", tuner.prompt, 12.5)
    finally:
        tuner.release(model)
    torch.testing.assert_close(result.edit.latents, want, atol=1e-4, rtol=1e-4)
    assert len(list((tmp_path / "inversion").iterdir())) == 1
    other = editor(seed=99)
    edit_video(model, video, method, other, cache, progress=False)
    assert len(list((tmp_path / "inversion").iterdir())) == 2  # other tuned weights: another inversion entry


def test_config_holds_the_released_settings():
    """Catches: a config default drifting from the official repository's (configs/*.yaml, train_tuneavideo.py)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "editing" / "tuneavideo.yaml")
    assert cfg._target_ == "stem.editing.baselines.tuneavideo.TuneAVideoEditor"
    released = {"negative_prompt": "", "guidance_scale": 12.5, "seed": 33, "train_steps": 500,
                "learning_rate": 3e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2,
                "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "start_from": "inverted", "clip_groupnorm": True,
                "gradient_checkpointing": True}
    assert {k: cfg[k] for k in released} == released
    assert list(cfg.trainable_modules) == ["attn1.to_q", "attn2.to_q", "attn_temp"]
    defaults = TuneAVideoEditor()
    assert (defaults.guidance_scale, defaults.train_steps, defaults.learning_rate, defaults.seed) == (12.5, 500, 3e-5,
                                                                                                      33)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"train_steps": 0}, "editing.train_steps"), ({"learning_rate": 0}, "editing.learning_rate"),
    ({"trainable_modules": "attn_temp"}, "editing.trainable_modules"),
    ({"checkpoint_every": 0}, "editing.checkpoint_every")])
def test_bad_settings_are_refused_in_one_line(kwargs, fragment):
    """Catches: a setting that would train nothing or crash deep in the loop accepted silently."""
    with pytest.raises(ConfigError) as info:
        TuneAVideoEditor(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_trainable_modules_matching_nothing_is_refused(model, video):
    """Catches: a typo in trainable_modules tuning nothing for 500 steps."""
    tuner = editor(trainable_modules=["attn3.to_q"])
    with pytest.raises(ConfigError, match="matches no module"):
        tuner.prepare(model, video, None, progress=False)
    tuner.release(model)
    assert hook_count(model.unet) == 0


def test_half_precision_model_tunes_fp32_weights_and_keeps_its_dtype(video):
    """bf16 on CPU stands for the GPU's fp16 (the release: fp32 trainable weights under autocast). Catches: the
    tuning crashing on mixed dtypes, fp32 weights left in a half-precision UNet after tuning, the query weights not
    restored by release."""
    half = build_tiny(seed=0, device="cpu", dtype="bfloat16")
    before = snapshot(half.unet)
    tuner = editor(learning_rate=1e-2)
    try:
        tuner.prepare(half, video, None, progress=False)
        assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in tuner.temporal.parameters()} == {torch.bfloat16}
        tuned = [k for k, v in before.items() if not torch.equal(half.unet.state_dict()[k], v)]
        assert tuned and all(k.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) for k in tuned)
    finally:
        tuner.release(half)
    assert all(torch.equal(half.unet.state_dict()[k], v) for k, v in before.items())

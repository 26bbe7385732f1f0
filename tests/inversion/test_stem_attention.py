"""STEM self-attention (Eq. 7) against explicit references, and STEM inversion end to end."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stem.core.errors import ConfigError
from stem.data.synthetic import camera_pan
from stem.diffusion.prompts import encode_prompt
from stem.diffusion.vae import encode_frames
from stem.inversion.em import init_bases
from stem.inversion.methods import STEMInversion
from stem.inversion.stem_attention import STEMAttnProcessor, group_spans

S, C, HEADS = 6, 8, 2
D = C // HEADS


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=HEADS, dim_head=D, bias=False).eval()


def ref_em(x, mu, iters, tau, values=None):
    """EM written out (float64): E-step softmax(<x, mu/|mu|>/tau), M-step weighted means."""
    x, mu = x.double(), mu.double()
    for _ in range(iters):
        z = torch.softmax(x @ (mu / (mu.norm(dim=-1, keepdim=True) + 1e-4)).T / tau, dim=-1)
        mu = z.T @ x / (z.sum(0)[:, None] + 1e-6)
    vb = z.T @ values.double() / (z.sum(0)[:, None] + 1e-6) if values is not None else None
    return mu, vb


def ref_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for (T, d) queries and (K, d) bases."""
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def reference(attn, x, n, group, space, k, iters, tau, seed):
    """Per branch and EM group: bases by `ref_em` from the processor's initial bases, then attention."""
    gen = torch.Generator().manual_seed(seed)
    branches = x.shape[0] // n
    xv = x.view(branches, n, S, C).double()
    out = torch.zeros(branches, n, S, C, dtype=torch.float64)
    w = {name: getattr(attn, f"to_{name}").weight.double() for name in "qkvo"[:3]}
    w_out = attn.to_out[0].weight.double()
    for f0, f1, size in group_spans(n, group):
        m = (f1 - f0) // size
        toks = xv[:, f0:f1].reshape(branches * m, size * S, C)          # EM groups, branch-major
        if space == "features":
            mu0 = init_bases(toks.float(), k, "gaussian", gen)
        else:
            keys = (toks @ w["k"].T).view(branches * m, size * S, HEADS, D).transpose(1, 2)
            mu0 = init_bases(keys.reshape(-1, size * S, D).float(), k, "gaussian", gen).view(branches * m, HEADS, k, D)
        for gm in range(branches * m):
            q = toks[gm] @ w["q"].T
            if space == "features":
                mu, _ = ref_em(toks[gm], mu0[gm], iters, tau)
                kb, vb = mu @ w["k"].T, mu @ w["v"].T
            heads = []
            for h in range(HEADS):
                sl = slice(h * D, (h + 1) * D)
                if space == "keys":
                    kh, vh = toks[gm] @ w["k"][sl].T, toks[gm] @ w["v"][sl].T
                    kbh, vbh = ref_em(kh, mu0[gm, h], iters, tau, values=vh)
                else:
                    kbh, vbh = kb[:, sl], vb[:, sl]
                heads.append(ref_attention(q[:, sl], kbh, vbh))
            res = torch.cat(heads, -1) @ w_out.T + attn.to_out[0].bias.double()
            out[gm // m, f0 + (gm % m) * size: f0 + (gm % m + 1) * size] = res.view(size, S, C)
    return out.view(branches * n, S, C)


@pytest.mark.parametrize("space", ["features", "keys"])
@pytest.mark.parametrize("n,group", [(4, None), (16, 8), (13, 4)])  # global; two groups of 8; 3 groups + 1 frame
def test_stem_attention_equals_explicit_bases_and_softmax(attn, space, n, group):
    x = torch.randn(2 * n, S, C, generator=torch.Generator().manual_seed(n))  # 2 prompt branches
    proc = STEMAttnProcessor(n, num_bases=5, n_iters=3, tau=0.5, space=space, group=group, seed=11,
                             chunk_size=7, query_chunk=10)
    with torch.no_grad():
        ours = proc(attn, x)
        expected = reference(attn, x, n, group, space, 5, 3, 0.5, seed=11)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_group_of_8_on_16_frames_equals_two_separate_videos(attn):
    x = torch.randn(16, S, C, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = STEMAttnProcessor(16, num_bases=4, group=8, init="random_tokens", seed=0)(attn, x)
        first = STEMAttnProcessor(8, num_bases=4, init="random_tokens", seed=0)
        second = STEMAttnProcessor(8, num_bases=4, init="random_tokens", seed=0)
        first(attn, x[:8])
        second.generator.set_state(first.generator.get_state())  # continue the same random stream
        halves = [STEMAttnProcessor(8, num_bases=4, init="random_tokens", seed=0)(attn, x[:8]), second(attn, x[8:])]
    torch.testing.assert_close(both, torch.cat(halves), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["features", "keys"])
def test_bases_equal_to_one_frames_tokens_give_one_frame_attention(attn, space):
    x = torch.randn(3, S, C, generator=torch.Generator().manual_seed(5))
    proc = STEMAttnProcessor(1, num_bases=S, n_iters=2, tau=1e-6, space=space, init="random_tokens")
    with torch.no_grad():
        torch.testing.assert_close(proc(attn, x), AttnProcessor2_0()(attn, x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small_video(tiny_model):
    video = camera_pan(n_frames=4, width=64, height=64, dx=3, dy=1)
    return encode_frames(tiny_model, video.frames), encode_prompt(tiny_model, video.prompt)


def test_same_seed_gives_bitwise_identical_latents_and_other_seeds_differ(tiny_model, small_video):
    latents, cond = small_video
    run = lambda seed: STEMInversion(num_bases=4, num_steps=4, seed=seed).invert(  # noqa: E731
        tiny_model, latents, cond, progress=False).latents
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a[1:], c[1:])


@pytest.mark.parametrize("preset", [dict(dead_bases="reseed"),
                                    dict(space="keys", group=4, n_iters=5, tau=0.01, dead_bases="keep")])
def test_stem_inversion_reconstructs(tiny_model, small_video, preset):
    latents, cond = small_video  # 4 frames of 8x8 latents: 4 tokens per group at the mid block
    method = STEMInversion(num_bases=4, num_steps=50, **preset)
    traj = method.invert(tiny_model, latents, cond, progress=False)
    rec = method.reconstruct(tiny_model, traj.latents[-1], cond, progress=False)
    # measured mean |error| on unit-variance latents: 0.0152 (features), 0.0158 (keys); z_T is ~0.81 away
    assert (rec - latents).abs().mean() < 0.017


def test_reconstruction_processor_follows_the_switch():
    assert isinstance(STEMInversion().reconstruction_processor(4), STEMAttnProcessor)
    assert not isinstance(STEMInversion(stem_in_reconstruction=False).reconstruction_processor(4), STEMAttnProcessor)


@pytest.mark.parametrize("kwargs,word", [({"num_bases": 0}, "num_bases"), ({"n_iters": 0}, "n_iters"),
                                         ({"tau": 0}, "tau"), ({"tau": -1}, "tau"), ({"group": 0}, "group"),
                                         ({"space": "values"}, "space"), ({"excess_bases": "x"}, "excess_bases")])
def test_bad_knobs_fail_at_construction(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        STEMInversion(**kwargs)


def test_too_many_bases_for_a_layer_names_the_layer_and_the_fix(tiny_model):
    # 8 frames of 256x256: latents 32x32, the mid block works on 4x4 tokens -> 128 per group
    with pytest.raises(ConfigError, match=r"num_bases=256 exceeds the 128 tokens of an EM group at mid_block\..*"
                                          r"lower num_bases to at most 128"):
        STEMInversion(num_bases=256).check(tiny_model.unet, 8, 32, 32)
    STEMInversion(num_bases=128).check(tiny_model.unet, 8, 32, 32)
    with pytest.raises(ConfigError, match="16 tokens of an EM group at mid_block"):
        STEMInversion(num_bases=128, group=1).check(tiny_model.unet, 8, 32, 32)
    STEMInversion(num_bases=256, excess_bases="clamp").check(tiny_model.unet, 8, 32, 32)


def test_stem_literal_preset_attends_to_eq_10_bases_where_eps_gives_zero_bases():
    """STEMInversion with configs/inversion/stem_literal.yaml (one EM iteration instead of R=3, so that the
    float64 reference is one step from the same initial bases) on 8 frames of 64 clustered tokens of 64
    channels, K=64: the bases the processor attends to are the float64 Eq. 8-11 step (raw-basis softmax,
    plain weighted mean; tolerance of tests/inversion/test_em.py), and its output is softmax(Q K_b^T / sqrt(d)) V_b of
    those bases. With the preset's M-step replaced by sum Z X / (sum Z + 1e-6), zero bases appear and the output
    moves by more than 10% of its norm.

    Mutation seen failing: `m_step: literal` removed from stem_literal.yaml (and STEMInversion not passing
    m_step to the processor)."""
    from test_em import clustered_tokens, literal_step
    from test_stem_released import preset

    frames, tokens, channels, k, heads = 8, 64, 64, 64, 2
    d = channels // heads
    torch.manual_seed(0)
    attn64 = Attention(query_dim=channels, heads=heads, dim_head=d, bias=False).eval()
    x, _, _ = clustered_tokens(seed=1)                                  # (1, 512, 64): 8 frames of 64 tokens
    seen = []

    def run(**overrides):
        settings = preset("stem_literal", num_bases=k, n_iters=1, seed=2, excess_bases="error", **overrides)
        proc = STEMInversion(**settings).processor(frames)
        em = proc.em

        def recorded(*args, **kwargs):
            res = em(*args, **kwargs)
            seen.append(res.bases)
            return res
        proc.em = recorded
        with torch.no_grad():
            return proc(attn64, x.view(frames, tokens, channels))

    out = run()
    mu0 = init_bases(x, k, "gaussian", torch.Generator().manual_seed(2))  # the processor's initial bases
    want, _, z = literal_step(x[0], mu0[0], 0.05)
    assert z.sum(0).min() < 1e-38  # a basis whose responsibilities all underflow in fp32
    delta = (channels ** 0.5 + 4) * 2.0 ** -24 * (x[0].double().abs() @ mu0[0].double().abs().T / 0.05).max()
    assert (seen[0][0].double() - want).abs().max() <= 2 * delta * (x[0].double()[:, None] - want).abs().max()
    w = {n: getattr(attn64, f"to_{n}").weight.double() for n in "qkv"}
    xd, mu = x[0].double(), seen[0][0].double()
    q, kb, vb = xd @ w["q"].T, mu @ w["k"].T, mu @ w["v"].T
    heads_out = [ref_attention(q[:, h * d:(h + 1) * d], kb[:, h * d:(h + 1) * d], vb[:, h * d:(h + 1) * d])
                 for h in range(heads)]
    expected = torch.cat(heads_out, -1) @ attn64.to_out[0].weight.double().T + attn64.to_out[0].bias.double()
    torch.testing.assert_close(out.double().view(-1, channels), expected, rtol=1e-5, atol=1e-6)
    eps = run(m_step="eps")
    assert (seen[1][0].abs().amax(-1) == 0).any()
    assert (eps.double() - out.double()).norm() > 0.1 * out.double().norm()

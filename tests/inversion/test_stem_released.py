"""The `stem_official` preset against an independent reference of the released STEM-Inv EM (issue #11, point 18).

The reference below is written from the released code's behaviour with its constants as literals
(tau 0.01, R 5, bases normalised with |mu| + 1e-4, M-step Z / (sum Z + 1e-4), value bases from
that normalised Z, init Normal(mean, unbiased std) of the keys), never the module's constants.
"""

import math
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from omegaconf import OmegaConf

from stem.inversion.em import em_bases, init_bases
from stem.inversion.methods import STEMInversion

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "inversion"
N, S, C, HEADS, K = 16, 4, 16, 2, 16  # 16 frames of 4 tokens, groups of 8 frames: 32 keys per EM, 16 bases
D = C // HEADS


def preset(name: str, **overrides) -> dict:
    """A configs/inversion preset as STEMInversion kwargs (its `defaults: [stem]` merged by hand)."""
    cfg = OmegaConf.load(PRESETS / f"{name}.yaml")
    if "defaults" in cfg:
        base = OmegaConf.load(PRESETS / "stem.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    cfg = OmegaConf.merge(cfg, overrides)
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}


def released_init(keys: torch.Tensor, num_bases: int, generator: torch.Generator) -> torch.Tensor:
    """Normal(per-channel mean, unbiased std) of (B, T, d) keys, drawn as mean + std * randn."""
    t = keys.shape[1]
    mean = keys.sum(1, keepdim=True) / t
    std = (((keys - mean) ** 2).sum(1, keepdim=True) / (t - 1)).sqrt()
    return mean + std * torch.randn(keys.shape[0], num_bases, keys.shape[2], generator=generator)


def released_em(k: torch.Tensor, v: torch.Tensor, k_base: torch.Tensor, n_iters: int = 5):
    """One head's EM as released: (T, d) keys and values, (K, d) initial bases -> key and value bases."""
    k, v, k_base = k.double(), v.double(), k_base.double()
    for _ in range(n_iters):
        unit = k_base / (k_base.norm(dim=-1, keepdim=True) + 1e-4)
        z = torch.softmax(k @ unit.T / 0.01, dim=-1)        # (T, K)
        z = z / (z.sum(0, keepdim=True) + 1e-4)             # released M-step normalisation
        k_base = z.T @ k
    return k_base, z.T @ v                                   # value bases reuse the normalised Z


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=HEADS, dim_head=D, bias=False).eval()


def released_attention(attn, x: torch.Tensor, seed: int, k: int = K, group: int = 8) -> torch.Tensor:
    """The released STEM self-attention on one branch of N frames, EM per group of 8 frames and per head."""
    gen = torch.Generator().manual_seed(seed)
    w = {n: getattr(attn, f"to_{n}").weight.double() for n in "qkv"}
    xd = x.double()
    groups = xd.view(N // group, group * S, C)                              # (m, 8*S, C)
    keys = (groups @ w["k"].T).view(N // group, group * S, HEADS, D).transpose(1, 2)
    mu0 = released_init(keys.reshape(-1, group * S, D).float(), k, gen).view(N // group, HEADS, k, D)
    out = torch.zeros(N, S, C, dtype=torch.float64)
    for g in range(N // group):
        q, kk, vv = (groups[g] @ w[n].T for n in "qkv")
        heads = []
        for h in range(HEADS):
            sl = slice(h * D, (h + 1) * D)
            kb, vb = released_em(kk[:, sl], vv[:, sl], mu0[g, h])
            heads.append(torch.softmax(q[:, sl] @ kb.T / math.sqrt(D), dim=-1) @ vb)
        res = torch.cat(heads, -1) @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
        out[g * group:(g + 1) * group] = res.view(group, S, C)
    return out


def test_stem_official_equals_the_released_em_and_mass_eps_matters(attn):
    """Catches: stem_official dividing by sum Z + 1e-6 (the issue measured 3.8e-2 at SD shapes), mass_eps
    not reaching em_bases, value bases formed with another normalisation than the keys', the biased std in
    the init, a head/group mix-up. Seen failing with mass_eps: 1.0e-4 removed from stem_official.yaml."""
    x = torch.randn(N, S, C, generator=torch.Generator().manual_seed(1))
    official = STEMInversion(**preset("stem_official", num_bases=K, seed=3))
    with torch.no_grad():
        ours = official.processor(N)(attn, x)
        paper_eps = STEMInversion(**preset("stem_official", num_bases=K, seed=3, mass_eps=1e-6)).processor(N)(attn, x)
    expected = released_attention(attn, x, seed=3)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)  # measured max |diff| 8e-8
    # bases with little mass here: sum Z + 1e-6 moves the output by 1e-4 (measured), far outside that tolerance
    assert not torch.allclose(paper_eps.double(), expected, rtol=1e-5, atol=1e-6)


def test_mass_eps_is_the_m_step_denominator_for_key_and_value_bases():
    """Catches: mass_eps ignored, or applied to the key bases but not the value bases. One basis points
    away from every token, so its mass is ~1e-7 and the eps decides its value."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 30, 4, generator=g).abs() + 0.1
    v = torch.randn(1, 30, 3, generator=g)
    mu0 = torch.cat([x[:, :3], -x[:, 3:4]], 1)
    for eps in (1e-4, 1e-6):
        res = em_bases(x, 4, n_iters=1, tau=0.1, values=v, bases=mu0, mass_eps=eps)
        kb, vb = x[0].double(), v[0].double()
        mu = mu0[0].double()
        for _ in range(1):
            z = torch.softmax(kb @ (mu / (mu.norm(dim=-1, keepdim=True) + 1e-4)).T / 0.1, dim=-1)
            zn = z / (z.sum(0, keepdim=True) + eps)
            mu = zn.T @ kb
        assert 1e-9 < z[:, 3].sum() < 1e-6  # the small mass this test is about
        torch.testing.assert_close(res.bases[0].double(), mu, rtol=1e-5, atol=1e-7)
        # values ~ N(0, 1) cancel in the fp32 sum of 30 terms: absolute floor ~ 30 x 6e-8 x |v| ~ 1e-6
        torch.testing.assert_close(res.values[0].double(), zn.T @ vb, rtol=1e-5, atol=1e-6)
    small, large = (em_bases(x, 4, n_iters=1, tau=0.1, values=v, bases=mu0, mass_eps=e) for e in (1e-6, 1e-4))
    assert (small.bases[0, 3] - large.bases[0, 3]).abs().max() > 1e-2


def test_gaussian_init_is_mean_plus_unbiased_std_times_normal_noise():
    """Catches: the population std (divisor T) instead of torch.std's unbiased one (T - 1), as released;
    a chunked accumulation that loses a chunk. 10 tokens: the two stds differ by 5%."""
    x = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(4)) * torch.tensor([1.0, 5.0, 0.1]) + 7
    mu = init_bases(x, 6, "gaussian", torch.Generator().manual_seed(0), chunk_size=3)
    expected = released_init(x, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mu, expected, rtol=1e-5, atol=1e-5)


def test_stem_official_keeps_k_bases_where_a_group_has_fewer_tokens(attn):
    """excess_bases=allow (stem_official): 48 bases for 32 keys per group, as released. Catches: allow
    clamping K to the token count, or stem_official refusing (the 16-frame default-data failure)."""
    x = torch.randn(N, S, C, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = STEMInversion(**preset("stem_official", num_bases=48, seed=1)).processor(N)(attn, x)
    torch.testing.assert_close(ours.double(), released_attention(attn, x, seed=1, k=48), rtol=1e-5, atol=1e-6)

"""EM of bases (stem/inversion/em.py) against naive loops, Lloyd's k-means, and its own streamed form."""

import pytest
import torch

from stem.core.errors import ConfigError
from stem.inversion.em import DEAD_MASS, MASS_EPS, NORM_EPS, em_bases, init_bases, responsibilities


def naive_em(x, mu, n_iters, tau, normalize_bases, values=None):
    """Token-by-token E-step (Eq. 8/9) and M-step (Eq. 10/11) for one group."""
    t, k = x.shape[0], mu.shape[0]
    for _ in range(n_iters):
        keys = [m / (m.norm() + NORM_EPS) if normalize_bases else m for m in mu]
        num, mass = torch.zeros_like(mu), torch.zeros(k, dtype=x.dtype)
        num_v = torch.zeros(k, values.shape[1], dtype=x.dtype) if values is not None else None
        for i in range(t):
            logits = torch.stack([x[i] @ kk for kk in keys]) / tau
            z = torch.exp(logits - logits.max())
            z = z / z.sum()
            for j in range(k):
                num[j] += z[j] * x[i]
                mass[j] += z[j]
                if num_v is not None:
                    num_v[j] += z[j] * values[i]
        mu = num / (mass[:, None] + MASS_EPS)
    return mu, (num_v / (mass[:, None] + MASS_EPS) if num_v is not None else None), mass


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 40, 5, generator=g, dtype=torch.float64)
    mu0 = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    return x, v, mu0


@pytest.mark.parametrize("normalize_bases", [True, False])
def test_em_equals_naive_loops(data, normalize_bases):
    x, v, mu0 = data
    res = em_bases(x, 4, n_iters=3, tau=0.5, normalize_bases=normalize_bases, values=v, bases=mu0)
    for b in range(2):
        mu, mu_v, mass = naive_em(x[b], mu0[b], 3, 0.5, normalize_bases, v[b])
        torch.testing.assert_close(res.bases[b].double(), mu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.values[b].double(), mu_v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.mass[b].double(), mass, rtol=1e-5, atol=1e-5)


def lloyd(x, mu, n_iters, normalize_bases):
    """Lloyd's k-means with the E-step's similarity as the assignment rule."""
    for _ in range(n_iters):
        keys = mu / (mu.norm(dim=-1, keepdim=True) + NORM_EPS) if normalize_bases else mu
        assign = (x @ keys.T).argmax(-1)
        # an empty cluster gets 0 / eps = 0, the M-step's convention (unnormalised dot products collapse)
        mu = torch.stack([x[assign == j].mean(0) if (assign == j).any() else torch.zeros_like(x[0])
                          for j in range(mu.shape[0])])
    return mu, assign


@pytest.mark.parametrize("normalize_bases", [True, False])
def test_em_tends_to_lloyds_kmeans_as_tau_goes_to_zero(normalize_bases):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 8, generator=g) * 4
    x = (centres[torch.arange(200) % 5] + torch.randn(200, 8, generator=g))[None]
    mu0 = x[:, torch.randperm(200, generator=g)[:5]]
    expected, assign = lloyd(x[0], mu0[0], 4, normalize_bases)
    if normalize_bases:
        assert len(assign.unique()) == 5
    res = em_bases(x, 5, n_iters=4, tau=1e-7, normalize_bases=normalize_bases, bases=mu0)
    torch.testing.assert_close(res.bases[0], expected, rtol=1e-4, atol=1e-4)
    z = responsibilities(x, res.bases, 1e-7, normalize_bases)
    keys = res.bases[0] / (res.bases[0].norm(dim=-1, keepdim=True) + NORM_EPS) if normalize_bases else res.bases[0]
    assert torch.equal(z[0].argmax(-1), (x[0] @ keys.T).argmax(-1))
    assert torch.equal(res.mass[0].round(), torch.bincount(assign, minlength=5).float())


@pytest.mark.parametrize("init", ["gaussian", "random_tokens", "kmeans++"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])  # 7 and 64 do not divide 150 tokens
def test_streamed_em_equals_monolithic(init, chunk_size):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 150, 12, generator=g), torch.randn(3, 150, 10, generator=g)
    run = lambda chunk, dead: em_bases(x, 16, 3, 0.05, True, init, dead, torch.Generator().manual_seed(5),  # noqa: E731
                                       chunk, values=v)
    for dead in ("keep", "reseed"):
        whole, streamed = run(None, dead), run(chunk_size, dead)
        for a, b in ((whole.bases, streamed.bases), (whole.values, streamed.values)):
            assert (a - b).abs().max() <= 1e-5
        torch.testing.assert_close(whole.mass, streamed.mass, rtol=1e-5, atol=0)  # sums ~10: compare relatively


def test_em_runs_in_fp32_for_half_inputs():
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(2))
    res16 = em_bases(x.half(), 4, generator=torch.Generator().manual_seed(0))
    res32 = em_bases(x.half().float(), 4, generator=torch.Generator().manual_seed(0))
    assert res16.bases.dtype == torch.float32
    torch.testing.assert_close(res16.bases, res32.bases)


def test_gaussian_init_uses_the_per_channel_mean_and_std():
    x = torch.randn(1, 5000, 3, generator=torch.Generator().manual_seed(4)) * torch.tensor([1.0, 5.0, 0.1]) + 7
    mu = init_bases(x, 4000, "gaussian", torch.Generator().manual_seed(0), chunk_size=333)
    torch.testing.assert_close(mu.mean(1), x.mean(1), rtol=0.02, atol=0.1)
    torch.testing.assert_close(mu.std(1), x.std(1), rtol=0.05, atol=0.0)


def test_random_tokens_and_kmeanspp_pick_distinct_tokens():
    x = torch.randn(2, 50, 4, generator=torch.Generator().manual_seed(6))
    for init in ("random_tokens", "kmeans++"):
        mu = init_bases(x, 10, init, torch.Generator().manual_seed(0))
        for b in range(2):
            matches = (mu[b][:, None] == x[b][None]).all(-1)  # (K, T)
            assert matches.any(1).all() and matches.float().argmax(1).unique().numel() == 10


def test_dead_bases_are_kept_as_zero_or_reseeded_with_the_worst_fit_tokens():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 30, 4, generator=g).abs() + 0.1  # all tokens in the positive orthant
    mu0 = torch.cat([x[:, :3], -torch.ones(1, 1, 4)], 1)  # basis 3 points away from every token
    sim = x[0] @ (mu0[0] / mu0[0].norm(dim=-1, keepdim=True)).T
    assert (sim.argmax(-1) != 3).all()
    keep = em_bases(x, 4, n_iters=1, tau=0.01, dead_bases="keep", bases=mu0)
    assert keep.mass[0, 3] < DEAD_MASS and keep.bases[0, 3].abs().max() < 1e-2
    reseed = em_bases(x, 4, n_iters=1, tau=0.01, dead_bases="reseed", bases=mu0)
    worst = sim.amax(-1).argmin()  # naive: the token whose best similarity is lowest
    torch.testing.assert_close(reseed.bases[0, 3], x[0, worst])
    torch.testing.assert_close(reseed.bases[0, :3], keep.bases[0, :3])


@pytest.mark.parametrize("kwargs,word", [({"num_bases": 0}, "num_bases"), ({"n_iters": 0}, "n_iters"),
                                         ({"tau": 0.0}, "tau"), ({"init": "zeros"}, "init"),
                                         ({"dead_bases": "drop"}, "dead_bases"), ({"chunk_size": 0}, "chunk_size")])
def test_bad_settings_raise_config_errors(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        em_bases(torch.randn(1, 10, 3), **{"num_bases": 2, **kwargs})


# ---------------------------------------------------------------- Eq. 10 to the letter (m_step="literal")
U32 = 2.0 ** -24  # fp32 unit roundoff


def clustered_tokens(seed: int = 0, tokens: int = 512, channels: int = 64, clusters: int = 8):
    """512 tokens of 64 channels around 8 centres (std 0.5 per channel, spread 0.1), and 64 gaussian initial
    bases: with raw bases at tau 0.05 the logits are hundreds apart and most responsibilities underflow in fp32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, channels, generator=g) * 0.5
    x = (centres[torch.arange(tokens) % clusters] + 0.1 * torch.randn(tokens, channels, generator=g))[None]
    v = torch.randn(1, tokens, 16, generator=g)
    return x, v, init_bases(x, 64, "gaussian", torch.Generator().manual_seed(seed + 1))


def literal_step(x, mu, tau, values=None):
    """One EM iteration of Eq. 8-11 as written, in float64 for one group: z = softmax_k(<x_i, mu_k> / tau)
    with the raw bases, mu_k = sum_i z_ik x_i / sum_i z_ik (no epsilon); value bases with the same z."""
    x, mu = x.double(), mu.double()
    z = torch.softmax(x @ mu.T / tau, dim=-1)
    mass = z.sum(0)
    vb = z.T @ values.double() / mass[:, None] if values is not None else None
    return z.T @ x / mass[:, None], vb, z


@pytest.mark.parametrize("chunk_size", [None, 100, 1])  # 100 does not divide 512: a short last chunk
def test_literal_m_step_is_eq_10_where_the_eps_m_step_gives_zero_bases(chunk_size):
    """m_step="literal" equals a float64 Eq. 8-11 reference (softmax of raw-basis logits / tau, plain weighted
    mean) at each of R=3 iterations, for key and value bases, streamed or not; R=3 in one call equals three
    calls of one iteration. The responsibilities of many bases underflow in fp32 here (masses down to 1e-58,
    asserted), so the eps M-step (sum Z X / (sum Z + 1e-6)) yields exact zero bases.

    Tolerance: an fp32 log-responsibility log z_ik carries the rounding of a C-term dot product, about
    sqrt(C) u L with L = the largest sum_c |x_ic mu_kc| / tau (the scale of its terms), plus a few u L from
    the division and log_softmax: delta = (sqrt(C) + 4) u L. That moves a mass relatively by delta, a weight
    ratio by 2 delta, and a basis (a weighted mean) by 2 delta times the largest |x_i - mu_k| (D).
    Measured: bases 0.4 u L D, masses 4.2 u L.

    Mutations seen failing: the eps M-step (m_step ignored); no rescaling of earlier chunks' sums when the
    running max grows (chunked runs only); value bases divided by the true (underflowing) mass."""
    x, v, mu0 = clustered_tokens()
    mu, tiny = mu0, []
    for _ in range(3):
        res = em_bases(x, 64, n_iters=1, tau=0.05, normalize_bases=False, dead_bases="keep", bases=mu, values=v,
                       chunk_size=chunk_size, m_step="literal")
        want, want_v, z = literal_step(x[0], mu[0], 0.05, v[0])
        delta = (64 ** 0.5 + 4) * U32 * (x[0].double().abs() @ mu[0].double().abs().T / 0.05).max()
        tol = 2 * delta * (x[0].double()[:, None] - want[None]).abs().max()
        assert (res.bases[0].double() - want).abs().max() <= tol
        tol_v = 2 * delta * (v[0].double()[:, None] - want_v[None]).abs().max()
        assert (res.values[0].double() - want_v).abs().max() <= tol_v
        torch.testing.assert_close(res.mass[0].double(), z.sum(0), rtol=delta, atol=1e-37)  # fp32: 0 below 1e-38
        tiny.append(z.sum(0).min().item())
        mu = res.bases
    assert min(tiny) < 1e-40  # far below fp32's smallest normal number: what this test is about
    whole = em_bases(x, 64, n_iters=3, tau=0.05, normalize_bases=False, dead_bases="keep", bases=mu0,
                     chunk_size=chunk_size, m_step="literal")
    assert torch.equal(whole.bases, mu)
    eps = em_bases(x, 64, n_iters=3, tau=0.05, normalize_bases=False, dead_bases="keep", bases=mu0,
                   chunk_size=chunk_size)
    assert (eps.bases[0].abs().amax(-1) == 0).sum() >= 1 and (eps.bases - mu).abs().max() > 1


def test_literal_m_step_reconstruction_error_is_that_of_the_literal_bases():
    """measure_error with m_step="literal": error_sq = sum_i ||x_i - z_i mu||^2 with z the last E-step's
    responsibilities and mu the literal bases (float64 reference), energy = sum_i ||x_i||^2.

    Mutation seen failing: <mu, Z^T X> taken from the log-domain weights (not rescaled by exp(max))."""
    x, _, mu0 = clustered_tokens(seed=2)
    res = em_bases(x, 64, n_iters=2, tau=0.05, normalize_bases=False, dead_bases="keep", bases=mu0, chunk_size=100,
                   m_step="literal", measure_error=True)
    before = em_bases(x, 64, n_iters=1, tau=0.05, normalize_bases=False, dead_bases="keep", bases=mu0,
                      m_step="literal").bases
    _, _, z = literal_step(x[0], before[0], 0.05)
    xd = x[0].double()
    want = (xd - z @ res.bases[0].double()).square().sum()
    energy = xd.square().sum()
    # fp32 sums of terms of the size of the energy: exact to about 1e-6 of it (stem/inversion/em.py)
    assert abs(res.error_sq[0].item() - want.item()) <= 1e-5 * energy.item()
    torch.testing.assert_close(res.energy[0].double(), energy, rtol=1e-6, atol=0)


def test_e_step_with_raw_bases_is_stable_for_large_logits():
    """Raw bases at tau 0.05 with logits up to ~1e4: the fp32 responsibilities are finite, rows sum to 1, and
    equal the float64 softmax to 4 u L (L the largest |logit|). Mutation seen failing: exp(logits) / sum
    without subtracting the row maximum (overflow: NaN)."""
    g = torch.Generator().manual_seed(4)
    x, mu = torch.randn(1, 50, 8, generator=g) * 10, torch.randn(1, 6, 8, generator=g) * 10
    z = responsibilities(x, mu, 0.05, normalize_bases=False)
    logits = x[0].double() @ mu[0].double().T / 0.05
    assert logits.abs().max() > 3000 and torch.isfinite(z).all()
    torch.testing.assert_close(z[0].double(), torch.softmax(logits, -1), rtol=0, atol=4 * U32 * logits.abs().max())


def test_reseeded_bases_get_the_worst_tokens_values():
    """Keys space passes the values: a dead key basis (it points away from every token) reseeded with the worst-fit
    token gets that token's value as its value basis, not the zero its responsibilities give.

    Mutation seen failing: value bases left out of the reseeding (the reseeded key keeps a zero value basis)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 30, 4, generator=g).abs() + 0.1  # all tokens in the positive orthant
    v = torch.randn(1, 30, 3, generator=g)
    mu0 = torch.cat([x[:, :3], -torch.ones(1, 1, 4)], 1)  # basis 3 points away from every token
    keep = em_bases(x, 4, n_iters=1, tau=0.01, dead_bases="keep", bases=mu0, values=v)
    assert keep.values[0, 3].abs().max() < 1e-2  # dead: (about) a zero value basis
    reseed = em_bases(x, 4, n_iters=1, tau=0.01, dead_bases="reseed", bases=mu0, values=v)
    worst = (x[0] @ (mu0[0] / mu0[0].norm(dim=-1, keepdim=True)).T).amax(-1).argmin()
    assert torch.equal(reseed.bases[0, 3], x[0, worst]) and torch.equal(reseed.values[0, 3], v[0, worst])
    torch.testing.assert_close(reseed.values[0, :3], keep.values[0, :3])


@pytest.mark.parametrize("mass,dead", [(5e-3, False), (5e-4, True)])
def test_a_basis_is_dead_below_a_mass_of_1e_3(mass, dead):
    """The dead-basis threshold by value (1e-3 of a token's responsibility): a basis holding 5e-3 is kept as its
    M-step gives it, one holding 5e-4 is reseeded with the worst-fit token. Two raw bases (s, 0) and (-s, 0)
    at tau 1 on 20 tokens (1 + r_i, y_i): z_i1 = sigmoid(-2 s (1 + r_i)); s is solved for the mass (float64).

    Mutations seen failing: DEAD_MASS 1e-1 (the 5e-3 basis reseeded); DEAD_MASS 1e-4 (the 5e-4 basis kept)."""
    g = torch.Generator().manual_seed(8)
    x = torch.stack([1 + torch.rand(20, generator=g), torch.randn(20, generator=g)], -1)[None]
    lo, hi = 0.0, 50.0
    for _ in range(200):  # bisection: the mass decreases in s
        s = (lo + hi) / 2
        lo, hi = (s, hi) if torch.sigmoid(-2 * s * x[0, :, 0].double()).sum() > mass else (lo, s)
    mu0 = torch.tensor([[[s, 0.0], [-s, 0.0]]])
    keep = em_bases(x, 2, n_iters=1, tau=1.0, normalize_bases=False, dead_bases="keep", bases=mu0)
    reseed = em_bases(x, 2, n_iters=1, tau=1.0, normalize_bases=False, dead_bases="reseed", bases=mu0)
    # s and the logits (|logit| < 20) rounded to fp32 move the mass relatively by about 20 u ~ 1e-6
    torch.testing.assert_close(keep.mass[0, 1].double(), torch.tensor(mass, dtype=torch.float64), rtol=1e-5, atol=0)
    worst = x[0, x[0, :, 0].argmin()]  # lowest best similarity s (1 + r_i)
    if dead:
        assert torch.equal(reseed.bases[0, 1], worst) and not torch.equal(keep.bases[0, 1], worst)
    else:
        assert torch.equal(reseed.bases, keep.bases)

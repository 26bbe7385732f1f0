"""Expectation-maximisation of K bases for a set of tokens (paper Sec. 4.2-4.3, Alg. 1).

Notation (paper symbols in brackets):
    x    (B, T, C)  tokens of B independent groups, T tokens each         [X]
    mu   (B, K, C)  bases                                                  [mu]
    z    (B, T, K)  responsibilities of the bases for each token           [Z]
    tau             temperature of the E-step                              [tau]
    R               EM iterations                                          [R]

E-step (Eq. 8/9):   z_ik = softmax_k( <x_i, mu_k> / tau )
                    (mu_k l2-normalised first, mu_k / (|mu_k| + 1e-4), when normalize_bases)
M-step (Eq. 10/11): mu_k = sum_i z_ik x_i / (sum_i z_ik + mass_eps)

`mass_eps` keeps the division finite for a basis without responsibility. The paper writes no
epsilon; the paper preset uses 1e-6, the released code 1e-4 (`m_step`: z / (sum z + 1e-4)).
With tau = 0.01 many bases hold little mass, so the choice changes the bases (issue #11).

One iteration is an E-step then an M-step; the result is mu after R iterations. Optional
`values` (B, T, Cv) get bases from the responsibilities of the last E-step, normalised the
same way, mu^v_k = sum_i z_ik v_i / (sum_i z_ik + mass_eps) (the released code's V-bases in
key space reuse its normalised Z).

As tau -> 0 the responsibilities become one-hot and EM is Lloyd's k-means with the E-step's
similarity as assignment rule (tested).

Memory: the M-step only needs sum_i z_ik x_i and sum_i z_ik, so tokens are processed in
chunks of `chunk_size` and the sums accumulated in fp32: peak memory O(B * chunk * K)
instead of O(B * T * K), with results equal to the one-chunk computation up to float
summation order. Arithmetic is fp32 whatever the input dtype.

Dead bases: a basis with (almost) no responsibility, sum_i z_ik < `DEAD_MASS`, becomes
0 / eps = a zero vector that still takes part in attention (as in the released code,
`dead_bases="keep"`). `dead_bases="reseed"` replaces it after the M-step by one of the
tokens worst represented by the current bases (lowest best similarity), with its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem.errors import ConfigError, check_choice, check_token_count

INITS = ("gaussian", "random_tokens", "kmeans++")
DEAD_POLICIES = ("keep", "reseed")
NORM_EPS = 1e-4   # released code: mu / (|mu| + 1e-4)
MASS_EPS = 1e-6   # M-step denominator, default (paper preset); the released code uses 1e-4
DEAD_MASS = 1e-3  # a basis with less total responsibility than this is dead
KMEANSPP_SAMPLE = 64  # k-means++ seeds from at most 64 * K tokens (a random subset)


@dataclass
class EMResult:
    bases: torch.Tensor                 # (B, K, C) fp32, mu after R iterations
    values: torch.Tensor | None         # (B, K, Cv) fp32 value bases, when values were given
    mass: torch.Tensor                  # (B, K) sum_i z_ik of the last E-step


def check_em_settings(num_bases: int, n_iters: int, tau: float, init: str, dead_bases: str,
                      chunk_size: int | None, mass_eps: float = MASS_EPS) -> None:
    """Raise ConfigError for settings EM cannot run with (before any model work)."""
    if not mass_eps > 0:
        raise ConfigError(f"mass_eps={mass_eps} must be > 0 (paper preset: 1e-6, released code: 1e-4)")
    if num_bases < 1:
        raise ConfigError(f"num_bases={num_bases} must be at least 1 (paper: 256)")
    if n_iters < 1:
        raise ConfigError(f"n_iters={n_iters} must be at least 1 (paper: 3, released code: 5)")
    if not tau > 0:
        raise ConfigError(f"tau={tau} must be > 0 (paper: 0.05, released code: 0.01)")
    check_choice("init", init, INITS)
    check_choice("dead_bases", dead_bases, DEAD_POLICIES)
    check_token_count("chunk_size", chunk_size)


def normalize(mu: torch.Tensor) -> torch.Tensor:
    return mu / (mu.norm(dim=-1, keepdim=True) + NORM_EPS)


def similarity(x: torch.Tensor, mu: torch.Tensor, normalize_bases: bool) -> torch.Tensor:
    """<x_i, mu_k> (B, T, K), with l2-normalised bases when asked."""
    return x @ (normalize(mu) if normalize_bases else mu).transpose(1, 2)


def responsibilities(x: torch.Tensor, mu: torch.Tensor, tau: float, normalize_bases: bool = True) -> torch.Tensor:
    """E-step (Eq. 8/9): z = softmax over bases of <x, mu> / tau, shape (B, T, K)."""
    return torch.softmax(similarity(x, mu, normalize_bases) / tau, dim=-1)


def _chunks(total: int, chunk_size: int | None):
    step = chunk_size or total
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Normal noise drawn on the generator's device (so CPU seeds give the same bases on GPU)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _randperm(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")


def init_bases(x: torch.Tensor, num_bases: int, init: str = "gaussian", generator: torch.Generator | None = None,
               chunk_size: int | None = None) -> torch.Tensor:
    """Initial bases (B, K, C) in fp32.

    - "gaussian" (released code): mu_kc ~ Normal(mean_c, std_c), the per-channel mean and
      unbiased std (divisor T - 1, as torch.std) of the group's tokens, accumulated over chunks
      in two passes; drawn as mean + std * randn.
    - "random_tokens": K distinct tokens of the group.
    - "kmeans++": D^2 seeding (Arthur & Vassilvitskii 2007) on at most 64 K random tokens.
    """
    b, t, c = x.shape
    if init == "gaussian":
        total = torch.zeros(b, c, device=x.device)
        for s, e in _chunks(t, chunk_size):
            total += x[:, s:e].float().sum(1)
        mean = total / t
        squares = torch.zeros(b, c, device=x.device)  # second pass: no cancellation when |mean| >> std
        for s, e in _chunks(t, chunk_size):
            squares += ((x[:, s:e].float() - mean[:, None]) ** 2).sum(1)
        std = (squares / max(t - 1, 1)).sqrt()  # unbiased, as torch.std; one token: std 0
        return mean[:, None] + std[:, None] * _randn((b, num_bases, c), generator, x.device)
    if init == "random_tokens":
        idx = torch.stack([_randperm(t, generator)[:num_bases] for _ in range(b)]).to(x.device)
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, c)).float()
    # kmeans++
    sample = min(t, KMEANSPP_SAMPLE * num_bases)
    idx = torch.stack([_randperm(t, generator)[:sample] for _ in range(b)]).to(x.device)
    pts = torch.gather(x, 1, idx[..., None].expand(-1, -1, c)).float()  # (B, P, C)
    first = torch.randint(sample, (b,), generator=generator, device=generator.device if generator else "cpu")
    centres = [pts[torch.arange(b), first.to(x.device)]]
    dist = ((pts - centres[0][:, None]) ** 2).sum(-1)
    for _ in range(1, num_bases):
        weights = dist / dist.sum(-1, keepdim=True).clamp_min(1e-30)
        weights = torch.where(dist.sum(-1, keepdim=True) > 0, weights, torch.ones_like(weights))
        pick = torch.multinomial(weights.to(generator.device if generator else "cpu"), 1, generator=generator)
        centre = pts[torch.arange(b), pick[:, 0].to(x.device)]
        centres.append(centre)
        dist = torch.minimum(dist, ((pts - centre[:, None]) ** 2).sum(-1))
    return torch.stack(centres, dim=1)


def em_bases(x: torch.Tensor, num_bases: int = 256, n_iters: int = 3, tau: float = 0.05,
             normalize_bases: bool = True, init: str = "gaussian", dead_bases: str = "keep",
             generator: torch.Generator | None = None, chunk_size: int | None = None,
             values: torch.Tensor | None = None, bases: torch.Tensor | None = None,
             mass_eps: float = MASS_EPS) -> EMResult:
    """Run R EM iterations on tokens `x` (B, T, C); see the module docstring.

    Args:
        num_bases: K. n_iters: R. tau: E-step temperature. normalize_bases: l2-normalise the
        bases in the E-step. init: how to choose the initial bases (ignored when `bases` is
        given). dead_bases: "keep" or "reseed". generator: for the initialisation.
        chunk_size: tokens per accumulation chunk (None = all at once).
        values: optional (B, T, Cv) tensor whose bases follow the last responsibilities.
        bases: optional initial bases (B, K, C).
        mass_eps: the M-step's denominator is sum_i z_ik + mass_eps (released code: 1e-4).
    """
    check_em_settings(num_bases, n_iters, tau, init, dead_bases, chunk_size, mass_eps)
    b, t, c = x.shape
    mu = init_bases(x, num_bases, init, generator, chunk_size) if bases is None else bases.float()
    k = mu.shape[1]
    value_bases = None
    for it in range(n_iters):
        last = it == n_iters - 1
        num = torch.zeros(b, k, c, device=x.device)
        mass = torch.zeros(b, k, device=x.device)
        num_v = torch.zeros(b, k, values.shape[-1], device=x.device) if (last and values is not None) else None
        worst_score = worst_x = worst_v = None
        for s, e in _chunks(t, chunk_size):
            xc = x[:, s:e].float()
            sim = similarity(xc, mu, normalize_bases)
            z = torch.softmax(sim / tau, dim=-1)
            num += z.transpose(1, 2) @ xc
            mass += z.sum(1)
            vc = values[:, s:e].float() if values is not None else None
            if num_v is not None:
                num_v += z.transpose(1, 2) @ vc
            if dead_bases == "reseed":
                worst_score, worst_x, worst_v = _keep_worst(sim.amax(-1), xc, vc, worst_score, worst_x, worst_v, k)
        mu = num / (mass[..., None] + mass_eps)
        if num_v is not None:
            value_bases = num_v / (mass[..., None] + mass_eps)
        if dead_bases == "reseed":
            mu, value_bases = _reseed(mu, value_bases, mass, worst_x, worst_v)
    return EMResult(mu, value_bases, mass)


def _keep_worst(score, xc, vc, best_score, best_x, best_v, k):
    """Keep the (at most) k tokens with the lowest best-similarity seen so far, per group."""
    if best_score is not None:
        score = torch.cat([best_score, score], 1)
        xc = torch.cat([best_x, xc], 1)
        vc = torch.cat([best_v, vc], 1) if vc is not None else None
    m = min(k, score.shape[1])
    keep = score.topk(m, dim=1, largest=False).indices
    take = lambda a: torch.gather(a, 1, keep[..., None].expand(-1, -1, a.shape[-1]))  # noqa: E731
    return torch.gather(score, 1, keep), take(xc), (take(vc) if vc is not None else None)


def _reseed(mu, value_bases, mass, worst_x, worst_v):
    """Replace dead bases (mass < DEAD_MASS) by the worst-represented tokens, in order."""
    dead = mass < DEAD_MASS
    if not dead.any():
        return mu, value_bases
    mu, value_bases = mu.clone(), value_bases.clone() if value_bases is not None else None
    for g in dead.any(1).nonzero()[:, 0].tolist():  # groups with dead bases (few)
        slots = dead[g].nonzero()[:, 0][: worst_x.shape[1]]
        mu[g, slots] = worst_x[g, : len(slots)]
        if value_bases is not None:
            value_bases[g, slots] = worst_v[g, : len(slots)]
    return mu, value_bases

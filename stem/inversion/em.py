"""Expectation-maximisation of K bases for a set of tokens (paper Sec. 4.2-4.3, Alg. 1).

Notation (paper symbols in brackets):
    x    (B, T, C)  tokens of B independent groups, T tokens each         [X]
    mu   (B, K, C)  bases                                                  [mu]
    z    (B, T, K)  responsibilities of the bases for each token           [Z]
    tau             temperature of the E-step                              [tau]
    R               EM iterations                                          [R]

E-step (Eq. 8/9):   z_ik = softmax_k( <x_i, mu_k> / tau )
                    (mu_k l2-normalised first, mu_k / (|mu_k| + 1e-4), when normalize_bases)
M-step (Eq. 10/11): mu_k = sum_i z_ik x_i / (sum_i z_ik + mass_eps)       (m_step="eps")
                    mu_k = sum_i w_ik x_i / sum_i w_ik,                     (m_step="literal")
                    w_ik = exp(log z_ik - max_i log z_ik)

m_step="eps": `mass_eps` keeps the division finite for a basis without responsibility. The paper
writes no epsilon; the paper preset uses 1e-6, the released code 1e-4 (its M-step: z / (sum z + 1e-4)).
With tau = 0.01 many bases hold little mass, so the choice changes the bases. A basis whose
responsibilities all underflow in fp32 (raw bases at tau 0.05: logits hundreds apart) gets 0 / eps = 0.

m_step="literal": Eq. 10 to the letter, a scale-free weighted mean. Dividing z_ik by its largest value
over the tokens does not change the mean, and done in the log domain (log z = the E-step's
log_softmax) the weights w_ik lie in (0, 1] with at least one 1 per basis: no epsilon, and a basis
whose every z_ik is far below fp32's range (exp(-87)) is still the weighted mean of its tokens.
Streamed: a running max m_k per basis; a chunk that raises it rescales the sums accumulated so far by
exp(m_old - m_new) (as a streamed logsumexp does). Distributed: the global max is all-reduced (MAX),
every process rescales its sums to it, then the sums are all-reduced as for "eps". The mass reported
(`EMResult.mass`, dead bases) is sum_i z_ik = exp(m_k) sum_i w_ik, which may underflow to 0.

E-step in fp32: softmax and log_softmax subtract each token's largest logit, so raw bases with logits
in the thousands neither overflow nor give NaN; the logits carry a rounding of a few ulps of the largest
|logit| (fp32: 6e-8 x |logit|), which moves every z_ik and w_ik relatively by about as much. A z_ik
below fp32's range (about exp(-87), or exp(-103) with denormals) is 0: harmless in absolute terms and for
"literal", which weighs by log z, but for "eps" a basis whose every z_ik is 0 has nothing left.

One iteration is an E-step then an M-step; the result is mu after R iterations. Optional
`values` (B, T, Cv) get bases from the responsibilities of the last E-step, normalised the
same way, mu^v_k = sum_i z_ik v_i / (sum_i z_ik + mass_eps) (the released code's V-bases in
key space reuse its normalised Z), or sum_i w_ik v_i / sum_i w_ik with m_step="literal".

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

Reconstruction error (`measure_error=True`, adaptive K with criterion=tokens): with z the responsibilities of the
last E-step and mu the returned bases (after reseeding), `error_sq` = sum_i ||x_i - z_i mu||^2 and
`energy` = sum_i ||x_i||^2 per group, streamed without holding z: the last iteration's chunk loop
also accumulates the Gram G = sum_i z_i^T z_i (K x K) and sum_i ||x_i||^2, and
sum_i ||x_i - z_i mu||^2 = sum_i ||x_i||^2 - 2 <mu, sum_i z_i^T x_i>_F + trace(mu^T G mu) (clamped at 0;
fp32: exact to about 1e-6 of the energy). Unmeasured (the default), none of this is computed.

Distributed EM (`EMShard`, frame-sharded jobs): when each process holds part of the EM problem, EM gives
every process the bases one process holding everything would get (up to float summation order):
- global bases, tokens split over processes (`token_start`, `total_tokens`, `comm`): the M-step
  sums sum_i z_ik x_i, sum_i z_ik (and sum_i z_ik v_i) are all-reduced once per iteration, right
  after the chunk loop (m_step="literal": after an all-reduce MAX of the per-basis running max and a
  rescaling of each process's sums to it); the gaussian init's per-channel sums all-reduced in both passes;
  random_tokens / kmeans++ draw token indices from the GLOBAL token set with the same generator
  on every process (identical draws), and the drawn tokens are assembled by an all-reduce of
  zero-filled buffers (each token is held by one process, so the sum is exact); dead-base
  reseeding, in an iteration that has dead bases (the all-reduced masses say so on every
  process alike), merges every process's worst tokens (an all-gather of as many tokens as the
  most dead bases of a group, with their values) and picks the globally worst.
  With measure_error the Gram and energy sums join the last iteration's all-reduce.
- group-scoped bases, whole groups per process (`rows`, `total_rows`): no communication; the
  random initial draws are made for all `total_rows` groups and this process keeps its rows, so
  every group gets the draws it gets in one process and the generators stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from stem.core.errors import check_choice, check_number, check_token_count

INITS = ("gaussian", "random_tokens", "kmeans++")
DEAD_POLICIES = ("keep", "reseed")
M_STEPS = ("eps", "literal")  # sum Z X / (sum Z + mass_eps) | Eq. 10's weighted mean in the log domain
NORM_EPS = 1e-4   # released code: mu / (|mu| + 1e-4)
MASS_EPS = 1e-6   # M-step denominator, default (paper preset); the released code uses 1e-4
DEAD_MASS = 1e-3  # a basis with less total responsibility than this is dead
KMEANSPP_SAMPLE = 64  # k-means++ seeds from at most 64 * K tokens (a random subset)


@dataclass
class EMResult:
    bases: torch.Tensor                 # (B, K, C) fp32, mu after R iterations
    values: torch.Tensor | None         # (B, K, Cv) fp32 value bases, when values were given
    mass: torch.Tensor                  # (B, K) sum_i z_ik of the last E-step
    error_sq: torch.Tensor | None = None  # (B,) sum_i ||x_i - z_i mu||^2 (measure_error; module docstring)
    energy: torch.Tensor | None = None    # (B,) sum_i ||x_i||^2 (measure_error)


class Comm(Protocol):
    """The collectives distributed EM needs (`stem.distributed.sharding.Distributed` has them)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class EMShard:
    """Where this process's tokens x (B, T, C) sit in the EM problem of all processes.

    rows, total_rows: x's groups are groups `rows` (B,) of `total_rows` (group-scoped bases; None: all).
    token_start, total_tokens: x holds tokens token_start .. token_start + T - 1 of each group's
        `total_tokens` (global bases split over processes; None: all T).
    comm: the collectives that sum over processes (needed when tokens are split).
    """

    rows: torch.Tensor | None = None
    total_rows: int | None = None
    token_start: int = 0
    total_tokens: int | None = None
    comm: Comm | None = None

    def tokens(self, t: int) -> int:
        """Tokens per group over all processes."""
        return self.total_tokens if self.total_tokens is not None else t

    def reduce(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The tensors summed over processes, with one all-reduce (None entries stay None)."""
        if self.comm is None:
            return list(tensors)
        present = [t for t in tensors if t is not None]
        flat = self.comm.all_reduce_sum(torch.cat([t.reshape(-1) for t in present]))
        out, pos = [], 0
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            out.append(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()
        return out

    def maximum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of `tensor` over processes (itself with one process)."""
        return tensor if self.comm is None else self.comm.all_reduce_max(tensor.clone())


def check_em_settings(num_bases: int, n_iters: int, tau: float, init: str, dead_bases: str,
                      chunk_size: int | None, mass_eps: float = MASS_EPS, m_step: str = "eps") -> None:
    """Raise ConfigError for settings EM cannot run with (before any model work)."""
    check_choice("m_step", m_step, M_STEPS)
    check_number("mass_eps", mass_eps, low=0, low_open=True, fix="the M-step's sum Z + mass_eps (paper preset 1e-6, "
                 "released code 1e-4)")
    check_number("num_bases", num_bases, low=1, integer=True, fix="K bases (paper: 256)")
    check_number("n_iters", n_iters, low=1, integer=True, fix="R EM iterations (paper: 3, released code: 5)")
    check_number("tau", tau, low=0, low_open=True, fix="the E-step temperature (paper: 0.05, released code: 0.01)")
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
               chunk_size: int | None = None, shard: EMShard | None = None) -> torch.Tensor:
    """Initial bases (B, K, C) in fp32.

    - "gaussian" (released code): mu_kc ~ Normal(mean_c, std_c), the per-channel mean and
      unbiased std (divisor T - 1, as torch.std) of the group's tokens, accumulated over chunks
      in two passes; drawn as mean + std * randn.
    - "random_tokens": K distinct tokens of the group.
    - "kmeans++": D^2 seeding (Arthur & Vassilvitskii 2007) on at most 64 K random tokens.

    With a `shard` (module docstring): statistics over all processes' tokens, draws made for all
    groups and tokens, so that this process's bases are its rows of the one-process bases.
    """
    b, t, c = x.shape
    rows_total = b if shard is None or shard.total_rows is None else shard.total_rows
    t_all = t if shard is None else shard.tokens(t)
    keep = (lambda a: a) if shard is None or shard.rows is None else (lambda a: a[shard.rows.to(a.device)])  # noqa: E731
    reduce = shard.reduce if shard is not None else (lambda *a: a)  # noqa: E731
    if init == "gaussian":
        total = torch.zeros(b, c, device=x.device)
        for s, e in _chunks(t, chunk_size):
            total += x[:, s:e].float().sum(1)
        total, = reduce(total)
        mean = total / t_all
        squares = torch.zeros(b, c, device=x.device)  # second pass: no cancellation when |mean| >> std
        for s, e in _chunks(t, chunk_size):
            squares += ((x[:, s:e].float() - mean[:, None]) ** 2).sum(1)
        squares, = reduce(squares)
        std = (squares / max(t_all - 1, 1)).sqrt()  # unbiased, as torch.std; one token: std 0
        return mean[:, None] + std[:, None] * keep(_randn((rows_total, num_bases, c), generator, x.device))
    if init == "random_tokens":
        idx = torch.stack([_randperm(t_all, generator)[:num_bases] for _ in range(rows_total)]).to(x.device)
        return _take_tokens(x, keep(idx), shard)
    # kmeans++
    sample = min(t_all, KMEANSPP_SAMPLE * num_bases)
    idx = torch.stack([_randperm(t_all, generator)[:sample] for _ in range(rows_total)]).to(x.device)
    pts = _all_rows(_take_tokens(x, keep(idx), shard), shard)  # (B, P, C), zeros in other processes' groups
    rows = torch.arange(rows_total, device=x.device)
    first = torch.randint(sample, (rows_total,), generator=generator, device=generator.device if generator else "cpu")
    centres = [pts[rows, first.to(x.device)]]
    dist = ((pts - centres[0][:, None]) ** 2).sum(-1)
    for _ in range(1, num_bases):
        weights = dist / dist.sum(-1, keepdim=True).clamp_min(1e-30)
        weights = torch.where(dist.sum(-1, keepdim=True) > 0, weights, torch.ones_like(weights))
        pick = torch.multinomial(weights.to(generator.device if generator else "cpu"), 1, generator=generator)
        centre = pts[rows, pick[:, 0].to(x.device)]
        centres.append(centre)
        dist = torch.minimum(dist, ((pts - centre[:, None]) ** 2).sum(-1))
    return keep(torch.stack(centres, dim=1))


def _take_tokens(x: torch.Tensor, idx: torch.Tensor, shard: EMShard | None) -> torch.Tensor:
    """Tokens idx (B, P) of each group in fp32; when tokens are split over processes, idx counts all
    processes' tokens and the tokens held elsewhere arrive by an exact all-reduce of zero-filled buffers."""
    c = x.shape[-1]
    if shard is None or shard.comm is None:
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, c)).float()
    local = idx - shard.token_start
    here = (local >= 0) & (local < x.shape[1])
    got = torch.gather(x, 1, local.clamp(0, x.shape[1] - 1)[..., None].expand(-1, -1, c)).float()
    return shard.reduce(torch.where(here[..., None], got, torch.zeros_like(got)))[0]


def _all_rows(a: torch.Tensor, shard: EMShard | None) -> torch.Tensor:
    """This process's groups placed at their rows among all groups (zeros elsewhere)."""
    if shard is None or shard.rows is None:
        return a
    out = a.new_zeros(shard.total_rows, *a.shape[1:])
    out[shard.rows.to(a.device)] = a
    return out


def em_bases(x: torch.Tensor, num_bases: int = 256, n_iters: int = 3, tau: float = 0.05,
             normalize_bases: bool = True, init: str = "gaussian", dead_bases: str = "keep",
             generator: torch.Generator | None = None, chunk_size: int | None = None,
             values: torch.Tensor | None = None, bases: torch.Tensor | None = None,
             mass_eps: float = MASS_EPS, shard: EMShard | None = None, measure_error: bool = False,
             m_step: str = "eps") -> EMResult:
    """Run R EM iterations on tokens `x` (B, T, C); see the module docstring.

    Args:
        num_bases: K. n_iters: R. tau: E-step temperature. normalize_bases: l2-normalise the
        bases in the E-step. init: how to choose the initial bases (ignored when `bases` is
        given). dead_bases: "keep" or "reseed". generator: for the initialisation.
        chunk_size: tokens per accumulation chunk (None = all at once).
        values: optional (B, T, Cv) tensor whose bases follow the last responsibilities.
        bases: optional initial bases (B, K, C).
        mass_eps: the M-step's denominator is sum_i z_ik + mass_eps (released code: 1e-4); m_step="eps" only.
        m_step: "eps" (sum Z X / (sum Z + mass_eps)) or "literal" (Eq. 10's weighted mean, log domain; module
            docstring).
        shard: this process's part of a distributed EM (module docstring); None: x is everything.
        measure_error: also return the reconstruction error of the tokens by their responsibilities,
            `error_sq` and `energy` (module docstring); off, nothing extra is computed.
    """
    check_em_settings(num_bases, n_iters, tau, init, dead_bases, chunk_size, mass_eps, m_step)
    literal = m_step == "literal"
    b, t, c = x.shape
    mu = init_bases(x, num_bases, init, generator, chunk_size, shard) if bases is None else bases.float()
    k = mu.shape[1]
    value_bases = None
    for it in range(n_iters):
        last = it == n_iters - 1
        num = torch.zeros(b, k, c, device=x.device)
        mass = torch.zeros(b, k, device=x.device)
        num_v = torch.zeros(b, k, values.shape[-1], device=x.device) if (last and values is not None) else None
        gram = torch.zeros(b, k, k, device=x.device) if (last and measure_error) else None
        energy = torch.zeros(b, device=x.device) if (last and measure_error) else None
        peak = torch.full((b, k), -torch.inf, device=x.device) if literal else None  # running max_i log z_ik
        worst_score = worst_x = worst_v = None
        for s, e in _chunks(t, chunk_size):
            xc = x[:, s:e].float()
            sim = similarity(xc, mu, normalize_bases)
            vc = values[:, s:e].float() if values is not None else None
            if literal:  # weights w = exp(log z - running max) in (0, 1]; earlier sums rescaled to a new max
                log_z = torch.log_softmax(sim / tau, dim=-1)
                new_peak = torch.maximum(peak, log_z.amax(1))
                num, mass, num_v = _rescale(peak, new_peak, num, mass, num_v)
                peak = new_peak
                w = torch.exp(log_z - peak[:, None])
                z = torch.exp(log_z) if gram is not None else None
            else:
                w = z = torch.softmax(sim / tau, dim=-1)
            num += w.transpose(1, 2) @ xc
            mass += w.sum(1)
            if num_v is not None:
                num_v += w.transpose(1, 2) @ vc
            if gram is not None:
                gram += z.transpose(1, 2) @ z
                energy += xc.square().sum((1, 2))
            if dead_bases == "reseed":
                worst_score, worst_x, worst_v = _keep_worst(sim.amax(-1), xc, vc, worst_score, worst_x, worst_v, k)
        if literal and shard is not None:  # every process's weights relative to the same (global) max
            global_peak = shard.maximum(peak)
            num, mass, num_v = _rescale(peak, global_peak, num, mass, num_v)
            peak = global_peak
        if shard is not None:  # the sums over all processes' tokens (Eq. 10/11 sum over the whole video)
            num, mass, num_v, gram, energy = shard.reduce(num, mass, num_v, gram, energy)
        if literal:  # sum_i w_ik >= 1 (the token at the max has weight 1): Eq. 10 without an epsilon
            mu = num / mass[..., None]
            if num_v is not None:
                value_bases = num_v / mass[..., None]
            scale = torch.exp(peak)  # sum_i z_ik = exp(max) sum_i w_ik (may underflow: the true fp32 mass)
            num, mass = num * scale[..., None], mass * scale
        else:
            mu = num / (mass[..., None] + mass_eps)
            if num_v is not None:
                value_bases = num_v / (mass[..., None] + mass_eps)
        if shard is not None:
            needed = int((mass < DEAD_MASS).sum(1).max()) if dead_bases == "reseed" and b else 0
            if needed:  # the same on every process (mass is all-reduced): only then are worst tokens exchanged
                worst_x, worst_v = _global_worst(shard, worst_score, worst_x, worst_v, needed, shard.tokens(t))
        if dead_bases == "reseed":
            mu, value_bases = _reseed(mu, value_bases, mass, worst_x, worst_v)
    if not measure_error:
        return EMResult(mu, value_bases, mass)
    # sum_i ||x_i - z_i mu||^2 = sum_i ||x_i||^2 - 2 <mu, Z^T X>_F + trace(mu^T Z^T Z mu), Z of the last E-step
    error_sq = energy - 2 * (mu * num).sum((1, 2)) + ((gram @ mu) * mu).sum((1, 2))
    return EMResult(mu, value_bases, mass, error_sq.clamp_min(0), energy)


def _rescale(old: torch.Tensor, new: torch.Tensor, *sums: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Sums of weights exp(log z - old) (and sums weighted by them) re-expressed relative to new >= old (B, K):
    multiplied by exp(old - new); zero where old is -inf (nothing accumulated yet)."""
    factor = torch.where(old > -torch.inf, torch.exp(old - new), torch.zeros_like(new))
    return [None if a is None else a * (factor[..., None] if a.dim() == 3 else factor) for a in sums]


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


def _global_worst(shard: EMShard, score, wx, wv, needed: int, total_tokens: int):
    """The `needed` worst-fit tokens over all processes, in order (as many as the most dead bases of a group):
    each process offers its own `needed` worst (sorted, padded with +inf scores), one all-gather merges them."""
    if shard.comm is None:
        return wx, wv
    parts = [score[..., None], wx] + ([wv] if wv is not None else [])
    packed = torch.cat(parts, -1)[:, :needed]
    missing = needed - packed.shape[1]
    if missing:
        pad = packed.new_zeros(packed.shape[0], missing, packed.shape[2])
        pad[..., 0] = float("inf")
        packed = torch.cat([packed, pad], 1)
    packed = torch.cat(shard.comm.all_gather(packed), 1)
    c = wx.shape[-1]
    _, wx, wv = _keep_worst(packed[..., 0], packed[..., 1:1 + c], packed[..., 1 + c:] if wv is not None else None,
                            None, None, None, needed)
    m = min(needed, total_tokens)
    return wx[:, :m], (wv[:, :m] if wv is not None else None)


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

"""Adaptive number of bases (`num_bases="auto"`, issue 15): the streamed error, the choice of K, the report,
the settings, and frame-sharded runs against one process."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli
from diffusers.models.attention_processor import Attention
from test_distributed import N_FRAMES, attn1_inputs, close, em_data, replay, run_ranks, video

from stem.core.errors import ConfigError
from stem.distributed.sharding import Distributed, frame_slices
from stem.inversion.adaptive import candidates, resolve_auto
from stem.inversion.em import DEAD_MASS, NORM_EPS, EMShard, em_bases
from stem.inversion.methods import STEMInversion, self_attention_tokens
from stem.inversion.sharded import invert_sharded, shard_processor, shard_video
from stem.inversion.stem_attention import STEMAttnProcessor

STEPS = 2


# ---------------------------------------------------------------- the streamed error of one EM
def explicit_error(x, mu_before, mu, tau, normalize_bases):
    """sum_i ||x_i - z_i mu||^2 and sum_i ||x_i||^2 per row, token by token in float64: z_i the E-step on the
    bases `mu_before` (those the last E-step saw), mu the returned bases."""
    x, mu_before, mu = x.double(), mu_before.double(), mu.double()
    errors, energies = [], []
    for b in range(x.shape[0]):
        keys = mu_before[b] / (mu_before[b].norm(dim=-1, keepdim=True) + NORM_EPS) if normalize_bases else mu_before[b]
        err = energy = 0.0
        for i in range(x.shape[1]):
            z = torch.softmax(keys @ x[b, i] / tau, dim=0)
            err += float(((x[b, i] - z @ mu[b]) ** 2).sum())
            energy += float((x[b, i] ** 2).sum())
        errors.append(err)
        energies.append(energy)
    return torch.tensor(errors, dtype=torch.float64), torch.tensor(energies, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(2, 35, 6), (6, 35, 4)])   # features (groups, T, C); keys (groups x heads, T, d)
@pytest.mark.parametrize("chunk_size", [None, 8])             # one chunk; chunks of 8 (not dividing 35)
@pytest.mark.parametrize("normalize_bases", [True, False])
def test_streamed_error_equals_the_explicit_reconstruction_error(shape, chunk_size, normalize_bases):
    """error_sq = sum_i ||x_i - z_i mu||^2 with z of the last E-step and mu the returned (reseeded) bases, and
    energy = sum_i ||x_i||^2, against a token-by-token loop; the bases, values and masses are bitwise those of an
    unmeasured EM (fixed K untouched). Dead bases are reseeded (asserted), with raw bases in the last iteration.

    Mutations seen failing: the Gram not reset between iterations (summed over all E-steps); the cross term
    without its factor 2; the energy of the last chunk only (chunked cases)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    x[:, ::3] += 4.0  # a far cluster: with K=12 and tau=0.01 gaussian-initialised bases die
    values = torch.randn(shape[0], shape[1], 5, generator=g) if shape[0] == 6 else None
    run = lambda iters, measure, dead="reseed": em_bases(  # noqa: E731
        x, 12, iters, 0.01, normalize_bases, "gaussian", dead, torch.Generator().manual_seed(3), chunk_size, values,
        measure_error=measure)
    res, plain, before = run(3, True), run(3, False), run(2, False)
    assert not torch.equal(res.bases, run(3, False, "keep").bases), "reseeding is not exercised"
    if not normalize_bases:  # raw bases: dead in the last E-step too, so the returned mu is reseeded after it
        assert (res.mass < DEAD_MASS).any()
    for a, b in ((res.bases, plain.bases), (res.values, plain.values), (res.mass, plain.mass)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert plain.error_sq is None and plain.energy is None
    want_err, want_energy = explicit_error(x, before.bases, res.bases, 0.01, normalize_bases)
    torch.testing.assert_close(res.energy.double(), want_energy, rtol=1e-6, atol=0)
    # fp32 sums of terms of the size of the energy: compare at 1e-6 of the energy
    assert ((res.error_sq.double() - want_err).abs() <= 1e-6 * want_energy).all(), (res.error_sq, want_err)
    assert (want_err > 1e-3 * want_energy).all()  # a real error, not a rounding floor


def em_error(d: Distributed | None = None):
    """EM error sums of test_distributed's EM data (raw bases: dead bases reseeded in the last iteration), on
    this rank's token slice (global bases, sums all-reduced), or on all tokens without a shard."""
    x, v = em_data()
    a, b = frame_slices(N_FRAMES, d.world_size)[d.rank] if d is not None else (0, N_FRAMES)
    shard = EMShard(token_start=a * 5, total_tokens=N_FRAMES * 5, comm=d) if d is not None else None
    res = em_bases(x[:, a * 5:b * 5], 12, 3, 0.01, False, "gaussian", "reseed", torch.Generator().manual_seed(5), 4,
                   v[:, a * 5:b * 5], shard=shard, measure_error=True)
    return res.error_sq, res.energy, res.mass


# ---------------------------------------------------------------- clusters: K = M
def cluster_tokens(m: int = 8, dims: int = 16, per: int = 32, radius: float = 10.0, spread: float = 0.1):
    """m clusters of `per` tokens around radius * e_j (orthogonal centres), gaussian spread per channel."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(m * per) % m
    centres = radius * torch.eye(dims)[:m]
    return centres[labels] + spread * torch.randn(m * per, dims, generator=g), labels


def test_auto_picks_the_number_of_well_separated_clusters():
    """M=8 tight clusters (4 "frames" of 64 tokens, 16 channels, centres 10 e_j, spread 0.1): with a target between
    the error of the cluster means (K = M, from the geometry) and a lower bound of the error of any K < M (z_i mu
    is an affine combination of K bases, so at best the PCA residual of the top K-1 directions: here the smallest
    centre direction), auto with criterion=tokens picks K = 8 with doubling from 1 and with k_step 1. kmeans++
    initialisation with reseeding (EM from gaussian bases merges clusters within 3 iterations).

    Mutations seen failing: candidates starting at 2 k_min; no stop at the first K within the target (k_max
    picked); the squared error compared with the target."""
    x, labels = cluster_tokens()
    means = torch.stack([x[labels == j].mean(0) for j in range(8)])
    energy = (x.double() ** 2).sum()
    at_m = ((x - means[labels]).double() ** 2).sum()                               # K = M, hard assignment
    centred = x.double() - x.double().mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred)                                   # increasing
    below_m = eig[: x.shape[1] - (8 - 2)].sum()                                       # K = M - 1: dims past the top 6
    target = float(((at_m / energy).sqrt() + (below_m / energy).sqrt()) / 2)
    assert (at_m / energy).sqrt() < 0.05 and (below_m / energy).sqrt() > 0.3   # far apart: the test is not at an edge
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=False).eval()
    for k_step, tried in ((None, [1, 2, 4, 8]), (1, list(range(1, 9)))):
        proc = STEMAttnProcessor(4, "auto", init="kmeans++", dead_bases="reseed",
                                 auto=dict(target=target, k_min=1, k_max=32, k_step=k_step, criterion="tokens"))
        with torch.no_grad():
            proc.for_layer("layer")(attn, x.view(4, 64, 16))
        rec = proc.bases_record()["layers"]["layer"]
        assert rec["k"] == [8] and rec["error"][0] <= target
        assert [t["k"] for t in rec["tried"]] == tried
        assert all(t["error"] > float((below_m / energy).sqrt()) for t in rec["tried"][:-1])


def test_candidates_double_or_step_and_stop_at_the_tokens():
    """Mutations seen failing: k_max left out when the doubling overshoots it; no cap at the layer's tokens."""
    assert candidates(resolve_auto({"k_min": 32, "k_max": 512}), 10**6) == [32, 64, 128, 256, 512]
    assert candidates(resolve_auto({"k_min": 24, "k_max": 100}), 10**6) == [24, 48, 96, 100]
    assert candidates(resolve_auto({"k_min": 10, "k_max": 35, "k_step": 10}), 10**6) == [10, 20, 30, 35]
    assert candidates(resolve_auto({"k_min": 32, "k_max": 512}), 100) == [32, 64, 100]
    assert candidates(resolve_auto({"k_min": 32, "k_max": 512}), 16) == [16]
    assert candidates(resolve_auto({"k_min": 7, "k_max": 7}), 100) == [7]


# ---------------------------------------------------------------- the attention criterion (the default)
def naive_attention_errors(attn, x, n, ks, seeds, picked, space="features", group=None, em_kwargs=None):
    """{K: ||O_stem - O_exact||_F / ||O_exact||_F} over the sampled positions `picked` (flat frame * S + token of
    the whole video, the same for every prompt branch), written out query by query in float64: exact attention
    of a query over every token of its EM group, softmax(q k_j / sqrt(d)) over the group's tokens j, and STEM
    attention over the bases of EM runs with the processor's seeds (one per EM call, every candidate from it)."""
    em_kwargs = em_kwargs or {}
    b, s, c = x.shape
    g, h = b // n, attn.heads
    d = attn.to_q.weight.shape[0] // h
    size = group or n
    spans = [(f, min(f + size, n)) for f in range(0, n, size)]
    calls = [(0, n // size * size, size)] if n // size else []        # the processor's EM calls: full groups,
    if n % size:                                                      # then a shorter last group
        calls.append((n // size * size, n, n % size))

    def heads(w, y):   # (T, C) -> (h, T, d) in float64
        return (y.double() @ w.weight.double().T).view(-1, h, d).transpose(0, 1)

    with torch.no_grad():
        bases = {}
        for k in ks:
            for (f0, f1, sz), seed in zip(calls, seeds, strict=True):
                gen = torch.Generator().manual_seed(seed)
                groups = [x.view(g, n, s, c)[br, a:a + sz].reshape(sz * s, c) for br in range(g)
                          for a in range(f0, f1, sz)]
                if space == "features":
                    res = em_bases(torch.stack(groups), k, generator=gen, chunk_size=16384, **em_kwargs)
                    kb = [heads(attn.to_k, mu) for mu in res.bases]
                    vb = [heads(attn.to_v, mu) for mu in res.bases]
                else:
                    keys = torch.stack([heads(attn.to_k, t) for t in groups]).flatten(0, 1).float()
                    vals = torch.stack([heads(attn.to_v, t) for t in groups]).flatten(0, 1).float()
                    res = em_bases(keys, k, generator=gen, chunk_size=16384, values=vals, **em_kwargs)
                    kb = list(res.bases.double().view(len(groups), h, k, d))
                    vb = list(res.values.double().view(len(groups), h, k, d))
                for i, (br, a) in enumerate((br, a) for br in range(g) for a in range(f0, f1, sz)):
                    bases[(k, br, a)] = (kb[i], vb[i])
        err = {k: 0.0 for k in ks}
        energy = 0.0
        for pos in picked.tolist():
            frame, tok = divmod(pos, s)
            a, e = next(span for span in spans if span[0] <= frame < span[1])
            for br in range(g):
                xq = x.view(g, n, s, c)[br, frame, tok][None]
                ctx = x.view(g, n, s, c)[br, a:e].reshape(-1, c)
                q, kk, vv = heads(attn.to_q, xq)[:, 0], heads(attn.to_k, ctx), heads(attn.to_v, ctx)
                for head in range(h):
                    w = torch.softmax(kk[head] @ q[head] / math.sqrt(d), 0)
                    exact = w @ vv[head]
                    energy += float((exact ** 2).sum())
                    for k in ks:
                        kb, vb = bases[(k, br, a)]
                        ws = torch.softmax(kb[head] @ q[head] / math.sqrt(d), 0)
                        err[k] += float(((ws @ vb[head] - exact) ** 2).sum())
    return {k: math.sqrt(v / energy) for k, v in err.items()}


def seeds_and_queries(proc, calls: int, total: int, queries: int):
    """The draws the processor makes from its generator at a choice: one seed per EM call, then the sampled
    query positions (randperm of the video's tokens)."""
    gen = torch.Generator()
    gen.set_state(proc.generator.get_state())
    seeds = [int(torch.randint(2**62, (1,), generator=gen)) for _ in range(calls)]
    return seeds, torch.randperm(total, generator=gen)[:queries]


@pytest.mark.parametrize("space,group,calls", [("features", None, 1), ("keys", 2, 2), ("features", 2, 2)])
def test_attention_estimate_equals_the_exact_attention_error_written_out(space, group, calls):
    """5 frames of 12 tokens, 2 prompt branches, 9 sampled queries, key chunks of 7 tokens (not dividing a
    group): every candidate's recorded error equals ||O_stem - O_exact||_F / ||O_exact||_F over the sampled
    queries, heads and branches, written out query by query in float64 (exact attention over all tokens of the
    query's EM group: the whole video, or its group of 2 frames with a shorter last one). fp32 against float64:
    1e-5 relative.

    Mutations seen failing: the softmax pieces merged over key chunks without rescaling to the common max;
    queries of the last group compared with the keys of the first; logits scaled by 1/d instead of 1/sqrt(d)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=False).eval()
    n, s = 5, 12
    x = 2 * torch.randn(2 * n, s, 16, generator=torch.Generator().manual_seed(1))
    proc = STEMAttnProcessor(n, "auto", space=space, group=group, chunk_size=7, seed=4,
                             auto=dict(target=1e-6, k_min=2, k_max=16, queries=9))
    seeds, picked = seeds_and_queries(proc, calls, n * s, 9)
    with torch.no_grad():
        proc.for_layer("layer")(attn, x)
    tried = proc.bases_record()["layers"]["layer"]["tried"]
    ks = [t["k"] for t in tried]
    assert ks == [2, 4, 8, 16 if group is None else 12]  # capped at the smallest group: 1 frame of 12 tokens
    want = naive_attention_errors(attn, x, n, ks, seeds, picked, space, group,
                                  dict(n_iters=3, tau=0.05, dead_bases="keep"))
    for t in tried:
        assert t["error"] == pytest.approx(want[t["k"]], rel=1e-5), (t, want)
    assert min(want.values()) > 1e-2  # real errors, not a rounding floor


def clustered_layer(offset: float = 0.0):
    """4 frames of 64 tokens in 4 tight clusters (centres e_1..e_4 in channels 1-4, spread 0.01) of 16 channels,
    plus `offset` in channel 0, which attention does not read (W_Q, W_K, W_V zero there); W_K scaled by 8 so
    that exact attention is peaked on a query's cluster(s)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 4
    x = torch.eye(16)[1 + labels] + 0.01 * torch.randn(256, 16, generator=g)
    x[:, 0] += offset
    torch.manual_seed(3)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=False).eval()
    with torch.no_grad():
        for w in (attn.to_q, attn.to_k, attn.to_v):
            w.weight[:, 0] = 0
        attn.to_k.weight *= 8
    return attn, x.view(4, 64, 16)


def test_the_estimate_is_monotone_where_the_true_attention_error_is():
    """4 clusters, K = 1, 2, 3, 4 (k-means++ initialisation, reseeded dead bases): the exact attention error
    (written out over all 256 queries) rises strictly from K = 1 to 3 (merged clusters enter the softmax with
    unequal weights, whereas one basis gives about the mean that the peaked exact attention averages to) and falls
    to about 0 at K = 4; the estimate on 16 sampled queries rises and falls with it, and a target below every
    error of K < 4 picks 4.

    Mutation seen failing: the estimate measured on the bases of the first candidate for every K (flat)."""
    attn, x = clustered_layer()
    em = dict(init="kmeans++", dead_bases="reseed")
    auto = dict(k_min=1, k_max=4, k_step=1, queries=16)
    proc = STEMAttnProcessor(4, "auto", **em, auto=dict(target=1e-6, **auto))
    seeds, _ = seeds_and_queries(proc, 1, 256, 16)
    with torch.no_grad():
        proc.for_layer("layer")(attn, x)
    est = [t["error"] for t in proc.bases_record()["layers"]["layer"]["tried"]]
    true = naive_attention_errors(attn, x, 4, [1, 2, 3, 4], seeds, torch.arange(256),
                                  em_kwargs=dict(n_iters=3, tau=0.05, **em))
    assert true[1] < true[2] < true[3] and est[0] < est[1] < est[2], (true, est)
    assert true[4] < 1e-3 and est[3] < 1e-3 and true[1] > 0.1
    proc = STEMAttnProcessor(4, "auto", **em, auto=dict(target=true[1] / 2, **auto))
    with torch.no_grad():
        proc.for_layer("layer")(attn, x)
    assert proc.bases_record()["layers"]["layer"]["k"] == [4]


def test_where_token_and_attention_errors_disagree_the_attention_criterion_picks_the_better_k():
    """Clusters plus a large offset in a channel attention ignores: the token error is small at every K (the
    offset holds the tokens' energy), so criterion=tokens stops at K = 1, whose attention error (written out)
    is large; criterion=attention goes on to the K of the clusters, with a far smaller attention error.

    Mutation seen failing: the criterion setting ignored (tokens used either way)."""
    attn, x = clustered_layer(offset=30.0)
    em = dict(init="kmeans++", dead_bases="reseed", normalize_bases=False)
    chosen = {}
    for criterion in ("tokens", "attention"):
        proc = STEMAttnProcessor(4, "auto", **em, auto=dict(target=0.1, k_min=1, k_max=4, criterion=criterion))
        seeds, _ = seeds_and_queries(proc, 1, 256, 64)
        with torch.no_grad():
            proc.for_layer("layer")(attn, x)
        chosen[criterion] = proc.bases_record()["layers"]["layer"]["k"][0]
    true = naive_attention_errors(attn, x, 4, [1, 2, 4], seeds, torch.arange(256),
                                  em_kwargs=dict(n_iters=3, tau=0.05, **em))
    assert chosen["tokens"] == 1 and chosen["attention"] == 4, chosen
    assert true[1] > 0.1 and true[4] < 1e-3, true   # K = 1 misses the 0.1 target that K = 4 meets


def test_default_auto_compresses_some_tiny_layer_below_its_tokens(tiny_model):
    """The default settings (criterion attention, target 0.2, K from 32, 64, ..., 512 capped at the tokens) on the
    tiny UNet, 4 frames of 8x8 latents (a 64x64 video: 256, 64, 16 and 4 tokens per layer): some layer with more
    than 32 tokens chooses fewer bases than its tokens, every choice reaches 0.2 or is its layer's last
    candidate, and the mean K is below the mean token count (105.25, what the token criterion chose here).

    Mutation seen failing: the default target at the token criterion's 0.3 with the token criterion (every layer
    at its tokens); the default criterion left at tokens."""
    assert resolve_auto(None)["target"] == 0.2 and resolve_auto(None)["criterion"] == "attention"
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    method = STEMInversion(num_bases="auto", num_steps=STEPS)
    method.invert(tiny_model, latents, cond, progress=False)
    layers = method.bases_report()["inversion"]["layers"]
    grids = self_attention_tokens(tiny_model.unet, 8, 8)
    tokens = {p: 4 * h * w for p, (h, w) in grids.items()}
    assert len(layers) == 16 and sum(tokens.values()) / 16 == 105.25
    assert any(rec["k"][0] < tokens[p] for p, rec in layers.items() if tokens[p] > 32), layers
    for p, rec in layers.items():
        last = min(512, tokens[p])
        assert rec["error"][0] <= 0.2 or rec["k"][0] == last, (p, rec)
    assert method.bases_report()["inversion"]["mean_k"] < 105.25


# ---------------------------------------------------------------- the tiny UNet
def _video(frames: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(frames, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)


@pytest.fixture(scope="module")
def unet_inputs(tiny_model):
    """(path, attn1 module, input) of every layer in each of the UNet calls of a 2-step fixed-K inversion."""
    unet, latents_cond, seen = tiny_model.unet, _video(), []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, p=path: seen.append((p, mod, args[0].clone())),
                                         with_kwargs=True)
             for path, m in unet.named_modules() if path.endswith(".attn1")]
    try:
        STEMInversion(num_bases=8, excess_bases="clamp", num_steps=STEPS).invert(tiny_model, *latents_cond,
                                                                                progress=False)
    finally:
        for h in hooks:
            h.remove()
    layers = len(seen) // STEPS
    return [seen[s * layers:(s + 1) * layers] for s in range(STEPS)]


def _replay_auto(steps, target: float, when: str, criterion: str) -> tuple[dict, torch.Tensor]:
    """One auto processor replaying the recorded inputs of every layer, call after call: its layer records and
    its generator's state at the end."""
    proc = STEMAttnProcessor(3, "auto", auto=dict(target=target, k_min=1, k_max=64, when=when, criterion=criterion))
    with torch.no_grad():
        for step in steps:
            for path, attn, hs in step:
                proc.for_layer(path)(attn, hs)
    return proc.bases_record()["layers"], proc.generator.get_state()


@pytest.mark.parametrize("criterion,loose,strict", [("tokens", 0.6, 0.45), ("attention", 0.3, 0.15)])
@pytest.mark.parametrize("when", ["first_step", "every_step"])
def test_a_looser_target_never_picks_more_bases(unet_inputs, when, criterion, loose, strict):
    """On the same inputs of every layer (recorded from the tiny UNet, replayed call after call), the looser
    target never picks a larger K than the stricter at any layer and call, and picks a smaller one somewhere
    (so the test can fail), with either criterion. With one seed per EM call both runs see the same error for
    every K both tried, and the processor's generator ends in the same state whatever the target.

    Mutations seen failing: candidates initialised from the processor's generator one after the other (a
    candidate's error then depends on those tried before, at this and later layers); no stop at the first K
    within the target."""
    (loose, loose_state), (strict, strict_state) = (_replay_auto(unet_inputs, target, when, criterion)
                                                    for target in (loose, strict))
    assert torch.equal(loose_state, strict_state)
    assert loose.keys() == strict.keys() and len(loose) == 16
    for path in loose:
        errors = {t["k"]: t["error"] for t in strict[path]["tried"]}
        assert all(t["error"] == errors[t["k"]] for t in loose[path]["tried"]), path  # loose tries a prefix
    smaller = False
    for path in loose:
        assert len(loose[path]["k"]) == (1 if when == "first_step" else STEPS)
        for a, b in zip(loose[path]["k"], strict[path]["k"], strict=True):
            assert a <= b, (path, loose[path], strict[path])
            smaller |= a < b
    assert smaller, "both targets pick the same K everywhere: pick targets that differ"


@pytest.mark.parametrize("criterion", ["attention", "tokens"])
def test_first_step_keeps_the_first_choice_and_every_step_chooses_again(tiny_model, monkeypatch, criterion):
    """Spying on the EM: with when=first_step a layer runs its candidates at its first call (the EM's token error
    measured only with criterion=tokens), then only the chosen K without error; every_step runs the candidates at
    every call (one K per step). The reconstruction chooses on its own first call and is recorded separately.

    Mutations seen failing: first_step choosing again at every call; the reconstruction reusing the inversion's
    records (no own choice)."""
    seen = []
    em = STEMAttnProcessor.em

    def spy(self, x, values=None, shard=None, k=None, generator=None, measure_error=False):
        seen.append((self.phase, self.layer, k, measure_error))
        return em(self, x, values, shard, k, generator, measure_error)
    monkeypatch.setattr(STEMAttnProcessor, "em", spy)
    latents, cond = _video()
    for when in ("first_step", "every_step"):
        seen.clear()
        auto = dict(target=0.5 if criterion == "tokens" else 0.2, k_min=2, k_max=32, when=when, criterion=criterion)
        method = STEMInversion(num_bases="auto", auto=auto, num_steps=STEPS)
        assert method.bases_report() is None
        traj = method.invert(tiny_model, latents, cond, progress=False)
        method.reconstruct(tiny_model, traj.latents[-1], cond, progress=False)
        report = method.bases_report()
        assert report["auto"] == resolve_auto(auto)
        for phase in ("inversion", "reconstruction"):
            layers = report[phase]["layers"]
            assert len(layers) == 16
            for path, rec in layers.items():
                calls = [(k, measured) for p, layer, k, measured in seen if p == phase and layer == path]
                tried = [(t["k"], criterion == "tokens") for t in rec["tried"]]
                assert calls[:len(tried)] == tried and rec["k"][0] == tried[-1][0]
                if when == "first_step":
                    assert calls[len(tried):] == [(rec["k"][0], False)] * (STEPS - 1) and len(rec["k"]) == 1
                else:
                    assert len(rec["k"]) == STEPS == len(rec["error"])
                    assert all(m == (criterion == "tokens") for _, m in calls)
            ks = [k for rec in layers.values() for k in rec["k"]]
            assert report[phase]["mean_k"] == pytest.approx(sum(ks) / len(ks))


def test_same_seed_gives_the_same_choices_and_latents(tiny_model):
    """Mutation seen failing: the candidates' generator seeded from the global torch RNG."""
    latents, cond = _video()

    def run():
        method = STEMInversion(num_bases="auto", auto=dict(target=0.5, k_min=2, k_max=32), num_steps=STEPS, seed=3)
        torch.manual_seed(torch.seed())  # a different global RNG state each time
        return method.invert(tiny_model, latents, cond, progress=False).latents, method.bases_report()
    (a, report_a), (b, report_b) = run(), run()
    assert torch.equal(a, b) and report_a == report_b


@pytest.mark.parametrize("excess_bases", ["clamp", "allow"])
def test_fixed_k_report_lists_the_k_used_per_layer(tiny_model, excess_bases):
    """Fixed K: one entry per layer, K itself, or the tokens of the layer's EM group where fewer (clamp); no error.
    No reconstruction entry when the sampling back is per frame.

    Mutation seen failing: the clamped K not recorded (K everywhere)."""
    latents, cond = _video()
    method = STEMInversion(num_bases=8, excess_bases=excess_bases, num_steps=STEPS, stem_in_reconstruction=False)
    traj = method.invert(tiny_model, latents, cond, progress=False)
    method.reconstruct(tiny_model, traj.latents[-1], cond, progress=False)
    report = method.bases_report()
    assert report["auto"] is None and "reconstruction" not in report
    grids = self_attention_tokens(tiny_model.unet, 8, 8)
    want = {path: 8 if excess_bases == "allow" else min(8, 3 * h * w) for path, (h, w) in grids.items()}
    assert {path: rec["k"] for path, rec in report["inversion"]["layers"].items()} == \
        {path: [k] for path, k in want.items()}
    assert min(want.values()) < 8 or excess_bases == "allow"
    assert all(rec["error"] is None and rec["tried"] is None for rec in report["inversion"]["layers"].values())


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize("auto,word", [
    ({"target": 0}, "auto.target=0 "), ({"target": 1}, "auto.target=1 "), ({"target": 1.5}, "auto.target=1.5"),
    ({"target": -0.1}, "auto.target=-0.1"), ({"target": "x"}, "auto.target='x'"),
    ({"k_min": 64, "k_max": 32}, "auto.k_max=32 is below auto.k_min=64"), ({"k_min": 0}, "auto.k_min=0"),
    ({"k_step": 0}, "auto.k_step=0"), ({"when": "sometimes"}, "auto.when='sometimes'"),
    ({"trget": 0.2}, "did you mean auto.target"), ({"criterion": "keys"}, "auto.criterion='keys' is not one of"),
    ({"queries": 0}, "auto.queries=0 must be an integer of at least 1"), ({"queries": 8.5}, "auto.queries=8.5"),
    ({"queries": True}, "auto.queries=True")])
def test_bad_auto_settings_fail_at_construction(auto, word):
    """Mutations seen failing: target 1 accepted (<= instead of <); k_min > k_max accepted; queries and criterion
    not checked (they fail only when a layer runs, after the model)."""
    with pytest.raises(ConfigError, match=word.replace("(", r"\(").replace(".", r"\.")) as info:
        STEMInversion(num_bases="auto", auto=auto)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        STEMInversion(num_bases=64, auto=auto)  # checked whatever K is


@pytest.mark.parametrize("value", ["abc", 4.5, True, 0])
def test_num_bases_is_an_integer_or_auto(value):
    with pytest.raises(ConfigError, match="num_bases"):
        STEMInversion(num_bases=value)


def test_auto_runs_where_a_fixed_k_is_refused(tiny_model):
    """check() refuses K=256 for 64 tokens, but auto caps its candidates at the tokens."""
    with pytest.raises(ConfigError, match="exceeds the 64 tokens"):
        STEMInversion(num_bases=256).check(tiny_model.unet, 4, 32, 32)
    STEMInversion(num_bases="auto", auto={"k_max": 4096}).check(tiny_model.unet, 4, 32, 32)


@pytest.mark.parametrize("overrides,message", [
    (("inversion.auto.k_min=64", "inversion.auto.k_max=32"), "auto.k_max=32 is below auto.k_min=64"),
    (("inversion.auto.criterion=output",), "auto.criterion='output' is not one of"),
    (("inversion.auto.queries=0",), "auto.queries=0 must be an integer of at least 1")])
def test_bad_auto_setting_on_the_command_line_is_one_error_line_before_the_model(tmp_path, overrides, message):
    """Mutations seen failing: k_min > k_max accepted (the job then builds the model and runs); queries=0 accepted
    (the first layer call then fails with a traceback after the model)."""
    result = run_cli("progress=false", "debug=fast", f"paths.cache_dir={tmp_path}/cache",
                     f"hydra.run.dir={tmp_path}/run", "device=cpu", "inversion=stem_auto", *overrides, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "built tiny" not in result.stdout + result.stderr


# ---------------------------------------------------------------- frame-sharded runs
AUTO = dict(target=0.5, k_min=1, k_max=16)
SHARDED_SPECS = {  # 7 frames: every layer's K from the same candidates, in one process and in 2 or 3
    "global_features": dict(num_bases="auto", auto={**AUTO, "target": 0.2, "queries": 40}),         # attention
    "global_keys_every_step": dict(num_bases="auto", space="keys", auto={**AUTO, "when": "every_step",
                                                                           "criterion": "tokens"}),
    "group3_features": dict(num_bases="auto", group=3, auto={**AUTO, "target": 0.2, "queries": 40}),  # attention
    "group3_keys": dict(num_bases="auto", space="keys", group=3, auto={**AUTO, "criterion": "tokens"}),
}


def _ks(report_or_record) -> dict:
    layers = report_or_record["layers"] if "layers" in report_or_record else report_or_record["inversion"]["layers"]
    return {path: rec["k"] for path, rec in layers.items()}


def _adaptive_job(model, inputs: dict):
    """One rank: the EM error sums; per spec the replay of the recorded attn1 inputs by the rank's processor (its
    layer outputs and K per layer), and a sharded inversion (trajectory on rank 0, the method's report)."""
    def job(d: Distributed):
        out = {"em": em_error(d)}
        latents, cond = video()
        for name, kwargs in SHARDED_SPECS.items():
            method = STEMInversion(num_steps=STEPS, **kwargs)
            fs = shard_video(d, method, N_FRAMES)
            proc = shard_processor(method, fs)
            _, outs = replay(proc, inputs[name], fs.start, fs.stop)
            traj = invert_sharded(method, model, fs.local(latents), cond, fs, progress=False)
            out[name] = dict(outs=outs, record=proc.bases_record(), traj=None if traj is None else traj.latents,
                             report=method.bases_report())
        return out
    return job


@pytest.fixture(scope="module")
def one_process_auto(tiny_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks
    try:
        ref = {"em": em_error(), "inputs": {}}
        latents, cond = video()
        for name, kwargs in SHARDED_SPECS.items():
            method = STEMInversion(num_steps=STEPS, **kwargs)
            ref["inputs"][name] = attn1_inputs(tiny_model, method, latents, cond)
            proc = method.processor(N_FRAMES)
            _, outs = replay(proc, ref["inputs"][name], 0, N_FRAMES)
            traj = method.invert(tiny_model, latents, cond, progress=False).latents
            ref[name] = dict(outs=outs, record=proc.bases_record(), traj=traj, report=method.bases_report())
    finally:
        torch.set_num_threads(threads)
    return ref


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_auto_chooses_as_one_process(tiny_model, one_process_auto, tmp_path, world):
    """2 and 3 ranks on 7 frames: the EM's error sums (global bases: joined to the M-step all-reduce) and, for
    global bases and groups of 3 frames in both spaces, the K chosen per layer, its error and every layer's output
    (replaying the one-process attn1 inputs), and in a sharded inversion the K per layer (method.bases_report()
    through stem.inversion.sharded's processors) and the trajectory, all as in one process.

    Mutations seen failing: the Gram and energy left out of the last iteration's all-reduce (each rank measures its
    own tokens); group-scoped error totals not all-reduced over ranks (ranks choose different K); criterion
    attention with global bases: each rank's softmax pieces used without the other ranks' (exact attention over the
    rank's own keys only)."""
    ref = one_process_auto
    assert (ref["em"][2] < DEAD_MASS).any(), "no dead basis in the last iteration"
    codes, _, ranks = run_ranks(world, _adaptive_job(tiny_model, ref["inputs"]), tmp_path)
    assert codes == [0] * world, f"rank exit codes {codes}"
    ks = set()
    for r, res in enumerate(ranks):
        for got, want, what in zip(res["em"], ref["em"], ("error_sq", "energy", "mass"), strict=True):
            close(got, want, f"EM {what}, rank {r} of {world}")
        for name in SHARDED_SPECS:
            got, want = res[name], ref[name]
            assert _ks(got["record"]) == _ks(want["record"]), f"{name} rank {r}: K per layer (replay)"
            for path, rec in got["record"]["layers"].items():
                want_error = want["record"]["layers"][path]["error"]
                close(torch.tensor(rec["error"]), torch.tensor(want_error), f"{name} error at {path}")
            assert _ks(got["report"]) == _ks(want["report"]), f"{name} rank {r}: K per layer (inversion)"
            ks |= {k for layer in _ks(want["report"]).values() for k in layer}
    assert len(ks) > 2, f"K chosen: {ks}: the layers do not differ enough for the test to mean something"
    for name in SHARDED_SPECS:
        for layer, want in enumerate(ref[name]["outs"]):
            close(torch.cat([res[name]["outs"][layer] for res in ranks]), want, f"{name} attn1 output of layer {layer}")
        close(ranks[0][name]["traj"], ref[name]["traj"], f"{name} trajectory")


# ---------------------------------------------------------------- the candidate cap with uneven EM groups
@pytest.mark.parametrize("space", ["features", "keys"])
def test_auto_caps_k_at_the_tokens_of_the_smallest_em_group(space):
    """5 frames of 6 tokens in EM groups of 2 frames: groups of 12, 12 and 6 tokens (the last one short). With
    k_min = k_max = 1000 the only candidate is the cap, whatever the error criterion and target decide: auto
    uses 6 bases at that layer, and no EM call gets more bases than its group has tokens.

    Mutation seen failing: the cap taken from the largest EM group (12 bases for the 6-token group)."""
    attn = Attention(query_dim=8, heads=2, dim_head=4, bias=False).eval()
    proc = STEMAttnProcessor(5, "auto", group=2, space=space, auto=dict(k_min=1000, k_max=1000))
    calls, em = [], proc.em

    def spy(x, *args, k=None, **kwargs):
        calls.append((k, x.shape[1]))
        return em(x, *args, k=k, **kwargs)
    proc.em = spy
    with torch.no_grad():
        proc.for_layer("layer")(attn, torch.randn(5, 6, 8, generator=torch.Generator().manual_seed(0)))
    assert sorted({tokens for _, tokens in calls}) == [6, 12]  # the uneven groups this test is about
    assert all(k <= tokens for k, tokens in calls), calls
    assert proc.bases_record()["layers"]["layer"]["k"] == [6]


@pytest.mark.parametrize("space,group", [("features", None), ("keys", None)])
def test_fixed_k_can_measure_its_attention_error_without_changing_its_output(space, group):
    """measure_attention_error (processor: error_queries) with a fixed K: the layer's recorded error is the attention
    error of its bases written out on the queries of a separate generator seeded with the processor's seed, and
    the layer's output and the processor's generator are bitwise those of an unmeasured processor; only the first
    call of a layer is measured.

    Mutation seen failing: the queries drawn from the processor's generator (the output changes)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=False).eval()
    n, s = 5, 12
    x = 2 * torch.randn(2 * n, s, 16, generator=torch.Generator().manual_seed(1))
    measured = STEMAttnProcessor(n, 8, space=space, group=group, seed=4, error_queries=9, chunk_size=7)
    plain = STEMAttnProcessor(n, 8, space=space, group=group, seed=4, chunk_size=7)
    with torch.no_grad():
        out = [measured.for_layer("layer")(attn, x) for _ in range(2)]
        ref = [plain.for_layer("layer")(attn, x) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    assert torch.equal(measured.generator.get_state(), plain.generator.get_state())
    rec = measured.bases_record()["layers"]["layer"]
    picked = torch.randperm(n * s, generator=torch.Generator().manual_seed(4))[:9]
    want = naive_attention_errors(attn, x, n, [8], [4], picked, space, group, dict(n_iters=3, tau=0.05))
    assert rec["k"] == [8] and len(rec["error"]) == 1
    assert rec["error"][0] == pytest.approx(want[8], rel=1e-5)
    assert plain.bases_record()["layers"]["layer"]["error"] is None

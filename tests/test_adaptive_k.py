"""Adaptive number of bases (`num_bases="auto"`, issue 15): the streamed error, the choice of K, the report,
the settings, and frame-sharded runs against one process."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from diffusers.models.attention_processor import Attention
from test_distributed import N_FRAMES, attn1_inputs, close, em_data, replay, run_ranks, video

from stem.adaptive import candidates, resolve_auto
from stem.distributed import Distributed, frame_slices
from stem.em import DEAD_MASS, NORM_EPS, EMShard, em_bases
from stem.errors import ConfigError
from stem.inversion import STEMInversion, self_attention_tokens
from stem.sharded import invert_sharded, shard_processor, shard_video
from stem.stem_attention import STEMAttnProcessor

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
    centre direction), auto picks K = 8 with doubling from 1 and with k_step 1. kmeans++ initialisation with
    reseeding (EM from gaussian bases merges clusters within 3 iterations).

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
                                 auto=dict(target=target, k_min=1, k_max=32, k_step=k_step))
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


def _replay_auto(steps, target: float, when: str) -> tuple[dict, torch.Tensor]:
    """One auto processor replaying the recorded inputs of every layer, call after call: its layer records and
    its generator's state at the end."""
    proc = STEMAttnProcessor(3, "auto", auto=dict(target=target, k_min=1, k_max=64, when=when))
    with torch.no_grad():
        for step in steps:
            for path, attn, hs in step:
                proc.for_layer(path)(attn, hs)
    return proc.bases_record()["layers"], proc.generator.get_state()


@pytest.mark.parametrize("when", ["first_step", "every_step"])
def test_a_looser_target_never_picks_more_bases(unet_inputs, when):
    """On the same inputs of every layer (recorded from the tiny UNet, replayed call after call), target 0.6
    never picks a larger K than 0.45 at any layer and call, and picks a smaller one somewhere (so the test can
    fail). With one seed per EM call both runs see the same error for every K both tried, and the processor's
    generator ends in the same state whatever the target.

    Mutations seen failing: candidates initialised from the processor's generator one after the other (a
    candidate's error then depends on those tried before, at this and later layers); no stop at the first K
    within the target."""
    (loose, loose_state), (strict, strict_state) = (_replay_auto(unet_inputs, target, when) for target in (0.6, 0.45))
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


def test_first_step_keeps_the_first_choice_and_every_step_chooses_again(tiny_model, monkeypatch):
    """Spying on the EM: with when=first_step a layer runs its candidates (errors measured) at its first call, then
    only the chosen K without error; every_step runs the candidates at every call (one K per step). The
    reconstruction chooses on its own first call and is recorded separately.

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
        method = STEMInversion(num_bases="auto", auto=dict(target=0.5, k_min=2, k_max=32, when=when), num_steps=STEPS)
        assert method.bases_report() is None
        traj = method.invert(tiny_model, latents, cond, progress=False)
        method.reconstruct(tiny_model, traj.latents[-1], cond, progress=False)
        report = method.bases_report()
        assert report["auto"] == resolve_auto(dict(target=0.5, k_min=2, k_max=32, when=when))
        for phase in ("inversion", "reconstruction"):
            layers = report[phase]["layers"]
            assert len(layers) == 16
            for path, rec in layers.items():
                calls = [(k, measured) for p, layer, k, measured in seen if p == phase and layer == path]
                tried = [(t["k"], True) for t in rec["tried"]]
                assert calls[:len(tried)] == tried and rec["k"][0] == tried[-1][0]
                if when == "first_step":
                    assert calls[len(tried):] == [(rec["k"][0], False)] * (STEPS - 1) and len(rec["k"]) == 1
                else:
                    assert len(rec["k"]) == STEPS == len(rec["error"]) and all(m for _, m in calls)
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
    ({"trget": 0.2}, "did you mean auto.target")])
def test_bad_auto_settings_fail_at_construction(auto, word):
    """Mutations seen failing: target 1 accepted (<= instead of <); k_min > k_max accepted."""
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


def test_bad_auto_setting_on_the_command_line_is_one_error_line_before_the_model(tmp_path):
    """Mutation seen failing: k_min > k_max accepted (the job then builds the model and runs)."""
    result = run_cli("progress=false", "debug=fast", f"paths.cache_dir={tmp_path}/cache",
                     f"hydra.run.dir={tmp_path}/run", "device=cpu", "inversion=stem_auto",
                     "inversion.auto.k_min=64", "inversion.auto.k_max=32", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "auto.k_max=32 is below auto.k_min=64" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "built tiny" not in result.stdout + result.stderr


# ---------------------------------------------------------------- frame-sharded runs
AUTO = dict(target=0.5, k_min=1, k_max=16)
SHARDED_SPECS = {  # 7 frames: every layer's K from the same candidates, in one process and in 2 or 3
    "global_features": dict(num_bases="auto", auto=AUTO),
    "global_keys_every_step": dict(num_bases="auto", space="keys", auto={**AUTO, "when": "every_step"}),
    "group3_features": dict(num_bases="auto", group=3, auto=AUTO),
    "group3_keys": dict(num_bases="auto", space="keys", group=3, auto=AUTO),
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
    through stem.sharded's processors) and the trajectory, all as in one process.

    Mutations seen failing: the Gram and energy left out of the last iteration's all-reduce (each rank measures its
    own tokens); group-scoped error totals not all-reduced over ranks (ranks choose different K)."""
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

"""Frame-sharded inversion over torch.distributed (issue #14): slicing, checks, and sharded == one process.

The multi-process tests fork gloo ranks from the test process (forking shares the already built
tiny model, so a rank starts in milliseconds instead of re-importing diffusers), each with one
thread, and compare what the ranks saved with the single-process computation done here.
"""

from __future__ import annotations

import copy
import multiprocessing
import socket
import time

import pytest
import torch

from stem.distributed import Distributed, frame_slices, init
from stem.em import DEAD_MASS, EMShard, em_bases
from stem.inversion import DDIMInversion, STEMInversion
from stem.sharded import invert_sharded, reconstruct_sharded, shard_processor, shard_video

N_FRAMES, STEPS = 7, 3

# STEM specs. "stem" and "stem_official" are configs/inversion/stem.yaml and stem_official.yaml
# (tests/test_stem_presets.py pins those values) with K=8 for the tiny UNet (the mid block has 1 token per
# frame, so clamp binds there: 7 tokens over the whole video, whatever a rank holds) and, for the released
# preset, EM groups of 2 frames instead of 8 (one group of 8 cannot be split over ranks on 7 frames).
STEM_SPECS = {
    "stem": dict(num_bases=8, excess_bases="clamp"),
    "stem_official": dict(num_bases=8, n_iters=5, tau=0.01, space="keys", group=2, init="gaussian",
                          dead_bases="keep", mass_eps=1e-4, excess_bases="allow"),
    "keys_global_kmeans": dict(num_bases=8, space="keys", init="kmeans++", excess_bases="clamp"),
    "features_group3_random": dict(num_bases=8, group=3, init="random_tokens", excess_bases="clamp"),
}
DDIM_SPECS = {
    "ddim_2frame_fatezero": dict(context="2frame", pairing="fatezero"),
    "ddim_2frame_tuneavideo": dict(context="2frame", pairing="tuneavideo"),
    "ddim_allframe": dict(context="allframe", query_chunk=24),  # 24 divides no slice's token count
}


def methods():
    out = {name: STEMInversion(num_steps=STEPS, **kw) for name, kw in STEM_SPECS.items()}
    out.update({name: DDIMInversion(num_steps=STEPS, **kw) for name, kw in DDIM_SPECS.items()})
    return out


def video():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_FRAMES, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)


def attn1_inputs(model, method, latents, cond) -> list:
    """(attn1 module, its input) of every layer in the first UNet call of the inversion, both in float64.

    The replays run the projections in float64, so that the EM (fp32 whatever its input) gets the same
    tokens in one process and in the ranks, up to the last bit of fp32 kernels whose vectorised and scalar
    paths split differently on 7 and on 3 frames."""
    seen, unet = [], model.unet
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, p=path: seen.append((p, args[0].clone())),
                                         with_kwargs=True)
             for path, m in unet.named_modules() if path.endswith(".attn1")]
    try:
        with torch.no_grad(), method.install(unet, len(latents)):
            unet(latents, 1, encoder_hidden_states=cond.expand(len(latents), -1, -1))
    finally:
        for h in hooks:
            h.remove()
    return [(copy.deepcopy(unet.get_submodule(path)).double(), hs.double()) for path, hs in seen]


def replay(proc, inputs, start: int, stop: int):
    """One processor (one generator, as in a run) applied to frames start..stop-1 of the recorded inputs of
    every layer in turn: the bases of every EM call and every layer's output."""
    calls, em = [], proc.em

    def recorded(x, values=None, shard=None):
        res = em(x, values, shard)
        calls.append((res.bases, res.values))
        return res
    proc.em = recorded  # this instance only
    with torch.no_grad():
        outs = [proc(attn, hs[start:stop]) for attn, hs in inputs]
    return calls, outs


# ---------------------------------------------------------------- EM-level data: 7 "frames" of 5 tokens
EM_TOKENS, EM_SPECS = 5, {
    "gaussian_keep": dict(init="gaussian", dead_bases="keep"),
    "gaussian_reseed": dict(init="gaussian", dead_bases="reseed"),
    "random_tokens_reseed": dict(init="random_tokens", dead_bases="reseed"),
    "kmeanspp_keep": dict(init="kmeans++", dead_bases="keep"),
}


def em_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N_FRAMES * EM_TOKENS, 6, generator=g)
    x[:, ::3] += 4.0  # a far cluster: with K=12 and tau=0.01 gaussian-initialised bases die (checked below)
    return x, torch.randn(2, N_FRAMES * EM_TOKENS, 5, generator=g)


def run_em(x, v, spec, shard=None):
    return em_bases(x, 12, n_iters=3, tau=0.01, generator=torch.Generator().manual_seed(5), chunk_size=4,
                    values=v, shard=shard, **EM_SPECS[spec])


# ---------------------------------------------------------------- forked gloo ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, job, path):
    torch.set_num_threads(1)  # two cores shared by all ranks: one thread each
    d = init(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=20)
    try:
        torch.save(job(d), path)
    finally:
        d.close()


def run_ranks(world: int, job, tmp_path, timeout: float = 120.0):
    """Run job(Distributed) on `world` forked gloo ranks; returns (exit codes, seconds, results or None)."""
    ctx, port = multiprocessing.get_context("fork"), free_port()
    paths = [tmp_path / f"rank{r}_of_{world}.pt" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, paths[r])) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(max(0.0, timeout - (time.monotonic() - start)))
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {timeout} s: a hang"
    codes = [p.exitcode for p in procs]
    results = [torch.load(p) if p.exists() else None for p in paths]
    return codes, time.monotonic() - start, results


def sharded_job(model, noise: dict, inputs: dict):
    """Everything one rank computes: EM-level bases; per STEM spec the replay of the recorded attn1 inputs
    `inputs[name]`; per method the gathered trajectory (rank 0) and, for STEM, the gathered reconstruction
    from noise[name] (all frames' z_T)."""
    def job(d: Distributed):
        out = {"em": {}, "replay": {}, "inv": {}}
        x, v = em_data()
        a, b = frame_slices(N_FRAMES, d.world_size)[d.rank]
        shard = EMShard(token_start=a * EM_TOKENS, total_tokens=N_FRAMES * EM_TOKENS, comm=d)
        for spec in EM_SPECS:
            r = run_em(x[:, a * EM_TOKENS:b * EM_TOKENS], v[:, a * EM_TOKENS:b * EM_TOKENS], spec, shard)
            out["em"][spec] = (r.bases, r.values, r.mass)
        latents, cond = video()
        for name, method in methods().items():
            fs = shard_video(d, method, N_FRAMES)
            if name in inputs:
                out["replay"][name] = replay(shard_processor(method, fs), inputs[name], fs.start, fs.stop)
            traj = invert_sharded(method, model, fs.local(latents), cond, fs, progress=False)
            rec = reconstruct_sharded(method, model, fs.local(noise[name]), cond, fs, progress=False) \
                if name in noise else None
            out["inv"][name] = dict(traj=None if traj is None else traj.latents, rec=rec)
        return out
    return job


@pytest.fixture(scope="module")
def reference(tiny_model):
    return one_process(tiny_model)


def one_process(model):
    """The one-process results the ranks must reproduce, and the recorded attn1 inputs they replay."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks (restored below)
    ref = {"em": {}, "inputs": {}, "replay": {}, "spread": {}, "inv": {}}
    try:
        x, v = em_data()
        for spec in EM_SPECS:
            r = run_em(x, v, spec)
            ref["em"][spec] = (r.bases, r.values, r.mass)
        latents, cond = video()
        for name, method in methods().items():
            if name in STEM_SPECS:
                ref["inputs"][name] = attn1_inputs(model, method, latents, cond)
                ref["replay"][name] = replay(method.processor(N_FRAMES), ref["inputs"][name], 0, N_FRAMES)
                ref["spread"][name] = rounding_spread(method, ref["inputs"][name], ref["replay"][name][0])
            traj = method.invert(model, latents, cond, progress=False).latents
            rec = method.reconstruct(model, traj[-1], cond, progress=False) if name in STEM_SPECS else None
            ref["inv"][name] = dict(traj=traj, rec=rec)
    finally:
        torch.set_num_threads(threads)
    return ref


def rounding_spread(method, inputs, calls) -> float:
    """How far one process's bases move when every input token moves by one fp32 ulp (signs at random):
    the EM's own rounding floor (tau=0.01 and 5 iterations: ~3e-5 on the tiny UNet's layers, tau=0.05 ~5e-6)."""
    g = torch.Generator().manual_seed(1)
    ulp = [(attn, hs * (1 + 2.0 ** -23 * torch.randint(-1, 2, hs.shape, generator=g, dtype=hs.dtype)))
           for attn, hs in inputs]
    moved, _ = replay(method.processor(N_FRAMES), ulp, 0, N_FRAMES)
    return max((a - b).abs().max().item() for c, r in zip(moved, calls) for a, b in zip(c, r) if a is not None)


def close(a, b, what, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_runs_equal_one_process(tiny_model, reference, tmp_path, world):
    """2 and 3 ranks on 7 frames (slices 4+3 and 3+2+2): EM bases, values and masses (global bases: sums
    all-reduced, init over the global token set, globally worst reseeding); the bases of every EM call and the
    output of every attn1 layer, replayed by one processor on the attn1 inputs of the first UNet call (equal
    inputs: across layers of a whole run, float summation order alone moves near-dead bases of tau=0.01 by up
    to 1e-2 while the latents agree to 3e-7); the inverted latents after 3 steps and the reconstruction.

    Mutations seen failing: no M-step all-reduce; gaussian std from local counts; random/kmeans++ draws from
    local tokens; local instead of global worst token; clamp K from local tokens; group-scoped draws made for
    local groups only (generator out of step); fatezero's middle frame from the local slice; tuneavideo's
    previous frame at a slice start taken as the frame itself; allframe on local keys only."""
    noise = {name: r["traj"][-1] for name, r in reference["inv"].items() if r["rec"] is not None}
    codes, seconds, ranks = run_ranks(world, sharded_job(tiny_model, noise, reference["inputs"]), tmp_path)
    assert codes == [0] * world, f"rank exit codes {codes}"
    for spec, (bases, values, mass) in reference["em"].items():
        assert (mass < DEAD_MASS).any() or spec != "gaussian_keep", "no dead basis: reseeding is not exercised"
        for r, res in enumerate(ranks):
            for got, want, what in zip(res["em"][spec], (bases, values, mass), ("bases", "values", "mass")):
                close(got, want, f"EM {spec} {what}, rank {r} of {world}")
    for name, (calls, outs) in reference["replay"].items():
        got = [res["replay"][name] for res in ranks]
        tol = max(1e-5, 4 * reference["spread"][name])  # bases: 1e-5, or 4x the EM's rounding floor if larger
        assert all(len(g[0]) == len(calls) for g in got), f"{name}: number of EM calls"
        for i, want in enumerate(calls):
            for part in (0, 1):  # bases, value bases (keys space)
                if want[part] is None:
                    continue
                if STEM_SPECS[name].get("group"):  # group-scoped: each rank holds its groups' rows, in order
                    close(torch.cat([g[0][i][part] for g in got]), want[part], f"{name} EM call {i} part {part}", tol)
                else:  # global bases: identical on every rank
                    for r, g in enumerate(got):
                        close(g[0][i][part], want[part], f"{name} EM call {i} part {part}, rank {r}", tol)
        for layer, want in enumerate(outs):
            close(torch.cat([g[1][layer] for g in got]), want, f"{name} attn1 output of layer {layer}")
    for name, ref in reference["inv"].items():
        got = [res["inv"][name] for res in ranks]
        close(got[0]["traj"], ref["traj"], f"{name} trajectory")
        assert all(g["traj"] is None for g in got[1:]), "only rank 0 receives the trajectory"
        if ref["rec"] is not None:
            close(got[0]["rec"], ref["rec"], f"{name} reconstruction")
        assert all(g["rec"] is None for g in got[1:]), "only rank 0 receives the reconstruction"

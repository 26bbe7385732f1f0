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
from types import SimpleNamespace

import pytest
import torch

from stem.core.errors import ConfigError
from stem.distributed.sharding import Distributed, choose_backend, frame_slices, from_env, init, submitit_environ
from stem.inversion.em import DEAD_MASS, EMShard, em_bases
from stem.inversion.methods import DDIMInversion, FateZeroInversion, STEMInversion
from stem.inversion.sharded import invert_sharded, reconstruct_sharded, shard_processor, shard_video
from stem.inversion.stem_attention import STEMAttnProcessor

N_FRAMES, STEPS = 7, 3

# STEM specs. "stem" and "stem_official" are configs/inversion/stem.yaml and stem_official.yaml
# (tests/inversion/test_stem_presets.py pins those values) with K=8 for the tiny UNet (the mid block has 1 token per
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
    "ddim_allframe": dict(context="allframe", query_chunk=24),  # query chunks of 24 tokens end mid-frame
}


def methods():
    out = {name: STEMInversion(num_steps=STEPS, **kw) for name, kw in STEM_SPECS.items()}
    out.update({name: DDIMInversion(num_steps=STEPS, **kw) for name, kw in DDIM_SPECS.items()})
    return out


def video():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_FRAMES, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)


def attn1_inputs(model, method, latents, cond) -> list:
    """(path, attn1 module, its input) of every layer in the first UNet call of the inversion, both in float64.

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
    return [(path, copy.deepcopy(unet.get_submodule(path)).double(), hs.double()) for path, hs in seen]


def replay(proc, inputs, start: int, stop: int):
    """One processor (one generator, as in a run) applied to frames start..stop-1 of the recorded inputs of
    every layer in turn, installed per layer as self_attention_processors installs it: the bases of every EM
    call and every layer's output."""
    calls, em = [], proc.em

    def recorded(x, values=None, shard=None, **kwargs):
        res = em(x, values, shard, **kwargs)
        calls.append((res.bases, res.values))
        return res
    proc.em = recorded  # this instance and its per-layer views only
    with torch.no_grad():
        outs = [proc.for_layer(path)(attn, hs[start:stop]) for path, attn, hs in inputs]
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


def run_em(x, v, spec, shard=None, chunk_size=4):
    return em_bases(x, 12, n_iters=3, tau=0.01, generator=torch.Generator().manual_seed(5), chunk_size=chunk_size,
                    values=v, shard=shard, **EM_SPECS[spec])


def summation_spread(x, v, spec, want) -> float:
    """How far one process's EM results move when only the summation order changes (other chunk sizes): the
    floor for ranks that sum their slices and then all-reduce (tau=0.01: kmeans++ here ~5e-5, the others ~3e-6)."""
    return max((a - b).abs().max().item() for chunk in (1, 3, None)
               for a, b in zip(_fields(run_em(x, v, spec, chunk_size=chunk)), want))


def _fields(r):
    return r.bases, r.values, r.mass


# ---------------------------------------------------------------- forked gloo ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, job, path, timeout_s):
    torch.set_num_threads(1)  # two cores shared by all ranks: one thread each
    d = init(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=timeout_s)
    try:
        torch.save(job(d), path)
    finally:
        d.close()


def run_ranks(world: int, job, tmp_path, timeout: float = 120.0, timeout_s: float = 20.0, wait=None):
    """Run job(Distributed) on `world` forked gloo ranks (collective timeout `timeout_s`); waits up to `timeout`
    seconds for the ranks `wait` (default all) and kills the others then. Returns (exit codes, seconds, results)."""
    ctx, port = multiprocessing.get_context("fork"), free_port()
    paths = [tmp_path / f"rank{r}_of_{world}.pt" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, paths[r], timeout_s)) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        for r in range(world) if wait is None else wait:
            procs[r].join(max(0.0, timeout - (time.monotonic() - start)))
        seconds = time.monotonic() - start
        hung = [r for r in (range(world) if wait is None else wait) if procs[r].is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert not hung, f"rank(s) {hung} still running after {timeout} s: a hang"
    return [p.exitcode for p in procs], seconds, [torch.load(p) if p.exists() else None for p in paths]


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
            out["em"][spec] = _fields(r)
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
    ref = {"em": {}, "em_spread": {}, "inputs": {}, "replay": {}, "spread": {}, "inv": {}}
    try:
        x, v = em_data()
        for spec in EM_SPECS:
            r = run_em(x, v, spec)
            ref["em"][spec] = _fields(r)
            ref["em_spread"][spec] = summation_spread(x, v, spec, ref["em"][spec])
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
    ulp = [(path, attn, hs * (1 + 2.0 ** -23 * torch.randint(-1, 2, hs.shape, generator=g, dtype=hs.dtype)))
           for path, attn, hs in inputs]
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
        tol = max(1e-5, 4 * reference["em_spread"][spec])  # 1e-5, or 4x the summation-order floor if larger
        for r, res in enumerate(ranks):
            for got, want, what in zip(res["em"][spec], (bases, values, mass), ("bases", "values", "mass")):
                close(got, want, f"EM {spec} {what}, rank {r} of {world}", tol)
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


def die_in_em(model, rank_to_die: int, stall: float = 0.0):
    """A job whose rank `rank_to_die` raises inside its third EM call (the others wait in an all-reduce), or
    with `stall` seconds, stays alive there that long (a hung rank)."""
    def job(d: Distributed):
        import stem.inversion.stem_attention as sa
        calls, em = [0], sa.em_bases

        def failing(*args, **kwargs):
            calls[0] += 1
            if d.rank == rank_to_die and calls[0] == 3:
                time.sleep(stall)
                raise RuntimeError("rank died inside the EM")
            return em(*args, **kwargs)
        sa.em_bases = failing  # a forked rank: the patch dies with it
        method = STEMInversion(num_steps=STEPS, **STEM_SPECS["stem"])
        latents, cond = video()
        fs = shard_video(d, method, N_FRAMES)
        return invert_sharded(method, model, fs.local(latents), cond, fs, progress=False)
    return job


def test_a_rank_that_dies_makes_the_others_fail_fast(tiny_model, tmp_path):
    """Rank 1 raises in the middle of the EM of the first layer: rank 0, waiting in the M-step all-reduce,
    exits non-zero within seconds (its peer's connection closes) instead of hanging, and writes nothing.

    Mutation seen failing: a rank that swallows the error (returns partial results) exits 0."""
    codes, seconds, results = run_ranks(2, die_in_em(tiny_model, 1), tmp_path, timeout=60)
    assert codes[1] != 0 and codes[0] != 0, f"exit codes {codes}: the surviving rank must fail too"
    assert results == [None, None], "a failed rank saved results"
    assert seconds < 30, f"the surviving rank took {seconds:.0f} s to fail"


def die_in_cached_inversion(model, cache_root):
    """A job inverting a 7-frame video through `invert_video` with a cache, whose rank 1 raises inside its third
    EM call (rank 0 waits in the M-step all-reduce, before any gather or cache write)."""
    def job(d: Distributed):
        import stem.inversion.stem_attention as sa
        from stem.data.video import Video
        from stem.runs.cache import TensorCache
        from stem.runs.reconstruction import invert_video

        calls, em = [0], sa.em_bases

        def failing(*args, **kwargs):
            calls[0] += 1
            if d.rank == 1 and calls[0] == 3:
                raise RuntimeError("rank died inside the EM")
            return em(*args, **kwargs)
        sa.em_bases = failing  # a forked rank: the patch dies with it
        frames = torch.rand(N_FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        video = Video(frames=frames, fps=8, prompt="a clip", name="clip")
        method = STEMInversion(num_steps=STEPS, **STEM_SPECS["stem"])
        invert_video(model, video, method, TensorCache(cache_root), progress=False, dist=d)
        return "finished"
    return job


def test_a_rank_that_dies_leaves_no_cache_entry(tiny_model, tmp_path):
    """Rank 1 dies mid-inversion of a cached, sharded `invert_video`: both ranks exit non-zero, and the cache
    folder holds no entry, complete or partial (rank 0 writes only after the last gather, atomically).

    Mutation seen failing: rank 0 saving the entry before the inversion has finished (e.g. its own slice's
    trajectory) leaves an entry behind."""
    cache_root = tmp_path / "cache"
    codes, seconds, results = run_ranks(2, die_in_cached_inversion(tiny_model, cache_root), tmp_path, timeout=60)
    assert codes[0] != 0 and codes[1] != 0, f"exit codes {codes}"
    assert results == [None, None]
    assert not cache_root.exists() or not any(cache_root.rglob("*")), sorted(cache_root.rglob("*"))
    assert seconds < 30


def test_a_hung_rank_makes_the_others_fail_after_the_timeout(tiny_model, tmp_path):
    """Rank 1 stalls for 60 s inside the EM without dying: rank 0 gives up after the collective timeout given
    to `init` (3 s here; 10 min by default, torch's own is 30 min) and exits non-zero.

    Mutation seen failing: `init` not passing timeout_s to init_process_group (rank 0 still waiting at 25 s)."""
    codes, seconds, _ = run_ranks(2, die_in_em(tiny_model, 1, stall=60), tmp_path, timeout=25, timeout_s=3, wait=[0])
    assert codes[0] not in (0, None), f"exit codes {codes}"
    assert seconds < 25


def test_frame_slices_follow_the_documented_rule():
    """Contiguous slices, the first U mod W ranks one unit longer (7 frames over 3 ranks: 3, 2, 2), units of
    whole EM groups when a group is set (the last, shorter group a unit of its own).

    Mutations seen failing: the longer slices at the end (2, 2, 3); slices cut at frame, not group, boundaries."""
    assert frame_slices(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert frame_slices(7, 2) == [(0, 4), (4, 7)]
    assert frame_slices(7, 2, group=2) == [(0, 4), (4, 7)]       # groups 0-1 2-3 | 4-5 6
    assert frame_slices(7, 3, group=2) == [(0, 4), (4, 6), (6, 7)]
    assert frame_slices(7, 2, group=3) == [(0, 6), (6, 7)]
    for n in range(1, 13):
        for group in (None, 1, 2, 3, 5, 8):
            units = -(-n // (group or 1))
            for w in range(1, min(n, units) + 1):
                s = frame_slices(n, w, group)
                assert s[0][0] == 0 and s[-1][1] == n and all(a[1] == b[0] for a, b in zip(s, s[1:]))
                sizes = [-(-(b - a) // (group or 1)) for a, b in s]    # units per rank
                assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
                assert all(a % (group or 1) == 0 for a, _ in s)


def test_bad_setups_fail_before_model_work(monkeypatch):
    """Too many ranks, EM groups that would straddle ranks, NCCL without CUDA: ConfigError from functions
    that need no model and start no process group.

    Mutations seen failing: no world-size check (a rank with no frame); groups not rounded (straddling);
    NCCL accepted on a CPU-only machine (init_process_group would fail later, or hang)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="world size 8 exceeds the 7 frames"):
        shard_video(Distributed(rank=0, world_size=8), STEMInversion(), 7)
    with pytest.raises(ConfigError, match="world size 8 exceeds the 7 frames"):
        shard_video(Distributed(rank=0, world_size=8), DDIMInversion(), 7)
    with pytest.raises(ConfigError, match="EM groups of 8 frames would straddle ranks.*only 1 group"):
        shard_video(Distributed(rank=0, world_size=2), STEMInversion(group=8), 7)
    with pytest.raises(ConfigError, match="EM groups of 4 frames would straddle"):
        shard_video(Distributed(rank=0, world_size=3), STEMInversion(group=4), 7)
    shard_video(Distributed(rank=0, world_size=2), STEMInversion(group=4), 7)  # 2 groups: fine
    with pytest.raises(ConfigError, match="backend=nccl needs CUDA"):
        choose_backend("nccl")
    assert choose_backend("auto") == "gloo" and choose_backend("auto", cuda=True) == "nccl"
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.raises(ConfigError, match="backend=nccl needs CUDA"):
        from_env(env, backend="nccl")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT unset: launch with torchrun"):
        from_env({"WORLD_SIZE": "2", "RANK": "0"})
    assert not torch.distributed.is_initialized()
    # a shard cut for other groups, or a processor told the wrong local frame count
    cut = Distributed(rank=0, world_size=2).shard(7)                  # 4 + 3 frames: cuts groups of 3
    with pytest.raises(ConfigError, match="cut EM groups of 3 frames"):
        STEMAttnProcessor(4, group=3, shard=cut)
    with pytest.raises(ConfigError, match="num_frames=7 but this process holds 4 frames"):
        STEMAttnProcessor(7, shard=cut)
    with pytest.raises(ConfigError, match="runs on one process only"):
        shard_video(Distributed(rank=0, world_size=2), FateZeroInversion(), 7)


def test_launch_environments():
    """No WORLD_SIZE (plain python) or WORLD_SIZE=1: the one-process job, nothing initialised; submitit's
    JobEnvironment maps to torchrun's variables (first host is the master)."""
    for env in ({}, {"WORLD_SIZE": "1"}):
        d = from_env(env)
        assert not d.active and d.group is None and d.world_size == 1
    job = SimpleNamespace(global_rank=3, num_tasks=4, local_rank=1, hostnames=["node7", "node8"])
    assert submitit_environ(job, master_port=1234) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                      "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}


@pytest.fixture
def one_thread():
    """One intra-op thread (2 shared cores: several threads each slow everything down), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_process_is_bitwise_the_unsharded_code(tiny_model, one_thread):
    """With one process (Distributed()), sharded inversion and reconstruction equal method.invert /
    method.reconstruct bit for bit, and every collective returns its input.

    Mutations seen failing: reconstruct_sharded using the inversion's processor (stem_in_reconstruction=False
    must sample back per frame); invert_sharded with the method's default 50 steps."""
    one = Distributed()
    t = torch.randn(3, 2)
    assert one.all_reduce_sum(t) is t and one.broadcast(t) is t and one.all_gather_slices(t, [3]) is t
    assert one.gather_slices(t, [3]) is t and one.all_gather(t)[0] is t
    latents, cond = video()
    cases = {**methods(), "stem_1frame_reconstruction": STEMInversion(num_steps=STEPS, stem_in_reconstruction=False,
                                                                      **STEM_SPECS["stem"])}
    for name, method in cases.items():
        fs = shard_video(one, method, N_FRAMES)
        want = method.invert(tiny_model, latents, cond, progress=False).latents
        got = invert_sharded(method, tiny_model, latents, cond, fs, progress=False).latents
        assert torch.equal(got, want), name
        if isinstance(method, STEMInversion):
            back = method.reconstruct(tiny_model, want[-1], cond, progress=False)
            assert torch.equal(reconstruct_sharded(method, tiny_model, want[-1], cond, fs, progress=False), back), name


def literal_em_job(chunk_size):
    """Three single EM iterations (m_step="literal", raw bases, tau 0.05) on this rank's frames of the clustered
    tokens of tests/inversion/test_em.py (8 "frames" of 64 tokens), each from the previous iteration's bases."""
    def job(d: Distributed):
        from test_em import clustered_tokens
        x, v, mu = clustered_tokens()
        a, b = frame_slices(8, d.world_size)[d.rank]
        shard = EMShard(token_start=a * 64, total_tokens=512, comm=d)
        steps = []
        for _ in range(3):
            res = em_bases(x[:, a * 64:b * 64], 64, n_iters=1, tau=0.05, normalize_bases=False, dead_bases="keep",
                           bases=mu, values=v[:, a * 64:b * 64], chunk_size=chunk_size, shard=shard, m_step="literal")
            steps.append((mu, res.bases, res.values, res.mass))
            mu = res.bases
        return steps
    return job


@pytest.mark.parametrize("world,chunk_size", [(2, None), (3, 100)])
def test_sharded_literal_m_step_is_eq_10_over_all_tokens(tmp_path, world, chunk_size):
    """Global bases over 2 and 3 gloo ranks (tokens split 256+256 and 192+192+128), m_step="literal": at each
    iteration every rank's key and value bases equal the float64 Eq. 8-11 step over ALL tokens from the bases
    it started from (tolerance of tests/inversion/test_em.py), and the ranks agree with one another.

    Mutations seen failing: no all-reduce MAX of the per-basis maxima (each rank's weights relative to its own
    max); the rescaling to the global max applied to num but not to the masses."""
    from test_em import clustered_tokens, literal_step
    codes, _, ranks = run_ranks(world, literal_em_job(chunk_size), tmp_path, timeout=60)
    assert codes == [0] * world, f"rank exit codes {codes}"
    x, v, _ = clustered_tokens()
    tiny = []
    for r, steps in enumerate(ranks):
        for i, (start, bases, values, mass) in enumerate(steps):
            want, want_v, z = literal_step(x[0], start[0], 0.05, v[0])
            # see test_literal_m_step_is_eq_10_where_the_eps_m_step_gives_zero_bases
            delta = (64 ** 0.5 + 4) * 2.0 ** -24 * (x[0].double().abs() @ start[0].double().abs().T / 0.05).max()
            spread = (x[0].double()[:, None] - want).abs().max()
            spread_v = (v[0].double()[:, None] - want_v).abs().max()
            assert (bases[0].double() - want).abs().max() <= 2 * delta * spread, f"rank {r} of {world}, iteration {i}"
            assert (values[0].double() - want_v).abs().max() <= 2 * delta * spread_v
            torch.testing.assert_close(mass[0].double(), z.sum(0), rtol=delta, atol=1e-37)
            tiny.append(z.sum(0).min().item())
            if r:
                assert torch.equal(bases, ranks[0][i][1]), "ranks disagree"  # same all-reduced sums
    assert min(tiny) < 1e-40  # bases whose every responsibility is below fp32's range: what this test is about


def five_frame_job(model):
    """STEMInversion(num_bases=4), one step, on 5 frames of 8x8 latents (1 token per frame at the tiny UNet's mid
    block: 5 tokens over the video, 3 and 2 on the two ranks)."""
    def job(d: Distributed):
        method = STEMInversion(num_bases=4, num_steps=1)
        latents, cond = video()
        fs = shard_video(d, method, 5)
        traj = invert_sharded(method, model, fs.local(latents[:5]), cond, fs, progress=False)
        return None if traj is None else traj.latents
    return job


def test_sharded_k_check_counts_the_whole_videos_tokens(tiny_model, tmp_path):
    """K=4 bases on 5 frames whose mid block has 1 token each: valid for the video (5 tokens per EM group,
    global bases) although neither rank's slice (3 + 2 frames) holds 4 tokens. Two ranks run it and rank 0's
    trajectory equals one process's.

    Mutation seen failing: invert_sharded checking K against the local slice's frames (refuses the job)."""
    latents, cond = video()
    with torch.no_grad():
        want = STEMInversion(num_bases=4, num_steps=1).invert(tiny_model, latents[:5], cond, progress=False).latents
    codes, _, ranks = run_ranks(2, five_frame_job(tiny_model), tmp_path, timeout=60)
    assert codes == [0, 0], f"rank exit codes {codes}"
    close(ranks[0], want, "5-frame trajectory")


def test_sharded_reconstruction_records_its_bases_as_the_reconstruction(tiny_model, one_thread):
    """reconstruct_sharded installs the reconstruction's processor: after a sharded inversion and reconstruction
    (one process), bases_report() has both phases, recorded by processors of their own phase; a reconstruction
    alone reports a reconstruction and no inversion.

    Mutation seen failing: reconstruct_sharded using the inversion-phase processor (its record lands under
    "inversion" and replaces the inversion's)."""
    latents, cond = video()
    method = STEMInversion(num_steps=1, **STEM_SPECS["stem"])
    fs = shard_video(Distributed(), method, N_FRAMES)
    traj = invert_sharded(method, tiny_model, latents, cond, fs, progress=False)
    inversion = method.processors["inversion"]
    reconstruct_sharded(method, tiny_model, traj.latents[-1], cond, fs, progress=False)
    assert method.processors["inversion"] is inversion and inversion.phase == "inversion"
    assert method.processors["reconstruction"].phase == "reconstruction"
    assert {"inversion", "reconstruction"} <= set(method.bases_report())
    alone = STEMInversion(num_steps=1, **STEM_SPECS["stem"])
    reconstruct_sharded(alone, tiny_model, traj.latents[-1], cond, fs, progress=False)
    report = alone.bases_report()
    assert "reconstruction" in report and "inversion" not in report

"""STEM self-attention (paper Eq. 7): every frame's queries attend to K EM bases of the video.

Per call (one self-attention layer at one timestep) the frames of a UNet batch, B = G * N
(G prompt branches, N frames), are split into EM groups of `group` consecutive frames
(None = the whole video; a last group may be shorter). For each branch and group:

- space "features" (paper text): EM on the attention input X (tokens of C channels) gives
  mu (K, C) shared by all heads; K = mu W_K, V = mu W_V.
- space "keys" (released code): per head, EM on the projected keys k = X W_K (d channels)
  gives the key bases; the value bases are the last responsibilities applied to the values.

Then Q = X^n W_Q of every frame of the group attends to those K bases in one fused
`scaled_dot_product_attention` call over (groups, heads): no loop over heads, no copies of
the bases per frame. Cost O(N S K (R + 1)) instead of O((N S)^2) for all-frame attention.

num_bases="auto" (`stem.inversion.adaptive`, docs/STEM.md "Adaptive K"): at a layer call the EM calls of all
groups run with each candidate K in turn until the error over all of them is at most the target; those
results feed the attention. The error (`auto.criterion`): of the STEM attention output on sampled queries
against exact attention over their EM group (`AttentionProbe`, the default), or the EM's relative token
reconstruction error ("tokens"). The
layer is the path of the view installed on it (`for_layer`); with when="first_step" its first choice is
kept. Each EM call draws one seed from the processor's generator and every candidate starts from it.

Frame-sharded (`shard`, a `stem.distributed.sharding.FrameShard`): this process holds frames
start .. stop - 1 of the N-frame video, and its bases are those of one process holding all N:
- group=None (global bases): the EM runs on this slice's tokens and all-reduces its sums over
  processes every iteration (`stem.inversion.em.EMShard`); all processes end with the same bases.
  Per layer and call that exchanges R x (K x C + K) floats per branch (keys space: per head,
  K x d + K, plus K x d for the value bases), and the initialisation's statistics.
- group=G: EM groups are local: the slices are made of whole groups (`frame_slices`), so no
  group straddles two processes and nothing is exchanged; every process walks all groups of
  the video in order to draw their initial bases, so its generator stays in step with the
  one-process generator, and keeps the draws of its own groups.
- num_bases="auto": criterion tokens: global bases get the error over all frames from the EM's all-reduce;
  criterion attention: global bases assemble the sampled queries on every process and merge the softmax
  pieces of every process's keys (`AttentionProbe`). With groups, one all-reduce per candidate sums the
  layer's two error totals over processes; rank 0's totals are then broadcast, so that all ranks take the
  same decision whatever the collectives' rounding.
"""

from __future__ import annotations

import copy
import logging

import torch

from stem.core.errors import ConfigError, check_choice, check_number, check_token_count
from stem.distributed.sharding import FrameShard, frame_units
from stem.inversion.adaptive import (
    candidates,
    error_totals,
    exact_attention,
    merge_pieces,
    output_error_totals,
    phase_record,
    relative_error,
    resolve_auto,
)
from stem.inversion.attention import SelfAttnProcessor, chunked_attention, project_heads, sharded
from stem.inversion.em import MASS_EPS, EMShard, check_em_settings, em_bases

SPACES = ("features", "keys")
EXCESS_POLICIES = ("error", "clamp", "allow")
log = logging.getLogger(__name__)


def group_spans(num_frames: int, group: int | None) -> list[tuple[int, int, int]]:
    """(first frame, end frame, frames per group) of the full groups and of a shorter last one."""
    size = min(group or num_frames, num_frames)
    full = num_frames // size * size
    spans = [(0, full, size)] if full else []
    if full < num_frames:
        spans.append((full, num_frames, num_frames - full))
    return spans


def excess_bases_error(num_bases: int, tokens: int, where: str) -> ConfigError:
    """The one-line error for K above the tokens of an EM group (`excess_bases="error"`), with the fix first:
    `excess_bases=clamp` is the keyword here and run.py's top-level knob, which also works in a sweep that
    mixes DDIM and STEM (configs/config.yaml; the STEM presets read it)."""
    return ConfigError(f"num_bases={num_bases} exceeds the {tokens} tokens of an EM group at {where}: set "
                       f"excess_bases=clamp (as many bases as tokens there), or lower num_bases to at most {tokens}, "
                       "or use more frames per group, more frames or a larger resolution")


def _to_groups(y: torch.Tensor, n: int, f0: int, f1: int, size: int) -> torch.Tensor:
    """Frames f0:f1 of per-frame tensors (G*N, *rest, S, d) as groups (G*m, *rest, size*S, d)."""
    g = y.shape[0] // n
    rest, (s, d) = y.shape[1:-2], y.shape[-2:]
    z = y.view(g, n, *rest, s, d)[:, f0:f1].reshape(g, (f1 - f0) // size, size, *rest, s, d)
    z = z.movedim(2, -3)  # (G, m, *rest, size, S, d)
    return z.reshape(g * ((f1 - f0) // size), *rest, size * s, d)


def _from_groups(y: torch.Tensor, g: int, size: int) -> torch.Tensor:
    """Inverse of `_to_groups` for (G*m, h, size*S, d): -> (G, m*size, h, S, d)."""
    gm, h, t, d = y.shape
    z = y.view(g, gm // g, h, size, t // size, d).movedim(3, 2)  # (G, m, size, h, S, d)
    return z.reshape(g, gm // g * size, h, t // size, d)


class STEMAttnProcessor(SelfAttnProcessor):
    """Self-attention over K bases estimated by EM (see the module docstring and `stem.inversion.em`).

    Args:
        num_frames: N, frames of the video in every UNet batch.
        num_bases: K, or "auto": K chosen per layer by `auto` (`stem.inversion.adaptive`, docs/STEM.md "Adaptive K").
        n_iters: R. tau: E-step temperature.
        space: "features" (EM on X, as the paper writes) or "keys" (per-head EM on keys, as released).
        group: frames per EM group; None = the whole video (global bases).
        init, normalize_bases, dead_bases, mass_eps, m_step: see `stem.inversion.em.em_bases`.
        seed: seeds the generator for the bases' initialisation (one generator per processor,
            so a run is reproducible call for call).
        excess_bases: a layer whose EM group has fewer tokens than K: "error", "clamp" to
            use as many bases as there are tokens there, or "allow" to run EM with K bases
            anyway, as the released code does (surplus bases duplicate others or die; needs
            init="gaussian", the only init that does not pick K distinct tokens). Not read with
            num_bases="auto", which never uses more bases than the smallest EM group of a layer has tokens.
        chunk_size: tokens per EM accumulation chunk (memory O(chunk x K)); None = all at once.
        query_chunk: query tokens per attention call; None = all at once.
        shard: the frames of this process in a frame-sharded job (module docstring); num_frames is
            then this process's frame count. None (or a one-process shard): the whole video is here.
        auto: the settings of num_bases="auto" (`stem.inversion.adaptive.AUTO_DEFAULTS`; ignored for an integer K).
        error_queries: with an integer K, also estimate the attention error of the bases (as auto's attention
            criterion does) on this many sampled queries at each layer's first call, recorded as the layer's error;
            the queries are drawn from a separate generator seeded with `seed`, so the bases and outputs are those
            of an unmeasured run. None: not measured.
        phase: "inversion" or "reconstruction", for the log lines of the choices.

    One processor serves every attn1 layer: `stem.inversion.attention.self_attention_processors` installs its
    per-layer views (`for_layer`), which share the generator and the records (`records`, K per layer
    and choice: `stem.inversion.adaptive.phase_record`).
    """

    def __init__(self, num_frames: int, num_bases: int | str = 256, n_iters: int = 3, tau: float = 0.05,
                 space: str = "features", group: int | None = None, init: str = "gaussian",
                 normalize_bases: bool = True, dead_bases: str = "keep", seed: int = 0,
                 excess_bases: str = "error", mass_eps: float = MASS_EPS, chunk_size: int | None = 16384,
                 query_chunk: int | None = 65536, shard: FrameShard | None = None, auto: dict | None = None,
                 phase: str = "inversion", m_step: str = "eps", error_queries: int | None = None):
        super().__init__(num_frames)
        self.auto = resolve_auto(auto) if num_bases == "auto" else None
        if self.auto is None and (isinstance(num_bases, bool) or not isinstance(num_bases, int)):
            raise ConfigError(f"num_bases={num_bases!r} must be an integer of at least 1 (paper: 256) or auto")
        check_em_settings(num_bases if self.auto is None else self.auto["k_min"], n_iters, tau, init, dead_bases,
                          chunk_size, mass_eps, m_step)
        check_choice("space", space, SPACES)
        if group is not None:
            check_number("group", group, low=1, integer=True, fix="frames per EM group, or null for the whole video")
        check_choice("excess_bases", excess_bases, EXCESS_POLICIES)
        if excess_bases == "allow" and init != "gaussian":
            raise ConfigError(f"excess_bases=allow needs init=gaussian (init={init} picks K distinct tokens, "
                              "which a group with fewer tokens lacks): use init=gaussian or excess_bases=clamp")
        check_token_count("query_chunk", query_chunk)
        check_token_count("error_queries", error_queries)
        self.seed, self.error_queries = seed, error_queries
        self.num_bases, self.n_iters, self.tau, self.space, self.group = num_bases, n_iters, tau, space, group
        self.init, self.normalize_bases, self.dead_bases = init, normalize_bases, dead_bases
        self.excess_bases, self.mass_eps, self.m_step = excess_bases, mass_eps, m_step
        self.chunk_size, self.query_chunk = chunk_size, query_chunk
        self.generator = torch.Generator().manual_seed(seed)
        self.shard = sharded(shard, num_frames)
        if self.shard is not None and group is not None:
            starts = {a for a, _ in frame_units(self.shard.total, group)}
            if any(a not in starts for a, _ in self.shard.slices):
                raise ConfigError(f"frame slices {list(self.shard.slices)} cut EM groups of {group} frames: "
                                  f"build the shard with Distributed.shard(num_frames, group={group})")
        self.phase, self.layer, self.records = phase, None, {}

    def for_layer(self, path: str) -> STEMAttnProcessor:
        """This processor on the layer `path` (what `self_attention_processors` installs there): a shallow copy
        that shares the generator and the records, and knows its layer."""
        view = copy.copy(self)
        view.layer = path
        return view

    def em(self, x: torch.Tensor, values: torch.Tensor | None = None, shard: EMShard | None = None,
           k: int | None = None, generator: torch.Generator | None = None, measure_error: bool = False):
        """EM bases of one call's groups: K = `k`, or the fixed K (fewer only with excess_bases="clamp", checked
        in attend; tokens of the whole group, over all processes); `generator` defaults to the processor's."""
        if k is None:
            tokens = x.shape[1] if shard is None else shard.tokens(x.shape[1])
            k = self.num_bases if self.excess_bases == "allow" else min(self.num_bases, tokens)
        return em_bases(x, k, self.n_iters, self.tau, self.normalize_bases, self.init, self.dead_bases,
                        self.generator if generator is None else generator, self.chunk_size, values,
                        mass_eps=self.mass_eps, shard=shard, measure_error=measure_error, m_step=self.m_step)

    def em_calls(self, tokens_per_frame: int, branches: int, heads: int):
        """(first, end local frame, frames per group, EMShard or None) of every EM call of a layer, in order.

        Sharded with group=G: every group span of the whole video, possibly empty here (the EM then
        only draws the initial bases of other processes' groups, keeping the generator in step)."""
        sh, n = self.shard, self.num_frames
        if sh is None:
            return [(f0, f1, size, None) for f0, f1, size in group_spans(n, self.group)]
        if self.group is None:
            return [(0, n, n, EMShard(token_start=sh.start * tokens_per_frame,
                                      total_tokens=sh.total * tokens_per_frame, comm=sh.dist))]
        per_row = heads if self.space == "keys" else 1  # keys space: one EM row per (group, head)
        calls = []
        for f0, f1, size in group_spans(sh.total, self.group):
            a, b = max(f0, sh.start), min(f1, sh.stop)
            if a >= b:
                a = b = sh.start
            m, j0, m_here = (f1 - f0) // size, (a - f0) // size, (b - a) // size
            groups = torch.arange(branches)[:, None] * m + j0 + torch.arange(m_here)   # (G, m_here) rows of (G, m)
            rows = (groups[..., None] * per_row + torch.arange(per_row)).flatten()
            calls.append((a - sh.start, b - sh.start, size, EMShard(rows=rows, total_rows=branches * m * per_row)))
        return calls

    def attend(self, attn, x):
        n, heads, s = self.num_frames, attn.heads, x.shape[1]
        g = x.shape[0] // n
        q, = self.project(attn, x, "q")
        kv = self.project(attn, x, "k", "v") if self.space == "keys" else None

        def em_input(f0: int, f1: int, size: int):
            """The EM's tokens (and values in keys space) of one call's groups."""
            if kv is None:
                return _to_groups(x[:, None], n, f0, f1, size)[:, 0], None                  # (G*m, size*S, C)
            return tuple(_to_groups(y, n, f0, f1, size).flatten(0, 1) for y in kv)      # (G*m*h, size*S, d)

        calls = self.em_calls(s, g, heads)
        tokens = [size * s if sh is None else sh.tokens(size * s) for _, _, size, sh in calls]  # per group
        key = self.layer if self.layer is not None else attn
        if self.auto is None:
            probe = None
            if self.error_queries is not None and key not in self.records:
                probe = AttentionProbe(self, attn, x, q, kv, calls, torch.Generator().manual_seed(self.seed),
                                       self.error_queries)
            results = self.fixed_bases(key, calls, tokens, em_input, s, probe)
        else:
            probe = None
            if self.auto["criterion"] == "attention":
                probe = lambda: AttentionProbe(self, attn, x, q, kv, calls, self.generator,  # noqa: E731
                                               self.auto["queries"])
            results = self.adaptive_bases(key, calls, min(tokens), em_input, probe)
        outs = []
        for (f0, f1, size, _), res in zip(calls, results, strict=True):
            if f1 == f0:
                continue  # another process's groups: only their initial draws were made
            qg = _to_groups(q, n, f0, f1, size)                       # (G*m, h, size*S, d)
            kb, vb = self.bases_kv(attn, res, qg.shape[0], heads, x.dtype)
            outs.append(_from_groups(chunked_attention(qg, kb, vb, self.query_chunk), g, size))
        out = torch.cat(outs, dim=1)                                   # (G, N, h, S, d)
        return out.reshape(g * n, *out.shape[2:])

    def bases_kv(self, attn, res, rows: int, heads: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (rows, h, K, d) of an EM result: features space mu W_K, mu W_V; keys space the bases."""
        if self.space == "features":
            return tuple(self.project(attn, res.bases.to(dtype), "k", "v"))
        return tuple(t.to(dtype).view(rows, heads, *t.shape[1:]) for t in (res.bases, res.values))

    def fixed_bases(self, key, calls, tokens: list[int], em_input, per_frame: int, probe=None) -> list:
        """The EM of every call with the fixed K; records the K of the layer's smallest group once (and with a
        `probe`, the attention error of the bases)."""
        results = []
        for (f0, f1, size, shard), t in zip(calls, tokens, strict=True):
            if t < self.num_bases and self.excess_bases == "error":
                raise excess_bases_error(self.num_bases, t, f"a layer ({t // per_frame} frames x {per_frame} tokens)")
            results.append(self.em(*em_input(f0, f1, size), shard))
        if key not in self.records:
            k = self.num_bases if self.excess_bases == "allow" else min(self.num_bases, min(tokens))
            error = None if probe is None else [self.shared_error(probe.totals(results))]
            self.records[key] = {"k": [k], "error": error, "tried": None}
        return results

    def shared_error(self, totals: torch.Tensor) -> float:
        """The relative error of a layer call's (error, energy) totals, the same on every process: group-scoped
        totals are summed over processes, then rank 0's are broadcast (ranks deciding differently on rounding
        would run different numbers of collectives and hang)."""
        if self.shard is not None:
            if self.group is not None:  # group-scoped: each process holds its own groups' sums (queries)
                totals = self.shard.dist.all_reduce_sum(totals)
            totals = self.shard.dist.broadcast(totals)
        return relative_error(totals)

    def adaptive_bases(self, key, calls, tokens: int, em_input, probe=None) -> list:
        """The EM of every call with the K chosen for this layer (`stem.inversion.adaptive`): the first candidate whose
        relative error over all calls is at most the target, else the last; with when=first_step a layer
        chosen before keeps its K. One seed per call from the processor's generator: every candidate starts
        from a fresh generator with that seed, so the choice does not depend on the candidates tried before.
        `probe()` (criterion=attention) builds the `AttentionProbe` of this call when a choice is made: it draws
        the sampled queries from the processor's generator (after the seeds) and computes their exact attention
        once for all candidates."""
        seeds = [int(torch.randint(2**62, (1,), generator=self.generator)) for _ in calls]
        kept = self.records.get(key) if self.auto["when"] == "first_step" else None
        probe = probe() if probe is not None and not kept else None
        tried = []
        for k in [kept["k"][0]] if kept else candidates(self.auto, tokens):
            results = [self.em(*em_input(f0, f1, size), shard, k=k, generator=torch.Generator().manual_seed(seed),
                               measure_error=not kept and probe is None)
                       for (f0, f1, size, shard), seed in zip(calls, seeds, strict=True)]
            if kept:
                return results
            tried.append({"k": k, "error": self.shared_error(error_totals(results) if probe is None
                                                             else probe.totals(results))})
            if tried[-1]["error"] <= self.auto["target"]:
                break
        self.record_choice(key, tried)
        return results

    def record_choice(self, key, tried: list[dict]) -> None:
        """Append the chosen K (the last tried) and its error to the layer's record, and log it."""
        chosen, target = tried[-1], self.auto["target"]
        rec = self.records.setdefault(key, {"k": [], "error": [], "tried": tried})
        rec["k"].append(chosen["k"])
        rec["error"].append(chosen["error"])
        if self.shard is None or self.shard.dist.rank == 0:
            reached = f"<= {target:g}" if chosen["error"] <= target else f"> {target:g}, target not reached"
            log.log(logging.INFO if self.auto["when"] == "first_step" else logging.DEBUG,
                    "adaptive K %s %s: K=%d (error %.3g %s)", self.phase,
                    key if isinstance(key, str) else "(unnamed layer)", chosen["k"], chosen["error"], reached)

    def bases_record(self) -> dict | None:
        """K (and error) per layer and choice of the layers this processor ran on
        (`stem.inversion.adaptive.phase_record`); None before any call through an installed (named) layer."""
        layers = {name: rec for name, rec in self.records.items() if isinstance(name, str)}
        return phase_record(layers) if layers else None


class AttentionProbe:
    """The attention criterion of num_bases="auto" at one layer call (`stem.inversion.adaptive`,
    docs/STEM.md "Adaptive K").

    At construction: `queries` distinct query tokens drawn from `generator` (auto: the processor's) among the
    N x S tokens of the whole video (the same positions for every prompt branch; all of them when fewer), and
    their exact attention over every token of their EM group, keys and values projected chunk by chunk
    (`chunk_size` tokens; the softmax merged over chunks with `stem.inversion.adaptive.merge_pieces`).
    `totals(results)`: the squared error of STEM attention over a candidate's bases on those queries, and the exact
    outputs' energy.

    Frame-sharded: group-scoped bases hold whole groups per process, so each process measures the queries of its
    frames and the processor all-reduces the totals. Global bases: the sampled queries are assembled on every
    process (an all-reduce of zero-filled buffers: each query is held by one process, so the sum is exact), each
    process computes the softmax pieces over its own keys, one all-gather merges them (max-shifted, so the result
    is the softmax over all keys), and every process then measures all queries against the (identical) bases.
    """

    def __init__(self, proc: STEMAttnProcessor, attn, x: torch.Tensor, q: torch.Tensor, kv, calls,
                 generator: torch.Generator, queries: int):
        n, s, heads = proc.num_frames, x.shape[1], attn.heads
        g = x.shape[0] // n
        sh = proc.shard
        total = (sh.total if sh is not None else n) * s
        picked = torch.randperm(total, generator=generator)[:queries]
        local, tok = picked // s - (sh.start if sh is not None else 0), picked % s
        self.proc, self.attn, self.heads, self.branches = proc, attn, heads, g
        self.dtype, self.device = x.dtype, x.device
        self.spread = sh is not None and proc.group is None  # global bases over processes
        self.parts = []   # per call: (call index, {group: (queries (G, h, nq, d), exact outputs (G, h, nq, d))})
        for i, (f0, f1, size, _) in enumerate(calls):
            if f1 == f0:
                continue
            here = ((local >= f0) & (local < f1)).nonzero()[:, 0]
            j = (local[here] - f0) // size                                     # group of each query
            idx = (local[here] - f0) % size * s + tok[here]                    # its token within the group
            m = (f1 - f0) // size
            qg = _to_groups(q, n, f0, f1, size).view(g, m, heads, size * s, -1).transpose(2, 3)  # (G, m, T, h, d)
            queries = qg[:, j, idx].transpose(1, 2).float()                    # (G, h, nq, d)
            if kv is None:
                xg = _to_groups(x[:, None], n, f0, f1, size)[:, 0].view(g, m, size * s, -1)   # (G, m, T, C)
                keys = lambda u, xg=xg: self.projected_chunks(xg[:, u])  # noqa: E731
            else:
                kg, vg = (_to_groups(y, n, f0, f1, size).view(g, m, heads, size * s, -1) for y in kv)
                keys = lambda u, kg=kg, vg=vg: self.chunks(kg[:, u], vg[:, u])  # noqa: E731
            if self.spread:
                self.parts.append((i, {0: self.spread_exact(picked, here, queries, keys(0))}))
                continue
            groups = {}
            for u in j.unique().tolist():
                at = (j == u).nonzero()[:, 0]
                qu = queries[:, :, at]
                mx, den, num = exact_attention(qu, keys(u))
                groups[u] = (qu, num / den[..., None])
            self.parts.append((i, groups))

    def chunks(self, k: torch.Tensor, v: torch.Tensor):
        """(k, v) chunks of `chunk_size` tokens of a group's keys and values (G, h, T, d)."""
        step = self.proc.chunk_size or k.shape[2]
        for a in range(0, k.shape[2], step):
            yield k[:, :, a:a + step], v[:, :, a:a + step]

    def projected_chunks(self, xg: torch.Tensor):
        """(k, v) chunks of a group's tokens (G, T, C), projected by W_K, W_V chunk by chunk (features space)."""
        step = self.proc.chunk_size or xg.shape[1]
        for a in range(0, xg.shape[1], step):
            yield tuple(project_heads(self.attn, xg[:, a:a + step], None, "k", "v"))

    def spread_exact(self, picked, here, queries, key_chunks):
        """Global bases over processes: every sampled query on every process and its exact output over all keys."""
        dist = self.proc.shard.dist
        full = queries.new_zeros(queries.shape[0], queries.shape[1], len(picked), queries.shape[-1])
        full[:, :, here] = queries
        full = dist.all_reduce_sum(full)                                       # each query held by one process
        mx, den, num = exact_attention(full, key_chunks)                       # over this process's keys
        packed = dist.all_gather(torch.cat([mx[..., None], den[..., None], num], -1))
        mx, den, num = merge_pieces((p[..., 0], p[..., 1], p[..., 2:]) for p in packed)
        return full, num / den[..., None]

    def totals(self, results) -> torch.Tensor:
        """(sum ||O_stem - O_exact||^2, sum ||O_exact||^2) over this process's sampled queries, float64."""
        out = torch.zeros(2, dtype=torch.float64, device=self.device)   # on the model's device, as collectives need
        for i, groups in self.parts:
            res = results[i]
            kb, vb = self.proc.bases_kv(self.attn, res, res.bases.shape[0] // (1 if self.proc.space == "features"
                                                                                else self.heads),
                                        self.heads, self.dtype)
            kb, vb = (t.view(self.branches, -1, *t.shape[1:]) for t in (kb, vb))   # (G, m, h, K, d)
            for u, (qu, exact) in groups.items():
                _, den, num = exact_attention(qu, [(kb[:, u], vb[:, u])])
                out += output_error_totals(num / den[..., None], exact)
        return out

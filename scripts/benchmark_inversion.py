"""Time and memory of DDIM inversion with each self-attention context (paper Table 1).

    python scripts/benchmark_inversion.py --model sd15_arch --frames 8 --width 256 --height 256 --steps 3
    python scripts/benchmark_inversion.py --model sd15 --video taylor.mp4 --frames 48 --steps 50   # Table 1, GPU
    python scripts/benchmark_inversion.py --model sd15_arch --frames 8 --width 128 --height 128 --steps 2 --nproc 1,2

Encodes the video once, then times only the inversion loop for every method in one process
(`stem.runs.benchmarking.time_inversion`, the same definition of "inversion time" as
`experiment=table1_time`: VAE encoding excluded): one untimed warm-up run per method, then
--repeats timed runs (the median is reported). Memory is the peak increase during a run: CUDA's max_memory_allocated
on GPU, the resident set size sampled every 2 ms on CPU. Prints the table (and writes it as
markdown plus raw numbers as JSON with --output). Bad options: one line `error: ...`, exit 2.

--nproc 1,2: the frame-sharded inversion (`stem.inversion.sharded`, docs/SCALING.md) on W forked processes joined over
gloo on the CPU (the model built once, before forking; the cores split between the ranks): per method and W,
the slowest rank's median time, every rank's peak memory increase, and the share of a rank's inversion time
spent inside collectives (all-reduce, all-gather, broadcast, gather: transfer plus waiting for the other ranks).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from stem.core.errors import StemError
from stem.diffusion.device import resolve_device, resolve_dtype
from stem.diffusion.prompts import encode_prompt
from stem.diffusion.vae import encode_frames
from stem.distributed.sharding import Distributed, init
from stem.inversion.methods import DDIMInversion, STEMInversion, self_attention_tokens
from stem.inversion.sharded import invert_sharded, shard_video
from stem.runs.benchmarking import (
    Parser,
    add_common_args,
    device_line,
    finish_report,
    load_frames,
    load_model,
    measure,
    time_inversion,
    warm_up,
)

DEFAULT_METHODS = "ddim_1frame,ddim_2frame,ddim_allframe,stem_k128,stem_k256,stem_k512"
# STEM as the paper writes it: the knobs of configs/inversion/stem.yaml, read from the file so they cannot drift
PAPER_PRESET = Path(__file__).resolve().parents[1] / "configs" / "inversion" / "stem.yaml"


def paper_stem() -> dict:
    """Keyword arguments of the `inversion=stem` preset, except those the benchmark sets itself."""
    preset = yaml.safe_load(PAPER_PRESET.read_text())
    own = ("_target_", "num_bases", "num_steps", "excess_bases", "seed")
    return {k: v for k, v in preset.items() if k not in own} | {"seed": 0}




def make_method(name: str, steps: int, excess_bases: str):
    """`ddim_1frame|ddim_2frame|ddim_allframe|stem_k<K>` -> an inversion method."""
    if name in ("ddim_1frame", "ddim_2frame", "ddim_allframe"):
        return DDIMInversion(context=name.removeprefix("ddim_"), pairing="fatezero", num_steps=steps)
    if name.startswith("stem_k") and name[6:].isdigit():
        return STEMInversion(num_bases=int(name[6:]), excess_bases=excess_bases, num_steps=steps, **paper_stem())
    raise StemError(f"unknown method '{name}': use ddim_1frame, ddim_2frame, ddim_allframe or stem_k<K>")


class TimedDistributed(Distributed):
    """A `Distributed` that adds up the wall time of its collectives (`seconds`; gloo on CPU is synchronous)."""

    seconds = 0.0

    def _timed(self, name, *args, **kwargs):
        start = time.perf_counter()
        try:
            return getattr(super(), name)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def all_reduce_sum(self, tensor):
        return self._timed("all_reduce_sum", tensor)

    def all_reduce_max(self, tensor):  # the literal M-step's per-basis maxima
        return self._timed("all_reduce_max", tensor)

    def all_gather(self, tensor):  # all_gather_slices goes through it
        return self._timed("all_gather", tensor)

    def broadcast(self, tensor, src=0):
        return self._timed("broadcast", tensor, src)

    def gather_slices(self, tensor, sizes, dim=0, dst=0):
        return self._timed("gather_slices", tensor, sizes, dim, dst)


def _rank(rank, world, port, threads, method, model, latents, cond, repeats, queue):
    """One forked rank: a warm-up run, then `repeats` timed sharded inversions; puts (rank, frames, runs)."""
    torch.set_num_threads(threads)
    d = init(rank, world, "127.0.0.1", port, backend="gloo")
    d = TimedDistributed(d.rank, d.world_size, d.local_rank, d.backend, d.group)
    try:
        shard = shard_video(d, method, len(latents))
        local = shard.local(latents).contiguous()
        invert_sharded(method, model, local, cond, shard, progress=False)
        runs = []
        for _ in range(repeats):
            d.seconds = 0.0
            seconds, peak = measure(lambda: invert_sharded(method, model, local, cond, shard, progress=False),
                                    model.device)
            runs.append((seconds, peak, d.seconds))
        queue.put((rank, shard.num_frames, runs))
    finally:
        d.close()


def sharded_row(name, method, model, latents, cond, world: int, repeats: int, threads: int) -> dict:
    """Run `method` on `world` forked gloo ranks; the row: slowest rank's median time, per-rank peaks, comm share."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    threads = max(1, threads // world)
    procs = [ctx.Process(target=_rank, args=(r, world, port, threads, method, model, latents, cond, repeats, queue))
             for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise StemError(f"{name} on {world} processes: rank exit codes {[proc.exitcode for proc in procs]}")
    ranks = sorted(queue.get() for _ in procs)
    medians = [statistics.median(s for s, _, _ in runs) for _, _, runs in ranks]
    shares = [statistics.median(c / s for s, _, c in runs) for _, _, runs in ranks]
    return dict(method=name, nproc=world, frames_per_rank=[f for _, f, _ in ranks], seconds=max(medians),
                seconds_per_frame=max(medians) / len(latents), peak_mib_per_rank=[max(m for _, m, _ in runs) / 2**20
                                                                                   for _, _, runs in ranks],
                comm_share_per_rank=shares, runs=[runs for _, _, runs in ranks])


def sharded_table(rows: list[dict], header: list[str]) -> str:
    """Markdown: method | processes | frames per rank | s | s/frame | peak MiB per rank | collective share."""
    lines = [*(f"- {h}" for h in header), "",
             "| method | processes | frames per rank | median s (slowest rank) | s / frame | peak MiB per rank | "
             "collective share of a rank's time |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['nproc']} | {', '.join(map(str, r['frames_per_rank']))} | {r['seconds']:.2f} | "
              f"{r['seconds_per_frame']:.3f} | {', '.join(f'{m:.0f}' for m in r['peak_mib_per_rank'])} | "
              f"{', '.join(f'{c:.1%}' for c in r['comm_share_per_rank'])} |" for r in rows]
    return "\n".join(lines) + "\n"










def clamp_note(methods, unet, frames: int, h: int, w: int) -> str | None:
    """A header line when some K exceeds the tokens of the smallest self-attention layer."""
    layer, (gh, gw) = min(self_attention_tokens(unet, h, w).items(), key=lambda kv: kv[1][0] * kv[1][1])
    tokens = gh * gw * frames
    big = [m.kwargs["num_bases"] for m in methods.values() if isinstance(m, STEMInversion)
           and m.kwargs["num_bases"] > tokens]
    if not big:
        return None
    return (f"K={', '.join(map(str, big))} exceed the {tokens} tokens ({frames} frames x {gh}x{gw}) of {layer}: "
            f"excess_bases=clamp uses {tokens} bases at such layers")


def table(rows: list[dict], header: list[str]) -> str:
    """Markdown: the header lines, then method | s | s/frame | x 1-frame | MiB | x 1-frame."""
    ref = next((r for r in rows if r["method"] == "ddim_1frame"), None)

    def ratio(r, key):
        return f"{r[key] / ref[key]:.2f}" if ref and ref[key] > 0 else "-"

    lines = [*(f"- {h}" for h in header), "",
             "| method | median s | s / frame | time ratio | peak MiB | memory ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['seconds_per_frame']:.3f} | {ratio(r, 'seconds')} | "
              f"{r['peak_mib']:.0f} | {ratio(r, 'peak_mib')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (paper: 50)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list; stem_k<K> for any K")
    p.add_argument("--excess-bases", choices=("error", "clamp"), default="clamp",
                   help="K above a layer's tokens: clamp (use as many bases as tokens) or error")
    p.add_argument("--nproc", help="comma list of process counts, e.g. 1,2: frame-sharded inversion over gloo (CPU)")
    args = p.parse_args(argv)
    try:
        for key in ("frames", "steps", "repeats"):
            if getattr(args, key) < 1:
                raise StemError(f"--{key}={getattr(args, key)} must be at least 1")
        if args.output and Path(args.output).suffix == ".json":
            raise StemError(f"--output {args.output}: name the markdown file (e.g. table.md); the JSON goes beside it")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        counts = [int(c) for c in args.nproc.split(",")] if args.nproc else []
        if any(c < 1 for c in counts) or (counts and (device.type != "cpu" or max(counts) > args.frames)):
            raise StemError(f"--nproc {args.nproc}: process counts from 1 to --frames, on --device cpu (gloo)")
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        threads = torch.get_num_threads()
        if counts:  # no OpenMP pool before forking (a forked rank would hang in it); the ranks share `threads`
            torch.set_num_threads(1)
        methods = {n: make_method(n, args.steps, args.excess_bases) for n in dict.fromkeys(names)}
        frames = load_frames(args)
        model = load_model(args)
        n, _, height, width = frames.shape
        for method in methods.values():  # refuse K > tokens (excess_bases=error) before any timing
            method.check(model.unet, n, height // 8, width // 8)
        latents = encode_frames(model, frames)
        cond = encode_prompt(model, "a video")
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(threads)  # the device line's thread count (setting it starts no pool)
    header = [f"device: {device_line(device)}", f"torch {torch.__version__}",
              f"model: {model.name}", f"video: {n} frames x {width}x{height} ({args.video or 'synthetic camera pan'})",
              f"DDIM steps: {args.steps}, dtype: {str(dtype).removeprefix('torch.')}, "
              f"repeats: {args.repeats} (median) after 1 warm-up"]
    note = clamp_note(methods, model.unet, n, height // 8, width // 8)
    header += [note] if note else []
    load_start = os.getloadavg()[0]
    print("\n".join(header), flush=True)
    if counts:
        torch.set_num_threads(1)
        header.append(f"frame-sharded over gloo, {threads} torch threads split between the ranks")
        rows = [sharded_row(name, method, model, latents, cond, w, args.repeats, threads)
                for name, method in tqdm(methods.items(), desc="methods") for w in counts]
        finish_report(sharded_table, rows, header, args, device, load_start)
        return 0
    rows = []
    for name, method in tqdm(methods.items(), desc="methods"):
        warm_up(method, model, latents, cond, method.num_steps)  # a whole untimed run
        runs = [time_inversion(method, model, latents, cond)[1:] for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        peak = max(m for _, m in runs) / 2**20
        rows.append(dict(method=name, seconds=seconds, seconds_per_frame=seconds / n, peak_mib=peak,
                         runs_seconds=[s for s, _ in runs], runs_peak_mib=[m / 2**20 for _, m in runs]))
    finish_report(table, rows, header, args, device, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the benchmark scripts (scripts/benchmark_*.py): model and frame loading, the
machine line, and `measure` (wall time and peak memory increase of one call).

Memory is CUDA's max_memory_allocated on GPU, the resident set size sampled every 2 ms on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from stem.core.atomic import atomic_file

PAGE = os.sysconf("SC_PAGE_SIZE")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def load_model(args):
    """The diffusion components named by --model on --device/--dtype."""
    from stem.diffusion.models import build_sd15_arch, build_tiny, load_pretrained

    if args.model == "sd15":
        return load_pretrained(args.model_path, device=args.device, dtype=args.dtype)
    return (build_tiny if args.model == "tiny" else build_sd15_arch)(seed=0, device=args.device, dtype=args.dtype)


def load_frames(args) -> torch.Tensor:
    """(N, 3, H, W) frames: --video, or a synthetic camera pan (256x256 unless --width/--height)."""
    if args.video:
        from stem.data.video import load_video

        return load_video(args.video, "", n_frames=args.frames, width=args.width, height=args.height).frames
    from stem.data.synthetic import camera_pan

    return camera_pan(n_frames=args.frames, width=args.width or 256, height=args.height or 256).frames


def device_line(device: torch.device) -> str:
    """GPU name, or CPU model and usable cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "CPU")
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


def rss() -> int:
    """Resident set size of this process in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def measure(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak memory increase in bytes) of one call of `fn`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - base
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc: give freed heap back, so RSS starts low
    if trim:
        trim(0)
    base = peak = rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return seconds, max(peak, rss()) - base


def time_inversion(method, model, latents: torch.Tensor, cond: torch.Tensor, progress: bool = False,
                   observer=None) -> tuple:
    """(trajectory, seconds, peak memory increase in bytes) of `method.invert` on clean `latents`.

    The one definition of "inversion time" (paper Table 1) that `experiment=table1_time` (through
    `stem.runs.reconstruction.invert_video`) and `scripts/benchmark_inversion.py` share: the DDIM inversion
    loop only, from clean latents to z_T, under the already encoded prompt; VAE encoding is excluded
    (reported on its own as `seconds.vae_encode`). `observer` (a context manager) is entered around it.
    """
    out = {}

    def run():
        with observer if observer is not None else contextlib.nullcontext():
            out["trajectory"] = method.invert(model, latents, cond, progress=progress)

    seconds, peak = measure(run, model.device)
    return out["trajectory"], seconds, peak


def warm_up(method, model, latents: torch.Tensor, cond: torch.Tensor, steps: int) -> None:
    """Run `steps` untimed inversion steps of `method` at the timed run's shapes (CUDA context, kernel
    selection, allocator growth), so the first timed job of a sweep is not slower than the others."""
    if steps > 0:
        short = copy.copy(method)
        short.num_steps = steps
        short.invert(model, latents, cond, progress=False)


def finish_report(md_table, rows: list[dict], header: list[str], args, device: torch.device,
                  load_start: float) -> str:
    """Add the CPU load line to `header`, print the markdown table, write it (and the raw numbers as
    JSON beside it) to `args.output` when given; return the markdown."""
    if device.type == "cpu":  # other processes on these cores slow every number down
        header.append(f"load average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
                      f"on {len(os.sched_getaffinity(0))} cores")
    md = md_table(rows, header)
    print("\n" + md, end="")
    if args.output:
        out = Path(args.output)
        with atomic_file(out) as tmp:
            tmp.write_text(md)
        with atomic_file(out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({"header": header, "args": vars(args), "rows": rows}, indent=2) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return md


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares: model, video, size, device, dtype, repeats, output."""
    p.add_argument("--model", choices=("tiny", "sd15_arch", "sd15"), default="tiny")
    p.add_argument("--model-path", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="for --model sd15")
    p.add_argument("--video", help="video file or frame folder (default: synthetic camera pan)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16")
    p.add_argument("--output", help="also write the table here (markdown) and raw numbers to <output>.json")

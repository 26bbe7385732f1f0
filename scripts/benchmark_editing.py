"""Time and memory of TokenFlow editing against the number of frames.

    python scripts/benchmark_editing.py --model tiny --frames 8,16,32,64 --steps 2
    python scripts/benchmark_editing.py --model sd15_arch --frames 8,16,32 --width 512 --height 512 --steps 2  # GPU

For each frame count: a synthetic camera pan (or the first N frames of --video) is inverted
with 1-frame DDIM (not timed), then `TokenFlowEditor.edit` is timed: one untimed warm-up, then
--repeats timed runs (median). Memory is the peak increase during an edit (CUDA's
max_memory_allocated on GPU, sampled RSS on CPU); with chunks of --batch-size frames it should
grow with the latents only, not with frames x keyframes. Prints a markdown table (--output
writes it, and the raw numbers as JSON beside it). Bad options: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
from tqdm.auto import tqdm

from stem.core.errors import StemError
from stem.diffusion.device import resolve_device, resolve_dtype
from stem.diffusion.prompts import encode_prompt
from stem.diffusion.vae import encode_frames
from stem.editing import TokenFlowEditor
from stem.inversion.methods import DDIMInversion
from stem.runs.benchmarking import Parser, add_common_args, device_line, finish_report, load_frames, load_model, measure


def table(rows: list[dict], header: list[str]) -> str:
    lines = [*(f"- {h}" for h in header), "",
             "| frames | keyframes | median s | s / frame / step | peak MiB | MiB / frame | keyframe cache MiB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['frames']} | {r['keyframes']} | {r['seconds']:.2f} | {r['seconds_per_frame_step']:.3f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] / r['frames']:.1f} | {r['cache_mib']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--frames", default="8,16,32", help="comma list of frame counts")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps of inversion and editing")
    p.add_argument("--batch-size", type=int, default=8, help="editing.batch_size (frames per keyframe chunk)")
    args = p.parse_args(argv)
    try:
        counts = [int(n) for n in args.frames.split(",") if n.strip()]
        if not counts or min(counts) < 1:
            raise StemError(f"--frames {args.frames}: give positive frame counts, e.g. 8,16,32")
        for key in ("steps", "repeats", "batch_size"):
            if getattr(args, key) < 1:
                raise StemError(f"--{key.replace('_', '-')}={getattr(args, key)} must be at least 1")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model = load_model(args)
        editor = TokenFlowEditor("a watercolor painting", num_steps=args.steps, batch_size=args.batch_size)
        editor.check_layers(model.unet)
        cond = encode_prompt(model, "a video")
    except (StemError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = [f"device: {device_line(device)}", f"torch {torch.__version__}", f"model: {model.name}",
              f"DDIM steps: {args.steps}, batch_size: {args.batch_size}, dtype: {str(dtype).removeprefix('torch.')}, "
              f"repeats: {args.repeats} (median) after 1 warm-up"]
    load_start = os.getloadavg()[0]
    print("\n".join(header), flush=True)
    rows = []
    for n in tqdm(counts, desc="frame counts"):
        args.frames = n
        frames = load_frames(args)
        trajectory = DDIMInversion("1frame", num_steps=args.steps).invert(
            model, encode_frames(model, frames, progress=False), cond, progress=False)
        info = {}

        def run(trajectory=trajectory):
            info.update(editor.edit(model, trajectory, "a video", progress=False).info)

        measure(run, device)  # warm-up
        runs = [measure(run, device) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        rows.append(dict(frames=n, keyframes=len(info["chunks"]), seconds=seconds,
                         seconds_per_frame_step=seconds / n / args.steps, peak_mib=max(m for _, m in runs) / 2**20,
                         cache_mib=info["keyframe_cache_bytes"] / 2**20, size=list(frames.shape[-2:]),
                         runs_seconds=[s for s, _ in runs], runs_peak_mib=[m / 2**20 for _, m in runs]))
    header.append(f"video: {rows[0]['size'][1]}x{rows[0]['size'][0]} ({args.video or 'synthetic camera pan'})")
    finish_report(table, rows, header, args, device, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

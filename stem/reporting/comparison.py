"""The paper's qualitative comparison (Figs. 5 and 11) of a sweep, from its run directories alone: for every clip,
a side-by-side video (the source, then one column per method) and a frame strip (rows: the source, then one per
method; columns: evenly spaced frames), each labelled with the paper's method names.

    runs = collect_runs(sweep_dir)                           # stem.reporting.tables
    files = write_comparisons(runs, sweep_dir, ["table2"], order={"table2": [...]}, count=5)
    # -> <sweep dir>/comparison/<clip>.mp4, <clip>_strip.png and <clip>.json (what each column shows) per clip

Nothing is rerun: each method's column is its job's own output video (`edited.mp4`, or `reconstruction.mp4` for
a reconstruction job), the source the left half of its `comparison.mp4` (input | output, written by run.py).
Clips: the jobs that share every override but the method columns (`columns`, e.g. ["table2"]; a Table 2 sweep's
`data=wolf` is one clip). Columns and rows follow the order the sweep declares (`order`), then job order. A method
that has no frames to show (its job failed, is running or never started; it wrote no video; its video has other
frames than the clip's source) is a grey tile saying why ("failed: <reason>", as the table's Not finished column),
never a missing column. Names: `stem.reporting.display.paper_method` ("Ours (STEM-TokenFlow)").

Every file is written atomically (`stem.data.video.write_video`, `stem.reporting.plots.save_png`).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from stem.core.atomic import atomic_file
from stem.core.errors import TableError
from stem.data.video import evenly_spaced, from_uint8, read_frames, to_uint8, write_video
from stem.reporting.display import paper_method

COMPARISON_DIR = "comparison"  # under the sweep folder: <clip>.mp4 (side by side) and <clip>_strip.png
SOURCE = "Source"              # the label of the input's column (video) and row (strip)
OUTPUT_VIDEOS = ("edited.mp4", "reconstruction.mp4")  # a job's output video, the first that exists
SOURCE_VIDEO = "comparison.mp4"  # run.py's input | output side by side: its left half is the input
STRIP_FRAMES = 5               # frames per strip row by default (evenly spaced, the first and the last included)
TILE_GREY = 0.5                # the background of a tile without frames
DEFAULT_FPS = 8.0              # when no job of a clip finished (the video is then all tiles)


def label_height(height: int) -> int:
    """Height in pixels of the label band above each column of a comparison video: height // 8, at least 16,
    even (mp4's yuv420p needs even sizes)."""
    band = max(16, height // 8)
    return band + band % 2


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_image(lines: list[str], width: int, height: int, background: float, size: int) -> np.ndarray:
    """uint8 (height, width, 3): `lines` drawn in black from the top left on a grey `background` in [0, 1]."""
    image = Image.new("RGB", (width, height), tuple([int(round(background * 255))] * 3))
    draw = ImageDraw.Draw(image)
    font = _font(size)
    y = 1
    for line in lines:
        draw.text((2, y), line, fill=(0, 0, 0), font=font)
        y += size + 2
    return np.asarray(image)


def _fit(text: str, width: int, size: int) -> list[str]:
    """`text` wrapped to the characters that fit in `width` pixels at font `size` (about 0.6 size per character)."""
    chars = max(4, int(width / (0.6 * size)))
    return textwrap.wrap(text, chars) or [""]


def label_band(text: str, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): a white band with `text` on one line (cut to fit) above a column."""
    size = max(8, height - 6)
    line = _fit(text, width, size)[0]
    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).text((2, 1), line, fill=(0, 0, 0), font=_font(size))
    return np.asarray(image)


def tile(text: str, frames: int, width: int, height: int) -> torch.Tensor:
    """(frames, 3, height, width) in [0, 1]: a grey tile with `text` wrapped over it (a method without frames)."""
    size = max(8, min(14, width // 10))
    lines = _fit(text, width, size)[: max(1, (height - 2) // (size + 2))]
    image = _text_image(lines, width, height, TILE_GREY, size)
    return from_uint8(np.repeat(image[None], frames, axis=0))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "clip"


def _rank(run: dict, columns: list[str], order: dict | None) -> tuple:
    out = []
    for column in columns:
        values = [str(v) for v in (order or {}).get(column, [])]
        value = str(run["overrides"].get(column))
        out.append(values.index(value) if value in values else len(values))
    return (*out, run["job"] if isinstance(run["job"], int) else 1 << 30, str(run["job"]))


def clip_groups(runs: list[dict], columns: list[str], order: dict | None = None) -> list[dict]:
    """The clips of a sweep: [{"name", "key" (the overrides they share, without `columns`), "runs" (one per method,
    in the declared order)}], in order of first appearance. The name is the clip's (metrics.json `video.name` of a
    finished job), else its overrides ("data=wolf"), made unique and safe as a file name."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run["overrides"].items() if k not in columns))
        groups.setdefault(key, []).append(run)
    out, used = [], set()
    for key, members in groups.items():
        members.sort(key=lambda r: _rank(r, columns, order))
        done = [r for r in members if r["status"] == "ok" and isinstance(r.get("metrics"), dict)]
        video = (done[0]["metrics"].get("video") or {}) if done else {}
        name = video.get("name") or ",".join(f"{k}={v}" for k, v in members[0]["overrides"].items()
                                             if k not in columns and len(groups) > 1) or "clip"
        name = _safe(name)
        if name in used:
            name = f"{name}_{len(used)}"
        used.add(name)
        out.append({"name": name, "key": dict(key), "runs": members})
    return out


def _output_video(run: dict) -> Path | None:
    for name in OUTPUT_VIDEOS:
        path = Path(run["dir"]) / name
        if path.is_file():
            return path
    return None


def _reason(run: dict) -> str:
    """"failed: <reason>" of a job that did not finish (its `reason` from `stem.reporting.tables.collect_runs`),
    as the table's Not finished column says it."""
    return f"{run['status']}: {run.get('reason') or run.get('error') or 'no reason recorded'}"


def clip_columns(group: dict, columns: list[str]) -> dict:
    """What a clip's comparison shows: {"labels": [SOURCE, method names...], "frames": [(N, 3, H, W) in [0, 1] per
    label: the source, then each method's output or its tile], "missing": {label: why it is a tile}, "fps", "title",
    "frame_numbers" (1-based, of the source clip)}. The clip's frames (N, H, W) are those of its first finished job
    with videos; None frames (no such job) leave every column a tile of 1 frame at 64x64."""
    reference = None
    for run in group["runs"]:
        video = (run.get("metrics") or {}).get("video") or {}
        if run["status"] == "ok" and (Path(run["dir"]) / SOURCE_VIDEO).is_file() \
                and isinstance(video.get("width"), int):
            reference = run
            break
    if reference is not None:
        video = reference["metrics"]["video"]
        source_pair, _ = read_frames(Path(reference["dir"]) / SOURCE_VIDEO)
        width, height = int(video["width"]), int(video["height"])
        if source_pair.shape[2] != 2 * width or source_pair.shape[1] != height:
            raise TableError(f"comparison: {reference['dir']}/{SOURCE_VIDEO} is not input | output at {width}x{height}"
                             f" (it is {source_pair.shape[2]}x{source_pair.shape[1]})")
        source = from_uint8(source_pair[:, :, :width])
        n, fps = len(source), float(video.get("fps") or DEFAULT_FPS)
        numbers = video.get("frame_numbers") or list(range(1, n + 1))
        prompt, target = video.get("prompt"), reference["metrics"].get("edit_prompt")
        title = f"{group['name']}: {prompt!r}" + (f" -> {target!r}" if target else "")
    else:
        n, width, height, fps, numbers = 1, 64, 64, DEFAULT_FPS, [1]
        source, title = None, f"{group['name']}: no job of this clip finished"
    labels, frames, missing = [SOURCE], [], {}
    if source is None:
        missing[SOURCE] = "source not recorded: no job of this clip finished"
        frames.append(tile(missing[SOURCE], n, width, height))
    else:
        frames.append(source)
    for run in group["runs"]:
        label = " / ".join(paper_method(c, run["overrides"].get(c), run.get("metrics")) for c in columns) \
            or str(run["job"])
        if label in labels:
            label = f"{label} (job {run['job']})"
        labels.append(label)
        why, out = None, None
        if run["status"] != "ok":
            why = _reason(run)
        elif _output_video(run) is None:
            why = f"no output video ({' or '.join(OUTPUT_VIDEOS)}) in job {run['job']}'s folder"
        else:
            out = from_uint8(read_frames(_output_video(run))[0])
            if tuple(out.shape) != (n, 3, height, width):
                why = (f"other frames than the source: {out.shape[0]} frames {out.shape[3]}x{out.shape[2]} "
                       f"(source {n} frames {width}x{height})")
        if why is not None:
            missing[label] = why
            frames.append(tile(why, n, width, height))
        else:
            frames.append(out)
    return {"labels": labels, "frames": frames, "missing": missing, "fps": fps, "title": title,
            "frame_numbers": list(numbers)}


def side_by_side_video(labels: list[str], frames: list[torch.Tensor]) -> np.ndarray:
    """uint8 (N, band + H, len(labels) * W, 3): the columns left to right, each under a label band
    (`label_height(H)` pixels, white, the label in black)."""
    n, _, height, width = frames[0].shape
    band = label_height(height)
    parts = []
    for label, column in zip(labels, frames, strict=True):
        header = np.repeat(label_band(label, width, band)[None], n, axis=0)
        parts.append(np.concatenate([header, to_uint8(column)], axis=1))
    return np.concatenate(parts, axis=2)


def strip_figure(shown: dict, count: int = STRIP_FRAMES, caption: str = ""):
    """The frame strip of a clip (`clip_columns` output) as a matplotlib Figure (`stem.reporting.plots.grid_figure`):
    rows the source then each method (labels wrapped), columns `count` evenly spaced frames
    (`stem.data.video.evenly_spaced`) labelled "frame <1-based source number>"; the tiles' reasons in the caption."""
    from stem.reporting.plots import LABEL_WIDTH, grid_figure  # matplotlib only when a figure is asked for

    n = shown["frames"][0].shape[0]
    indices = [int(i) for i in evenly_spaced(n, min(int(count), n))]
    rows = {textwrap.fill(label, LABEL_WIDTH): column[indices]
            for label, column in zip(shown["labels"], shown["frames"], strict=True)}
    col_labels = [f"frame {shown['frame_numbers'][i]}" for i in indices]
    note = "" if not shown["missing"] else " Tiles: " + "; ".join(f"{k}: {v}" for k, v in shown["missing"].items())
    return grid_figure(rows, col_labels, title=shown["title"], caption=(caption + note).strip()), indices


def write_comparisons(runs: list[dict], sweep_dir: str | Path, columns: list[str], order: dict | None = None,
                      count: int = STRIP_FRAMES, caption: str = "") -> list[Path]:
    """For every clip of `runs` (`clip_groups`), into `<sweep dir>/comparison/`: `<clip>.mp4` (`side_by_side_video`),
    `<clip>_strip.png` (`strip_figure`, `caption` below) and `<clip>.json` (the columns' labels, the strip's 0-based
    frame indices and 1-based frame numbers, each tile's reason, the jobs shown); return the paths in clip order."""
    from stem.reporting.plots import save_png  # matplotlib only when a figure is asked for

    if not runs:
        raise TableError(f"no job folders in {sweep_dir}: nothing to compare")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise TableError(f"comparison: count={count!r} frames per strip row; give an integer >= 1")
    folder = Path(sweep_dir) / COMPARISON_DIR
    files = []
    for group in clip_groups(runs, list(columns), order):
        shown = clip_columns(group, list(columns))
        files.append(write_video(folder / f"{group['name']}.mp4", side_by_side_video(shown["labels"], shown["frames"]),
                                 shown["fps"]))
        fig, indices = strip_figure(shown, count, caption)
        files.append(save_png(fig, folder / f"{group['name']}_strip.png"))
        record = {"clip": group["name"], "title": shown["title"], "labels": shown["labels"],
                  "jobs": [None, *(r["job"] for r in group["runs"])], "missing": shown["missing"],
                  "strip_indices": indices, "strip_frame_numbers": [shown["frame_numbers"][i] for i in indices]}
        with atomic_file(folder / f"{group['name']}.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        files.append(folder / f"{group['name']}.json")
    return files

"""Figures people look at: curves (a sweep's metric against its setting, paper Fig. 3 and Tables
4/5; per-frame PSNR/SSIM, Fig. 4; feature similarity per inversion step, Fig. 9; a sweep's metric
against a measured value, e.g. PSNR against the mean K chosen), image grids (PCA of features, Fig. 6)
and the number of STEM bases per layer of a run (`bases_figure`).

    fig = curves_figure([Panel({"STEM (K=256)": [33.1, 32.9]}, x=[8, 16], ylabel="PSNR (dB)",
                               points={"paper": ([8, 16], [32.702, 33.279])})],
                        xlabel="frames", caption="model tiny, random weights: mechanics only")
    save_png(fig, "table4_length.png")      # or plot_curves(path, curves, ...) in one call

Matplotlib's object API without pyplot: no global figure state and no display backend, so it
runs on headless cluster nodes. Every PNG is written under a temporary name and renamed.
Axes never use an offset or scientific multiplier ("1e-5+7.8962"): a flat curve shows its
values as they are. A caption (how the numbers were made) is drawn in small print below the axes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from stem.core.atomic import atomic_file
from stem.core.errors import TableError
from stem.reporting.display import (
    clamp_note,
    clamped,
    display_column,
    display_value,
    layer_order,
    method_name,
    short_layer,
)

DPI = 120
CAPTION_FONTSIZE = 6
PAPER = "paper"  # legend entry of the paper's values
MEASURED = "measured"  # legend entry of a sweep's single curve (no other column to name it)
POINT_MARKERS = "osD^vPX"  # one-point curves (a sweep's point per run)
POINT_STYLE = {"linestyle": "none", "marker": "*", "markersize": 10, "color": "black", "zorder": 3}
MAX_TICKS = 20  # integer x values up to this many distinct: one tick at each (frames, K, sizes)
PLOT_KEYS = {"y", "x", "title", "xlabel", "ylabel", "paper_label"}


@dataclass
class Panel:
    """One axes of a curves figure.

    curves: {legend label: y values}; x: shared x values, {label: x values} per curve, or None
    (1..len); points: {legend label: (xs, ys)} reference values drawn as markers only (the paper's);
    levels: {legend label: y} values without an x, drawn as dashed horizontal lines (Fig. 3's DDIM row
    beside STEM's points over K).
    """

    curves: Mapping[str, Sequence[float]]
    x: Sequence[float] | Mapping[str, Sequence[float] | None] | None = None
    ylabel: str = ""
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    levels: Mapping[str, float | None] = field(default_factory=dict)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` as PNG, atomically (the bounding box grows to hold the caption)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def add_caption(fig: Figure, caption: str = "") -> None:
    """Draw `caption` in small print below everything else, wrapped to the figure's width."""
    if not caption:
        return
    width = max(40, int(fig.get_figwidth() * 72 / (CAPTION_FONTSIZE * 0.55)))  # characters per line
    text = "\n".join(textwrap.fill(line, width) or "" for line in str(caption).splitlines())
    fig.text(0.01, 0.0, text, fontsize=CAPTION_FONTSIZE, color="0.25", ha="left", va="top")


def _floats(values, what: str) -> list[float]:
    try:
        return [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: values must be numbers, got {list(values)[:5]}") from None


def _curve_x(panel: Panel, label: str, n: int) -> list[float]:
    xs = panel.x.get(label) if isinstance(panel.x, Mapping) else panel.x
    if xs is None:
        return list(range(1, n + 1))
    if len(xs) < n:
        raise ValueError(f"curve {label!r}: {n} values but only {len(xs)} x values")
    return _floats(list(xs)[:n], f"x of curve {label!r}")


def curves_figure(panels: Sequence[Panel], xlabel: str = "step", title: str = "", caption: str = "") -> Figure:
    """A figure of line plots, one axes per panel (stacked, sharing x), the caption below."""
    if not panels or any(not (p.curves or p.levels) or any(len(v) == 0 for v in p.curves.values()) for p in panels):
        raise ValueError(f"every curve needs at least one value, got "
                         f"{[{k: len(v) for k, v in p.curves.items()} for p in panels]}")
    fig = Figure(figsize=(6, 0.4 + 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        xs_all = []
        for i, (label, values) in enumerate(panel.curves.items()):
            xs = _curve_x(panel, label, len(values))
            xs_all += xs
            style = {"marker": "o" if len(values) <= 20 else None, "markersize": 3}
            if len(values) == 1:  # a point per run: hollow, each its own shape, so that equal points all show
                style = {"marker": POINT_MARKERS[i % len(POINT_MARKERS)], "markersize": 9, "markerfacecolor": "none"}
            ax.plot(xs, _floats(values, f"curve {label!r}"), label=label, **style)
        for i, (label, level) in enumerate(panel.levels.items()):
            if level is not None:
                ax.axhline(_floats([level], f"level {label!r}")[0], label=label, linestyle="--",
                           color=f"C{(len(panel.curves) + i) % 10}")
        for label, (pxs, pys) in panel.points.items():
            pxs = _floats(pxs, f"points {label!r}")
            xs_all += pxs
            ax.plot(pxs, _floats(pys, f"points {label!r}"), label=label, **POINT_STYLE)
        ticks = sorted({x for x in xs_all if math.isfinite(x)})
        if 0 < len(ticks) <= MAX_TICKS and all(x == int(x) for x in ticks):
            ax.set_xticks(ticks, [str(int(x)) for x in ticks])  # frame numbers, K, sizes: each one shown
        else:
            ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # never "1e-5+7.8962"
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel(xlabel)
    axes[0].set_title(title)
    add_caption(fig, caption)
    return fig


def plot_curves(path: str | Path, curves: Mapping[str, Sequence[float]], x=None, xlabel: str = "step",
                ylabel: str = "", title: str = "", caption: str = "", points=None) -> Path:
    """One line per entry of `curves` ({label: values}) against `x` (default 1..len; or {label: x}),
    `points` ({label: (xs, ys)}) as markers, `caption` in small print; saved as PNG."""
    fig = curves_figure([Panel(curves, x, ylabel, points or {})], xlabel, title, caption)
    return save_png(fig, path)


def grid_figure(rows: Mapping[str, torch.Tensor], col_labels: Sequence[str] | None = None, title: str = "",
                caption: str = "") -> Figure:
    """A grid of images: one row per entry of `rows` ({label: (F, 3, h, w) in [0, 1]}).

    Rows may differ in resolution (input frames beside feature maps); each image is shown at the
    same cell size with nearest-neighbour interpolation, so feature cells stay visible.
    """
    if not rows:
        raise ValueError("image grid: no rows to draw")
    cols = max(len(v) for v in rows.values())
    fig = Figure(figsize=(1.8 * cols + 0.6, 1.8 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image grid: row {label!r} must be (F, 3, h, w), got {tuple(images.shape)}")
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
                          interpolation="nearest")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and col_labels is not None and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    add_caption(fig, caption)
    return fig


def image_grid(path: str | Path, rows: Mapping[str, torch.Tensor], col_labels: Sequence[str] | None = None,
               title: str = "", caption: str = "") -> Path:
    """`grid_figure(rows, col_labels, title, caption)` saved as PNG."""
    try:
        fig = grid_figure(rows, col_labels, title, caption)
    except ValueError as e:
        raise ValueError(f"{Path(path).name}: {e}") from None
    return save_png(fig, path)


# ---- a sweep's figure (stem.reporting.tables.sweep_plot) ---------------------------------------------------
def _legend(run: dict, columns: Sequence[str]) -> str:
    """Display names of a run's column values ("STEM (K=256)"; an unnamed value as "Frames N=8"); a clamped K
    that no column names is added ("Frames N=8 (STEM K=256 clamped at 1 of 16 layers, mean K 244.0)")."""
    parts = []
    for column in columns:
        value = run["overrides"].get(column)
        shown = display_value(column, value, run.get("metrics"))
        parts.append(shown if shown != display_value("", value) else f"{display_column(column)}={shown}")
    note = clamp_note(run.get("metrics"))
    if parts and note is not None and not any(note in part for part in parts):
        parts[-1] += f" (STEM K={clamped(run['metrics'])['k']} {note})"
    return ", ".join(parts)


def _curve_name(runs: Sequence[dict], first: str) -> str:
    """Legend of a curve over the first column when no other column names it (Tables 4 and 5: "STEM (K=256)"):
    the method its runs share (`method_name`), with the x values at which K was clamped ("STEM (K=256), K
    clamped at Frames N=8"); MEASURED when the runs do not name one method."""
    names = {method_name(run.get("metrics"), note=False) for run in runs}
    if len(names) != 1 or None in names:
        return MEASURED
    label = names.pop()
    at = [display_value(first, run["overrides"].get(first)) for run in runs if clamp_note(run.get("metrics"))]
    return f"{label}, K clamped at {display_column(first)}={', '.join(at)}" if at else label


def _as_list(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise TableError(f"plot spec: {what} has {len(values)} entries for {n} y paths; give one per y")
    return values


def _number(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TableError(f"{what}: {value!r} is not a number") from None


def paper_points(paper: Mapping | None, label: str | None,
                 columns: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """The paper's values of metric `label` as {legend: (xs, ys)}, x the row key's first column value
    (Table 4's paper row "128" is drawn at 128, wherever the table prints it). Values may be numbers or
    numeric strings; one series per value of the other columns."""
    if not paper or not label:
        return {}
    series: dict[str, list[tuple[float, float]]] = {}
    for key, values in paper.items():
        if label not in (values or {}):
            continue
        key = str(key)
        first, *rest = key.split("/")
        x = _number(first, f"paper row {key!r}: x")
        y = _number(values[label], f"paper row {key!r}: {label}")
        run = {"overrides": dict(zip(columns[1:], rest)), "metrics": None}
        name = ", ".join([PAPER, _legend(run, columns[1:])]) if rest and columns[1:] else PAPER
        series.setdefault(name, []).append((x, y))
    return {name: ([x for x, _ in sorted(pts)], [y for _, y in sorted(pts)]) for name, pts in series.items()}


def sweep_figure(runs: list[dict], columns: list[str], spec: Mapping, caption: str = "",
                 paper: Mapping | None = None) -> Figure | None:
    """The figure of a sweep (`stem.reporting.tables.collect_runs`), None when no run finished.

    spec: {"y": dotted path into metrics.json, or a list of them (one panel each: Fig. 4's PSNR and
    SSIM), "x": dotted path of per-frame/per-step x values (e.g. video.frame_numbers), or of a number
    measured by each run (e.g. bases.inversion.mean_k), or null, "title", "xlabel", "ylabel" (one per
    y), "paper_label": the metric label of `paper` that y is (one per y)}.
    A list-valued y draws one curve per finished run, labelled with the display names of its column
    values (Figs. 4, 9); a number with a number x draws one point per finished run at (its x, its y),
    labelled the same way (ablation_adaptive_k: PSNR against the mean K each run chose; ablation_k: against
    each STEM run's K), a run without that x (the DDIM row beside STEM's K) as a dashed horizontal line at
    its y; a number without x draws one curve over the first column's values per value of the other
    columns (Tables 4 and 5), with the paper's values of `paper_label` as markers; with no other column the
    curve is named after the method its runs share ("STEM (K=256)", `_curve_name`).
    """
    from stem.reporting.display import lookup as _lookup
    from stem.reporting.display import sort_key as _sort_key

    unknown = sorted(set(spec) - PLOT_KEYS)
    if unknown:
        raise TableError(f"plot spec: unknown key(s) {unknown}; known: {sorted(PLOT_KEYS)}")
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return None
    ys = list(spec["y"]) if isinstance(spec["y"], (list, tuple)) else [spec["y"]]
    ylabels = _as_list(spec.get("ylabel", ys), len(ys), "ylabel")
    paper_labels = _as_list(spec.get("paper_label"), len(ys), "paper_label")
    x = spec.get("x")
    panels = []
    for y, ylabel, paper_label in zip(ys, ylabels, paper_labels):
        per_run = isinstance(_lookup(ok[0]["metrics"], y), list)  # per frame / per step: one curve per run
        if per_run or x:  # or a point per run at the x it measured
            curves, xs, levels = {}, {}, {}
            for run in ok:
                label = _legend(run, columns) or str(run["job"])
                value, at = _lookup(run["metrics"], y), _lookup(run["metrics"], x) if x else None
                if not per_run and at is None:  # a run without that setting (DDIM beside STEM's K): a level
                    levels[label] = value
                    continue
                curves[label], xs[label] = (value, at) if per_run else ([value], [at])
            panels.append(Panel(curves, xs, ylabel, levels=levels))
            continue
        first, rest = columns[0], columns[1:]
        curves, xs, members = {}, {}, {}
        for run in sorted(ok, key=lambda r: _sort_key(r["overrides"].get(first))):
            label = _legend(run, rest) or MEASURED
            curves.setdefault(label, []).append(_lookup(run["metrics"], y))
            xs.setdefault(label, []).append(run["overrides"].get(first))
            members.setdefault(label, []).append(run)
        if MEASURED in curves:  # no other column names the curve: the method its runs share (Table 4's legend)
            name = _curve_name(members[MEASURED], first)
            curves[name], xs[name] = curves.pop(MEASURED), xs.pop(MEASURED)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sum(xs.values(), []))
        points = paper_points(paper, paper_label, columns) if numeric else {}
        panels.append(Panel(curves, xs if numeric else None, ylabel, points))
    return curves_figure(panels, xlabel=spec.get("xlabel", x or (display_column(columns[0]) if columns else "")),
                         title=spec.get("title", ""), caption=caption)


# ---- a sweep's frames side by side (paper Fig. 3: reconstructions and edits per row) -------------
FRAMES_KEYS = {"videos", "count", "title"}
SOURCE_ROW = "source"
SOURCE_VIDEO = "comparison.mp4"  # run.py's input | output side by side: its left half is the input
LABEL_WIDTH = 24  # characters per line of a row label


def sweep_frames(runs: list[dict], columns: Sequence[str], spec: Mapping) -> dict | None:
    """The frames of a sweep's frame figure, from the job folders alone (None when no run finished):
    {"rows": {label: (count * len(videos), 3, h, w) in [0, 1]}, "col_labels", "indices", "skipped"}.

    spec: {"videos": names of each run's videos, e.g. [reconstruction, edited] (`<dir>/<name>.mp4`), "count":
    frames per video (default 4), "title"}. Frames: `count` evenly spaced 0-based indices of the clip
    (`stem.data.video.evenly_spaced`, first and last included), the same for every row. Rows: "source" (the input
    frames: the left half of the first run's comparison.mp4), then one per finished run in job order (the
    sweep's declared order), labelled with the display names of its column values (`_legend`); each row holds
    `count` frames of each of `videos`, left to right. Column labels name the video and the frame's number in
    the source clip (metrics.json's `video.frame_numbers`, 1-based). Runs of another clip than the first run's
    (name, frames, size), or without one of the videos, are left out and named in "skipped"."""
    from stem.data.video import evenly_spaced, from_uint8, read_frames_at

    unknown = sorted(set(spec) - FRAMES_KEYS)
    if unknown:
        raise TableError(f"frames spec: unknown key(s) {unknown}; known: {sorted(FRAMES_KEYS)}")
    videos = list(spec.get("videos") or [])
    count = int(spec.get("count", 4))
    if not videos or count < 1:
        raise TableError(f"frames spec: give videos (e.g. [reconstruction, edited]) and count >= 1, got {dict(spec)}")
    ok = [r for r in runs if r["status"] == "ok" and r.get("dir") is not None]
    if not ok:
        return None
    clip = ok[0]["metrics"].get("video") or {}
    shape = {k: clip.get(k) for k in ("name", "frames", "width", "height")}
    if not isinstance(shape["frames"], int) or not isinstance(shape["width"], int):
        raise TableError(f"frames figure: metrics.json of job {ok[0]['job']} records no video frames/width")
    indices = [int(i) for i in evenly_spaced(shape["frames"], min(count, shape["frames"]))]
    numbers = clip.get("frame_numbers") or [i + 1 for i in range(shape["frames"])]
    rows, skipped = {}, []
    for run in ok:
        video = run["metrics"].get("video") or {}
        files = [Path(run["dir"]) / f"{name}.mp4" for name in videos]
        if {k: video.get(k) for k in shape} != shape or not all(f.is_file() for f in files):
            skipped.append(run["job"])
            continue
        if not rows:
            source = from_uint8(read_frames_at(Path(run["dir"]) / SOURCE_VIDEO, indices))
            if source.shape[-1] != 2 * shape["width"]:
                raise TableError(f"frames figure: {run['dir']}/{SOURCE_VIDEO} is not input | output at width "
                                 f"{shape['width']} (its width is {source.shape[-1]})")
            rows[SOURCE_ROW] = source[..., : shape["width"]]
        label = _legend(run, columns) or str(run["job"])
        label = textwrap.fill(label if label not in rows else f"{label} (job {run['job']})", LABEL_WIDTH)
        rows[label] = torch.cat([from_uint8(read_frames_at(f, indices)) for f in files])
    col_labels = [f"{name}, frame {numbers[i]}" for name in videos for i in indices]
    return {"rows": rows, "col_labels": col_labels, "indices": indices, "skipped": skipped}


def sweep_frames_figure(runs: list[dict], columns: Sequence[str], spec: Mapping, caption: str = "") -> Figure | None:
    """`sweep_frames` as an image grid (`grid_figure`): rows = source + one per run, columns = `count` frames
    of each video; None when no run finished. Left-out runs are named in the caption."""
    frames = sweep_frames(runs, columns, spec)
    if frames is None or len(frames["rows"]) < 2:
        return None
    note = f" Left out (another clip or no {'/'.join(spec['videos'])}.mp4): jobs {frames['skipped']}." \
        if frames["skipped"] else ""
    return grid_figure(frames["rows"], frames["col_labels"], spec.get("title", ""), caption + note)


# ---- a run's bases per layer (metrics.json's "bases" section) ----------------------------------
BASES_PLOT = "bases_per_layer.png"
PHASE_STYLE = {"inversion": {"marker": "o", "linestyle": "-"}, "reconstruction": {"marker": "x", "linestyle": "--"}}


def _per_layer(record: dict, layers: list[str]) -> tuple[list[float], list[float], list[float]]:
    """(mean, min, max) of K over the choices of each of `layers` (nan where the record lacks a layer)."""
    stats = []
    for path in layers:
        ks = [float(k) for k in (record["layers"].get(path) or {}).get("k") or []]
        stats.append((sum(ks) / len(ks), min(ks), max(ks)) if ks else (math.nan,) * 3)
    return tuple(list(column) for column in zip(*stats))


def bases_figure(section: Mapping, title: str = "", caption: str = "") -> Figure:
    """K against layer (UNet order, short names "down0.0" ... "mid" ... "up3.2") for each phase of a run's
    bases section ({"inversion": record, "reconstruction": record}, records as `method.bases_report()`
    gives them; a phase that is None or absent is not drawn). One K per layer: a line per phase. Several
    (auto.when=every_step, one per step): the mean over steps with a min-max band, and below it one
    heatmap per such phase, K per layer (x) and step (y)."""
    phases = {phase: record for phase, record in section.items()
              if phase in PHASE_STYLE and isinstance(record, Mapping) and record.get("layers")}
    if not phases:
        raise ValueError(f"bases plot: no phase with layers in {sorted(section)}")
    layers = sorted({path for record in phases.values() for path in record["layers"]}, key=layer_order)
    names = [short_layer(path) for path in layers]
    stepped = [phase for phase, record in phases.items()
               if any(len(v.get("k") or []) > 1 for v in record["layers"].values())]
    fig = Figure(figsize=(max(6.0, 0.45 * len(layers) + 1.5), 3.6 + 2.6 * len(stepped)), layout="constrained")
    axes = fig.subplots(1 + len(stepped), 1, squeeze=False)[:, 0]
    ax, xs = axes[0], list(range(len(layers)))
    for phase, record in phases.items():
        mean, lo, hi = _per_layer(record, layers)
        stepwise = phase in stepped
        band = "; per layer: mean over steps, band min-max" if stepwise else ""
        label = f"{phase} (mean {record['mean_k']:.1f}{band})"
        line, = ax.plot(xs, mean, label=label, markersize=5, **PHASE_STYLE[phase])
        if stepwise:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    values = sorted({k for record in phases.values() for v in record["layers"].values() for k in v["k"]})
    ax.set_yscale("log", base=2)
    ticks = values if len(values) <= 12 else [2 ** e for e in range(int(math.log2(values[0])),
                                                                    int(math.log2(values[-1])) + 2)]
    ax.set_yticks(ticks, [str(int(t)) for t in ticks])  # the K values themselves, never 2^n labels
    ax.minorticks_off()
    ax.set_xticks(xs, names, rotation=90)
    ax.set_ylabel("K (number of bases)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, phase in zip(axes[1:], stepped):
        layers_k = [(phases[phase]["layers"].get(path) or {}).get("k") or [] for path in layers]
        steps = max(len(ks) for ks in layers_k)
        grid = [[float(ks[i]) if i < len(ks) else math.nan for ks in layers_k] for i in range(steps)]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", origin="lower",
                          norm=LogNorm(values[0], values[-1] if values[-1] > values[0] else values[0] * 2),
                          extent=(-0.5, len(layers) - 0.5, 0.5, steps + 0.5))
        bar = fig.colorbar(image, ax=ax, label="K")
        bar.set_ticks(ticks, labels=[str(int(t)) for t in ticks])
        bar.minorticks_off()
        ax.set_xticks(xs, names, rotation=90)
        ax.set_ylabel(f"{phase} step")
    add_caption(fig, caption)
    return fig


def plot_bases(path: str | Path, section: Mapping, title: str = "", caption: str = "") -> Path:
    """`bases_figure(section, title, caption)` saved as PNG."""
    return save_png(bases_figure(section, title, caption), path)

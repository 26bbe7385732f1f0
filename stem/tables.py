"""Result tables rebuilt from run directories, so W&B is never the only record.

A sweep folder (`python run.py -m ...`) holds one job folder per job, `<sweep dir>/<job num>/`,
each with Hydra's `.hydra/overrides.yaml` and, when the job finished, `metrics.json` (written
atomically at the very end: a job folder without it is a job that failed, or one still running).

    runs = collect_runs("outputs/reconstruct/multiruns/2024-06-01/12-00-00")
    table = sweep_table(runs, ["inversion"], DEFAULT_METRICS)
    print(to_markdown(table))

A table is a dict: `header` (column keys, then metric labels), `rows` (raw values: override
values parsed as YAML, metric values as floats, "failed" in every metric cell of a failed job)
and `formats` (None for a column, the format spec of each metric). Markdown formats metrics
with their spec (PSNR `.3f`, SSIM `.4f` by default, as the paper prints them); CSV keeps full precision.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from stem.atomic import atomic_file
from stem.errors import TableError

FAILED = "failed"
# (label, dotted path into metrics.json, format spec for markdown: the paper's 3 decimals for PSNR, 4 for SSIM)
# The default table shows those of these that at least one finished job has (metrics=recon|edit|all).
DEFAULT_METRICS = (
    ("PSNR", "vs_input.psnr", ".3f"),
    ("SSIM", "vs_input.ssim", ".4f"),
    ("PSNR vs VAE", "vs_vae.psnr", ".3f"),
    ("SSIM vs VAE", "vs_vae.ssim", ".4f"),
    ("CLIP score", "clip.clip_score", ".4f"),
    ("CLIP consistency", "clip.frame_consistency", ".4f"),
    ("Warp error x1e-3", "warp_error.warp_error", ".3f"),
    ("Warp flow", "warp_error.backend", ""),
    ("Feature similarity", "feature_similarity.mean", ".4f"),
)
DEFAULT_FORMAT = ".4g"  # for a metric given as (label, path) only


def parse_overrides(lines: list[str]) -> dict:
    """Hydra override strings ("a.b=1", "+c=x") -> {key: value}; values parsed as YAML, so
    numbers are numbers. A leading "+"/"++" (add) is dropped from the key."""
    out = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        key = key.lstrip("+")
        if not sep:  # "~key": a deletion has no value
            out[key] = None
            continue
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def _job_key(folder: Path):
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """One dict per job folder (a subfolder with `.hydra/`), sorted by job number:
    {"job", "dir", "overrides", "status": "ok" | "failed", "metrics": dict or None}."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise TableError(f"sweep folder not found: {sweep_dir}")
    runs = []
    for folder in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=_job_key):
        overrides_file = folder / ".hydra" / "overrides.yaml"
        try:
            lines = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
            metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else None
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise TableError(f"cannot parse a file in {folder}: {type(e).__name__}: {e}".replace("\n", " ")) from e
        runs.append({"job": int(folder.name) if folder.name.isdigit() else folder.name, "dir": folder,
                     "overrides": parse_overrides(lines or []), "status": "ok" if metrics is not None else FAILED,
                     "metrics": metrics})
    return runs


def varying_keys(runs: list[dict]) -> list[str]:
    """Override keys whose value differs between runs (absent counts as a value), in order of first
    appearance; all keys when none differs (a single run)."""
    keys = list(dict.fromkeys(k for run in runs for k in run["overrides"]))
    missing = object()
    varying = [k for k in keys if len({repr(run["overrides"].get(k, missing)) for run in runs}) > 1]
    return varying or keys


def _metric_spec(metric) -> tuple[str, str, str, float]:
    """(label, dotted path[, format[, scale]]) -> all four; scale multiplies numbers (e.g. 1/60: minutes)."""
    label, path, *rest = metric
    fmt = rest[0] if rest and rest[0] is not None else DEFAULT_FORMAT
    return label, path, fmt, float(rest[1]) if len(rest) > 1 else 1.0


def _value(metrics: dict, path: str, scale: float):
    value = _lookup(metrics, path)
    if scale != 1.0 and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * scale
    return value


def _lookup(metrics: dict, path: str):
    node = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node in ("inf", "-inf", "nan"):  # metrics.json keeps strict JSON by writing these as strings
        return float(node)
    return node


def _sort_key(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, "" if value is None else str(value))


def default_metrics(runs: list[dict]) -> list[tuple]:
    """The DEFAULT_METRICS that some finished job has (the first four when none finished)."""
    ok = [run["metrics"] for run in runs if run["status"] == "ok"]
    if not ok:
        return list(DEFAULT_METRICS[:4])
    return [m for m in DEFAULT_METRICS if any(_lookup(r, m[1]) is not None for r in ok)]


def sweep_table(runs: list[dict], columns: list[str], metrics=None, average_over=(), paper=None,
                ratio_to: str | None = None) -> dict:
    """Rows of `columns` (override keys) then `metrics` ((label, dotted path[, format[, scale]]) into
    metrics.json; None: `default_metrics(runs)`), sorted by the column values; a failed run is a
    row of "failed" cells.

    average_over: override keys (e.g. ["data"]) averaged out: one row per value of the other
        columns, each metric the mean over its runs, a "runs" column with their count, and
        "failed" cells when any of them failed (never a silently smaller average).
    paper: {row key: {metric label: value}} with row key the row's column values joined by "/"
        (e.g. "stem_k128"); adds a "<label> (paper)" column after the metrics for each label given.
    ratio_to: a row key (e.g. "ddim_1frame"): adds "<first metric> ratio", each row's first metric
        divided by that row's (paper Table 1's "x 1-frame").
    """
    specs = [_metric_spec(m) for m in (default_metrics(runs) if metrics is None else metrics)]
    for label, _, fmt, _ in specs:
        try:
            format(1.0, fmt)
        except ValueError:
            raise TableError(f"metric {label!r}: {fmt!r} is not a float format spec (e.g. .2f)") from None
    ok = [run["metrics"] for run in runs if run["status"] == "ok"]
    for label, path, _, _ in specs:
        if ok and all(_lookup(m, path) is None for m in ok):
            raise TableError(f"metric {label!r}: no metrics.json has {path!r} (top-level keys: {sorted(ok[0])})")
    columns = [c for c in columns if c not in average_over]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(repr(run["overrides"].get(c)) for c in columns)
        groups.setdefault(key if average_over else (run["job"],), []).append(run)
    rows = []
    for members in groups.values():
        cells = [members[0]["overrides"].get(c) for c in columns]
        cells += [_combine([_value(r["metrics"], path, scale) if r["status"] == "ok" else FAILED for r in members])
                  for _, path, _, scale in specs]
        if average_over:
            cells.append(len(members))
        rows.append((tuple(_sort_key(v) for v in cells[:len(columns)]), _sort_key(members[0]["job"]), cells))
    rows.sort(key=lambda r: r[:2])
    header = [*columns, *(label for label, _, _, _ in specs)] + (["runs"] if average_over else [])
    formats = [None] * len(columns) + [fmt for _, _, fmt, _ in specs] + ([None] if average_over else [])
    table = {"header": header, "rows": [r[2] for r in rows], "formats": formats}
    if ratio_to is not None:
        table = add_ratio_column(table, len(columns), ratio_to)
    return add_paper_columns(table, len(columns), paper) if paper else table


def add_ratio_column(table: dict, n_columns: int, ratio_to: str) -> dict:
    """Append "<first metric> ratio": each row's first metric over that of the row keyed `ratio_to`."""
    first = n_columns
    refs = [row[first] for row in table["rows"] if row_key(row, n_columns) == ratio_to]
    ref = refs[0] if refs and isinstance(refs[0], (int, float)) and refs[0] else None

    def ratio(value):
        return value / ref if ref is not None and isinstance(value, (int, float)) else FAILED if value == FAILED \
            else None

    return {"header": table["header"] + [f"{table['header'][first]} ratio"],
            "rows": [row + [ratio(row[first])] for row in table["rows"]], "formats": table["formats"] + [".2f"]}


def _combine(values: list):
    """One cell from the values of a row's runs: the value, the mean of numbers, or "failed"."""
    if len(values) == 1 or FAILED in values:
        return FAILED if FAILED in values else values[0]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    return values[0] if len({repr(v) for v in values}) == 1 else None


def row_key(cells: list, n_columns: int) -> str:
    """The key of a row in `paper` dicts: its column values joined by "/"."""
    return "/".join(_text(v) for v in cells[:n_columns])


def add_paper_columns(table: dict, n_columns: int, paper: dict) -> dict:
    """Append "<label> (paper)" columns with the paper's values of each row (blank where it has none)."""
    labels = [h for h in table["header"][n_columns:] if any(h in (v or {}) for v in paper.values())]
    unknown = sorted({lab for v in paper.values() for lab in (v or {})} - set(table["header"]))
    if unknown:
        raise TableError(f"paper values for {unknown}: not metric labels of the table ({table['header'][n_columns:]})")
    fmts = dict(zip(table["header"], table["formats"]))
    rows = [row + [(paper.get(row_key(row, n_columns)) or {}).get(lab) for lab in labels] for row in table["rows"]]
    return {"header": table["header"] + [f"{lab} (paper)" for lab in labels], "rows": rows,
            "formats": table["formats"] + [fmts[lab] for lab in labels]}


def sweep_plot(runs: list[dict], columns: list[str], spec: dict, path: str | Path, caption: str = "",
               paper: dict | None = None) -> Path | None:
    """The figure of a sweep as PNG (None when no run finished): `stem.plots.sweep_figure`.

    spec: {"y": dotted path or a list of them (one panel each), "x": dotted path (for per-step/per-frame
    lists) or null, "title", "xlabel", "ylabel", "paper_label": the label of `paper` that y is,
    "paper_x": {paper row key: x}}. A list-valued y draws one curve per finished run, labelled with
    the display names of its column values (paper Figs. 4, 9); a number draws one curve over the
    first column's values, one per value of the other columns (Fig. 3, Tables 4 and 5), with the
    paper's values (`paper`: {row key: {metric label: value}}) as markers. `caption` is drawn in
    small print below the axes.
    """
    from stem.plots import save_png, sweep_figure  # matplotlib only when a figure is asked for

    fig = sweep_figure(runs, columns, spec, caption=caption, paper=paper)
    return None if fig is None else save_png(fig, path)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell(value, fmt: str | None) -> str:
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return _text(value).replace("|", "\\|")


def to_markdown(table: dict) -> str:
    """A GitHub table; metric columns right-aligned and formatted with their spec."""
    lines = ["| " + " | ".join(table["header"]) + " |",
             "|" + "|".join("---:" if fmt else "---" for fmt in table["formats"]) + "|"]
    lines += ["| " + " | ".join(_cell(v, f) for v, f in zip(row, table["formats"])) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    """The same table as CSV, values at full precision ("inf" stays "inf")."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table["header"])
    writer.writerows([[_text(v) for v in row] for row in table["rows"]])
    return out.getvalue()


def write_tables(table: dict, directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<directory>/<name>.md` and `.csv` atomically; return both paths."""
    md, csv_path = Path(directory) / f"{name}.md", Path(directory) / f"{name}.csv"
    for path, text in ((md, to_markdown(table)), (csv_path, to_csv(table))):
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    return md, csv_path


def _runs(sweep_dir) -> list[dict]:
    runs = collect_runs(sweep_dir)
    if not runs:
        raise TableError(f"no job folders in {sweep_dir}: expected <job num>/.hydra/ from `python run.py -m ...`")
    return runs


def write_sweep_outputs(sweep_dir: str | Path, name: str = "table", columns: list[str] | None = None,
                        metrics=None, average_over=(), paper=None, plot: dict | None = None,
                        ratio_to: str | None = None) -> dict:
    """Build the table of `sweep_dir`, write `<name>.md`, `.csv` and, with a `plot` spec, `<name>.png`
    into it; return {"table", "markdown", "files"}."""
    runs = _runs(sweep_dir)
    columns = varying_keys(runs) if columns is None else list(columns)
    table = sweep_table(runs, columns, metrics, average_over, paper, ratio_to)
    files = list(write_tables(table, sweep_dir, name))
    if plot:
        png = sweep_plot(runs, [c for c in columns if c not in average_over], plot, Path(sweep_dir) / f"{name}.png")
        files += [png] if png else []
    return {"table": table, "markdown": to_markdown(table), "files": files}

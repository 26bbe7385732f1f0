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


def _metric_spec(metric) -> tuple[str, str, str]:
    label, path, *fmt = metric
    return label, path, fmt[0] if fmt else DEFAULT_FORMAT


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


def sweep_table(runs: list[dict], columns: list[str], metrics=None) -> dict:
    """Rows of `columns` (override keys) then `metrics` ((label, dotted path[, format]) into
    metrics.json; None: `default_metrics(runs)`), sorted by the column values; a failed run is a
    row of "failed" cells."""
    specs = [_metric_spec(m) for m in (default_metrics(runs) if metrics is None else metrics)]
    for label, _, fmt in specs:
        try:
            format(1.0, fmt)
        except ValueError:
            raise TableError(f"metric {label!r}: {fmt!r} is not a float format spec (e.g. .2f)") from None
    ok = [run["metrics"] for run in runs if run["status"] == "ok"]
    for label, path, _ in specs:
        if ok and all(_lookup(m, path) is None for m in ok):
            raise TableError(f"metric {label!r}: no metrics.json has {path!r} (top-level keys: {sorted(ok[0])})")
    rows = []
    for run in runs:
        cells = [run["overrides"].get(c) for c in columns]
        if run["status"] == "ok":
            cells += [_lookup(run["metrics"], path) for _, path, _ in specs]
        else:
            cells += [FAILED] * len(specs)
        rows.append((tuple(_sort_key(v) for v in cells[:len(columns)]), _sort_key(run["job"]), cells))
    rows.sort(key=lambda r: r[:2])
    return {"header": [*columns, *(label for label, _, _ in specs)], "rows": [r[2] for r in rows],
            "formats": [None] * len(columns) + [fmt for _, _, fmt in specs]}


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


def build_sweep_table(sweep_dir: str | Path, columns: list[str] | None = None, metrics=None) -> dict:
    """collect_runs + sweep_table; columns default to the override keys that vary between jobs."""
    runs = collect_runs(sweep_dir)
    if not runs:
        raise TableError(f"no job folders in {sweep_dir}: expected <job num>/.hydra/ from `python run.py -m ...`")
    return sweep_table(runs, varying_keys(runs) if columns is None else list(columns), metrics)


def write_sweep_tables(sweep_dir: str | Path, name: str = "table", columns: list[str] | None = None,
                       metrics=None) -> tuple[Path, Path]:
    """Build the table of `sweep_dir` and write `<sweep_dir>/<name>.md` and `.csv`; return both paths."""
    return write_tables(build_sweep_table(sweep_dir, columns, metrics), sweep_dir, name)

"""Result tables rebuilt from run directories, so W&B is never the only record.

A sweep folder (`python run.py -m ...`) holds one job folder per job, `<sweep dir>/<job num>/`,
each with Hydra's `.hydra/overrides.yaml`, run.py's `status.json` (`mark_job`) and, when the job
finished, `metrics.json` (written atomically at the very end). A job that did not finish is a row of
its status in every metric cell: "failed", "running", "missing" (never started) or "unreadable"
(`JOB_STATES`), and says why in one line in the table's last column, "Not finished" (`NOT_FINISHED`: the
failure's line that run.py wrote into status.json, e.g. "failed: editing.num_steps=0 ..."; a column only
tables with such a job have); one bad job never stops the table.

    runs = collect_runs("outputs/reconstruct/multiruns/2024-06-01/12-00-00")
    table = sweep_table(runs, ["inversion"], DEFAULT_METRICS)
    print(to_markdown(table))

A table is a dict: `header` (column keys, then metric labels: the CSV's header), `labels` (the
printed headers), `rows` (raw values: override values parsed as YAML, metric values as floats,
the job's status in every metric cell of a job that did not finish), `row_labels` (the printed column cells: the
paper's method names, K of STEM rows from each run, and a K that was clamped said so: "STEM (K=256, clamped at
1 of 16 layers, mean K 244.0)", or "8 (STEM K=256 clamped at ...)" where no column names the method) and
`formats` (None for a column, the format spec of each metric). Rows follow the paper's order (the sweep's
declared order), each paper value
sits right after its metric. Markdown formats metrics with their spec (PSNR `.3f`, SSIM `.4f` by
default, as the paper prints them) and paper values as the config writes them; CSV keeps full
precision. `write_sweep_outputs` adds the provenance caption (`stem.reporting.provenance`) and a sidecar JSON.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import socket
from pathlib import Path

import yaml

from stem.core.atomic import atomic_file, pid_alive
from stem.core.errors import TableError
from stem.reporting.display import lookup as _lookup
from stem.reporting.display import sort_key as _sort_key

FAILED = "failed"
RUNNING = "running"
MISSING = "missing"
UNREADABLE = "unreadable"
# a job's status and its cells in the table: "ok" (metrics.json read) or one of these
JOB_STATES = {
    FAILED: "a job folder without metrics.json whose run ended with an error or was killed (or has no status.json)",
    RUNNING: "a job folder without metrics.json whose status.json says running and whose process is alive "
             "(or runs on another host, where it cannot be checked)",
    MISSING: "an expected job of multirun.yaml without a folder: it never started",
    UNREADABLE: "a job whose metrics.json or .hydra/overrides.yaml cannot be parsed (e.g. truncated)",
}
JOB_STATUS = "status.json"  # written by run.py (`mark_job`)
JOB_LOG = "run.log"  # Hydra's job log: a failure's line when status.json has none (runs from before "reason")
NOT_FINISHED = "Not finished"  # the column that says why a row's job(s) did not finish
_LOG_ERROR = re.compile(r"\]\[ERROR\] - (.+)$")  # Hydra's job log format: [time][logger][LEVEL] - message
log = logging.getLogger(__name__)
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


def collect_runs(sweep_dir: str | Path, expected: list[list[str]] | None = None) -> list[dict]:
    """One dict per job, sorted by job number: {"job", "dir", "overrides", "status", "metrics": dict or
    None, "error": why a job is not "ok" (None when it is), "reason": the same in one short line for the
    table (the job's own failure line when it wrote one)}; see `JOB_STATES` for the statuses.

    Jobs are the subfolders with `.hydra/`, plus, with `expected` (the override list of each job of the
    sweep in job order, as Hydra's BasicSweeper numbers them: `scripts/make_tables.py` expands
    multirun.yaml), a "missing" row for each expected job that has no folder. One unreadable file is
    that job's "unreadable" row, never an error for the whole sweep."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise TableError(f"sweep folder not found: {sweep_dir}")
    runs = [_read_job(folder) for folder in sweep_dir.iterdir() if (folder / ".hydra").is_dir()]
    present = {run["job"] for run in runs}
    runs += [{"job": i, "dir": None, "overrides": parse_overrides(lines), "status": MISSING, "metrics": None,
              "error": "no job folder: the job never started", "reason": "the job never started"}
             for i, lines in enumerate(expected or []) if i not in present]
    runs.sort(key=lambda run: _job_key(Path(str(run["job"]))))
    for run in runs:
        if run["error"] is not None:
            log.warning("job %s: %s: %s", run["job"], run["status"], run["error"])
    return runs


def _read_job(folder: Path) -> dict:
    run = {"job": int(folder.name) if folder.name.isdigit() else folder.name, "dir": folder, "overrides": {},
           "status": "ok", "metrics": None, "error": None, "reason": None}
    for name, parse in ((".hydra/overrides.yaml", yaml.safe_load), ("metrics.json", json.loads)):
        path = folder / name
        try:
            value = parse(path.read_text()) if path.is_file() else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
            run["status"], run["error"] = UNREADABLE, f"cannot parse {path}: {type(e).__name__}: {e}".replace("\n", " ")
            run["reason"] = f"cannot parse {name} ({type(e).__name__})"
            return run
        if name == "metrics.json":
            run["metrics"] = value
        else:
            run["overrides"] = parse_overrides(value or [])
    if run["metrics"] is None:
        run["status"], run["error"] = _unfinished_state(folder)
        run["reason"] = _failure_line(folder) if run["status"] == FAILED else None
        run["reason"] = run["reason"] or run["error"]
        if run["reason"] != run["error"]:
            run["error"] += f": {run['reason']}"
    return run


def mark_job(run_dir: str | Path, state: str, reason: str | None = None) -> None:
    """Write `<run_dir>/status.json` atomically: {"state": "running" | "failed" | "done", "pid", "host"}, and
    with `reason` (one line: why the job failed, `stem.app.signals.failure_reason`) {"reason"}.
    run.py marks each job "running" at its start and "failed" or "done" at its end, so a table can
    tell a job still running from one that ended with an error (or was killed: see `_unfinished_state`),
    and say why in its row.

    A status that cannot be written (a full disk) is a warning, not an error: it must not replace the failure being
    reported, and the file keeps its previous state ("running" is then reported failed once the process is gone)."""
    record = {"state": state, "pid": os.getpid(), "host": socket.gethostname()}
    if reason is not None:
        record["reason"] = " ".join(str(reason).split())
    path = Path(run_dir) / JOB_STATUS
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record) + "\n")
    except OSError as e:
        log.warning("cannot mark the job %s in %s (%s): a table reports a job left 'running' as failed once its "
                    "process is gone", state, path, e.strerror or e)


def _unfinished_state(folder: Path) -> tuple[str, str]:
    """(status, reason) of a job folder without metrics.json, from its status.json (`mark_job`)."""
    try:
        record = json.loads((folder / JOB_STATUS).read_text())
    except (OSError, ValueError):  # no marker (a sweep from before markers, or killed before it): failed
        return FAILED, "no metrics.json"
    state = record.get("state") if isinstance(record, dict) else record
    if state != RUNNING:
        return FAILED, f"no metrics.json; {JOB_STATUS} says {state!r}"
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return FAILED, f"no metrics.json; its process {pid} is gone (killed)"
    return RUNNING, f"no metrics.json yet; process {pid} on {host} is running" + (
        "" if host == socket.gethostname() else " (another host: not checked)")


def _failure_line(folder: Path) -> str | None:
    """Why a failed job failed, in one line: status.json's "reason" (run.py writes the failure's line there),
    else the last ERROR line of its run.log (the same line, from runs before "reason"); None when neither
    says (a job killed by SIGKILL writes nothing)."""
    try:
        record = json.loads((folder / JOB_STATUS).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("reason"), str) and record["reason"].strip():
        return " ".join(record["reason"].split())
    try:
        lines = (folder / JOB_LOG).read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [m.group(1).strip() for m in map(_LOG_ERROR.search, lines) if m]
    return found[-1] if found else None


def not_finished(members: list[dict]) -> str:
    """The "Not finished" cell of a row: "" when all its jobs finished, else the first unfinished job's status and
    one-line reason ("failed: <reason>"), with how many of the row's jobs did not finish and which job (and clip)
    it was when the row averages several ("failed: <reason> (job 3, data=wolf; 2 of 4 jobs)")."""
    bad = [r for r in members if r["status"] != "ok"]
    if not bad:
        return ""
    first = bad[0]
    text = f"{first['status']}: {first.get('reason') or first.get('error') or 'no reason recorded'}"
    if len(members) > 1:
        where = ", ".join(f"{k}={v}" for k, v in first["overrides"].items()
                          if len({repr(r["overrides"].get(k)) for r in members}) > 1)
        text += f" (job {first['job']}{', ' + where if where else ''}; {len(bad)} of {len(members)} jobs)"
    return text


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


def default_metrics(runs: list[dict]) -> list[tuple]:
    """The DEFAULT_METRICS that some finished job has (the first four when none finished)."""
    ok = [run["metrics"] for run in runs if run["status"] == "ok"]
    if not ok:
        return list(DEFAULT_METRICS[:4])
    return [m for m in DEFAULT_METRICS if any(_lookup(r, m[1]) is not None for r in ok)]


def sweep_order(params) -> dict[str, list]:
    """{key: [values in the order the sweep lists them]} from `hydra.sweeper.params` ({"inversion":
    "ddim_1frame,stem", "data.n_frames": "8,16"}); a "+" is dropped from keys; sweeps written with
    Hydra's functions (range(), choice(), glob()) give no order."""
    order = {}
    for key, value in (params or {}).items():
        if isinstance(value, (list, tuple)):
            order[str(key).lstrip("+")] = list(value)
            continue
        text = str(value)
        if "(" in text:
            continue
        order[str(key).lstrip("+")] = [parse_overrides([f"v={v.strip()}"])["v"] for v in text.split(",")]
    return order


def _paper_number(row: str, label: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise TableError(f"paper value {value!r} of {row!r} / {label!r} is not a number; write the paper's "
                         "number as a string, as printed (e.g. \"0.29\")") from None


def paper_by_metric(paper: dict | None, written_for, metrics) -> dict:
    """`paper` ({row: {label: value}}, its labels those of the metrics `written_for`) re-keyed onto the
    labels of `metrics`, pairing by metric, not by label: a paper value goes beside the metric of
    `metrics` with the same dotted path (and scale) as the metric it was written for, under that
    metric's label, and nowhere else. So `PSNR=vs_vae.psnr` gets no paper column where the paper's
    PSNR is `vs_input.psnr`, `P=vs_input.psnr` gets it as "P (paper)", and the paper's values for
    metrics left out are dropped (a subset of the metrics is a valid table).
    Raises TableError for a paper label that is none of `written_for`'s."""
    written = {label: (path, scale) for label, path, _, scale in map(_metric_spec, written_for)}
    unknown = sorted({label for values in (paper or {}).values() for label in (values or {})} - set(written))
    if unknown:
        raise TableError(f"paper values for {unknown}: not metric labels of the table spec ({list(written)})")
    label_of: dict[tuple, str] = {}
    for label, path, _, scale in map(_metric_spec, metrics):
        label_of.setdefault((path, scale), label)
    return {row: {label_of[written[label]]: value for label, value in (values or {}).items()
                  if written[label] in label_of}
            for row, values in (paper or {}).items()}


def paper_numbers(paper: dict | None) -> dict:
    """The `paper` dict with every value a float ("0.80" -> 0.8), for plots and ratios."""
    return {str(row): {label: _paper_number(str(row), label, v) for label, v in (values or {}).items()
                       if v is not None} for row, values in (paper or {}).items()}


def _ranker(columns: list[str], order: dict | None, paper: dict | None):
    """Sort key of a row's column values: the sweep's declared order, then the order of the paper's
    row keys, then the rest (numbers by value, text alphabetically)."""
    declared = [[_text(v) for v in (order or {}).get(c, [])] for c in columns]
    keys = [str(k).split("/") for k in (paper or {})]
    in_paper = [list(dict.fromkeys(parts[i] for parts in keys if len(parts) == len(columns)))
                for i in range(len(columns))]

    def rank(cells: list) -> tuple:
        out = []
        for i, value in enumerate(cells):
            text = _text(value)
            if text in declared[i]:
                out.append((0, declared[i].index(text), (0, 0, "")))
            elif text in in_paper[i]:
                out.append((1, in_paper[i].index(text), (0, 0, "")))
            else:
                out.append((2, 0, _sort_key(value)))
        return tuple(out)

    return rank


def sweep_table(runs: list[dict], columns: list[str], metrics=None, average_over=(), paper=None,
                ratio_to: str | None = None, order: dict | None = None, paper_rows: dict | None = None) -> dict:
    """Rows of `columns` (override keys) then `metrics` ((label, dotted path[, format[, scale]]) into
    metrics.json; None: `default_metrics(runs)`); a run that did not finish is a row of its status
    ("failed", "running", "missing", "unreadable": `JOB_STATES`) in every metric cell.

    Rows come in the paper's order: `order` ({column: [values]}, the order the sweep declares, see
    `sweep_order`), then the order of the `paper` keys, then the remaining values (numbers by
    value, text alphabetically), then by job.

    average_over: override keys (e.g. ["data"]) averaged out: one row per value of the other
        columns, each metric the mean over its runs, a "runs" column with their count, and
        the status cells of the first that did not finish (never a silently smaller average).
    paper: {row key: {metric label: value}} with row key the row's column values joined by "/"
        (e.g. "stem_k128"); puts a "<label> (paper)" column right after each metric the paper has.
        A value written as a string ("0.29", "7.2") is printed as written, the paper's precision.
    ratio_to: a row key (e.g. "ddim_1frame"): adds "<first metric> ratio", each row's first metric
        divided by that row's (paper Table 1's "x 1-frame"), after the first metric (and its paper
        column), and "<first metric> ratio (paper)" from the paper's values when it has them.
    paper_rows: {row key: paper row key}: rows compared with a different row of the paper (Table 4:
        {"120": "128"}, the clip's 120 frames beside the paper's N=128); the markdown says so where the
        table has a paper column.

    A row with a job that did not finish gets, in a last column "Not finished" (`NOT_FINISHED`, only in tables
    with such a row), its one-line reason (`not_finished`: "failed: <the job's failure line>"), never a silent gap.

    The table: "header" (column keys and metric labels, the CSV's), "labels" (headers to print,
    `stem.reporting.display.display_column`), "rows" (raw values), "row_labels" (the column cells to print,
    `stem.reporting.display.display_value` with K from each run's metrics), "formats" (None for a column).
    """
    from stem.reporting.display import clamp_note, clamped, display_column, display_value

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
    paper = {str(k): dict(v or {}) for k, v in (paper or {}).items()}
    numbers = paper_numbers(paper)  # checks every value is a number
    unknown = sorted({lab for v in paper.values() for lab in v} - {label for label, _, _, _ in specs})
    if unknown:
        raise TableError(f"paper values for {unknown}: not metric labels of the table "
                         f"({[label for label, _, _, _ in specs]})")
    paper_rows = {str(k): str(v) for k, v in (paper_rows or {}).items()}
    columns = [c for c in columns if c not in average_over]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(repr(run["overrides"].get(c)) for c in columns)
        groups.setdefault(key if average_over else (run["job"],), []).append(run)
    rank = _ranker(columns, order, paper)
    built = []
    for members in groups.values():
        cells = [members[0]["overrides"].get(c) for c in columns]
        values = [_combine([_value(r["metrics"], path, scale) if r["status"] == "ok" else r["status"] for r in members])
                  for _, path, _, scale in specs]
        done = [r["metrics"] for r in members if r["status"] == "ok"] or [None]
        done.sort(key=lambda m: clamp_note(m) is None)  # names from a clamped run first: a row never hides it
        built.append((rank(cells), _sort_key(members[0]["job"]), cells, values, len(members), done[0],
                      not_finished(members)))
    built.sort(key=lambda r: r[:2])

    key_fmt = [None] * len(columns)
    header, labels, formats = list(columns), [display_column(c) for c in columns], list(key_fmt)
    getters = []  # one per non-key column: (row key, cells, metric values, runs) -> cell
    ratio_ref = None
    if ratio_to is not None and specs:
        refs = [b[3][0] for b in built if row_key(b[2], len(columns)) == str(ratio_to)]
        ratio_ref = refs[0] if refs and isinstance(refs[0], (int, float)) and refs[0] else None
    for i, (label, _, fmt, _) in enumerate(specs):
        header.append(label)
        labels.append(label)
        formats.append(fmt)
        getters.append(lambda key, vals, i=i: vals[i])
        if any(label in v for v in paper.values()):
            header.append(f"{label} (paper)")
            labels.append(f"{label} (paper)")
            formats.append("")  # strings print as written; numbers as Python writes them
            getters.append(lambda key, vals, label=label: paper.get(paper_rows.get(key, key), {}).get(label))
        if i == 0 and ratio_to is not None:
            header.append(f"{label} ratio")
            labels.append(f"{label} ratio")
            formats.append(".2f")
            getters.append(lambda key, vals: _ratio(vals[0], ratio_ref))
            ref_paper = numbers.get(str(ratio_to), {}).get(label)
            if ref_paper:
                header.append(f"{label} ratio (paper)")
                labels.append(f"{label} ratio (paper)")
                formats.append(".3f")  # exact for ratios of 2-decimal minutes over 0.80 (1.02 / 0.80 = 1.275)
                getters.append(lambda key, vals, label=label, ref=ref_paper:
                               _ratio(numbers.get(paper_rows.get(key, key), {}).get(label), ref))
    if average_over:
        header.append("runs")
        labels.append("runs")
        formats.append(None)
    reasons = any(b[6] for b in built)
    if reasons:  # why rows did not finish: a column only where some did not
        header.append(NOT_FINISHED)
        labels.append(NOT_FINISHED)
        formats.append(None)
    rows, row_labels = [], []
    for _, _, cells, values, n_runs, run_metrics, why in built:
        key = row_key(cells, len(columns))
        rows.append(cells + [get(key, values) for get in getters] + ([n_runs] if average_over else [])
                    + ([why] if reasons else []))
        shown = [display_value(c, v, run_metrics) for c, v in zip(columns, cells)]
        if shown and key in paper_rows and paper_rows[key] != key and any(h.endswith(" (paper)") for h in header):
            shown[-1] += f" (paper: {paper_rows[key]})"
        note = clamp_note(run_metrics)
        if shown and note is not None and not any(note in cell for cell in shown):  # e.g. Table 4's "8"
            shown[-1] += f" (STEM K={clamped(run_metrics)['k']} {note})"
        row_labels.append(shown)
    return {"header": header, "labels": labels, "rows": rows, "row_labels": row_labels, "formats": formats}


def _ratio(value, ref):
    if isinstance(value, str) and value in JOB_STATES:
        return value
    return value / ref if ref is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _combine(values: list):
    """One cell from the values of a row's runs: the value, the mean of numbers, or the status of the first
    run that did not finish ("failed", "running", "missing", "unreadable")."""
    bad = [v for v in values if isinstance(v, str) and v in JOB_STATES]
    if len(values) == 1 or bad:
        return bad[0] if bad else values[0]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    return values[0] if len({repr(v) for v in values}) == 1 else None


def row_key(cells: list, n_columns: int) -> str:
    """The key of a row in `paper` dicts: its column values joined by "/"."""
    return "/".join(_text(v) for v in cells[:n_columns])


def sweep_plot(runs: list[dict], columns: list[str], spec: dict, path: str | Path, caption: str = "",
               paper: dict | None = None) -> Path | None:
    """The figure of a sweep as PNG (None when no run finished): `stem.reporting.plots.sweep_figure`.

    spec: {"y": dotted path or a list of them (one panel each), "x": dotted path (for per-step/per-frame
    lists) or null, "title", "xlabel", "ylabel", "paper_label": the label of `paper` that y is}.
    A list-valued y draws one curve per finished run, labelled with
    the display names of its column values (paper Figs. 4, 9); a number draws one curve over the
    first column's values, one per value of the other columns (Fig. 3, Tables 4 and 5), with the
    paper's values (`paper`: {row key: {metric label: value}}) as markers. `caption` is drawn in
    small print below the axes (the sweep's provenance line, `stem.reporting.provenance`); `paper` values are
    floats (`paper_numbers`).
    """
    from stem.reporting.plots import save_png, sweep_figure  # matplotlib only when a figure is asked for

    fig = sweep_figure(runs, columns, spec, caption=caption, paper=paper)
    return None if fig is None else save_png(fig, path)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell(value, fmt: str | None) -> str:
    if fmt is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return _text(value).replace("|", "\\|")


def to_markdown(table: dict) -> str:
    """A GitHub table with the printed names (`labels`, `row_labels`) where the table has them;
    metric columns right-aligned and formatted with their spec, paper values as the paper prints them."""
    n = len(table.get("row_labels", [[]])[0]) if table.get("row_labels") else 0
    lines = ["| " + " | ".join(_cell(h, None) for h in table.get("labels", table["header"])) + " |",
             "|" + "|".join("---" if fmt is None else "---:" for fmt in table["formats"]) + "|"]
    for i, row in enumerate(table["rows"]):
        cells = [*table["row_labels"][i], *row[n:]] if n else row
        lines.append("| " + " | ".join(_cell(v, f) for v, f in zip(cells, table["formats"])) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    """The same table as CSV with config keys and metric labels as header, values at full precision
    ("inf" stays "inf"), paper values as written; the printed names are in the sidecar JSON."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table["header"])
    writer.writerows([[_text(v) for v in row] for row in table["rows"]])
    return out.getvalue()


def _write(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def write_tables(table: dict, directory: str | Path, name: str, provenance: dict | None = None) -> tuple[Path, ...]:
    """Write `<directory>/<name>.md` and `.csv` atomically, and with `provenance` (`stem.reporting.provenance`)
    its caption line above the markdown table and the sidecar `<name>.json`; return the paths."""
    directory = Path(directory)
    caption = f"Provenance: {provenance['caption']}\n\n" if provenance else ""
    paths = (_write(directory / f"{name}.md", caption + to_markdown(table)),
             _write(directory / f"{name}.csv", to_csv(table)))
    if provenance is not None:
        paths += (_write(directory / f"{name}.json", json.dumps(sidecar(table, provenance), indent=2) + "\n"),)
    return paths


def sidecar(table: dict, provenance: dict) -> dict:
    """What `<name>.json` holds: the provenance fields, and under "display" the printed header of
    each CSV column and the printed column cells of each row (CSV row order)."""
    return {**provenance, "display": {"columns": dict(zip(table["header"], table.get("labels", table["header"]))),
                                      "rows": table.get("row_labels", [])}}


def _runs(sweep_dir, expected=None) -> list[dict]:
    runs = collect_runs(sweep_dir, expected)
    if not runs:
        raise TableError(f"no job folders in {sweep_dir}: expected <job num>/.hydra/ from `python run.py -m ...`")
    return runs


def write_sweep_outputs(sweep_dir: str | Path, name: str = "table", columns: list[str] | None = None,
                        metrics=None, average_over=(), paper=None, plot: dict | None = None,
                        ratio_to: str | None = None, order: dict | None = None,
                        paper_rows: dict | None = None, expected: list[list[str]] | None = None,
                        frames: dict | None = None, comparison: dict | None = None) -> dict:
    """Build the table of `sweep_dir` (see `sweep_table`) and its provenance (`stem.reporting.provenance`),
    write `<name>.md` (caption line, then the table), `.csv`, the sidecar `<name>.json` and, with
    a `plot` spec, `<name>.png` into it; return {"table", "markdown" (the .md text), "files",
    "provenance" (a plain dict, "caption" its line), "runs" (`collect_runs`)}. `expected`: the override
    list of each job the sweep launches (see `collect_runs`), so that jobs that never started are rows
    and count in the caption's "N of M jobs finished". `frames`: a frame-figure spec
    (`stem.reporting.plots.sweep_frames`: {"videos": [reconstruction, edited], "count": 4, "title"})
    writes `<name>_frames.png`, the source and each run's videos side by side (paper Fig. 3). `comparison`
    ({"count": frames per strip row}, paper Figs. 5 and 11): for every clip, `comparison/<clip>.mp4`, `_strip.png`
    and `.json` (`stem.reporting.comparison.write_comparisons`, one column/row per value of the table's columns)."""
    from stem.reporting.provenance import sweep_provenance

    runs = _runs(sweep_dir, expected)
    columns = varying_keys(runs) if columns is None else list(columns)
    table = sweep_table(runs, columns, metrics, average_over, paper, ratio_to, order, paper_rows)
    provenance = sweep_provenance(runs, [c for c in columns if c not in average_over])
    files = list(write_tables(table, sweep_dir, name, provenance))
    if plot:
        png = sweep_plot(runs, [c for c in columns if c not in average_over], plot, Path(sweep_dir) / f"{name}.png",
                         caption=provenance["caption"], paper=paper_numbers(paper) if paper else None)
        files += [png] if png else []
    if frames:
        from stem.reporting.plots import save_png, sweep_frames_figure  # matplotlib only when a figure is asked for

        fig = sweep_frames_figure(runs, [c for c in columns if c not in average_over], frames,
                                  caption=provenance["caption"])
        files += [save_png(fig, Path(sweep_dir) / f"{name}_frames.png")] if fig is not None else []
    if comparison is not None:
        from stem.reporting.comparison import STRIP_FRAMES, write_comparisons

        unknown = sorted(set(comparison or {}) - {"count"})
        if unknown:
            raise TableError(f"comparison spec: unknown key(s) {unknown}; known: ['count']")
        files += write_comparisons(runs, sweep_dir, [c for c in columns if c not in average_over], order,
                                   count=(comparison or {}).get("count", STRIP_FRAMES), caption=provenance["caption"])
    return {"table": table, "markdown": files[0].read_text(), "files": files, "provenance": provenance, "runs": runs}

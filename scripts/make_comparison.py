"""Build the paper's comparison figures (Figs. 5 and 11) of a sweep from its job folders (nothing is rerun).

    python scripts/make_comparison.py outputs/table2_editing/multiruns/2024-06-01/12-00-00
    python scripts/make_comparison.py <sweep dir> --columns table2 --count 8 --wandb

For every clip of the sweep (the jobs that share every override but the method columns), writes into
`<sweep dir>/comparison/`: `<clip>.mp4`, the source and one column per method side by side, each under a
label with the paper's method name ("Tune-A-Video", ..., "Ours (STEM-TokenFlow)"); `<clip>_strip.png`, rows =
the source and each method, columns = `--count` evenly spaced frames (first and last included), labelled; and
`<clip>.json`, what each column shows. A method whose job failed (or is running, never started, wrote no video)
is a grey tile saying why ("failed: <reason>", the line run.py recorded in its status.json), never a missing
column. Method columns: `--columns`, else those of the sweep's table spec (multirun.yaml's
hydra.callbacks.sweep_table, without its average_over: `table2` for experiment=table2_editing), else every
override key that varies between jobs except data*; order: the sweep's declared order, then job order.
`experiment=table2_editing` writes the same at the end of the sweep and on `scripts/make_tables.py`.

`--wandb` logs them (videos, strips) and the sweep's table as its W&B summary run (as scripts/make_tables.py
--wandb; offline unless WANDB_MODE or the sweep's logger.mode say otherwise). Bad input (no job folders, a
missing folder): one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from make_tables import expected_jobs, sweep_spec  # the sibling script (its folder is sys.path[0])

from stem.core.errors import StemError, TableError
from stem.reporting.comparison import STRIP_FRAMES, write_comparisons
from stem.reporting.tables import collect_runs, varying_keys


def method_columns(runs: list[dict], spec: dict) -> list[str]:
    """The override keys that name a method: the table spec's columns without its average_over, else the keys
    that vary between jobs except data and data.* (the clips)."""
    if spec.get("columns"):
        return [c for c in spec["columns"] if c not in (spec.get("average_over") or [])]
    return [k for k in varying_keys(runs) if k != "data" and not k.startswith("data.")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the sweep folder (hydra.sweep.dir) holding <job num>/ folders")
    parser.add_argument("--columns", type=lambda s: [c for c in s.split(",") if c],
                        help="comma-separated override keys that name the methods (default: the sweep's table "
                             "columns without average_over, else the varying keys but data*)")
    parser.add_argument("--count", type=int, default=None,
                        help=f"frames per strip row, evenly spaced (default: the sweep's spec, else {STRIP_FRAMES})")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the figures and the table as the sweep's W&B summary run")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.sweep_dir, expected_jobs(args.sweep_dir))
        if not [r for r in runs if r["dir"] is not None]:
            raise TableError(f"no job folders in {args.sweep_dir}: expected <job num>/.hydra/ from "
                             "`python run.py -m ...`")
        spec = {"name": "table", **sweep_spec(args.sweep_dir)}
        columns = args.columns or method_columns(runs, spec)
        count = args.count if args.count is not None else (spec.get("comparison") or {}).get("count", STRIP_FRAMES)
        if args.wandb:
            from stem.app.callbacks import log_sweep_summary, read_sweep_config
            from stem.reporting.tables import write_sweep_outputs

            sweep_config = read_sweep_config(args.sweep_dir)  # first: bad input fails before any file is written
            spec["comparison"] = {"count": count}
            spec["columns"] = args.columns or spec.get("columns") or columns
            out = write_sweep_outputs(args.sweep_dir, **spec, expected=expected_jobs(args.sweep_dir))
            files = [f for f in out["files"] if "comparison" == f.parent.name]
            log_sweep_summary(args.sweep_dir, spec["name"], out, sweep_config)
        else:
            files = write_comparisons(runs, args.sweep_dir, columns, spec.get("order"), count=count)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        if run["status"] != "ok":
            print(f"job {run['job']}: {run['status']}: {run['reason']}", file=sys.stderr)
    print("\n".join(map(str, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

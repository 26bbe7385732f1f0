"""Rebuild a sweep's results table from its job folders (no W&B needed).

    python scripts/make_tables.py outputs/reconstruct/multiruns/2024-06-01/12-00-00
    python scripts/make_tables.py <sweep dir> --name table6 --columns inversion,inversion.num_bases \
        --metrics "PSNR=vs_input.psnr:.3f" "SSIM=vs_input.ssim:.4f" "Method=method"
    python scripts/make_tables.py <sweep dir> --metrics "PSNR vs VAE=vs_vae.psnr:.3f" --no-paper

Writes `<sweep dir>/<name>.md` (the provenance caption line, then the table), `.csv`, the
sidecar `<name>.json` (provenance fields and printed names), `<name>.png` when the sweep's
table spec has a plot, `<name>_frames.png` when it has frames (ablation_k) and the comparison figures
`comparison/<clip>.mp4`, `_strip.png` when it has a comparison (table2_editing; any sweep:
scripts/make_comparison.py); prints the markdown.
A sweep launched from an experiment file carries its
table spec (name, columns, metrics, averaging, the paper's values, plot) in
`<sweep dir>/multirun.yaml` under `hydra.callbacks.sweep_table`, and its declared sweep
(`hydra.sweeper.params`: the row order): both are used unless options here override them.
Otherwise columns default to the override keys that vary between jobs. With `--metrics`, the sweep's
paper values follow their metric, not its label (`stem.reporting.tables.paper_by_metric`): each sits beside
the metric with the dotted path it was written for (`vs_input.psnr` for the paper's PSNR), whatever
its label, and only there; any subset of metrics is accepted. `--no-paper` leaves the paper's
columns (and plot markers) out. The provenance comes
from the job folders (metrics.json, git.json, .hydra/config.yaml). Bad input: one line
`error: ...` on stderr and exit status 2.

After an interrupted sweep (a kill, a time limit, a crashed node) every job the sweep launches is a
row, and a job that did not finish shows its status in every metric cell; the caption's "N of M
jobs finished" counts all M expected jobs:
- `failed`: a job folder without metrics.json whose status.json (written by run.py) says it ended
  with an error, or says running while its process is gone on this host (kill -9); also a folder
  without status.json (a sweep from before it);
- `running`: status.json says running and its process is alive, or it runs on another host (a
  cluster node: cannot be checked from here, so a job killed there still reads `running`);
- `missing`: an expected job without a folder: it never started. The expected jobs are those
  Hydra's BasicSweeper launches, expanded here with Hydra's own parser from multirun.yaml
  (`hydra.sweeper.params`, then `hydra.overrides.task`), numbered in its order; a sweep with
  another sweeper (Optuna, ...) lists only the jobs that have a folder;
- `unreadable`: its metrics.json (or .hydra/overrides.yaml) cannot be parsed, e.g. truncated.
Each such job is also listed on stderr with the reason.

`--wandb` also logs the table as the sweep's W&B summary run (stem.app.callbacks.log_sweep_summary: job
type "summary", the jobs' group, the sweep's config from multirun.yaml and the table's provenance), e.g.
after a sweep in which a job failed (Hydra then skips the callback). W&B settings are the sweep's
`logger=wandb` ones from multirun.yaml (else project "stem"), offline unless WANDB_MODE or the
sweep's logger.mode says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stem.core.errors import StemError, TableError
from stem.reporting.tables import DEFAULT_METRICS, paper_by_metric, sweep_order, write_sweep_outputs

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

SPEC_KEYS = ("name", "columns", "metrics", "average_over", "paper", "plot", "ratio_to", "paper_rows", "frames",
             "comparison")


def sweep_spec(sweep_dir: str) -> dict:
    """The table spec the sweep was launched with (hydra.callbacks.sweep_table of multirun.yaml), if any."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf  # a script may use omegaconf; the stem library may not

    try:
        cfg = OmegaConf.load(path)
        node = OmegaConf.select(cfg, "hydra.callbacks.sweep_table")
        if node is None:
            return {}
        container = OmegaConf.to_container(node, resolve=True)
        spec = {k: container[k] for k in SPEC_KEYS if k in container}
    except Exception as e:  # an unresolvable or broken multirun.yaml
        raise TableError(f"cannot read the table spec of {path}: {type(e).__name__}: {e}".replace("\n", " ")) from e
    swept = OmegaConf.select(cfg, "hydra.sweeper.params")
    if spec.get("columns") is None and swept:
        spec["columns"] = [str(k).lstrip("+") for k in swept]
    if swept:  # rows in the order the sweep declares, as the callback orders them
        spec["order"] = sweep_order(OmegaConf.to_container(swept, resolve=True))
    return {k: v for k, v in spec.items() if v is not None}


def expected_jobs(sweep_dir: str) -> list[list[str]] | None:
    """The override list of each job the sweep launches, in job-number order, as Hydra's BasicSweeper
    expands them: `hydra.sweeper.params` ("key=values" each) then the command line's
    `hydra.overrides.task`, through its OverridesParser and `split_arguments` (the cartesian product,
    Hydra's own code, so every sweep syntax it takes is expanded exactly). None when multirun.yaml is
    absent, records no command line, or names another sweeper."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        task = OmegaConf.select(cfg, "hydra.overrides.task")
        if task is None or OmegaConf.select(cfg, "hydra.sweeper._target_", default=BASIC_SWEEPER) != BASIC_SWEEPER:
            return None
        params = OmegaConf.select(cfg, "hydra.sweeper.params")
        params = {} if params is None else OmegaConf.to_container(params, resolve=True)
        arguments = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in task]
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except Exception as e:  # a broken multirun.yaml or a sweep Hydra itself could not have launched
        raise TableError(f"cannot list the jobs of {path}: {type(e).__name__}: {e}".replace("\n", " ")) from e
    return [list(job) for batch in batches for job in batch]


def parse_metric(text: str) -> tuple[str, ...]:
    """"LABEL=dotted.path[:format]" -> (label, path[, format])."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=dotted.path[:format], e.g. PSNR=vs_input.psnr:.3f")
    path, sep, fmt = rest.partition(":")
    return (label, path, fmt) if sep else (label, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the sweep folder (hydra.sweep.dir) holding <job num>/ folders")
    parser.add_argument("--name", help="file name of the table, without suffix (default: the sweep's, else table)")
    parser.add_argument("--columns", type=lambda s: [c for c in s.split(",") if c],
                        help="comma-separated override keys (default: the keys that vary between jobs)")
    parser.add_argument("--metrics", nargs="+", type=parse_metric, metavar="LABEL=PATH[:FMT]",
                        help="metrics as dotted paths into metrics.json "
                             "(default: those of stem.reporting.tables.DEFAULT_METRICS that the runs have)")
    parser.add_argument("--no-paper", action="store_true",
                        help="leave out the paper's columns (and the plot's paper markers)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table as the sweep's W&B summary run (offline unless WANDB_MODE "
                             "or the sweep's logger.mode say otherwise)")
    args = parser.parse_args(argv)
    try:
        spec = {"name": "table", **sweep_spec(args.sweep_dir)}
        if args.metrics and spec.get("paper"):  # the paper's values follow their metric, not its label
            spec["paper"] = paper_by_metric(spec["paper"], spec.get("metrics") or DEFAULT_METRICS, args.metrics)
        if args.no_paper:
            spec.pop("paper", None)
        spec.update({k: v for k, v in (("name", args.name), ("columns", args.columns), ("metrics", args.metrics))
                     if v})
        if args.wandb:  # its config first: bad input fails before any file is written
            from stem.app.callbacks import log_sweep_summary, read_sweep_config

            sweep_config = read_sweep_config(args.sweep_dir)
        out = write_sweep_outputs(args.sweep_dir, **spec, expected=expected_jobs(args.sweep_dir))
        if args.wandb:
            log_sweep_summary(args.sweep_dir, spec["name"], out, sweep_config)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in out["runs"]:
        if run["status"] != "ok":
            print(f"job {run['job']}: {run['status']}: {run['error']}", file=sys.stderr)
    print(out["markdown"], end="")
    print(f"wrote {', '.join(map(str, out['files']))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rebuild a sweep's results table from its job folders (no W&B needed).

    python scripts/make_tables.py outputs/reconstruct/multiruns/2024-06-01/12-00-00
    python scripts/make_tables.py <sweep dir> --name table6 --columns inversion,inversion.num_bases \
        --metrics "PSNR=vs_input.psnr:.3f" "SSIM=vs_input.ssim:.4f" "Method=method"

Writes `<sweep dir>/<name>.md` (the provenance caption line, then the table), `.csv`, the
sidecar `<name>.json` (provenance fields and printed names), and `<name>.png` when the sweep's
table spec has a plot; prints the markdown. A sweep launched from an experiment file carries its
table spec (name, columns, metrics, averaging, the paper's values, plot) in
`<sweep dir>/multirun.yaml` under `hydra.callbacks.sweep_table`, and its declared sweep
(`hydra.sweeper.params`: the row order): both are used unless options here override them.
Otherwise columns default to the override keys that vary between jobs. The provenance comes
from the job folders (metrics.json, git.json, .hydra/config.yaml). Failed jobs are rows of
"failed". Bad input: one line `error: ...` on stderr and exit status 2.

`--wandb` also logs the table as the sweep's W&B summary run (callbacks.log_sweep_summary: job type
"summary", the jobs' group, the sweep's config from multirun.yaml and the table's provenance), e.g.
after a sweep in which a job failed (Hydra then skips the callback). W&B settings are the sweep's
`logger=wandb` ones from multirun.yaml (else project "stem"), offline unless WANDB_MODE or the
sweep's logger.mode says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stem.errors import StemError, TableError
from stem.tables import sweep_order, write_sweep_outputs

SPEC_KEYS = ("name", "columns", "metrics", "average_over", "paper", "plot", "ratio_to", "paper_rows")


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
                             "(default: those of stem.tables.DEFAULT_METRICS that the runs have)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table as the sweep's W&B summary run (offline unless WANDB_MODE "
                             "or the sweep's logger.mode say otherwise)")
    args = parser.parse_args(argv)
    try:
        spec = {"name": "table", **sweep_spec(args.sweep_dir)}
        spec.update({k: v for k, v in (("name", args.name), ("columns", args.columns), ("metrics", args.metrics))
                     if v})
        if args.wandb:  # its config first: bad input fails before any file is written
            from callbacks import log_sweep_summary, read_sweep_config  # run.py's neighbour (a top-level module)

            sweep_config = read_sweep_config(args.sweep_dir)
        out = write_sweep_outputs(args.sweep_dir, **spec)
        if args.wandb:
            log_sweep_summary(args.sweep_dir, spec["name"], out, sweep_config)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out["markdown"], end="")
    print(f"wrote {', '.join(map(str, out['files']))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

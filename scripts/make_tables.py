"""Rebuild a sweep's results table from its job folders (no W&B needed).

    python scripts/make_tables.py outputs/reconstruct/multiruns/2024-06-01/12-00-00
    python scripts/make_tables.py <sweep dir> --name table6 --columns inversion,inversion.num_bases \
        --metrics "PSNR=vs_input.psnr:.3f" "SSIM=vs_input.ssim:.4f" "Method=method"

Writes `<sweep dir>/<name>.md` and `.csv` and prints the markdown. Columns default to the
override keys that vary between jobs; failed jobs are rows of "failed". Bad input: one line
`error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from stem.errors import StemError
from stem.tables import build_sweep_table, to_markdown, write_tables


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
    parser.add_argument("--name", default="table", help="file name of the table, without suffix (default: table)")
    parser.add_argument("--columns", type=lambda s: [c for c in s.split(",") if c],
                        help="comma-separated override keys (default: the keys that vary between jobs)")
    parser.add_argument("--metrics", nargs="+", type=parse_metric, metavar="LABEL=PATH[:FMT]",
                        help="metrics as dotted paths into metrics.json "
                             "(default: those of stem.tables.DEFAULT_METRICS that the runs have)")
    args = parser.parse_args(argv)
    try:
        table = build_sweep_table(args.sweep_dir, args.columns, args.metrics or None)
        md, csv_path = write_tables(table, args.sweep_dir, args.name)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(table), end="")
    print(f"wrote {md} and {csv_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the user study of Table 3 from a Table 2 sweep: its pairs, their source videos and the manifest.

    python scripts/make_study.py outputs/table2_editing/multiruns/2024-06-01/12-00-00 study
    python scripts/make_study.py <run folder> <run folder> ... study     # run folders of single runs

Pairs are the same clip and target prompt edited by FateZero and STEM-FateZero, or by TokenFlow and
STEM-TokenFlow (finished jobs only, both sides present: stem.study.pairs). Writes `<out>/sources/<pair id>.mp4`
(the source frames both edits started from) and `<out>/manifest.json`, the only list of files a study server may
serve; prints one line per pair and per skipped group. Bad input (a missing folder, no pairs, two jobs of one
method on a clip and prompt): one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from stem.core.errors import StemError
from stem.study.pairs import MANIFEST, write_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="a Table 2 sweep folder (hydra.sweep.dir), or run folders")
    parser.add_argument("out", help="the study folder to write (manifest.json, sources/)")
    args = parser.parse_args(argv)
    try:
        manifest = write_study(args.sources, args.out)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for pair in manifest["pairs"]:
        print(f"{pair['id']}: {pair['clip']} -> {pair['prompt']!r}: {pair['comparison']}")
    for line in manifest["skipped"]:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"wrote {args.out}/{MANIFEST} ({len(manifest['pairs'])} pairs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

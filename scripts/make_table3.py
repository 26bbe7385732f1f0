"""Build Table 3 (the user study) from a study's answers database and its manifest.

    python scripts/make_table3.py study/answers.sqlite study/manifest.json study
    python scripts/make_table3.py study/answers.sqlite study/manifest.json study --wandb   # + a W&B run

Writes `<out dir>/table3.md` (a caption naming the sweep the videos came from, then the paper's layout: each
method's share of the answers per question with its 95% Wilson interval and choices/answers, the paper's value
beside it, the participants) and `<out dir>/table3.csv` (one row per comparison, method and question); prints the
markdown. `--wandb` also logs it as a W&B run (stem.app.study_table: the table in the paper's layout with
each cell's percent, Wilson interval, choices, answers, participants and the paper's value; the caption and
markdown and the numbers as its summary), under `<out dir>/wandb/`, project "stem" (`--project`), in the W&B
group of the Table 2 sweep the videos came from (`--group` to choose another), offline unless WANDB_MODE says
otherwise (`wandb sync <out dir>/wandb/offline-run-*` uploads it). The same as
`python run.py experiment=table3_user_study study.db=... study.manifest=... logger=wandb`. Bad input (a
missing or damaged database or manifest, a database of another manifest): one line `error: ...` on stderr and
exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys

from stem.core.errors import StemError
from stem.study.table3 import write_table3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", help="the study's answers (SQLite, stem.study.store)")
    parser.add_argument("manifest", help="the study's manifest.json (scripts/make_study.py)")
    parser.add_argument("out_dir", help="where table3.md and table3.csv go")
    parser.add_argument("--name", default="table3", help="file name of the table, without suffix")
    parser.add_argument("--wandb", action="store_true", help="also log the table as a W&B run (offline unless "
                        "WANDB_MODE says otherwise)")
    parser.add_argument("--project", default="stem", help="W&B project (with --wandb)")
    parser.add_argument("--group", default=None, help="W&B group (with --wandb; default: the Table 2 sweep's)")
    args = parser.parse_args(argv)
    try:
        out = write_table3(args.db, args.manifest, args.out_dir, args.name)   # bad input fails before any W&B run
        if args.wandb:
            from stem.app.study_table import log_table3

            log_table3(out, args.db, args.manifest, args.out_dir, project=args.project, group=args.group)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out["markdown"], end="")
    print(f"wrote {', '.join(map(str, out['files']))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

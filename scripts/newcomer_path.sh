#!/usr/bin/env bash
# A new user's path, end to end: clone, `make demo`, one paper experiment on the tiny setting, open its
# table and see its W&B runs. What it shows: the table's provenance caption (model, random weights,
# device, clip, steps, commit), the paper's layout (rows in the paper's order with K named, each paper
# value beside its metric) and the sweep's offline W&B runs, one group per sweep.
#
#   bash scripts/newcomer_path.sh [REPO] [WORKDIR] [EXTRA OVERRIDES...]
#
# REPO: what to clone (default: this checkout); WORKDIR: where (default: a new temporary folder).
# Extra overrides go to the experiment (tests/test_newcomer_path.py passes inversion.num_steps=2).
# Measured on a 2-core CPU (2026-12-01): 5 min 24 s in all, of which the venv and the install about 3.5 min,
# the demo about 40 s and the sweep (4 jobs, 50 steps) 47 s. Exits non-zero at the first step that fails.
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
work=${2:-$(mktemp -d)}
shift $(( $# < 2 ? $# : 2 ))

git clone -q "$repo" "$work/stem"
cd "$work/stem"
make demo
.venv/bin/python run.py -m experiment=table6_inversion model=tiny data=synthetic data.width=64 data.height=64 \
    data.n_frames=4 excess_bases=clamp logger=wandb progress=false "$@"
sweep=$(ls -d outputs/table6_inversion/multiruns/*/* | tail -n 1)
echo "== $work/stem/$sweep/table6_inversion.md"
cat "$sweep/table6_inversion.md"
echo "== W&B runs (offline; sync with: wandb sync $sweep/wandb $sweep/*/wandb)"
ls -d "$sweep"/wandb/offline-run-* "$sweep"/*/wandb/offline-run-*

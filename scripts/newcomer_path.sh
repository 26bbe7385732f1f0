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
# Costs a venv and the install (minutes), the demo (about a minute) and the sweep (about 2 minutes
# on 2 CPU cores at the default 50 steps). Exits non-zero at the first step that fails.
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

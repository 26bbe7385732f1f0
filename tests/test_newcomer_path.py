"""A new user's path (issue #12): one paper experiment on the tiny setting, typed as the README types it,
then its table and its W&B runs, read as a newcomer reads them.

The fast tests run the README's sweep in this checkout with 2 DDIM steps (one sweep, shared). The slow
one runs scripts/newcomer_path.sh: a fresh clone, `make demo`, the same sweep at the default 50 steps.
"""

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import read_wandb_records, run_cli
from test_sweep_mixed import refusal, the_fix

ROOT = Path(__file__).resolve().parents[1]
TABLE6 = yaml.safe_load((ROOT / "configs" / "experiment" / "table6_inversion.yaml").read_text())
SPEC = TABLE6["hydra"]["callbacks"]["sweep_table"]
ROWS = TABLE6["hydra"]["sweeper"]["params"]["inversion"].split(",")   # the paper's order
# the README's newcomer command (README.md, "A newcomer's path"), without the fix: the test takes the fix
# from the library's own error message
README_SWEEP = ["-m", "experiment=table6_inversion", "model=tiny", "data=synthetic", "data.width=64",
                "data.height=64", "data.n_frames=4", "logger=wandb"]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def the_sweep(outputs: Path) -> Path:
    """The one sweep folder under the default place, outputs/<task_name>/multiruns/<date>/<time>."""
    (sweep,) = (outputs / "table6_inversion" / "multiruns").glob("*/*")
    return sweep


def last_run_record(folder: Path):
    return [r.run for r in read_wandb_records(folder) if r.WhichOneof("record_type") == "run"][-1]


def check_what_a_newcomer_sees(sweep: Path, steps: int) -> None:
    """The table says how it was made and reads like the paper's; the W&B runs are one group."""
    lines = (sweep / "table6_inversion.md").read_text().splitlines()
    commit = json.loads((sweep / "0" / "git.json").read_text())["commit"]
    assert lines[0].startswith("Provenance: Model tiny (random weights: mechanics only), float32, on "), lines[0]
    for fact in ("synthetic_pan (4 frames, 64x64)", f"; {steps} DDIM steps;", f"commit {commit[:10]}",
                 "4 of 4 jobs finished"):
        assert fact in lines[0], (fact, lines[0])
    header = cells(lines[2])
    assert header[:5] == ["Inversion", "PSNR", "PSNR (paper)", "SSIM", "SSIM (paper)"], header
    body = [cells(line) for line in lines[4:]]
    stem_job = json.loads(next(p / "metrics.json" for p in sweep.iterdir()
                               if p.name.isdigit() and '"num_bases"' in (p / "metrics.json").read_text()).read_text())
    layers = stem_job["bases"]["inversion"]["layers"]   # the tiny UNet at 64x64 holds K=256 at no layer of 4 frames
    fewer = sum(1 for layer in layers.values() if min(layer["k"]) < 256)
    assert fewer > 0   # the newcomer's fix (excess_bases=clamp) acted, and the row says so
    mean_k = stem_job["bases"]["inversion"]["mean_k"]
    stem_label = f"STEM (K=256, clamped at {fewer} of {len(layers)} layers, mean K {mean_k:.1f})"
    assert [row[0] for row in body] == ["DDIM 1-frame", "DDIM 2-frame", "DDIM all-frame", stem_label]
    for row, key in zip(body, ROWS):
        assert (row[2], row[4]) == (SPEC["paper"][key]["PSNR"], SPEC["paper"][key]["SSIM"])  # as the paper prints
        assert math.isfinite(float(row[1])) and math.isfinite(float(row[3]))
    group = f"table6_inversion/{sweep.parent.name}/{sweep.name}"   # the sweep's <task_name>/<date>/<time>
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 4
    for job in jobs:
        record = last_run_record(job)
        assert record.run_group == group and record.job_type != "summary", (job, record.run_group)
    summary = last_run_record(sweep)
    assert (summary.run_group, summary.job_type) == (group, "summary")


@pytest.fixture(scope="module")
def readme_sweep(tmp_path_factory, tiny_model):
    """The README's newcomer sweep (2 DDIM steps) with the fix the STEM job's error names, from a new
    folder, as typed: no hydra.sweep.dir, no cache path."""
    cwd = tmp_path_factory.mktemp("newcomer")
    proc = run_cli(*README_SWEEP, "inversion.num_steps=2", "progress=false", the_fix(refusal(tiny_model.unet)),
                   cwd=cwd, env={"WANDB_SILENT": "true"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return the_sweep(cwd / "outputs")


def test_readme_command_is_the_documented_fix():
    """The README's command carries the fix this test takes from the error message. Catches: the README
    losing `excess_bases=clamp` (its sweep would fail for every newcomer) or spelling it another way."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## A newcomer's path"):].split("```")[1].replace("\\\n", " ")
    (line,) = [line.split("#")[0].split() for line in block.splitlines() if "experiment=table6_inversion" in line]
    assert line[:3] == ["python", "run.py", "-m"] and set(line[3:]) == {*README_SWEEP[1:], "excess_bases=clamp"}


def test_mixed_sweep_on_toy_sizes_fills_every_row_and_the_fix_reaches_stem_only(readme_sweep):
    """Every row and every metric cell filled (CSV and markdown), and the knob in the STEM job only.
    Catches: the fix not working in a sweep that mixes DDIM and STEM (named as `inversion.excess_bases`,
    or not read by the STEM preset), the knob leaking into DDIM jobs, a row of "failed"."""
    labels = [metric[0] for metric in SPEC["metrics"]]
    rows = list(csv.DictReader((readme_sweep / "table6_inversion.csv").open()))
    assert [row["inversion"] for row in rows] == ROWS
    for row in rows:
        assert all(math.isfinite(float(row[label])) for label in labels), row
    assert "failed" not in (readme_sweep / "table6_inversion.md").read_text()
    settings = {}
    for job in readme_sweep.iterdir():
        if (job / "metrics.json").is_file():
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            name = next(o.split("=", 1)[1] for o in overrides if o.startswith("inversion="))
            settings[name] = json.loads((job / "metrics.json").read_text())["inversion"].get("excess_bases")
    assert settings == {"ddim_1frame": None, "ddim_2frame": None, "ddim_allframe": None, "stem": "clamp"}


def test_the_table_and_wandb_runs_a_newcomer_opens(readme_sweep):
    """Caption, paper layout and one W&B group. Catches: a table without its provenance line or without
    the random-weights warning, rows in another order or under config names, a paper value away from
    its metric or reprinted at our precision, jobs and summary in different W&B groups."""
    check_what_a_newcomer_sees(readme_sweep, steps=2)


@pytest.mark.slow
def test_newcomer_path_from_a_fresh_clone(tmp_path):
    """scripts/newcomer_path.sh: clone this checkout (committed state), `make demo` (a venv and the
    install: minutes), the README's sweep at 50 steps, the table printed. Then the same checks."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "newcomer_path.sh"), str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    sweep = the_sweep(tmp_path / "stem" / "outputs")
    assert (sweep / "table6_inversion.md").read_text() in proc.stdout   # the script shows the table
    check_what_a_newcomer_sees(sweep, steps=50)

"""Experiment files run end to end on the tiny CPU setting and write their tables."""

import csv

import pytest
from conftest import run_cli


def sweep(tmp_path, experiment, *extra):
    proc = run_cli("-m", f"experiment={experiment}", "model=tiny", "data=synthetic", "progress=false",
                   f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *extra, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ablation_k_sweeps_three_bases_counts_into_one_table(tmp_path):
    sweep(tmp_path, "ablation_k", "inversion.num_steps=3")
    rows = list(csv.DictReader((tmp_path / "ablation_k.csv").open()))
    assert [int(r["inversion.num_bases"]) for r in rows] == [128, 256, 512]
    assert all(float(r["PSNR vs VAE"]) > 20 for r in rows)
    md = (tmp_path / "ablation_k.md").read_text()
    assert md.count("\n| 128 |") == md.count("\n| 256 |") == md.count("\n| 512 |") == 1
    for job in range(3):
        assert (tmp_path / str(job) / "metrics.json").is_file()


@pytest.mark.slow
def test_ablation_k_full_length_on_the_tiny_setting(tmp_path):
    sweep(tmp_path, "ablation_k")
    rows = list(csv.DictReader((tmp_path / "ablation_k.csv").open()))
    assert len(rows) == 3 and all(float(r["PSNR vs VAE"]) > 40 for r in rows)

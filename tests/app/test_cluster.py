"""Launcher presets: SLURM settings resolve from the machine's local config; a real 2-job sweep through
submitit's local executor (the same launcher code path) completes, aggregates, and shows failures."""

import json

import pytest
from conftest import FAST, ROOT, run_cli, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

TINY = [*FAST, "data.n_frames=2", "data.width=64", "data.height=64", "hydra/launcher=local_submitit"]


def hydra_config(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_preset_takes_partition_and_account_from_the_local_config():
    cfg = hydra_config("hydra/launcher=slurm", "+cluster.partition=gpu", "+cluster.account=proj",
                       "hydra.sweep.dir=/scratch/sweep", "experiment=table6_inversion")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["account"], launcher["gpus_per_node"]) == ("gpu", "proj", 1)
    assert launcher["name"] == "table6_inversion" and launcher["submitit_folder"] == "/scratch/sweep/.submitit/%j"
    bare = OmegaConf.to_container(hydra_config("hydra/launcher=slurm", "hydra.sweep.dir=/s").hydra.launcher,
                                  resolve=True)
    assert bare["partition"] is None and bare["account"] is None  # no local config: SLURM's defaults


def test_two_job_sweep_through_submitit_completes_and_aggregates(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "inversion=ddim_1frame,ddim_2frame", f"hydra.sweep.dir={sweep}",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [j["method"] for j in jobs] == ["ddim_1frame", "ddim_2frame_fatezero"]
    lines = (sweep / "debug.md").read_text().splitlines()
    assert lines[0].startswith("Provenance: Model tiny (random weights: mechanics only), ") and lines[1] == ""
    assert lines[4].startswith("| DDIM 1-frame | ") and lines[5].startswith("| DDIM 2-frame | ") and len(lines) == 6
    assert list((sweep / ".submitit").iterdir())  # the jobs really went through submitit


# slow (21 s): a failed job in a sweep stays in the default run through test_tables.py (basic launcher)
@pytest.mark.slow
def test_a_failed_submitit_job_leaves_the_other_and_shows_in_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "data.width=250,64", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}")
    assert proc.returncode != 0 and "width=250 is not a positive multiple of 8" in proc.stderr + proc.stdout
    assert (sweep / "1" / "metrics.json").is_file() and not (sweep / "0" / "metrics.json").exists()
    table = run_script("make_tables.py", sweep)
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("| 250 |")]
    assert row.startswith("| 250 | failed | failed | failed | failed | failed: ") and "width=250" in row  # and why

"""Launching frame-sharded jobs (issue #14): run.py under torchrun, the SLURM multi-GPU preset, submitit's
environment, and the checks every rank runs before any process group or model work.

The torchrun test runs `python -m torch.distributed.run --standalone --nproc-per-node=2 run.py` on the tiny
model (5 frames of 64x64: slices of 3 and 2 frames, 3 DDIM steps) and compares it with one process run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, compose_config, run_cli, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from safetensors.torch import load_file

from stem.app import job as app_job
from stem.app import launch as app_launch
from stem.core.errors import ConfigError

# STEM as configs/inversion/stem.yaml (global bases), K=8 for the tiny UNet (its mid block has 1 token per frame)
JOB = ["inversion=stem", "inversion.num_bases=8", "excess_bases=clamp", "inversion.num_steps=3", "data.n_frames=5",
       "data.width=64", "data.height=64"]


def torchrun(tmp_path: Path, *overrides: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=<nproc> run.py <overrides>` (one thread per rank), its temporary
    files under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path / "tmp")}
    env.pop("WANDB_MODE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(ROOT / "run.py"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_folders(log_dir: Path) -> list[Path]:
    return sorted(p.parent for p in log_dir.rglob(".hydra"))


def test_torchrun_two_ranks_equal_one_process_write_one_folder_and_a_reusable_cache_entry(tmp_path):
    """Two ranks through torchrun: one run folder (rank 1's Hydra output is a temporary folder, removed), whose
    inverted latents (the cache entry) equal one process's within 1e-5 under the same key, and whose metrics
    agree; a single-process TokenFlow edit then reuses that entry (cache hit: no second inversion).

    Mutations seen failing: rank_overrides leaving rank 1's command line as typed (two run folders, each
    resolving ${now:}); no removal of rank 1's temporary folder at exit (a leftover under TMPDIR); every rank
    sampling back from the first frames' z_T instead of its own slice; the reconstruction sampled back with
    1-frame attention on each slice instead of the global STEM bases (metrics differ)."""
    log_dir, cache = tmp_path / "outputs", tmp_path / "cache"
    proc = torchrun(tmp_path, *FAST, *JOB, "device=cpu", f"paths.log_dir={log_dir}", f"paths.cache_dir={cache}")
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    folders = run_folders(log_dir)
    assert len(folders) == 1, f"run folders: {folders}"
    assert not list((tmp_path / "tmp").glob(".stem-rank*")), "rank 1's temporary Hydra folder is left behind"
    sharded = json.loads((folders[0] / "metrics.json").read_text())
    assert sharded["distributed"]["world_size"] == 2 and sharded["distributed"]["frame_slices"] == [[0, 3], [3, 5]]
    assert len(sharded["distributed"]["inversion_peak_mib_per_rank"]) == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        single = app_job.run_job(compose_config(tmp_path / "single", *JOB), tmp_path / "single_run")
    finally:
        torch.set_num_threads(threads)
    assert single["inversion_cache"]["key"] == sharded["inversion_cache"]["key"]
    assert "distributed" not in single
    assert sharded["bases"] == single["bases"] and len(single["bases"]["inversion"]["layers"]) == 16  # K per layer
    got = load_file(Path(sharded["inversion_cache"]["path"]) / "tensors.safetensors")
    want = load_file(Path(single["inversion_cache"]["path"]) / "tensors.safetensors")
    assert got["latents"].shape == want["latents"].shape == (4, 5, 4, 8, 8)
    torch.testing.assert_close(got["latents"], want["latents"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["timesteps"], want["timesteps"])
    for ref in ("vs_input", "vs_vae", "vae_vs_input"):
        # PSNR = -10 log10(MSE): frames equal to ~1e-6 move the MSE of vs_vae (~5e-5) by ~1e-4 relative
        assert sharded[ref]["psnr_per_frame"] == pytest.approx(single[ref]["psnr_per_frame"], abs=2e-3), ref
        assert sharded[ref]["ssim_per_frame"] == pytest.approx(single[ref]["ssim_per_frame"], abs=1e-5), ref

    edit = app_job.run_job(compose_config(tmp_path, *JOB, "editing=tokenflow", "editing.prompt=a robot",
                                          "metrics=recon", "report_reconstruction=false"), tmp_path / "edit_run")
    assert edit["inversion_cache"] == {**sharded["inversion_cache"], "hit": True}


def _no_process_group(*args, **kwargs):
    raise AssertionError("the process group was started before the checks")


@pytest.mark.parametrize("overrides, message", [
    (["data.n_frames=1"], "world size 2 exceeds the 1 frames"),
    (["inversion=stem_official", "inversion.num_bases=8", "data.n_frames=5"], "EM groups of 8 frames would straddle"),
    (["editing=tokenflow", "editing.prompt=a robot", "metrics=recon"], r"editing \(TokenFlow\) runs on one process"),
    (["inversion=fatezero"], "runs on one process only"),
    (["metrics=features"], "feature similarity records the UNet of one process"),
])
def test_bad_sharded_setups_fail_on_every_rank_before_the_process_group(tmp_path, monkeypatch, overrides, message):
    """Rank 0 and rank 1 of a 2-process job raise the same ConfigError before any process group or model exists.

    Mutation seen failing: no `_check_sharded` call (editing reaches the process group; the world-size and
    straddling cases are still refused by the sharded memory check, which slices the video first)."""
    monkeypatch.setattr(app_job, "from_env", _no_process_group)
    monkeypatch.setattr("stem.diffusion.models.build_tiny", _no_process_group)
    for rank in (0, 1):
        environ = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
        with pytest.raises(ConfigError, match=message):
            app_job.run_job(compose_config(tmp_path, "data.width=64", "data.height=64", *overrides),
                        tmp_path / f"run{rank}", environ=environ)


def test_torchrun_bad_setup_is_one_error_line_per_rank(tmp_path):
    """torchrun with more ranks than frames: each rank ends with `error: ...` and status 2, no traceback of ours.

    Mutation seen failing: `_main` letting the ConfigError escape (a traceback, status 1)."""
    proc = torchrun(tmp_path, *FAST, "data.n_frames=1", "data.width=64", "data.height=64",
                    f"paths.log_dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("world size 2 exceeds the 1 frames" in line for line in errors), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout


def test_rank_overrides_give_ranks_above_0_a_temporary_output():
    """One process, or rank 0: the command line as typed. Rank 1: Hydra's run folder replaced by a temporary one
    (created now, removed at exit) without .hydra/, console logging of warnings; a sweep under torchrun refused.

    Mutations seen failing: rank 1 keeping a typed hydra.run.dir (both ranks write one folder, rank 1's
    .hydra/ overwriting rank 0's); -m accepted."""
    argv = ["inversion=stem", "hydra.run.dir=/x"]
    assert app_launch.rank_overrides(argv, {}) == argv
    assert app_launch.rank_overrides(argv, {"RANK": "0", "WORLD_SIZE": "2"}) == argv
    other = app_launch.rank_overrides(argv, {"RANK": "1", "WORLD_SIZE": "2"})
    assert other[0] == "inversion=stem" and "hydra.run.dir=/x" not in other
    tmp = Path(next(a for a in other if a.startswith("hydra.run.dir=")).split("=", 1)[1])
    assert tmp.is_dir() and "hydra.output_subdir=null" in other and "hydra/job_logging=stdout" in other
    shutil.rmtree(tmp)  # at exit otherwise
    with pytest.raises(ConfigError, match="a sweep"):
        app_launch.rank_overrides(["-m", "inversion=stem,stem_official"], {"RANK": "0", "WORLD_SIZE": "2"})


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
              "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_launch_environ_reads_torchrun_then_submitit(monkeypatch):
    """torchrun's variables win; else submitit's JobEnvironment of a several-task job (SLURM variables, parsed
    by submitit: the master is the first host of the node list, the port the configured one or one derived
    from the job id); a one-task submitit job or a plain process: {} (one process).

    Mutation seen failing: the submitit branch ignoring num_tasks (a 1-task job would start a process group)."""
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    assert app_launch.launch_environ({}, {**torchrun_env, "SUBMITIT_EXECUTOR": "slurm"}) == torchrun_env
    assert app_launch.launch_environ({}, {}) == {}
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    got = app_launch.launch_environ({"master_port": 12345}, dict(os.environ))
    assert got == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "12345"}
    derived = app_launch.launch_environ({"master_port": None}, dict(os.environ))["MASTER_PORT"]
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert app_launch.launch_environ({"master_port": None}, dict(os.environ))["MASTER_PORT"] == derived  # every task
    assert 20000 <= int(derived) < 40000
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert app_launch.launch_environ({}, dict(os.environ)) == {}


def test_slurm_multigpu_preset_runs_one_task_per_gpu():
    """hydra/launcher=slurm_multigpu: G tasks on G GPUs of one node (G = gpus_per_node, default 2; tasks follow
    it), SLURM killing the other tasks when one fails (srun's SLURM_KILL_BAD_EXIT), partition from the local
    config; the job config carries the distributed settings run.py reads.

    Mutations seen failing: tasks_per_node fixed at 1 (one process, no sharding); no SLURM_KILL_BAD_EXIT."""
    def launcher(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=slurm_multigpu", "hydra.sweep.dir=/s", *overrides],
                          return_hydra_config=True)
        return cfg, OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    cfg, conf = launcher("+cluster.partition=gpu")
    assert conf["_target_"].endswith("SlurmLauncher") and conf["partition"] == "gpu"
    assert conf["gpus_per_node"] == conf["tasks_per_node"] == 2 and conf["nodes"] == 1
    assert "export SLURM_KILL_BAD_EXIT=1" in conf["setup"]  # srun's --kill-on-bad-exit
    assert OmegaConf.to_container(cfg.distributed) == {"backend": "auto", "timeout_s": 600, "master_port": None}
    _, four = launcher("hydra.launcher.gpus_per_node=4")
    assert four["gpus_per_node"] == four["tasks_per_node"] == 4


def test_benchmark_nproc_reports_each_rank_and_the_collective_share(tmp_path):
    """scripts/benchmark_inversion.py --nproc 1,2 (tiny model, gloo): one row per method and process count, the
    frames of every rank, a peak per rank, and the share of time in collectives (~0 for one process, > 0 for two).

    Mutation seen failing: the ranks' Distributed not timed (share 0 with two processes)."""
    out = tmp_path / "table.md"
    proc = run_script("benchmark_inversion.py", "--model", "tiny", "--frames", 3, "--width", 32, "--height", 32,
                      "--steps", 1, "--repeats", 1, "--methods", "stem_k4", "--device", "cpu", "--nproc", "1,2",
                      "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["nproc"], r["frames_per_rank"]) for r in rows] == [(1, [3]), (2, [2, 1])]
    assert rows[0]["comm_share_per_rank"][0] < 1e-2  # identity calls only
    assert all(1e-2 < c < 1 for c in rows[1]["comm_share_per_rank"])  # the EM all-reduces of every STEM layer
    assert len(rows[1]["peak_mib_per_rank"]) == 2 and rows[1]["seconds"] > 0
    bad = run_script("benchmark_inversion.py", "--model", "tiny", "--frames", 2, "--nproc", "3", "--device", "cpu")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --nproc 3")


# slow (25 s): the multi-task path of hydra/launcher=slurm_multigpu through submitit's local executor
@pytest.mark.slow
def test_a_two_task_submitit_job_is_one_sharded_run_that_reuses_the_cache(tmp_path):
    """A sweep job with 2 submitit tasks (the launcher code path of slurm_multigpu, on this machine): run.py
    reads submitit's JobEnvironment and the 2 tasks join over gloo. The entry a single-process run wrote is a hit
    for the sharded job (rank 0 sends z_T and z_0 to the other rank), whose sampled-back frames then score as the
    single-process run's; one job folder, marked done by rank 0.

    Mutations seen failing: launch_environ without the submitit branch (each task a whole single-process run,
    no `distributed` section); rank 1 sampling back from rank 0's frames on a hit (metrics differ)."""
    single = app_job.run_job(compose_config(tmp_path, *JOB), tmp_path / "single_run")
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *FAST, *JOB, "device=cpu", "hydra/launcher=local_submitit", "hydra.launcher.tasks_per_node=2",
                   f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads((sweep / "0" / "metrics.json").read_text())
    assert job["distributed"]["world_size"] == 2 and job["distributed"]["frame_slices"] == [[0, 3], [3, 5]]
    assert job["inversion_cache"] == {**single["inversion_cache"], "hit": True}
    assert json.loads((sweep / "0" / "status.json").read_text())["state"] == "done"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    for ref in ("vs_input", "vs_vae", "vae_vs_input"):  # tolerances as in the torchrun test
        assert job[ref]["psnr_per_frame"] == pytest.approx(single[ref]["psnr_per_frame"], abs=2e-3), ref
        assert job[ref]["ssim_per_frame"] == pytest.approx(single[ref]["ssim_per_frame"], abs=1e-5), ref

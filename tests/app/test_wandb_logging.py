"""W&B runs of a sweep, read back from their offline .wandb files: the jobs and the summary run share
a group named after the sweep, jobs are named after their swept overrides and tagged with method and
data, the summary run carries the sweep's config and the table's provenance, and
`scripts/make_tables.py --wandb` logs a rebuilt table (a failed job included) as that summary run."""

import json

import pytest
import yaml
from conftest import FAST, compose_config, read_wandb_records, run_cli, run_script
from omegaconf import OmegaConf

from stem.core.errors import StemError

# 2 frames of 64x64, 2 DDIM steps, inversion only (no sampling back, no video, no metrics: half the time of a
# reconstruction): the smallest sweep that runs the tiny model through run_job with W&B on
TINY = [*FAST, "model=tiny", "data=synthetic", "data.n_frames=2", "data.width=64", "data.height=64",
        "inversion.num_steps=2", "reconstruct=false", "metrics.reconstruction=false", "logger=wandb"]


def run_record(folder):
    """The last state of the one W&B run under `folder` (tags are added after init: later records win)."""
    runs = [r.run for r in read_wandb_records(folder) if r.WhichOneof("record_type") == "run"]
    return runs[-1]


def run_config(record) -> dict:
    return {item.key: json.loads(item.value_json) for item in record.config.update}


def logged_table(folder, name):
    """The W&B table `name` logged by the run under `folder` (its table file), and its history entry."""
    records = read_wandb_records(folder)
    logged = {tuple(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for i in r.history.item if i.nested_key}
    (run_dir,) = folder.glob("wandb/offline-run-*")
    return json.loads((run_dir / "files" / logged[(name, "path")]).read_text()), logged


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One 2-job sweep with logger=wandb, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("wandb_sweep")
    folder = root / "sweep"
    proc = run_cli("-m", *TINY, "inversion=ddim_1frame,ddim_2frame", f"hydra.sweep.dir={folder}",
                   f"paths.cache_dir={root / 'cache'}", env={"WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_jobs_of_a_sweep_share_its_group_are_named_after_their_swept_overrides_and_tagged(sweep):
    """Catches: jobs left ungrouped (group not passed to the logger), a group per job (named after the job
    folder), names from all the overrides (model=tiny,...,inversion=...) or compared verbatim with the
    command line (Hydra re-spells `progress=false` as `progress=False` in a job), tags not added."""
    group = f"debug/{sweep.parent.name}/sweep"  # <task_name>/<parent folder>/<sweep folder>
    for job, override in enumerate(["inversion=ddim_1frame", "inversion=ddim_2frame"]):
        record = run_record(sweep / str(job))
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert (record.run_group, record.display_name) == (group, override)
        assert list(record.tags) == [metrics["method"], metrics["video"]["name"]]  # e.g. ddim_1frame, synthetic_pan


def test_summary_run_is_in_the_jobs_group_with_the_sweeps_config_and_provenance(sweep):
    """Catches: the summary run outside the jobs' group, no config or provenance on it, Hydra's own node
    logged, ${hydra:runtime.cwd} left unresolved (Hydra resets its job config before the callback)."""
    from stem.reporting.tables import write_sweep_outputs

    record = run_record(sweep)
    assert (record.job_type, record.display_name) == ("summary", "debug-summary")
    assert record.run_group == run_record(sweep / "0").run_group
    config = run_config(record)
    expected = write_sweep_outputs(sweep, "check").get("provenance", {})
    assert config["provenance"] == expected
    assert "hydra" not in config and config["task_name"] == "debug"
    assert (config["data"]["width"], config["inversion"]["num_steps"], config["model"]["_target_"]) == (
        64, 2, "stem.diffusion.models.build_tiny")
    assert config["sweep_overrides"][-2:] == ["inversion=ddim_1frame,ddim_2frame", f"paths.cache_dir={sweep.parent}"
                                              "/cache"]
    assert config["sweep_dir"] == str(sweep) and "${" not in json.dumps(config)


def fake_sweep(root, logger=None):
    """A sweep folder as `python run.py -m inversion=ddim_1frame,stem` leaves it when the second job failed
    (no metrics.json): Hydra then never calls the callback. No model is run."""
    folder = root / "sweep"
    logger = logger or {"_target_": "stem.app.loggers.WandbLogger", "project": "stem", "entity": None,
                        "mode": "offline", "group": None, "tags": ["rebuilt"]}
    multirun = {"task_name": "reconstruct", "seed": 0, "logger": logger,
                "paths": {"root_dir": "${hydra:runtime.cwd}", "log_dir": "${paths.root_dir}/outputs"},
                "hydra": {"runtime": {"cwd": "/home/me/stem"}, "sweep": {"dir": "${now:%H-%M-%S}"},
                          "overrides": {"task": ["logger=wandb", "inversion=ddim_1frame,stem"]}}}
    folder.mkdir()
    (folder / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    for job, inversion in enumerate(["ddim_1frame", "stem"]):
        (folder / str(job) / ".hydra").mkdir(parents=True)
        (folder / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"inversion={inversion}"]))
    scores = {"psnr": 30.0, "ssim": 0.9, "psnr_per_frame": [30.0], "ssim_per_frame": [0.9]}
    (folder / "0" / "metrics.json").write_text(json.dumps({
        "vs_input": scores, "vs_vae": scores, "method": "ddim_1frame", "model": "tiny-seed0", "device": "cpu",
        "dtype": "torch.float32", "video": {"name": "synthetic_pan", "frames": 2, "width": 64, "height": 64},
        "inversion": {"method": "ddim", "context": "1frame", "num_steps": 2}}))
    return folder


def test_make_tables_wandb_logs_a_sweep_with_a_failed_job_as_its_summary_run(tmp_path, monkeypatch):
    """Catches: --wandb ignored, the summary outside the jobs' group, the sweep's logger settings (tags)
    not read from multirun.yaml, ${hydra:...} left unresolved outside Hydra, the failed job dropped."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = fake_sweep(tmp_path)
    proc = run_script("make_tables.py", folder, "--wandb")
    assert proc.returncode == 0, proc.stderr
    record = run_record(folder)
    assert (record.job_type, record.display_name, list(record.tags)) == ("summary", "table-summary", ["rebuilt"])
    assert record.run_group == f"reconstruct/{tmp_path.name}/sweep"
    config = run_config(record)
    assert "provenance" in config and config["sweep_overrides"] == ["logger=wandb", "inversion=ddim_1frame,stem"]
    assert config["paths"] == {"root_dir": "/home/me/stem", "log_dir": "/home/me/stem/outputs"}
    data, logged = logged_table(folder, "table")
    assert logged[("table", "nrows")] == 2
    ok, failed = data["data"]
    assert data["columns"][-1] == "Not finished" and ok[-1] == "" and failed[-1].startswith("failed: ")  # why
    metric_cells = range(1, len(data["columns"]) - 1)
    assert all(failed[i] == "failed" for i in metric_cells) and not any(ok[i] == "failed" for i in metric_cells)


def test_make_tables_wandb_follows_wandb_mode_and_rejects_a_folder_without_multirun_yaml(tmp_path, monkeypatch):
    """Catches: the sweep's mode (offline) winning over WANDB_MODE=disabled, a missing multirun.yaml as a
    traceback (or a table written before the error)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder = fake_sweep(tmp_path)
    proc = run_script("make_tables.py", folder, "--wandb")
    assert proc.returncode == 0, proc.stderr
    assert (folder / "table.md").is_file() and not (folder / "wandb").exists()
    (folder / "multirun.yaml").unlink()
    (folder / "table.md").unlink()
    proc = run_script("make_tables.py", folder, "--wandb")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: no multirun.yaml in {folder}: the W&B summary needs the config the sweep was launched with; "
        "pass the folder `python run.py -m ...` wrote (hydra.sweep.dir)"]
    assert not (folder / "table.md").exists()


def test_explicit_logger_group_and_name_win_and_the_method_is_tagged_before_the_data_fails(tmp_path, monkeypatch):
    """Catches: the sweep's group/name overriding logger.group/logger.name given on the command line,
    tags added only after the whole job was built (a job whose video is missing would have none).
    No model is built: the data fails first."""
    from stem.app.job import run_job

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config(tmp_path, "logger=wandb", "logger.group=mine", "logger.name=first-try", "logger.tags=[x]",
                         "data=video", "data.path=/nonexistent/clip.mp4", "data.prompt=x")
    with pytest.raises(StemError):
        run_job(cfg, tmp_path / "run", {"group": "debug/sweep", "name": "inversion=ddim_1frame"})
    record = run_record(tmp_path / "run")
    assert (record.run_group, record.display_name, list(record.tags)) == ("mine", "first-try", ["x", "ddim_1frame"])


def test_single_run_is_named_after_its_overrides_without_paths_and_logger(tmp_path):
    """Catches: paths.*/logger overrides in names, a single run put in a sweep group, no name without overrides."""
    from hydra.core.hydra_config import HydraConfig

    from stem.app.job import job_tracking

    cfg = compose_config(tmp_path, "logger=wandb", "inversion=stem")
    assert job_tracking(cfg, HydraConfig.get()) == {"name": "debug=fast,progress=false,device=cpu,inversion=stem"}
    cfg = compose_config(tmp_path, fast=False)
    no_overrides = OmegaConf.create({"mode": None, "overrides": {"task": [f"paths.cache_dir={tmp_path}"]}})
    assert job_tracking(cfg, no_overrides) == {"name": "reconstruct"}

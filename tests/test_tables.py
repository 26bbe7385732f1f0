"""Sweep tables: stem.tables on hand-written sweep folders, scripts/make_tables.py, and the
Hydra callback at the end of real multiruns (`python run.py -m ...`), with and without W&B."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import FAST, ROOT, read_wandb_records, run_cli
from omegaconf import OmegaConf

from stem.errors import TableError
from stem.tables import (
    DEFAULT_METRICS,
    collect_runs,
    sweep_table,
    to_csv,
    to_markdown,
    varying_keys,
    write_sweep_outputs,
)


def metrics(psnr, ssim, vae_psnr, vae_ssim):
    return {"vs_input": {"psnr": psnr, "ssim": ssim, "psnr_per_frame": [psnr], "ssim_per_frame": [ssim]},
            "vs_vae": {"psnr": vae_psnr, "ssim": vae_ssim, "psnr_per_frame": [vae_psnr], "ssim_per_frame": [vae_ssim]},
            "method": "stem", "seconds": {"inversion": 1.5}}


# job -> (overrides, metrics.json or None for a failed job); job 10 sorts after 2 (numbers, not names)
JOBS = {
    0: (["debug=fast", "inversion=stem", "inversion.num_bases=256", "progress=False"],
        metrics(24.12345, 0.813749, 41.0, 0.99876)),
    1: (["debug=fast", "inversion=stem", "inversion.num_bases=64", "progress=False"], metrics("inf", 1.0, "inf", 1.0)),
    2: (["debug=fast", "inversion=stem", "inversion.num_bases=128", "progress=False"], None),
    10: (["debug=fast", "inversion=ddim_1frame", "progress=False"], metrics(22.5, 0.75, 30.0, 0.9)),
}

MARKDOWN = """\
| inversion | inversion.num_bases | PSNR | SSIM | PSNR vs VAE | SSIM vs VAE |
|---|---|---:|---:|---:|---:|
| ddim_1frame |  | 22.500 | 0.7500 | 30.000 | 0.9000 |
| stem | 64 | inf | 1.0000 | inf | 1.0000 |
| stem | 128 | failed | failed | failed | failed |
| stem | 256 | 24.123 | 0.8137 | 41.000 | 0.9988 |
"""

CSV = """\
inversion,inversion.num_bases,PSNR,SSIM,PSNR vs VAE,SSIM vs VAE
ddim_1frame,,22.5,0.75,30.0,0.9
stem,64,inf,1.0,inf,1.0
stem,128,failed,failed,failed,failed
stem,256,24.12345,0.813749,41.0,0.99876
"""


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for job, (overrides, result) in JOBS.items():
        (root / str(job) / ".hydra").mkdir(parents=True)
        (root / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if result is not None:
            (root / str(job) / "metrics.json").write_text(json.dumps(result))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    (root / "wandb").mkdir()  # not a job folder: no .hydra/
    return root


def test_collect_runs_reads_every_job_folder_in_job_order(sweep):
    runs = collect_runs(sweep)
    assert [(r["job"], r["status"]) for r in runs] == [(0, "ok"), (1, "ok"), (2, "failed"), (10, "ok")]
    assert runs[0]["overrides"] == {"debug": "fast", "inversion": "stem", "inversion.num_bases": 256, "progress": False}
    assert runs[2]["metrics"] is None and runs[1]["metrics"]["vs_input"]["psnr"] == "inf"
    assert runs[3]["dir"] == sweep / "10"


def test_columns_default_to_the_override_keys_that_vary(sweep):
    runs = collect_runs(sweep)
    assert varying_keys(runs) == ["inversion", "inversion.num_bases"]
    assert varying_keys(runs[:1]) == ["debug", "inversion", "inversion.num_bases", "progress"]  # one run: all


def test_table_rows_sorted_by_columns_with_failed_jobs_kept(sweep):
    table = sweep_table(collect_runs(sweep), ["inversion", "inversion.num_bases"])  # default: metrics the runs have
    assert table == sweep_table(collect_runs(sweep), ["inversion", "inversion.num_bases"], DEFAULT_METRICS[:4])
    assert table["header"] == ["inversion", "inversion.num_bases", "PSNR", "SSIM", "PSNR vs VAE", "SSIM vs VAE"]
    assert table["rows"] == [["ddim_1frame", None, 22.5, 0.75, 30.0, 0.9],
                             ["stem", 64, float("inf"), 1.0, float("inf"), 1.0],
                             ["stem", 128, "failed", "failed", "failed", "failed"],
                             ["stem", 256, 24.12345, 0.813749, 41.0, 0.99876]]
    assert to_markdown(table) == MARKDOWN
    assert to_csv(table) == CSV


def test_default_columns_follow_the_metrics_group_of_the_runs(tmp_path):
    edit = {"clip": {"clip_score": 0.31, "frame_consistency": 0.95},
            "warp_error": {"warp_error": 4.9, "backend": "dis"}}
    for job, result in enumerate([edit, {**edit, "feature_similarity": {"mean": 0.8}}]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}"]))
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(result))
    table = sweep_table(collect_runs(tmp_path), ["seed"])
    assert table["header"] == ["seed", "CLIP score", "CLIP consistency", "Warp error x1e-3", "Warp flow",
                               "Feature similarity"]
    assert table["rows"] == [[0, 0.31, 0.95, 4.9, "dis", None], [1, 0.31, 0.95, 4.9, "dis", 0.8]]
    assert to_markdown(table).splitlines()[2] == "| 0 | 0.3100 | 0.9500 | 4.900 | dis |  |"


def test_metric_spec_takes_any_dotted_path_and_format(sweep):
    table = sweep_table(collect_runs(sweep), ["inversion.num_bases"],
                        [("Method", "method"), ("s", "seconds.inversion", ".1f"), ("PSNR", "vs_input.psnr")])
    assert to_markdown(table).splitlines()[2:] == ["| 64 | stem | 1.5 | inf |", "| 128 | failed | failed | failed |",
                                                   "| 256 | stem | 1.5 | 24.12 |", "|  | stem | 1.5 | 22.5 |"]


def test_write_sweep_outputs_writes_markdown_and_csv(sweep):
    md, csv_path = write_sweep_outputs(sweep, "table6", columns=["inversion", "inversion.num_bases"])["files"]
    assert (md, csv_path) == (sweep / "table6.md", sweep / "table6.csv")
    assert md.read_text() == MARKDOWN and csv_path.read_text() == CSV
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith(".")) == []  # no temporary files left


@pytest.mark.parametrize("metric,words", [(("X", "vs_input.lpips"), "no metrics.json has 'vs_input.lpips'"),
                                          (("X", "vs_input.psnr", "%d"), "'%d' is not a float format spec")])
def test_bad_metric_spec_is_a_clear_error(sweep, metric, words):
    with pytest.raises(TableError, match=words):
        sweep_table(collect_runs(sweep), ["inversion"], [metric])


def test_callback_puts_the_declared_sweep_first(sweep):
    from callbacks import SweepTableCallback

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"params": {
        "inversion.num_bases": "64,128,256"}}}, "logger": {"_target_": "run.NullLogger"}})
    SweepTableCallback(name="t").on_multirun_end(config)
    assert (sweep / "t.md").read_text().splitlines()[0] == ("| inversion.num_bases | inversion | PSNR | SSIM | "
                                                            "PSNR vs VAE | SSIM vs VAE |")


def make_tables(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_prints_and_writes_the_table(sweep):
    proc = make_tables(sweep)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == MARKDOWN and (sweep / "table.md").read_text() == MARKDOWN
    assert (sweep / "table.csv").read_text() == CSV
    proc = make_tables(sweep, "--name", "k", "--columns", "inversion.num_bases", "--metrics", "SSIM=vs_vae.ssim:.2f")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["| inversion.num_bases | SSIM |", "|---|---:|", "| 64 | 1.00 |",
                                        "| 128 | failed |", "| 256 | 1.00 |", "|  | 0.90 |"]


def test_cli_on_a_folder_without_jobs_fails_with_one_line(tmp_path):
    proc = make_tables(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: no job folders in {tmp_path}: expected <job num>/.hydra/ "
                                        "from `python run.py -m ...`"]


TINY = [*FAST, "data.n_frames=2", "data.width=64", "data.height=64"]  # about 2 s per job


def expected_row(label, m):
    return (f"| {label} | {m['vs_input']['psnr']:.3f} | {m['vs_input']['ssim']:.4f} | {m['vs_vae']['psnr']:.3f} "
            f"| {m['vs_vae']['ssim']:.4f} |")


def check_two_job_table(sweep):
    """The table the callback wrote (task_name `debug` from debug=fast) against the jobs' metrics."""
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert (sweep / "debug.md").read_text().splitlines() == [
        "| inversion | PSNR | SSIM | PSNR vs VAE | SSIM vs VAE |", "|---|---:|---:|---:|---:|",
        expected_row("ddim_1frame", jobs[0]), expected_row("ddim_2frame", jobs[1])]


def test_multirun_writes_the_sweep_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "inversion=ddim_1frame,ddim_2frame", f"hydra.sweep.dir={sweep}",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_two_job_table(sweep)
    assert (sweep / "debug.csv").read_text().splitlines()[0] == "inversion,PSNR,SSIM,PSNR vs VAE,SSIM vs VAE"
    assert not (sweep / "wandb").exists()


def test_multirun_with_wandb_logs_the_table_in_one_summary_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "logger=wandb", "inversion=ddim_1frame,ddim_2frame", f"hydra.sweep.dir={sweep}",
                   f"paths.cache_dir={tmp_path / 'cache'}", env={"WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_two_job_table(sweep)
    records = read_wandb_records(sweep)  # exactly one run directly under the sweep folder: the summary
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.job_type, run.display_name, run.project) == ("summary", "debug-summary", "stem")
    logged = {tuple(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for i in r.history.item if i.nested_key}
    assert logged[("debug", "_type")] == "table-file" and logged[("debug", "nrows")] == 2
    data = json.loads((sweep / "wandb" / "latest-run" / "files" / logged[("debug", "path")]).read_text())
    csv_rows = [line.split(",") for line in (sweep / "debug.csv").read_text().splitlines()]
    assert data["columns"] == csv_rows[0]
    assert [[row[0], *map(float, row[1:])] for row in csv_rows[1:]] == data["data"]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert all(list((sweep / str(i)).glob("wandb/offline-run-*")) for i in (0, 1))  # one W&B run per job too


def test_a_failed_job_does_not_stop_the_sweep_and_shows_as_failed(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "data.width=250,64", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}")
    assert proc.returncode == 1 and "error: data: width=250 is not a positive multiple of 8" in proc.stderr
    assert not (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").is_file()
    assert not (sweep / "debug.md").exists()  # Hydra skips on_multirun_end after a failed job: rebuild by script
    job = json.loads((sweep / "1" / "metrics.json").read_text())
    proc = make_tables(sweep)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["| data.width | PSNR | SSIM | PSNR vs VAE | SSIM vs VAE |",
                                        "|---|---:|---:|---:|---:|", expected_row("64", job),
                                        "| 250 | failed | failed | failed | failed |"]

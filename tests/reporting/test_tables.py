"""Sweep tables: stem.reporting.tables on hand-written sweep folders, scripts/make_tables.py, and the
Hydra callback at the end of real multiruns (`python run.py -m ...`), with and without W&B."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import FAST, ROOT, read_wandb_records, run_cli
from omegaconf import OmegaConf
from test_provenance import job_metrics, make_sweep

from stem.core.errors import TableError
from stem.reporting.tables import (
    DEFAULT_METRICS,
    collect_runs,
    sweep_order,
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
| Inversion | K | PSNR | SSIM | PSNR vs VAE | SSIM vs VAE | Not finished |
|---|---|---:|---:|---:|---:|---|
| DDIM 1-frame |  | 22.500 | 0.7500 | 30.000 | 0.9000 |  |
| STEM | 64 | inf | 1.0000 | inf | 1.0000 |  |
| STEM | 128 | failed | failed | failed | failed | failed: no metrics.json |
| STEM | 256 | 24.123 | 0.8137 | 41.000 | 0.9988 |  |
"""
# what write_sweep_outputs puts above it for these job folders (no git.json, no config: facts unknown)
CAPTION = ("Provenance: Model unknown, unknown, on unknown (device name not recorded); clips: unknown; "
           "unknown DDIM steps; commit unknown; 3 of 4 jobs finished (1 failed: the table's Not finished column "
           "says why).\n\n")

CSV = """\
inversion,inversion.num_bases,PSNR,SSIM,PSNR vs VAE,SSIM vs VAE,Not finished
ddim_1frame,,22.5,0.75,30.0,0.9,
stem,64,inf,1.0,inf,1.0,
stem,128,failed,failed,failed,failed,failed: no metrics.json
stem,256,24.12345,0.813749,41.0,0.99876,
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
    assert table["header"] == ["inversion", "inversion.num_bases", "PSNR", "SSIM", "PSNR vs VAE", "SSIM vs VAE",
                               "Not finished"]
    assert table["rows"] == [["ddim_1frame", None, 22.5, 0.75, 30.0, 0.9, ""],
                             ["stem", 64, float("inf"), 1.0, float("inf"), 1.0, ""],
                             ["stem", 128, "failed", "failed", "failed", "failed", "failed: no metrics.json"],
                             ["stem", 256, 24.12345, 0.813749, 41.0, 0.99876, ""]]
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
    assert to_markdown(table).splitlines()[2:] == [
        "| 64 | stem | 1.5 | inf |  |", "| 128 | failed | failed | failed | failed: no metrics.json |",
        "| 256 | stem | 1.5 | 24.12 |  |", "|  | stem | 1.5 | 22.5 |  |"]


def test_write_sweep_outputs_writes_markdown_and_csv(sweep):
    md, csv_path, side = write_sweep_outputs(sweep, "table6", columns=["inversion", "inversion.num_bases"])["files"]
    assert (md, csv_path, side) == (sweep / "table6.md", sweep / "table6.csv", sweep / "table6.json")
    assert md.read_text() == CAPTION + MARKDOWN and csv_path.read_text() == CSV
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith(".")) == []  # no temporary files left


@pytest.mark.parametrize("metric,words", [(("X", "vs_input.lpips"), "no metrics.json has 'vs_input.lpips'"),
                                          (("X", "vs_input.psnr", "%d"), "'%d' is not a float format spec")])
def test_bad_metric_spec_is_a_clear_error(sweep, metric, words):
    with pytest.raises(TableError, match=words):
        sweep_table(collect_runs(sweep), ["inversion"], [metric])


def test_callback_puts_the_declared_sweep_first(sweep):
    from stem.app.callbacks import SweepTableCallback

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"params": {
        "inversion.num_bases": "64,128,256"}}}, "logger": {"_target_": "stem.app.loggers.NullLogger"}})
    SweepTableCallback(name="t").on_multirun_end(config)
    assert (sweep / "t.md").read_text().splitlines()[2] == ("| K | Inversion | PSNR | SSIM | PSNR vs VAE | SSIM vs VAE "
                                                            "| Not finished |")


def make_tables(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_prints_and_writes_the_table(sweep):
    proc = make_tables(sweep)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == CAPTION + MARKDOWN and (sweep / "table.md").read_text() == CAPTION + MARKDOWN
    assert (sweep / "table.csv").read_text() == CSV
    proc = make_tables(sweep, "--name", "k", "--columns", "inversion.num_bases", "--metrics", "SSIM=vs_vae.ssim:.2f")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == CAPTION + "\n".join(["| K | SSIM | Not finished |", "|---|---:|---|", "| 64 | 1.00 |  |",
                                               "| 128 | failed | failed: no metrics.json |", "| 256 | 1.00 |  |",
                                               "|  | 0.90 |  |"]) + "\n"


def test_cli_on_a_folder_without_jobs_fails_with_one_line(tmp_path):
    proc = make_tables(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: no job folders in {tmp_path}: expected <job num>/.hydra/ "
                                        "from `python run.py -m ...`"]


TINY = [*FAST, "data.n_frames=2", "data.width=64", "data.height=64"]  # about 2 s per job


def caption_line(sweep, finished=2, jobs=2):
    """The provenance line of a real tiny CPU sweep, from stem.diffusion.device and git independently of
    stem.reporting.provenance."""
    from stem.diffusion.device import device_name
    from stem.runs.rundir import git_revision

    rev = git_revision(ROOT)
    commit = f"{rev['commit'][:10]}{' (dirty)' if rev['dirty'] else ''}"
    return (f"Provenance: Model tiny (random weights: mechanics only), float32, on {device_name('cpu')} (cpu); "
            f"clips: synthetic_pan (2 frames, 64x64); frames scored: synthetic_pan 1-2; 5 DDIM steps; commit {commit}; "
            f"{finished} of {jobs} jobs finished"
            + (f" ({jobs - finished} failed: the table's Not finished column says why)" if finished < jobs else "")
            + ".")


def expected_row(label, m):
    return (f"| {label} | {m['vs_input']['psnr']:.3f} | {m['vs_input']['ssim']:.4f} | {m['vs_vae']['psnr']:.3f} "
            f"| {m['vs_vae']['ssim']:.4f} |")


def check_two_job_table(sweep):
    """The table the callback wrote (task_name `debug` from debug=fast) against the jobs' metrics."""
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert (sweep / "debug.md").read_text().splitlines() == [
        caption_line(sweep), "", "| Inversion | PSNR | SSIM | PSNR vs VAE | SSIM vs VAE |", "|---|---:|---:|---:|---:|",
        expected_row("DDIM 1-frame", jobs[0]), expected_row("DDIM 2-frame", jobs[1])]


def test_multirun_writes_the_sweep_table(tmp_path):
    """As a user types it: no hydra.sweep.dir, so the sweep folder is the default one under the folder run
    from. Bug caught: the launcher resolving hydra.sweep.dir (${hydra:runtime.cwd}) before Hydra's config is
    set (callbacks.SweepDirCallback removed), which fails every `python run.py -m` without hydra.sweep.dir."""
    proc = run_cli("-m", *TINY, "inversion=ddim_1frame,ddim_2frame", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").glob("*/*")
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
    # the failed job's row says why: the line it printed (status.json's reason)
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))[len("error: "):]
    assert not (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").is_file()
    assert not (sweep / "debug.md").exists()  # Hydra skips on_multirun_end after a failed job: rebuild by script
    job = json.loads((sweep / "1" / "metrics.json").read_text())
    proc = make_tables(sweep)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [caption_line(sweep, 1), "", "| Resolution | PSNR | SSIM | PSNR vs VAE | "
                                        "SSIM vs VAE | Not finished |", "|---|---:|---:|---:|---:|---|",
                                        expected_row("64", job) + "  |",
                                        f"| 250 | failed | failed | failed | failed | failed: {error} |"]


# ------------------------------------------------------------------ the paper's layout (hand-written sweeps)

def experiment_spec(name):
    """The sweep_table spec and declared sweep of configs/experiment/<name>.yaml (the file as written)."""
    hydra = yaml.safe_load((ROOT / "configs" / "experiment" / f"{name}.yaml").read_text())["hydra"]
    return hydra["callbacks"]["sweep_table"], hydra["sweeper"]["params"]


def md_lines(out):
    """The markdown table of write_sweep_outputs' output, without the caption."""
    lines = out["markdown"].splitlines()
    assert lines[0] == f"Provenance: {out['provenance']['caption']}" and lines[1] == ""
    return lines[2:]


def test_rows_follow_the_declared_sweep_not_the_alphabet(tmp_path):
    """Mutation caught: rows sorted by value (ddim_1frame, ddim_allframe, stem, stem_official) again, or
    undeclared values put first / in job order."""
    jobs = [([f"inversion={v}"], job_metrics(), "tiny", None)
            for v in ("stem_official", "stem", "ddim_allframe", "ddim_1frame", "fatezero")]
    params = {"inversion": "ddim_1frame,ddim_allframe,stem"}
    root = make_sweep(tmp_path, jobs, params=params, spec={"name": "t", "columns": ["inversion"]})
    order = sweep_order(params)
    assert order == {"inversion": ["ddim_1frame", "ddim_allframe", "stem"]}
    out = write_sweep_outputs(root, "t", ["inversion"], [("PSNR", "vs_input.psnr", ".3f")], order=order)
    assert [r[0] for r in out["table"]["rows"]] == ["ddim_1frame", "ddim_allframe", "stem", "fatezero",
                                                    "stem_official"]  # declared, then the rest alphabetically
    assert [line.split(" | ")[0] for line in md_lines(out)[2:]] == [
        "| DDIM 1-frame", "| DDIM all-frame", "| STEM", "| DDIM, FateZero attention", "| STEM, released code"]
    assert sweep_order({"+data.n_frames": "8,16,120", "seed": "range(3)"}) == {"data.n_frames": [8, 16, 120]}


def test_without_a_declared_sweep_rows_follow_the_paper_keys(tmp_path):
    """Table 2's paper order (FateZero, TokenFlow, STEM-FateZero, STEM-TokenFlow) for a sweep typed on the
    command line. Mutation caught: the paper's key order ignored (alphabetical: tokenflow last)."""
    paper = experiment_spec("table2_editing")[0]["paper"]
    jobs = [([f"table2={v}"], job_metrics(), "tiny", None) for v in ("stem_tokenflow", "tokenflow", "fatezero",
                                                                      "stem_fatezero", "zzz_extra")]
    table = sweep_table(collect_runs(make_sweep(tmp_path, jobs)), ["table2"], [("PSNR", "vs_input.psnr")],
                        paper={k: {"PSNR": "1"} for k in paper})
    assert [r[0] for r in table["rows"]] == ["fatezero", "tokenflow", "stem_fatezero", "stem_tokenflow", "zzz_extra"]


def test_stem_rows_name_the_k_each_run_used(tmp_path):
    """Mutation caught: display names taken from the config name alone, so `inversion=stem
    inversion.num_bases=128` reads as the preset's K=256 (or shows no K)."""
    stem = {"method": "stem", "num_bases": 128}
    root = make_sweep(tmp_path, [(["inversion=stem", "inversion.num_bases=128"], job_metrics(inversion=stem), "tiny",
                                  None),
                                 (["inversion=stem_k512"], job_metrics(inversion={**stem, "num_bases": 512}), "tiny",
                                  None),
                                 (["inversion=ddim_1frame"], job_metrics(), "tiny", None)])
    out = write_sweep_outputs(root, "t", ["inversion"], [("PSNR", "vs_input.psnr", ".3f")],
                              order={"inversion": ["ddim_1frame", "stem", "stem_k512"]})
    assert md_lines(out) == ["| Inversion | PSNR |", "|---|---:|", "| DDIM 1-frame | 30.000 |",
                             "| STEM (K=128) | 30.000 |", "| STEM (K=512) | 30.000 |"]
    assert (root / "t.csv").read_text().splitlines()[1:] == ["ddim_1frame,30.0", "stem,30.0", "stem_k512,30.0"]
    side = json.loads((root / "t.json").read_text())
    assert side["display"] == {"columns": {"inversion": "Inversion", "PSNR": "PSNR"},
                               "rows": [["DDIM 1-frame"], ["STEM (K=128)"], ["STEM (K=512)"]]}
    assert {k: v for k, v in side.items() if k != "display"} == out["provenance"]


def test_paper_values_sit_beside_their_metric_at_the_papers_precision(tmp_path):
    """Table 2's spec as the config writes it. Mutations caught: "(paper)" columns appended at the far
    right; paper values formatted with our spec ("0.2900", "7.20"); a paper value that is no number accepted."""
    spec, params = experiment_spec("table2_editing")
    edit = {"clip": {"clip_score": 0.3123456, "frame_consistency": 0.9}, "warp_error": {"warp_error": 5.0,
                                                                                        "backend": "exact"}}
    jobs = [([f"table2={row}", f"data={clip}"], job_metrics(**edit), "tiny", None)
            for row in ("stem_tokenflow", "fatezero") for clip in ("car_turn", "wolf")]
    root = make_sweep(tmp_path, jobs, params=params, spec=spec)
    out = write_sweep_outputs(root, spec["name"], spec["columns"], [tuple(m) for m in spec["metrics"]],
                              spec["average_over"], spec["paper"], order=sweep_order(params))
    assert out["table"]["header"] == ["table2", "CLIP score", "CLIP score (paper)", "Warp error x1e-3",
                                      "Warp error x1e-3 (paper)", "Flow", "CLIP consistency", "runs"]
    assert md_lines(out) == [
        "| Method | CLIP score | CLIP score (paper) | Warp error x1e-3 | Warp error x1e-3 (paper) | Flow | "
        "CLIP consistency | runs |", "|---|---:|---:|---:|---:|---:|---:|---|",
        "| FateZero | 0.3123 | 0.29 | 5.00 | 7.2 | exact | 0.9000 | 2 |",
        "| STEM-TokenFlow | 0.3123 | 0.31 | 5.00 | 3.5 | exact | 0.9000 | 2 |"]
    assert (root / "table2_editing.csv").read_text().splitlines()[1] == "fatezero,0.3123456,0.29,5.0,7.2,exact,0.9,2"
    with pytest.raises(TableError, match="paper value 'n/a' of 'fatezero' / 'CLIP score' is not a number"):
        sweep_table(collect_runs(root), ["table2"], [("CLIP score", "clip.clip_score")], ["data"],
                    {"fatezero": {"CLIP score": "n/a"}})


def test_table1_prints_the_papers_ratio_to_one_frame_beside_ours(tmp_path):
    """Table 1's spec as the config writes it. Mutations caught: the paper's ratio taken from our
    minutes (or ours from the paper's), divided by the wrong row, or missing."""
    spec, params = experiment_spec("table1_time")
    minutes = {"ddim_1frame": 2.0, "ddim_2frame": 3.0, "stem": 4.5}
    stem = {"method": "stem", "num_bases": 256}
    jobs = [([f"inversion={k}"], job_metrics(seconds={"inversion": 60 * v, "inversion_per_frame": v},
                                             inversion=stem if k == "stem" else None), "tiny", None)
            for k, v in minutes.items()]
    root = make_sweep(tmp_path, jobs, params=params, spec=spec)
    out = write_sweep_outputs(root, spec["name"], spec["columns"], [tuple(m) for m in spec["metrics"]],
                              paper=spec["paper"], ratio_to=spec["ratio_to"], order=sweep_order(params))
    table = out["table"]
    assert table["header"] == ["inversion", "Minutes", "Minutes (paper)", "Minutes ratio", "Minutes ratio (paper)",
                               "s / frame", "Peak MiB"]
    paper = {k: float(v["Minutes"]) for k, v in spec["paper"].items()}
    ratios = [(row[3], row[4]) for row in table["rows"]]
    assert ratios == [(minutes[k] / minutes["ddim_1frame"], paper[k] / paper["ddim_1frame"]) for k in minutes]
    assert md_lines(out)[2:] == ["| DDIM 1-frame | 2.00 | 0.80 | 1.00 | 1.000 | 2.000 | 10 |",
                                 "| DDIM 2-frame | 3.00 | 1.12 | 1.50 | 1.400 | 3.000 | 10 |",
                                 "| STEM (K=256) | 4.50 | 1.50 | 2.25 | 1.875 | 4.500 | 10 |"]


def test_table4_puts_the_papers_n128_beside_our_longest_n(tmp_path):
    """Table 4's spec as the config writes it. Mutations caught: `paper_rows` ignored (120 gets no
    paper value), or applied to every row, or the row not saying which paper row it is compared with."""
    spec, params = experiment_spec("table4_length")
    n_frames = [120, 8, 64, 16, 32]
    jobs = [([f"data.n_frames={n}"], job_metrics(frames=n, inversion={"method": "stem", "num_bases": 256}), "sd15",
             None) for n in n_frames]
    root = make_sweep(tmp_path, jobs, params=params, spec=spec)
    out = write_sweep_outputs(root, spec["name"], spec["columns"], [tuple(m) for m in spec["metrics"]],
                              paper=spec["paper"], order=sweep_order(params), paper_rows=spec["paper_rows"])
    assert out["table"]["header"][:5] == ["data.n_frames", "PSNR", "PSNR (paper)", "SSIM", "SSIM (paper)"]
    assert [(r[0], r[2], r[4]) for r in out["table"]["rows"]] == [
        (8, "32.702", "0.9836"), (16, "33.279", "0.9854"), (32, "33.197", "0.9854"), (64, "33.058", "0.9851"),
        (120, "32.751", "0.9843")]
    assert md_lines(out)[-1] == "| 120 (paper: 128) | 30.000 | 32.751 | 0.9000 | 0.9843 | 40.000 |"
    assert md_lines(out)[2] == "| 8 | 30.000 | 32.702 | 0.9000 | 0.9836 | 40.000 |"


def test_make_tables_rebuilds_caption_layout_and_sidecar_from_the_job_folders(tmp_path):
    """The callback (at the end of a sweep) and the script (from the folders alone) write the same
    files. Mutation caught: make_tables not reading the declared order (or paper_rows) from multirun.yaml."""
    from stem.app.callbacks import SweepTableCallback

    spec, params = experiment_spec("table4_length")
    jobs = [([f"data.n_frames={n}"], job_metrics(frames=n), "tiny", None) for n in (120, 8, 64)]
    root = make_sweep(tmp_path, jobs, params=params, spec={k: v for k, v in spec.items() if k != "plot"})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}, "sweeper": {"params": params}},
                               "logger": {"_target_": "stem.app.loggers.NullLogger"}})
    SweepTableCallback(**{k: v for k, v in spec.items() if k != "plot"}).on_multirun_end(config)
    written = {s: (root / f"table4_length{s}").read_text() for s in (".md", ".csv", ".json")}
    assert "| 120 (paper: 128) |" in written[".md"] and written[".md"].index("| 8 |") < written[".md"].index("| 64 |")
    for suffix in written:
        (root / f"table4_length{suffix}").unlink()
    proc = make_tables(root)
    assert proc.returncode == 0, proc.stderr
    assert {s: (root / f"table4_length{s}").read_text() for s in written} == written
    assert proc.stdout == written[".md"]


def table4_sweep(tmp_path):
    """Table 4's spec as the experiment file writes it (paper PSNR/SSIM are vs-input), jobs N = 8 and
    120 (the latter beside the paper's N=128); vs-input PSNR 30 and vs-VAE PSNR 40 in every job."""
    spec, params = experiment_spec("table4_length")
    jobs = [([f"data.n_frames={n}"], job_metrics(frames=n), "tiny", None) for n in (8, 120)]
    return make_sweep(tmp_path, jobs, params=params, spec={k: v for k, v in spec.items() if k != "plot"})


def table_lines(proc):
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[2:]  # without the caption


def test_cli_metrics_pair_paper_values_by_metric_not_by_label(tmp_path):
    """--metrics relabels and subsets; the paper's values go only beside the metric (dotted path) they
    were written for (Table 4's PSNR: vs_input.psnr). Mutation caught: pairing by label (the old code:
    `PSNR=vs_vae.psnr` printed our vs-VAE 40.000 beside the paper's vs-input 32.702)."""
    root = table4_sweep(tmp_path)
    assert table_lines(make_tables(root, "--metrics", "PSNR=vs_vae.psnr:.3f")) == [
        "| Frames N | PSNR |", "|---|---:|", "| 8 | 40.000 |", "| 120 | 40.000 |"]  # no paper column beside vs-VAE
    assert table_lines(make_tables(root, "--metrics", "PSNR in=vs_input.psnr:.2f", "PSNR=vs_vae.psnr:.3f")) == [
        "| Frames N | PSNR in | PSNR in (paper) | PSNR |", "|---|---:|---:|---:|",
        "| 8 | 30.00 | 32.702 | 40.000 |", "| 120 (paper: 128) | 30.00 | 32.751 | 40.000 |"]


def test_cli_metrics_accepts_a_subset_of_the_papers_metrics(tmp_path):
    """Only SSIM of Table 4's PSNR/SSIM: its paper column, PSNR's dropped. Mutation caught: the paper's
    PSNR values kept, an error ("paper values for ['PSNR']: not metric labels") as the old code gave."""
    assert table_lines(make_tables(table4_sweep(tmp_path), "--metrics", "SSIM=vs_input.ssim:.4f")) == [
        "| Frames N | SSIM | SSIM (paper) |", "|---|---:|---:|", "| 8 | 0.9000 | 0.9836 |",
        "| 120 (paper: 128) | 0.9000 | 0.9843 |"]


def test_cli_no_paper_leaves_the_paper_columns_out(tmp_path):
    """--no-paper, with the sweep's own metrics and with --metrics (mutation: the flag ignored, or
    only honoured without --metrics)."""
    root = table4_sweep(tmp_path)
    assert table_lines(make_tables(root, "--no-paper")) == [
        "| Frames N | PSNR | SSIM | PSNR vs VAE |", "|---|---:|---:|---:|", "| 8 | 30.000 | 0.9000 | 40.000 |",
        "| 120 | 30.000 | 0.9000 | 40.000 |"]
    assert table_lines(make_tables(root, "--no-paper", "--metrics", "PSNR=vs_input.psnr:.1f")) == [
        "| Frames N | PSNR |", "|---|---:|", "| 8 | 30.0 |", "| 120 | 30.0 |"]
    assert "(paper)" in make_tables(root).stdout   # without the flag the paper is there


def test_paper_by_metric_pairs_by_path_and_scale():
    """The library function: by (path, scale), first label of a path wins, unknown paper labels refused.
    Mutation caught: pairing on the path alone (seconds beside the paper's minutes)."""
    from stem.core.errors import TableError
    from stem.reporting.tables import paper_by_metric

    written = [["Minutes", "seconds.inversion", ".2f", 1 / 60], ["PSNR", "vs_input.psnr", ".3f"]]
    paper = {"stem": {"Minutes": "1.50", "PSNR": "30.1"}}
    assert paper_by_metric(paper, written, [("Seconds", "seconds.inversion"), ("P", "vs_input.psnr"),
                                            ("P again", "vs_input.psnr")]) == {"stem": {"P": "30.1"}}
    assert paper_by_metric(paper, written, [("Min", "seconds.inversion", ".1f", 1 / 60)]) == {"stem": {"Min": "1.50"}}
    with pytest.raises(TableError, match=r"paper values for \['SSIM'\]"):
        paper_by_metric({"stem": {"SSIM": "0.9"}}, written, written)


# ------------------------------------------------------------------ interrupted sweeps (issue 13, item 10)

def interrupted_sweep(tmp_path, n_started):
    """A sweep of 4 expected jobs (declared seed=0,1 and the command line's inversion=ddim_1frame,stem)
    of which the first `n_started` have a folder, each finished."""
    combos = [[f"seed={s}", f"inversion={m}", "data.n_frames=8"] for s in (0, 1) for m in ("ddim_1frame", "stem")]
    root = make_sweep(tmp_path / "sweep", [(c, job_metrics(psnr=20.0 + i), "tiny", None)
                                           for i, c in enumerate(combos[:n_started])])
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None,
                    "params": {"seed": "0,1"}},
        "overrides": {"task": ["inversion=ddim_1frame,stem", "data.n_frames=8"]}}}))
    return root, combos


def test_jobs_that_never_started_are_missing_rows_and_count_as_jobs(tmp_path):
    """The expected jobs come from multirun.yaml (declared params first, then the command line, in Hydra's
    cartesian order: the reference is the product written out above). Mutations caught: jobs without a
    folder dropped silently (2 of 2 jobs finished), the product taken in another order (command line
    first: the missing rows would be seed 0 / stem and seed 1 / stem), or the command line's fixed override
    counted as a swept value."""
    root, combos = interrupted_sweep(tmp_path, 2)
    proc = make_tables(root, "--columns", "seed,inversion", "--metrics", "PSNR=vs_input.psnr:.1f")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("; 2 of 4 jobs finished (2 missing: the table's Not finished column says why).")
    assert lines[4:] == ["| 0 | DDIM 1-frame | 20.0 |  |", "| 0 | STEM | 21.0 |  |",
                         "| 1 | DDIM 1-frame | missing | missing: the job never started |",
                         "| 1 | STEM | missing | missing: the job never started |"]
    assert "job 2: missing: no job folder" in proc.stderr
    runs = collect_runs(root, expected=combos)
    assert [(r["job"], r["status"]) for r in runs] == [(0, "ok"), (1, "ok"), (2, "missing"), (3, "missing")]
    assert runs[3]["overrides"] == {"seed": 1, "inversion": "stem", "data.n_frames": 8} and runs[3]["dir"] is None


def mark(folder, state, pid=None, host=None):
    (folder / "status.json").write_text(json.dumps({"state": state, "pid": pid or os.getpid(),
                                                    "host": host or socket.gethostname()}))


def test_a_running_job_is_running_not_failed(tmp_path):
    """Mutations caught: a job folder without metrics.json always called failed (the running job of a live
    sweep); a marker that says running trusted after its process died (kill -9: it stays failed); the
    marker of a job that ended with an error ignored."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    jobs = [([f"seed={i}"], None, "tiny", None) for i in range(5)]
    root = make_sweep(tmp_path, jobs)
    mark(root / "0", "running")                                # this process: alive
    mark(root / "1", "running", pid=int(dead.stdout))          # its process is gone: killed
    mark(root / "2", "failed")                                 # ended with an error
    mark(root / "3", "running", host="another-node-of-the-cluster")  # cannot be checked from here: running
    assert [r["status"] for r in collect_runs(root)] == ["running", "failed", "failed", "running", "failed"]
    table = sweep_table(collect_runs(root), ["seed"], [("PSNR", "vs_input.psnr")])
    assert [row[1] for row in table["rows"]] == ["running", "failed", "failed", "running", "failed"]


def test_run_py_marks_a_job_that_ended_with_an_error(tmp_path):
    """run.py writes status.json at job start and marks it failed on an error. Mutation caught: no marker
    (or one left at "running"), so a failed job would read as still running."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "data.width=250", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}")
    assert proc.returncode == 1 and "error: data: width=250" in proc.stderr
    status = json.loads((sweep / "0" / "status.json").read_text())
    assert status["state"] == "failed" and status["pid"] != os.getpid()
    assert [r["status"] for r in collect_runs(sweep)] == ["failed"]


def test_a_truncated_metrics_json_is_one_unreadable_row(tmp_path):
    """Mutation caught: a parse error of one job's metrics.json (a disk full, a copy cut short) raised for
    the whole sweep, or the bad job counted as finished."""
    root = make_sweep(tmp_path, [([f"seed={i}"], job_metrics(psnr=20.0 + i), "tiny", None) for i in range(3)])
    text = (root / "1" / "metrics.json").read_text()
    (root / "1" / "metrics.json").write_text(text[: len(text) // 2])
    runs = collect_runs(root)
    assert [r["status"] for r in runs] == ["ok", "unreadable", "ok"]
    assert "metrics.json" in runs[1]["error"] and "JSONDecodeError" in runs[1]["error"]
    out = write_sweep_outputs(root, "t", ["seed"], [("PSNR", "vs_input.psnr", ".1f")])
    assert md_lines(out)[2:] == ["| 0 | 20.0 |  |", "| 1 | unreadable | unreadable: cannot parse metrics.json "
                                 "(JSONDecodeError) |", "| 2 | 22.0 |  |"]
    assert out["provenance"]["caption"].endswith("; 2 of 3 jobs finished (1 unreadable: the table's Not finished "
                                                 "column says why).")
    proc = make_tables(root, "--columns", "seed", "--metrics", "PSNR=vs_input.psnr:.1f")
    assert proc.returncode == 0, proc.stderr
    assert f"job 1: unreadable: cannot parse {root / '1' / 'metrics.json'}: JSONDecodeError" in proc.stderr


# ------------------------------------------------------------------ why a row did not finish (issue 25)


def test_a_row_that_did_not_finish_says_why_in_one_line(tmp_path):
    """Rows table2 x clip, averaged over clips: the reason of the first unfinished job of each row, from its
    status.json's "reason" (run.py's failure line), else the last ERROR line of its run.log, else the bare
    status; with the job, its clip and the count. Mutations caught: the reason read from the wrong job of an
    averaged row; the first ERROR line of the log instead of the failure's (the last); a multi-line reason
    breaking the markdown row; a Not finished column on a table where every job finished."""
    from stem.reporting.tables import mark_job

    jobs = [(["table2=a", "data=x"], job_metrics(), "tiny", None), (["table2=a", "data=y"], None, "tiny", None),
            (["table2=b", "data=x"], None, "tiny", None), (["table2=b", "data=y"], None, "tiny", None),
            (["table2=c", "data=x"], None, "tiny", None)]
    root = make_sweep(tmp_path, jobs)
    mark_job(root / "1", "failed", "OutOfMemoryError: CUDA out of memory.\nTried to allocate 2.00 GiB")
    (root / "2" / "run.log").write_text(
        "[2024-06-01 12:00:00,000][run][INFO] - video wolf: 40 frames\n"
        "[2024-06-01 12:00:01,000][stem.x][ERROR] - an earlier error the job survived\n"
        "[2024-06-01 12:00:02,000][run][ERROR] - editing: 40 frames exceed the 24 the method holds\n")
    (root / "4" / "run.log").write_text("[2024-06-01 12:00:00,000][run][INFO] - nothing went wrong yet\n")
    runs = collect_runs(root)
    assert [r["reason"] for r in runs] == [None, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                           "editing: 40 frames exceed the 24 the method holds", "no metrics.json",
                                           "no metrics.json"]
    table = sweep_table(runs, ["table2", "data"], [("PSNR", "vs_input.psnr", ".1f")], ["data"])
    assert table["header"] == ["table2", "PSNR", "runs", "Not finished"]
    assert [row[-1] for row in table["rows"]] == [
        "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (job 1, data=y; 1 of 2 jobs)",
        "failed: editing: 40 frames exceed the 24 the method holds (job 2, data=x; 2 of 2 jobs)",
        "failed: no metrics.json"]
    assert to_markdown(table).splitlines()[2] == ("| a | failed | 2 | failed: OutOfMemoryError: CUDA out of memory. "
                                                  "Tried to allocate 2.00 GiB (job 1, data=y; 1 of 2 jobs) |")
    finished = sweep_table(runs[:1], ["table2"], [("PSNR", "vs_input.psnr", ".1f")])
    assert finished["header"] == ["table2", "PSNR"]

"""Experiment files run end to end on the tiny CPU setting and write their tables."""

import csv
import json

import pytest
from conftest import read_wandb_records, run_cli, run_script


def sweep(tmp_path, experiment, *extra):
    proc = run_cli("-m", f"experiment={experiment}", "model=tiny", "data=synthetic", "progress=false",
                   f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *extra, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SMALL = ["inversion.num_steps=2", "data.width=64", "data.height=64"]  # seconds per job
# STEM's paper preset refuses K above a layer's tokens (excess_bases=error): 16 frames of 256x256 give the
# tiny UNet's mid block 16 x 4x4 = 256 tokens, so sweeps that mix DDIM with K=256 STEM run there
FIT_256 = ["inversion.num_steps=2", "data.n_frames=16"]


def read_table(folder, name):
    return list(csv.DictReader((folder / f"{name}.csv").open()))


def test_ablation_k_reconstructs_and_edits_every_row_with_a_frames_figure(tmp_path):
    """Fig. 3 on the tiny setting (4 frames of 64x64, 2 steps; every STEM K exceeds some layer's tokens there,
    excess_bases=clamp): rows DDIM, K=128/256/512 in that order, each with reconstruction PSNR/SSIM and the
    edit's CLIP score and warp error; STEM rows name their clamped K and mean K, the DDIM row has none; the
    frames figure is 1 + 4 rows by 4 + 4 frames (all 4 frames of the clip, reconstruction then edit); the W&B
    summary holds the table and both figures; make_tables rebuilds all from the job folders.
    Mutations caught: an edit-only row (no report_reconstruction: empty PSNR), reconstruction-only rows (no CLIP
    column), the frames spec dropped from the experiment or from multirun.yaml's rebuild (no _frames.png), the
    two PNGs logged under one W&B key (the plot overwritten)."""
    from stem.reporting.plots import sweep_frames_figure
    from stem.reporting.tables import collect_runs

    sweep(tmp_path, "ablation_k", *SMALL, "data.n_frames=4", "metrics.clip.pretrained=null", "logger=wandb")
    rows = read_table(tmp_path, "ablation_k")
    assert [r["ablation_k"] for r in rows] == ["ddim", "k128", "k256", "k512"]
    for r in rows:
        assert float(r["PSNR vs VAE"]) > 20 and 0 < float(r["SSIM"]) <= 1 and float(r["PSNR"]) > 0
        assert -1 <= float(r["CLIP score"]) <= 1 and float(r["Warp error x1e-3"]) >= 0 and r["Flow"] == "exact"
    assert rows[0]["Mean K"] == "" and all(float(r["Mean K"]) < int(r["ablation_k"][1:]) for r in rows[1:])
    md = (tmp_path / "ablation_k.md").read_text()
    labels = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:]
    assert labels[0] == "DDIM 1-frame" and all(
        label.startswith(f"STEM (K={k}, clamped at ") for label, k in zip(labels[1:], (128, 256, 512)))
    fig = sweep_frames_figure(collect_runs(tmp_path), ["ablation_k"], {"videos": ["reconstruction", "edited"]})
    assert len(fig.axes) == 5 * 8 and [ax.get_ylabel().split("\n")[0] for ax in fig.axes[::8]][:2] == [
        "source", "DDIM 1-frame"]
    assert (tmp_path / "ablation_k.png").stat().st_size > 1000
    assert (tmp_path / "ablation_k_frames.png").stat().st_size > 1000
    # the summary run (offline) holds the table and both figures
    records = read_wandb_records(tmp_path)
    logged = {tuple(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for i in r.history.item if i.nested_key}
    assert logged[("ablation_k", "_type")] == "table-file" and logged[("ablation_k", "nrows")] == 4
    assert logged[("ablation_k_plot", "_type")] == logged[("ablation_k_frames", "_type")] == "image-file"
    # rebuilt from the job folders alone, with the spec the sweep was launched with (multirun.yaml)
    for suffix in (".md", ".csv", ".png", "_frames.png"):
        (tmp_path / f"ablation_k{suffix}").unlink()
    proc = run_script("make_tables.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ablation_k.md").read_text() == md and proc.stdout == md
    assert (tmp_path / "ablation_k.png").is_file() and (tmp_path / "ablation_k_frames.png").is_file()


# slow (30 s): table6's sweep and paper columns stay in the default run through test_newcomer_path's mixed sweep
@pytest.mark.slow
def test_table6_averages_over_clips_and_prints_the_paper_beside(tmp_path):
    sweep(tmp_path, "table6_inversion", *FIT_256, "inversion=ddim_1frame,stem")
    rows = read_table(tmp_path, "table6_inversion")
    assert [r["inversion"] for r in rows] == ["ddim_1frame", "stem"]
    assert [r["PSNR (paper)"] for r in rows] == ["24.122", "31.572"] and all(r["runs"] == "1" for r in rows)
    assert not (tmp_path / "debug.md").exists()


def test_table1_times_every_inversion_with_the_ratio_to_one_frame(tmp_path):
    sweep(tmp_path, "table1_time", "inversion.num_steps=2", "data.n_frames=8", "inversion=ddim_1frame,stem_k128")
    rows = {r["inversion"]: r for r in read_table(tmp_path, "table1_time")}
    assert float(rows["ddim_1frame"]["Minutes ratio"]) == 1.0 and float(rows["stem_k128"]["Minutes"]) > 0
    assert rows["stem_k128"]["Minutes (paper)"] == "1.02" and float(rows["stem_k128"]["Peak MiB"]) >= 0
    assert float(rows["stem_k128"]["Minutes ratio (paper)"]) == pytest.approx(1.02 / 0.80)  # the paper's x 1-frame
    assert float(rows["stem_k128"]["s / frame"]) * 8 / 60 == pytest.approx(float(rows["stem_k128"]["Minutes"]))


# slow (36 s): sweep plots stay in the default run through ablation_k's and test_plots.py
@pytest.mark.slow
def test_table4_and_table5_sweep_length_and_resolution_with_plots(tmp_path):
    sweep(tmp_path / "t4", "table4_length", *SMALL, "inversion.num_bases=2", "data.n_frames=2,4")
    assert [r["data.n_frames"] for r in read_table(tmp_path / "t4", "table4_length")] == ["2", "4"]
    sweep(tmp_path / "t5", "table5_resolution", "inversion.num_steps=2", "data.n_frames=2", "inversion.num_bases=2",
          "data.width=64,128")
    rows = read_table(tmp_path / "t5", "table5_resolution")
    assert [r["data.width"] for r in rows] == ["64", "128"] and rows[0]["PSNR (paper)"] == ""
    for folder, name in ((tmp_path / "t4", "table4_length"), (tmp_path / "t5", "table5_resolution")):
        assert (folder / f"{name}.png").stat().st_size > 1000


# slow (82 s): each editor's run stays in the default run through test_tokenflow.py and test_fatezero.py,
# the CLIP and warp columns through test_evaluation.py
@pytest.mark.slow
def test_table2_edits_with_every_method_and_averages_clips(tmp_path):
    sweep(tmp_path, "table2_editing", *FIT_256, "metrics.clip.pretrained=null")
    rows = {r["table2"]: r for r in read_table(tmp_path, "table2_editing")}
    assert sorted(rows) == ["fatezero", "stem_fatezero", "stem_tokenflow", "tokenflow"]
    assert all(-1 <= float(r["CLIP score"]) <= 1 and float(r["Warp error x1e-3"]) >= 0 for r in rows.values())
    assert rows["stem_tokenflow"]["Warp error x1e-3 (paper)"] == "3.5" and rows["fatezero"]["Flow"] == "exact"


# slow (135 s): the fig4/fig9 configs compose in test_experiment_protocol.py, per-frame plots in test_plots.py
@pytest.mark.slow
def test_fig4_and_fig9_draw_per_frame_and_per_step_curves(tmp_path):
    sweep(tmp_path / "f4", "fig4_per_frame", *FIT_256)
    rows = read_table(tmp_path / "f4", "fig4_per_frame")
    assert [r["fig4"] for r in rows] == ["ddim_i", "stem_i", "ddim_ii", "stem_ii"]  # the order the sweep declares
    # each job ran its row's pair (metrics.json's method label): before, the sweep's inversion=ddim_1frame
    # replaced fatezero_reconstruct's inversion=fatezero, so "FateZero" ran on 1-frame DDIM latents
    ran = {}
    for job in (tmp_path / "f4").iterdir():
        if (job / "metrics.json").is_file():
            row = [o for o in (job / ".hydra" / "overrides.yaml").read_text().split() if o.startswith("fig4=")]
            m = json.loads((job / "metrics.json").read_text())
            ran[row[0].split("=")[1]] = (m["method"], m.get("inversion_method"))
    assert ran == {"ddim_i": ("ddim_1frame", None), "stem_i": ("stem_k256", None),
                   "ddim_ii": ("FateZero", "fatezero"), "stem_ii": ("STEM-FateZero", "stem_k256")}
    assert all(float(r["PSNR vs VAE"]) > 20 for r in rows)
    sweep(tmp_path / "f9", "fig9_feature_similarity", *FIT_256)
    rows = read_table(tmp_path / "f9", "fig9_feature_similarity")
    assert len(rows) == 4 and all(-1 <= float(r["Feature similarity"]) <= 1 for r in rows)
    for folder, name in ((tmp_path / "f4", "fig4_per_frame"), (tmp_path / "f9", "fig9_feature_similarity")):
        assert (folder / f"{name}.png").stat().st_size > 1000

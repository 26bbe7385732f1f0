"""Paper Fig. 3 in full (experiment=ablation_k): the frames figure of a sweep, clamped K said in every name, and
the name of the method in a sweep's legend where no column names it (Table 4). Expected values are written out
here; each test names the plausible bug it catches."""

import json
from pathlib import Path

import numpy as np
import yaml

from stem.data.video import write_video
from stem.reporting.display import display_value
from stem.reporting.plots import sweep_figure, sweep_frames_figure
from stem.reporting.tables import collect_runs, sweep_table, write_sweep_outputs

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiment"


def spec(name: str) -> dict:
    return yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())["hydra"]["callbacks"]["sweep_table"]


LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1",
          "up_blocks.3.attentions.2.transformer_blocks.0.attn1"]


def stem_metrics(k: int, used: list[int], psnr: float = 30.0) -> dict:
    """metrics.json of a fixed-K STEM reconstruction whose layers used `used` bases (fewer than k: clamped)."""
    return {"method": f"stem_k{k}", "inversion": {"method": "stem", "num_bases": k, "num_steps": 5},
            "bases": {"auto": None, "inversion": {"layers": {p: {"k": [u], "error": None, "tried": None}
                                                             for p, u in zip(LAYERS, used)},
                                                  "mean_k": sum(used) / len(used)}},
            "vs_input": {"psnr": psnr, "ssim": 0.9}}


def runs_of(column: str, cells: list, metrics: list[dict]) -> list[dict]:
    return [{"job": i, "dir": None, "overrides": {column: c}, "status": "ok", "metrics": m}
            for i, (c, m) in enumerate(zip(cells, metrics))]


# ------------------------------------------------------------------------------------ clamped K


def test_a_clamped_k_is_named_in_every_row_label_and_an_unclamped_one_is_not():
    """A STEM K=256 run whose mid block held 64 bases (excess_bases=clamp) is never shown as plain "STEM (K=256)":
    rows named by the method, by K, or by another setting (Table 4's frames) all say so; a run that used K
    everywhere does not. Mutations caught: the note dropped (labels from the settings alone); layers counted
    with <= K (every layer "clamped", the unclamped run too); the note of an averaged row taken from its first
    run only (a row averaging a clamped and an unclamped clip hides it)."""
    clamped, whole = stem_metrics(256, [256, 64, 256]), stem_metrics(256, [256, 256, 256])
    note = "clamped at 1 of 3 layers, mean K 192.0"
    assert display_value("inversion", "stem", clamped) == f"STEM (K=256, {note})"
    assert display_value("ablation_k", "k256", clamped) == f"STEM (K=256, {note})"
    assert display_value("adaptive_k", "k256", clamped) == f"STEM (K=256, {note})"
    assert display_value("inversion.num_bases", 256, clamped) == f"256 ({note})"
    assert display_value("inversion", "stem", whole) == display_value("ablation_k", "k256", whole) == "STEM (K=256)"
    assert display_value("inversion.num_bases", 256, whole) == "256"
    table = sweep_table(runs_of("data.n_frames", [8, 16], [clamped, whole]), ["data.n_frames"],
                        [("PSNR", "vs_input.psnr")])
    assert table["row_labels"] == [[f"8 (STEM K=256 {note})"], ["16"]]
    table = sweep_table(runs_of("ablation_k", ["k256", "k256"], [whole, clamped]), ["ablation_k"],
                        [("PSNR", "vs_input.psnr")], average_over=["data"])
    assert table["row_labels"] == [[f"STEM (K=256, {note})"]]   # one of the two clips was clamped


def test_a_clamped_k_is_named_in_the_sweep_legend():
    """Legends follow the row labels, also where no column names the method (a point per run over frames N).
    Mutation caught: the legend of a run over another setting left without the note ("Frames N=8")."""
    metrics = [stem_metrics(256, [256] * 3), stem_metrics(512, [512, 64, 256])]
    fig = sweep_figure(runs_of("inversion", ["stem", "stem_k512"], metrics), ["inversion"],
                       {"y": "vs_input.psnr", "x": "inversion.num_bases"})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "STEM (K=256)", "STEM (K=512, clamped at 2 of 3 layers, mean K 277.3)"]
    fig = sweep_figure(runs_of("data.n_frames", [16, 8], metrics), ["data.n_frames"],
                       {"y": "vs_input.psnr", "x": "inversion.num_bases"})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "Frames N=16", "Frames N=8 (STEM K=512 clamped at 2 of 3 layers, mean K 277.3)"]


# ------------------------------------------------------------------------------------ Table 4's legend


def test_table4_legend_names_the_method_and_where_k_was_clamped():
    """docs/REPRODUCE.md: each figure's lines are named as in the paper, "STEM (K=256)". Table 4's sweep has one
    column (frames N), so its curve was "measured". Mutations caught: the curve left "measured"; named with the
    clamp note of one run (its name then differs by run: "measured", or a name that hides the other runs)."""
    table4 = spec("table4_length")
    paper = {str(k): dict(v) for k, v in table4["paper"].items()}
    runs = runs_of("data.n_frames", [16, 8], [stem_metrics(256, [256] * 3, 33.0), stem_metrics(256, [256] * 3, 32.0)])
    fig = sweep_figure(runs, ["data.n_frames"], table4["plot"], paper=paper)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["STEM (K=256)", "paper"]
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [8, 16] and list(line.get_ydata()) == [32.0, 33.0]
    runs[1]["metrics"] = stem_metrics(256, [256, 128, 256], 32.0)   # N=8: the tiny mid block holds 128 tokens
    fig = sweep_figure(runs, ["data.n_frames"], table4["plot"], paper=paper)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "STEM (K=256), K clamped at Frames N=8", "paper"]


# ------------------------------------------------------------------------------------ Fig. 3 frames


SIZE = 32
N_FRAMES = 10
FRAME_NUMBERS = [3 + 2 * i for i in range(N_FRAMES)]   # a subsampled clip: source frames 3, 5, ..., 21
SOURCE_G, CODES = 30, {("ddim", "reconstruction"): 90, ("ddim", "edited"): 150,
                        ("k256", "reconstruction"): 210, ("k256", "edited"): 250}


def solid(green: int) -> np.ndarray:
    """N_FRAMES solid frames: red = 10 + 20 * frame index (which frame), green = which video."""
    out = np.zeros((N_FRAMES, SIZE, SIZE, 3), np.uint8)
    out[..., 0] = (10 + 20 * np.arange(N_FRAMES))[:, None, None]
    out[..., 1] = green
    return out


def fig3_sweep(root: Path) -> Path:
    """Two finished ablation_k jobs as run.py leaves them: comparison.mp4 (input | edited), edited.mp4,
    reconstruction.mp4, metrics.json."""
    for job, row in enumerate(["ddim", "k256"]):
        folder = root / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"ablation_k={row}"]))
        for video in ("reconstruction", "edited"):
            write_video(folder / f"{video}.mp4", solid(CODES[row, video]), fps=10)
        write_video(folder / "comparison.mp4", np.concatenate([solid(SOURCE_G), solid(CODES[row, "edited"])], 2), 10)
        metrics = {"method": "TokenFlow" if row == "ddim" else "STEM-TokenFlow",
                   "inversion": {"method": "ddim"} if row == "ddim" else {"method": "stem", "num_bases": 256},
                   "reconstruction_vs_input": {"psnr": 20.0 + job}, "editing": {"method": "TokenFlow"},
                   "video": {"name": "clip", "frames": N_FRAMES, "width": SIZE, "height": SIZE,
                             "frame_numbers": FRAME_NUMBERS}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_frames_figure_shows_source_then_each_rows_reconstruction_beside_its_edit(tmp_path):
    """Fig. 3's layout: rows = the source, then one per job (table order, display names); columns = 4 frames of
    the reconstruction, then the same 4 of the edit; frames evenly spaced over the clip, first and last included
    (0-based 0, 3, 6, 9 of 10), labelled with their number in the source clip. Each cell is checked against the
    colour coding of the video and frame it must show. Mutations caught: the source taken from comparison.mp4's
    right half (the edit); the first 4 frames instead of 4 spread over the clip; column labels
    numbered by index + 1 instead of video.frame_numbers; edit and reconstruction blocks swapped."""
    sweep = fig3_sweep(tmp_path)
    frames = spec("ablation_k")["frames"]
    assert frames["videos"] == ["reconstruction", "edited"] and frames["count"] == 4
    fig = sweep_frames_figure(collect_runs(sweep), ["ablation_k"], frames)
    cols, indices = 8, [0, 3, 6, 9]
    assert len(fig.axes) == 3 * cols
    grid = [fig.axes[r * cols:(r + 1) * cols] for r in range(3)]
    assert [row[0].get_ylabel() for row in grid] == ["source", "DDIM 1-frame", "STEM (K=256)"]
    assert [ax.get_title() for ax in grid[0]] == [f"{v}, frame {FRAME_NUMBERS[i]}" for v in ("reconstruction", "edited")
                                                  for i in indices] == [
        "reconstruction, frame 3", "reconstruction, frame 9", "reconstruction, frame 15", "reconstruction, frame 21",
        "edited, frame 3", "edited, frame 9", "edited, frame 15", "edited, frame 21"]
    for r, row in enumerate(grid):
        for c, ax in enumerate(row):
            if r == 0 and c >= 4:
                assert not ax.images   # the source once, under the reconstructions
                continue
            video = ("reconstruction", "edited")[c // 4]
            green = SOURCE_G if r == 0 else CODES[("ddim", "k256")[r - 1], video]
            shown = np.asarray(ax.images[0].get_array()) * 255
            red = 10 + 20 * indices[c % 4]
            assert abs(shown[..., 0].mean() - red) < 8 and abs(shown[..., 1].mean() - green) < 8, (r, c)


def test_write_sweep_outputs_writes_the_frames_png_beside_the_plot(tmp_path):
    """The sweep's outputs include <name>_frames.png from the job folders alone (scripts/make_tables.py and the
    callback both go through here). Mutation caught: the frames spec not passed on (no PNG)."""
    sweep = fig3_sweep(tmp_path)
    out = write_sweep_outputs(sweep, "ablation_k", ["ablation_k"], [("PSNR", "reconstruction_vs_input.psnr")],
                              frames={"videos": ["reconstruction", "edited"], "count": 4})
    png = sweep / "ablation_k_frames.png"
    assert png in out["files"] and png.stat().st_size > 1000


def test_ablation_k_plot_draws_stem_over_k_and_ddim_as_a_level():
    """ablation_k.png: reconstruction PSNR, edit CLIP score and warp error against K, one panel each; STEM rows
    at their K, the DDIM row (no K) a dashed horizontal line at its value. Mutation caught: runs without an x
    dropped from the plot (the DDIM row missing, as before)."""
    plot = spec("ablation_k")["plot"]
    values = {"ddim": (24.0, 0.25, 6.0), "k128": (28.0, 0.26, 5.0), "k256": (31.0, 0.27, 4.0)}
    metrics = [{"method": "TokenFlow", "inversion": {"method": "ddim"}} if row == "ddim" else
               {"method": "STEM-TokenFlow", "inversion": {"method": "stem", "num_bases": int(row[1:])}}
               for row in values]
    for m, (psnr, clip, warp) in zip(metrics, values.values()):
        m.update(reconstruction_vs_input={"psnr": psnr}, clip={"clip_score": clip}, warp_error={"warp_error": warp})
    fig = sweep_figure(runs_of("ablation_k", list(values), metrics), ["ablation_k"], plot)
    assert len(fig.axes) == 3
    for panel, ax in enumerate(fig.axes):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["STEM (K=128)"].get_xdata()) == [128] and list(lines["STEM (K=256)"].get_xdata()) == [256]
        assert list(lines["STEM (K=256)"].get_ydata()) == [values["k256"][panel]]
        assert lines["DDIM 1-frame"].get_linestyle() == "--"
        assert list(lines["DDIM 1-frame"].get_ydata()) == [values["ddim"][panel]] * 2


def test_ablation_k_rows_are_named_after_the_inversion_the_job_ran():
    """The DDIM row run with another context (ablation_k=ddim inversion=ddim_2frame) is not called "DDIM 1-frame":
    the name comes from the job's metrics.json (`inversion_method`), the config name only without one.
    Mutation caught: ablation_k rows named from the config name alone."""
    ran = {"method": "TokenFlow", "inversion_method": "ddim_2frame_fatezero", "inversion": {"method": "ddim"}}
    assert display_value("ablation_k", "ddim", ran) == "DDIM 2-frame"
    assert display_value("ablation_k", "ddim") == "DDIM 1-frame"

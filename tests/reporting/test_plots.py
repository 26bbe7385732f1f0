"""Figures: PNGs that decode, drawn from the data given, written atomically; bad input refused."""

import json
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import pytest
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from stem.data.video import Video, load_video, write_video
from stem.reporting import plots
from stem.reporting.plots import Panel, curves_figure, grid_figure, image_grid, plot_curves, sweep_figure
from stem.reporting.tables import sweep_plot
from stem.runs.rundir import write_run


def test_plot_curves_writes_a_png_and_no_temporary_file(tmp_path):
    path = plot_curves(tmp_path / "curve.png", {"ddim": [0.5, 0.6, 0.7], "stem": [0.9, 0.95, 0.97]},
                       x=[1, 21, 41], xlabel="t", ylabel="similarity")
    image = iio.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_image_grid_shows_the_images_it_is_given(tmp_path):
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1
    path = image_grid(tmp_path / "grid.png", {"red": red, "small": torch.rand(1, 3, 4, 4)}, ["a", "b"])
    image = iio.imread(path)[..., :3].reshape(-1, 3).astype(int)
    assert ((image == [255, 0, 0]).all(1)).sum() > 1000  # the pure-red cells are drawn as they are


@pytest.mark.parametrize("call, match", [
    (lambda p: plot_curves(p, {}), "every curve needs at least one value"),
    (lambda p: plot_curves(p, {"a": []}), "every curve needs at least one value"),
    (lambda p: image_grid(p, {}), "no rows"),
    (lambda p: image_grid(p, {"gray": torch.rand(2, 1, 4, 4)}),
     r"row 'gray' must be \(F, 3, h, w\), got \(2, 1, 4, 4\)"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# ---- issue 12: the paper's points, captions, plain tick labels, display names, frame numbers ----------
EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiment"


def _sweep_spec(name: str) -> dict:
    """The sweep_table spec of an experiment file (its plot and paper values)."""
    return yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())["hydra"]["callbacks"]["sweep_table"]


def _runs(column: str, values: list, metrics) -> list[dict]:
    """Finished fake jobs of a sweep over `column` (as stem.reporting.tables.collect_runs returns them)."""
    return [{"job": i, "dir": None, "overrides": {column: v}, "status": "ok", "metrics": metrics(i, v)}
            for i, v in enumerate(values)]


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def _drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


@pytest.mark.parametrize("name, column, ours, paper_xs", [
    ("table4_length", "data.n_frames", [8, 16, 32, 64, 120], [8, 16, 32, 64, 128]),
    ("table5_resolution", "data.width", [384, 512, 768, 1024], [384, 512, 768, 1024]),
])
def test_paper_values_are_markers_at_the_papers_x_and_y(name, column, ours, paper_xs):
    """The experiment's own plot spec and paper values: one "paper" marker series at the paper's
    settings and values (Table 4's N=128 value, printed beside our 120, drawn at 128), our curve at ours.
    Mutations caught: paper values not drawn / `paper_label` dropped from the config (no "paper" line);
    the paper's x taken from the table row it is printed beside (`paper_rows`: last marker at 120);
    markers joined by a line."""
    spec = _sweep_spec(name)
    paper = {str(k): dict(v) for k, v in spec["paper"].items()}   # numbers as strings, as the configs keep them
    psnr = {v: 20.0 + i / 8 for i, v in enumerate(ours)}
    runs = _runs(column, ours[::-1], lambda i, v: {"vs_input": {"psnr": psnr[v]}})  # job order != x order
    fig = sweep_figure(runs, [column], spec["plot"], paper=paper)
    lines = _lines(fig.axes[0])
    assert set(lines) == {plots.PAPER, plots.MEASURED}
    expected_y = [32.702, 33.279, 33.197, 33.058, 32.751] if name == "table4_length" \
        else [29.558, 33.767, 34.813, 35.668]
    assert list(lines[plots.PAPER].get_xdata()) == paper_xs
    assert list(lines[plots.PAPER].get_ydata()) == pytest.approx(expected_y, rel=1e-12)
    assert lines[plots.PAPER].get_linestyle() == "None" and lines[plots.PAPER].get_marker() == "*"
    assert list(lines[plots.MEASURED].get_xdata()) == ours
    assert list(lines[plots.MEASURED].get_ydata()) == [psnr[v] for v in ours]


def test_no_paper_markers_where_the_paper_gives_no_numbers(tmp_path):
    """Fig. 3 (ablation_k) has no numbers in the paper: its spec names no paper label, so nothing is
    drawn even when a paper dict is passed; the PNG is still written by stem.reporting.tables.sweep_plot.
    Mutation caught: a paper label guessed from the y path (a "paper" line appears)."""
    spec = _sweep_spec("ablation_k")
    assert "paper_label" not in spec["plot"] and "paper" not in spec
    scores = {"reconstruction_vs_input": {"psnr": 25.0}, "clip": {"clip_score": 0.3}, "warp_error": {"warp_error": 4.0}}
    runs = _runs("ablation_k", ["k128", "k256", "k512"], lambda i, v: {
        **scores, "inversion": {"method": "stem", "num_bases": int(v[1:])}})
    fig = sweep_figure(runs, ["ablation_k"], spec["plot"], paper={"k256": {"PSNR": 31.572}})
    for ax in fig.axes:
        assert set(_lines(ax)) == {"STEM (K=128)", "STEM (K=256)", "STEM (K=512)"}
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["128", "256", "512"]
    path = sweep_plot(runs, ["ablation_k"], spec["plot"], tmp_path / "k.png", caption="c")
    assert path == tmp_path / "k.png" and iio.imread(path).ndim == 3


def test_caption_is_drawn_wrapped_below_the_axes_and_never_clipped():
    """The caption is in the figure, in small print, below the axes and their x label, wrapped to
    the figure's width, and inside the saved (tight) bounding box, for curves, sweeps and grids.
    Mutations caught: caption dropped; drawn at y=0 growing upward (over the x label); not wrapped."""
    caption = "model tiny (float32) on cpu; clips synthetic_pan 8 frames 64x64, 2 steps; " * 4 + \
        "random weights: mechanics only"
    runs = _runs("data.width", [64, 128], lambda i, v: {"vs_input": {"psnr": 10.0 + i}})
    figures = [curves_figure([Panel({"a": [1.0, 2.0]})], xlabel="x label", caption=caption),
               sweep_figure(runs, ["data.width"], {"y": "vs_input.psnr"}, caption=caption),
               grid_figure({"row": torch.rand(2, 3, 8, 8)}, ["f1", "f2"], caption=caption)]
    for fig in figures:
        renderer = _drawn(fig)
        texts = [t for t in fig.texts if " ".join(t.get_text().split()) == caption]
        assert len(texts) == 1, [t.get_text() for t in fig.texts]
        box = texts[0].get_window_extent(renderer)
        assert texts[0].get_fontsize() <= 6 and texts[0].get_text().count("\n") >= 2
        assert box.width <= fig.bbox.width  # wrapped to the figure's width
        assert all(box.y1 <= ax.get_tightbbox(renderer).y0 + 1e-6 for ax in fig.axes)  # below axes and labels
        saved = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # what savefig keeps
        assert saved.x0 <= box.x0 and saved.y0 <= box.y0 + 1e-6 and box.x1 <= saved.x1


def test_a_nearly_constant_curve_has_no_offset_label():
    """A flat curve (random weights) must not read "1e-5+7.8962": the y (and x) tick formatters
    show no offset text after drawing, and the tick labels are the values themselves.
    Mutation caught: the ticklabel_format(useOffset=False) calls removed (offset text '+7.8962')."""
    values = [7.8962 + 1e-6 * i for i in range(5)]
    fig = curves_figure([Panel({"flat": values}, x=[1000.0001 + 1e-4 * i for i in range(5)])])
    _drawn(fig)
    ax = fig.axes[0]
    assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
    shown = [float(t.get_text().replace("\u2212", "-")) for t in ax.get_yticklabels() if t.get_text()]
    assert shown and all(abs(v - 7.8962) < 1e-4 for v in shown)


def test_legend_labels_are_display_names_with_the_runs_own_k():
    """Curves are labelled with the paper's names (stem.reporting.display), K read from each run's metrics.json,
    not the config names. Mutation caught: labels from the raw override values ("stem", "ddim_1frame")."""
    settings = {"ddim_1frame": {"method": "ddim"}, "stem": {"method": "stem", "num_bases": 512}}
    runs = _runs("inversion", ["ddim_1frame", "stem"], lambda i, v: {
        "feature_similarity": {"per_step": [0.5, 0.6], "timesteps": [981, 961]}, "inversion": settings[v]})
    fig = sweep_figure(runs, ["inversion"], _sweep_spec("fig9_feature_similarity")["plot"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["DDIM 1-frame", "STEM (K=512)"]


def test_fig4_draws_psnr_and_ssim_against_the_source_frame_numbers(tmp_path):
    """Fig. 4 from subsampled frames: load_video records which source frames it kept (checked against
    the frames' content, not its own arithmetic), write_run stores them 1-based in metrics.json's
    video section, and both panels (PSNR, SSIM) put the curves and the x ticks at those numbers.
    Mutations caught: max_frames/even picks not applied to the indices; 0-based numbers; x from 1..N."""
    frames = torch.stack([torch.full((3, 8, 8), i / 20) for i in range(14)])  # frame i has value i/20
    write_video(tmp_path / "clip", frames, fps=10)
    picked = load_video(tmp_path / "clip", "p", start=1, stride=2, max_frames=4)  # of 1,3,...,13: 1,5,9,13
    even = load_video(tmp_path / "clip", "p", start=1, stride="even", n_frames=4)
    for video in (picked, even):
        content = (video.frames[:, 0, 0, 0] * 20).round().long().tolist()  # the source index of each frame
        assert video.frame_numbers == [i + 1 for i in content]
    assert picked.frame_numbers == [2, 6, 10, 14]

    run_dir = tmp_path / "run"
    inverted = SimpleNamespace(entry=None, key="k", cache_hit=False)
    write_run(run_dir, picked, None, "reconstruction", inverted, {})
    numbers = json.loads((run_dir / "metrics.json").read_text())["video"]["frame_numbers"]
    assert numbers == [2, 6, 10, 14]

    runs = _runs("fig4", ["ddim_i", "stem_i"], lambda i, v: {
        "video": {"frame_numbers": numbers},
        "vs_input": {"psnr_per_frame": [20.0 + i, 21.0, 22.0, 23.0], "ssim_per_frame": [0.5, 0.6, 0.7, 0.8 - i / 10]}})
    fig = sweep_figure(runs, ["fig4"], _sweep_spec("fig4_per_frame")["plot"])
    assert [ax.get_ylabel() for ax in fig.axes] == ["PSNR (dB)", "SSIM"]
    for ax, key in zip(fig.axes, ("psnr_per_frame", "ssim_per_frame")):
        lines = _lines(ax)
        assert set(lines) == {"DDIM, fashion (i)", "STEM, fashion (i)"}
        for run in runs:
            line = lines["DDIM, fashion (i)" if run["overrides"]["fig4"] == "ddim_i" else "STEM, fashion (i)"]
            assert list(line.get_xdata()) == numbers and list(line.get_ydata()) == run["metrics"]["vs_input"][key]
        assert list(ax.get_xticks()) == numbers
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["2", "6", "10", "14"]  # shared x, shown below


def test_feature_pca_title_names_the_method_and_frames_by_source_number(tmp_path, monkeypatch):
    """feature_pca.png's title names the method (its display name), not the last PCA row's label,
    and its columns are the frames' source numbers. Mutation caught: the PCA row loop reusing the
    `label` variable (the title then reads "step 2 (t=961): ...")."""
    from stem.metrics.evaluation import PCA_FIGURE, Evaluator

    figures = {}
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.setdefault(Path(path).name, fig) and path)
    video = Video(frames=torch.rand(4, 3, 16, 16), fps=10, prompt="p", name="clip", flow=torch.zeros(3, 2, 16, 16),
                  source_indices=(0, 2, 4, 6))
    recorder = SimpleNamespace(per_call=[0.5, 0.6], layer="up_blocks.3.attentions.2.transformer_blocks.0.attn1",
                               kept={0: torch.rand(2, 4, 2, 2), 1: torch.rand(2, 4, 2, 2)}, keep_frames=[0, 3])
    ev = Evaluator(reconstruction=False, features=True, device="cpu", progress=False)
    ev.evaluate(video.frames, video, label="stem_k256", recorder=recorder, run_dir=tmp_path, timesteps=[981, 961])
    pca = figures[PCA_FIGURE]
    assert pca._suptitle.get_text().startswith("STEM (K=256) on clip: PCA of")
    assert [ax.get_title() for ax in pca.axes[:2]] == ["frame 1", "frame 7"]

"""Adaptive K (issue 15), the run and experiment side: the K per layer of a STEM run in metrics.json ("bases"),
the log and bases_per_layer.png; its display names; the sweep `experiment=ablation_adaptive_k`. Hand-made
bases records first (the shape of `STEMInversion.bases_report()`), then real runs on the tiny CPU setting."""

import random

import imageio.v3 as iio
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from stem.display import bases_line, display_value, layer_order, short_layer
from stem.plots import bases_figure, plot_bases, sweep_figure

# the attn1 layers of an SD-style UNet (tiny and SD 1.5 alike) in the UNet's order, and their short names
UNET = ([f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in range(3) for a in range(2)]
        + ["mid_block.attentions.0.transformer_blocks.0.attn1"]
        + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in range(1, 4) for a in range(3)])
SHORT = ["down0.0", "down0.1", "down1.0", "down1.1", "down2.0", "down2.1", "mid",
         "up1.0", "up1.1", "up1.2", "up2.0", "up2.1", "up2.2", "up3.0", "up3.1", "up3.2"]


def record(ks: dict[str, list[int]]) -> dict:
    """A bases record as `bases_report()` gives it, its keys shuffled (a record's order is not the UNet's)."""
    paths = list(ks)
    random.Random(0).shuffle(paths)
    choices = [k for p in paths for k in ks[p]]
    return {"layers": {p: {"k": ks[p], "error": None} for p in paths}, "mean_k": sum(choices) / len(choices)}


def auto_settings(target: float) -> dict:
    return {"method": "stem", "num_bases": "auto", "num_steps": 50,
            "auto": {"target": target, "k_min": 32, "k_max": 512, "k_step": None, "when": "first_step"}}


# ---- names ------------------------------------------------------------------------------------------------
def test_layers_read_short_in_the_unets_order():
    """Mutations caught: mid named "mid0.0"; attention and block numbers swapped ("down1.0" for block 0,
    attention 1); an order by the record's keys, or by text (up_blocks.10 before up_blocks.2)."""
    shuffled = random.Random(1).sample(UNET, len(UNET))
    assert [short_layer(p) for p in sorted(shuffled, key=layer_order)] == SHORT
    assert sorted(["up_blocks.10.attentions.0.transformer_blocks.0.attn1",
                   "up_blocks.2.attentions.0.transformer_blocks.0.attn1"], key=layer_order)[0].startswith("up_blocks.2")
    assert short_layer("down_blocks.0.attentions.1.transformer_blocks.1.attn1") == "down0.1/t1"
    assert short_layer("some.other.layer") == "some.other.layer"


def test_auto_rows_name_their_target_and_fixed_rows_their_k_from_the_run():
    """The row name comes from the run's own metrics.json settings. Mutations caught: an auto run shown as
    "STEM (K=auto)"; the target of the row's config name (tight/loose) instead of the run's own (a command
    line `inversion.auto.target=0.1` must show 0.1); a fixed row's K from its config name when the run
    clamped the preset's K by a command-line num_bases."""
    assert display_value("adaptive_k", "auto_tight", {"inversion": auto_settings(0.1)}) == "STEM (auto, target 0.1)"
    assert display_value("adaptive_k", "k128", {"inversion": {"method": "stem", "num_bases": 64}}) == "STEM (K=64)"
    assert display_value("inversion", "stem_auto", {"inversion": auto_settings(0.3)}) == "STEM (auto, target 0.3)"
    assert display_value("inversion", "stem", {"inversion": auto_settings(0.25)}) == "STEM (auto, target 0.25)"
    assert display_value("inversion", "stem_k256", {"inversion": {"method": "stem", "num_bases": 256}}) \
        == "STEM (K=256)"
    # a job that did not finish has no metrics.json: the row's own name
    assert [display_value("adaptive_k", v) for v in ("k128", "k512", "auto_tight", "auto_loose")] == [
        "STEM (K=128)", "STEM (K=512)", "STEM (auto, tight)", "STEM (auto, loose)"]


def test_log_line_lists_k_per_layer_in_unet_order_with_the_mean():
    """Mutations caught: layers in the record's order; a per-step range shown as its first K; the mean
    recomputed over layers only (ignoring that every_step layers have several choices) instead of the record's."""
    ks = {p: [64] for p in UNET}
    ks[UNET[6]] = [32]
    ks[UNET[0]] = [64, 128, 128]
    line = bases_line("inversion", record(ks), "auto, target 0.3")
    cells = ", ".join(["down0.0 64-128", *(f"{s} 64" for s in SHORT[1:6]), "mid 32", *(f"{s} 64" for s in SHORT[7:])])
    mean = (64 + 128 + 128 + 32 + 64 * 14) / 18
    assert line == f"K per layer (inversion, auto, target 0.3): {cells}; mean {mean:.1f}"


# ---- the run's plot ---------------------------------------------------------------------------------------
def test_bases_plot_draws_k_per_layer_in_unet_order_per_phase(tmp_path):
    """One K per layer (first_step, fixed K): one line per phase at the K of each layer, x ticks the short
    names in the UNet's order, the title as given. Mutations caught: layers in the record's (shuffled) order;
    the reconstruction phase dropped; the y axis on 2^n labels instead of the K values."""
    inversion = {p: [2 ** (4 + i % 4)] for i, p in enumerate(UNET)}
    reconstruction = {p: [256] for p in UNET}
    fig = bases_figure({"auto": None, "inversion": record(inversion), "reconstruction": record(reconstruction)},
                       title="synthetic_pan: bases per layer, STEM (K=256)")
    FigureCanvasAgg(fig).draw()
    (ax,) = fig.axes
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines()}
    assert set(lines) == {"inversion", "reconstruction"}
    assert list(lines["inversion"].get_ydata()) == [inversion[p][0] for p in UNET]
    assert list(lines["reconstruction"].get_ydata()) == [256] * len(UNET)
    assert [t.get_text() for t in ax.get_xticklabels()] == SHORT
    assert {t.get_text() for t in ax.get_yticklabels()} >= {"16", "32", "64", "128", "256"}
    assert ax.get_title() == "synthetic_pan: bases per layer, STEM (K=256)"
    path = plot_bases(tmp_path / "bases_per_layer.png", {"inversion": record(inversion)})
    assert iio.imread(path).ndim == 3 and [p.name for p in tmp_path.iterdir()] == ["bases_per_layer.png"]


def test_bases_plot_with_every_step_shows_mean_band_and_a_layer_by_step_heatmap():
    """every_step (one K per step): the line is each layer's mean over steps, the band spans its min and max,
    and a heatmap holds K per step (rows) and layer (columns). Mutations caught: the band dropped; the heatmap
    transposed (layers as rows); the line at the first step's K."""
    rng = random.Random(2)
    steps = 5
    ks = {p: [rng.choice([16, 32, 64, 128]) for _ in range(steps)] for p in UNET}
    fig = bases_figure({"inversion": record(ks)}, title="t")
    FigureCanvasAgg(fig).draw()
    top, heat = fig.axes[:2]
    (line,) = top.get_lines()
    assert list(line.get_ydata()) == pytest.approx([sum(ks[p]) / steps for p in UNET], rel=1e-12)
    (band,) = top.collections
    path = band.get_paths()[0].vertices
    for i, p in enumerate(UNET):
        at = path[abs(path[:, 0] - i) < 1e-9, 1]
        assert min(at) == min(ks[p]) and max(at) == max(ks[p]), p
    (image,) = heat.get_images()
    grid = image.get_array()
    assert grid.shape == (steps, len(UNET))
    assert grid.tolist() == [[float(ks[p][s]) for p in UNET] for s in range(steps)]
    assert [t.get_text() for t in heat.get_xticklabels()] == SHORT


def test_bases_plot_refuses_a_section_without_records():
    with pytest.raises(ValueError, match="no phase with layers"):
        bases_figure({"auto": None, "inversion": None})


# ---- the sweep's plot -------------------------------------------------------------------------------------
def test_sweep_plot_puts_one_labelled_point_per_row_at_its_own_mean_k():
    """The experiment's plot spec: PSNR vs VAE (y) against the mean K each run chose (x, from its metrics.json),
    one point per finished row, labelled with the row's display name. Mutations caught: x from the row's
    config value (no number: no plot), x from the job order, the label without the run's target."""
    from test_plots import _sweep_spec

    spec = _sweep_spec("ablation_adaptive_k")
    rows = {"k128": ({"method": "stem", "num_bases": 128}, 90.0, 30.0),
            "auto_tight": (auto_settings(0.2), 70.5, 29.0),
            "auto_loose": (auto_settings(0.4), 40.25, 27.5)}
    runs = [{"job": i, "dir": None, "overrides": {"adaptive_k": row}, "status": "ok",
             "metrics": {"inversion": settings, "vs_vae": {"psnr": psnr}, "bases": {"inversion": {"mean_k": k}}}}
            for i, (row, (settings, k, psnr)) in enumerate(rows.items())]
    fig = sweep_figure(runs, ["adaptive_k"], spec["plot"])
    points = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert points == {"STEM (K=128)": ([90.0], [30.0]), "STEM (auto, target 0.2)": ([70.5], [29.0]),
                      "STEM (auto, target 0.4)": ([40.25], [27.5])}
    assert len({line.get_marker() for line in fig.axes[0].get_lines()}) == 3  # equal points stay visible

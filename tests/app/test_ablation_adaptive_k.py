"""Adaptive K (issue 15), the run and experiment side: the K per layer of a STEM run in metrics.json ("bases"),
the log and bases_per_layer.png; its display names; the sweep `experiment=ablation_adaptive_k`. Hand-made
bases records first (the shape of `STEMInversion.bases_report()`), then real runs on the tiny CPU setting."""

import random

import imageio.v3 as iio
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from stem.reporting.display import bases_line, display_value, layer_order, short_layer
from stem.reporting.plots import bases_figure, plot_bases, sweep_figure

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
    clamped the preset's K by a command-line num_bases; an auto.criterion=tokens run labelled as the attention
    criterion's target."""
    assert display_value("adaptive_k", "auto_tight", {"inversion": auto_settings(0.1)}) == "STEM (auto, target 0.1)"
    assert display_value("adaptive_k", "k128", {"inversion": {"method": "stem", "num_bases": 64}}) == "STEM (K=64)"
    assert display_value("inversion", "stem_auto", {"inversion": auto_settings(0.3)}) == "STEM (auto, target 0.3)"
    assert display_value("inversion", "stem", {"inversion": auto_settings(0.25)}) == "STEM (auto, target 0.25)"
    tokens = auto_settings(0.3)
    tokens["auto"]["criterion"] = "tokens"   # the other criterion's error is another quantity: the label says so
    assert display_value("inversion", "stem_auto", {"inversion": tokens}) == "STEM (auto, token error 0.3)"
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
    """Mutation caught: the check removed (an empty figure is drawn and saved without a word)."""
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


# ---- runs on the tiny CPU setting -------------------------------------------------------------------------
SMALL = ["data.n_frames=4", "data.width=64", "data.height=64", "inversion.num_steps=2"]


def tiny_tokens(path: str, frames=4, latent=8, levels=4) -> int:
    """Tokens of one EM group (the whole video) at an attn1 of the tiny SD-shaped UNet: down_blocks.i works at
    the latent size halved i times, the mid block at the smallest, up_blocks.j mirrors down_blocks.(levels-1-j)."""
    part, index = path.split(".")[:2]
    level = levels - 1 if part == "mid_block" else int(index) if part == "down_blocks" else levels - 1 - int(index)
    return frames * (latent >> level) ** 2


def expected_short(path: str) -> str:
    """`short_layer` written out for the tiny UNet's paths (one transformer block per attention)."""
    parts = path.split(".")
    return "mid" if parts[0] == "mid_block" else f"{parts[0].split('_')[0]}{parts[1]}.{parts[3]}"


def mean_of(record: dict) -> float:
    ks = [k for layer in record["layers"].values() for k in layer["k"]]
    return sum(ks) / len(ks)


def logged_k(line: str) -> dict:
    """{short name: K} of a "K per layer (...): down0.0 64, ...; mean 72.0" log line."""
    cells = line.split("): ", 1)[1].rsplit("; mean ", 1)[0]
    return {name: int(k) for name, k in (cell.split(" ") for cell in cells.split(", "))}


def test_auto_run_reports_k_per_layer_and_a_cached_rerun_reports_the_same(tmp_path, tiny_model, caplog):
    """run.py with inversion=stem_auto: metrics.json's "bases" holds the auto settings and, for the inversion and
    the sampling back, a record of every attn1 layer of the UNet whose mean_k is the mean of its per-layer K; one
    INFO line per phase lists those K; bases_per_layer.png is in the run folder. A rerun hits the cache (no STEM
    attention runs while inverting) and reports the same inversion record, read from the entry's meta.json.
    Mutations caught: the record not stored in meta.json (the hit reports none), the hit reporting the
    reconstruction's record as the inversion's, the section built from the first run's method only."""
    from conftest import compose_config

    from stem.app.job import run_job

    cfg = compose_config(tmp_path, "inversion=stem_auto", "inversion.auto.target=0.3", *SMALL)
    layers = {p.removesuffix(".processor") for p in tiny_model.unet.attn_processors if ".attn1" in p}
    with caplog.at_level("INFO", logger="run"):
        first = run_job(cfg, tmp_path / "first")
    bases = first["bases"]
    assert bases["auto"] == first["inversion"]["auto"] and bases["auto"]["target"] == 0.3
    assert set(bases) == {"auto", "inversion", "reconstruction"} and not first["inversion_cache"]["hit"]
    for phase in ("inversion", "reconstruction"):
        record = bases[phase]
        assert set(record["layers"]) == layers
        assert record["mean_k"] == pytest.approx(mean_of(record), rel=1e-12)
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith(f"K per layer ({phase}, auto, target 0.3): ")]
        assert len(lines) == 1 and lines[0].endswith(f"; mean {record['mean_k']:.1f}")
        assert logged_k(lines[0]) == {expected_short(p): v["k"][0] for p, v in record["layers"].items()}
    assert (tmp_path / "first" / "bases_per_layer.png").stat().st_size > 1000
    assert (tmp_path / "first" / "metrics.json").is_file()

    again = run_job(cfg, tmp_path / "again")
    assert again["inversion_cache"]["hit"] and again["inversion_cache"]["key"] == first["inversion_cache"]["key"]
    assert again["bases"]["inversion"] == bases["inversion"]
    assert again["bases"]["reconstruction"] == bases["reconstruction"]  # sampled back from the same z_T
    assert (tmp_path / "again" / "bases_per_layer.png").is_file()


def test_fixed_k_run_reports_the_k_used_per_layer_without_errors(tmp_path, caplog):
    """A fixed-K STEM run has the section too: no auto settings, per layer the K used (clamped where the layer has
    fewer tokens, excess_bases=clamp; computed here from the latent grid) and no error. A cache entry written
    before records were kept (no "bases" in its meta.json) is still a hit (same key): its inversion record is
    None, said in the log, and the sampling back is reported. Mutations caught: the section only for auto runs;
    the configured K reported where the layer clamped it; the method's empty inversion record read on a hit
    (a KeyError/TypeError), or the record key made part of the cache key (a miss)."""
    from conftest import compose_config

    from stem.app.job import run_job

    cfg = compose_config(tmp_path, "inversion=stem", "inversion.num_bases=32", "excess_bases=clamp", *SMALL)
    metrics = run_job(cfg, tmp_path / "run")
    bases = metrics["bases"]
    assert bases["auto"] is None and metrics["method"] == "stem_k32"
    for phase in ("inversion", "reconstruction"):
        layers = bases[phase]["layers"]
        assert {p: v["k"] for p, v in layers.items()} == {p: [min(32, tiny_tokens(p))] for p in layers}
        assert all(v["error"] is None for v in layers.values())
        assert bases[phase]["mean_k"] == pytest.approx(sum(min(32, tiny_tokens(p)) for p in layers) / len(layers))
    assert (tmp_path / "run" / "bases_per_layer.png").is_file()

    import shutil

    from stem.runs.cache import TensorCache

    entry = (tmp_path / "run" / "inverted_latents").resolve()
    cache = TensorCache(entry.parent)
    tensors, stored = cache.load(entry.name)
    assert stored.pop("bases") == bases["inversion"]
    shutil.rmtree(entry)  # rewritten without the record, as before records were kept (an edited meta.json is a miss)
    cache.save(entry.name, tensors, stored)
    with caplog.at_level("INFO", logger="run"):
        old = run_job(cfg, tmp_path / "old")
    assert old["inversion_cache"]["hit"] and old["bases"]["inversion"] is None
    assert old["bases"]["reconstruction"] == bases["reconstruction"]
    assert any(r.getMessage().startswith("K per layer (inversion): not recorded in the cache entry")
               for r in caplog.records)


ROWS = ["k128", "k256", "k512", "auto_tight", "auto_loose"]


def test_sweep_tabulates_fixed_and_auto_rows_with_their_mean_k(tmp_path):
    """`experiment=ablation_adaptive_k` on the tiny CPU setting: one row per setting in the declared order, named
    as the paper names STEM (auto rows by their own target), its Mean K the job's metrics.json
    bases.inversion.mean_k, the mean of its per-layer record (a fixed row's: K clamped at each layer's tokens),
    the loose target choosing no more bases than the tight one, real inversion times (no cache hit), the plot; its
    Attention error the job's bases.inversion.mean_error, the mean of a per-layer estimate that every layer of every
    row has (fixed rows: measure_attention_error), each auto layer's within its target or at its last candidate.
    Mutations caught: use_cache left on (a rerun would read 0 s), a row out of order, the mean K of the config's K
    instead of the record's, the auto targets swapped between the rows, the fixed rows left unmeasured (empty
    cells), the mean error taken over the tried candidates instead of the chosen ones."""
    import csv
    import json

    from conftest import run_cli

    proc = run_cli("-m", "experiment=ablation_adaptive_k", "model=tiny", "data=synthetic", "progress=false", *SMALL,
                   f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "ablation_adaptive_k.csv").open()))
    assert [r["adaptive_k"] for r in rows] == ROWS
    jobs = {}
    for job in tmp_path.iterdir():
        if (job / "metrics.json").is_file():
            row = [o for o in (job / ".hydra" / "overrides.yaml").read_text().split() if o.startswith("adaptive_k=")]
            jobs[row[0].split("=")[1]] = json.loads((job / "metrics.json").read_text())
    assert sorted(jobs) == sorted(ROWS)
    for row in rows:
        metrics = jobs[row["adaptive_k"]]
        record = metrics["bases"]["inversion"]
        assert float(row["Mean K"]) == record["mean_k"] == pytest.approx(mean_of(record), rel=1e-12)
        assert float(row["Inversion s"]) == metrics["seconds"]["inversion"] > 0
        assert metrics["inversion_cache"]["path"] is None and float(row["PSNR vs VAE"]) > 20  # no cache: real times
        errors = [e for layer in record["layers"].values() for e in layer["error"]]
        assert len(errors) == len(record["layers"]) == 16 and all(0 < e < 1 for e in errors)
        assert record["mean_error"] == pytest.approx(sum(errors) / len(errors), rel=1e-12)
        assert float(row["Attention error"]) == pytest.approx(record["mean_error"], abs=5e-4)   # printed .3f
    for k in (128, 256, 512):
        layers = jobs[f"k{k}"]["bases"]["inversion"]["layers"]
        assert float(rows[ROWS.index(f"k{k}")]["Mean K"]) == pytest.approx(
            sum(min(k, tiny_tokens(p)) for p in layers) / len(layers), rel=1e-12)
    tight, loose = (jobs[f"auto_{t}"]["bases"] for t in ("tight", "loose"))
    assert (tight["auto"]["target"], loose["auto"]["target"]) == (0.1, 0.3)
    assert tight["auto"]["criterion"] == loose["auto"]["criterion"] == "attention"
    assert loose["inversion"]["mean_k"] <= tight["inversion"]["mean_k"]
    for bases in (tight, loose):
        for path, layer in bases["inversion"]["layers"].items():
            last = min(512, tiny_tokens(path))
            assert layer["error"][0] <= bases["auto"]["target"] or layer["k"][0] == last, (path, layer)
    md = (tmp_path / "ablation_adaptive_k.md").read_text().splitlines()
    def label(row: str, name: str) -> str:  # a fixed K that some tiny layer cannot hold is labelled clamped
        record = jobs[row]["bases"]["inversion"]
        if not row.startswith("k"):
            return name
        fewer = sum(1 for layer in record["layers"].values() if min(layer["k"]) < int(row[1:]))
        return name[:-1] + f", clamped at {fewer} of 16 layers, mean K {record['mean_k']:.1f})" if fewer else name
    assert [line.split(" | ")[0].lstrip("| ") for line in md if line.startswith("| STEM")] == [
        label(row, name) for row, name in zip(ROWS, ["STEM (K=128)", "STEM (K=256)", "STEM (K=512)",
                                                     "STEM (auto, target 0.1)", "STEM (auto, target 0.3)"])]
    assert (tmp_path / "ablation_adaptive_k.png").stat().st_size > 1000
    assert all((tmp_path / str(job) / "bases_per_layer.png").is_file() for job in range(len(ROWS)))


# slow (~25 s): the record's way through a sharded job is rank 0's `_save` and `Inverted.bases`, which the
# single-process tests above cover; this runs them under torchrun
@pytest.mark.slow
def test_sharded_auto_run_reports_k_per_layer_and_one_process_reuses_its_record(tmp_path):
    """torchrun with 2 ranks: rank 0 writes the bases section (both phases, every layer) and stores the
    inversion's record in the cache entry; a single-process run of the same job then hits that entry and reports
    the same record. Mutation caught: rank 0 saving the entry without the record (the hit reports none)."""
    import json

    from conftest import compose_config
    from test_distributed_launch import torchrun

    from stem.app.job import run_job

    job = ["inversion=stem_auto", "inversion.auto.target=0.4", *SMALL, "device=cpu", "progress=false"]
    proc = torchrun(tmp_path, *job, f"hydra.run.dir={tmp_path / 'sharded'}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert sharded["distributed"]["world_size"] == 2 and set(sharded["bases"]) == {"auto", "inversion",
                                                                                    "reconstruction"}
    assert len(sharded["bases"]["inversion"]["layers"]) == len(UNET)
    assert (tmp_path / "sharded" / "bases_per_layer.png").is_file()
    single = run_job(compose_config(tmp_path, *job), tmp_path / "single")
    assert single["inversion_cache"]["hit"] and single["inversion_cache"]["key"] == sharded["inversion_cache"]["key"]
    assert single["bases"]["inversion"] == sharded["bases"]["inversion"]

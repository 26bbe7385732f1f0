"""The `metrics` group end to end: stem.metrics.evaluation.Evaluator, run_job with metrics=recon|edit|all,
figures in the run directory, flows cached per source, and bad metric settings refused early."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import FAST, compose_config, read_wandb_records, run_cli

from stem.core.errors import ConfigError, MetricError
from stem.data.synthetic import camera_pan
from stem.data.video import Video, read_frames, write_video
from stem.metrics import reconstruction_metrics, warp_error
from stem.metrics.clip_score import ClipScorer
from stem.metrics.evaluation import Evaluator, per_frame_columns, summary_scalars
from stem.runs.cache import TensorCache

RANDOM_CLIP = "metrics.clip.pretrained=null"  # no CLIP weights offline: a random model (mechanics only)


@pytest.fixture(scope="module")
def all_metrics_run(tmp_path_factory):
    from stem.app.job import run_job

    tmp = tmp_path_factory.mktemp("all")
    metrics = run_job(compose_config(tmp, "metrics=all", RANDOM_CLIP), tmp / "run")
    return tmp / "run", metrics


def test_each_metrics_option_composes_with_its_sections(tmp_path):
    sections = {"recon": (True, False, False, False), "edit": (False, True, True, False),
                "all": (True, True, True, True)}
    for name, (recon, clip, warp, features) in sections.items():
        cfg = compose_config(tmp_path, f"metrics={name}")
        assert cfg.metrics._target_ == "stem.metrics.evaluation.Evaluator"
        assert (cfg.metrics.reconstruction, cfg.metrics.clip is not None, cfg.metrics.warp_error,
                cfg.metrics.features is not None) == (recon, clip, warp, features), name
    cfg = compose_config(tmp_path, "metrics=edit")
    assert (cfg.metrics.clip.model, cfg.metrics.clip.pretrained) == ("ViT-B-32-quickgelu", "openai")
    assert cfg.metrics.flow.backend == "auto" and cfg.metrics.flow.raft_iters == 12


def test_metrics_all_writes_every_section_and_the_figures(all_metrics_run):
    run_dir, metrics = all_metrics_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["clip"]["clip_score"] == pytest.approx(metrics["clip"]["clip_score"])
    for section in ("vs_input", "vs_vae", "vae_vs_input", "clip", "warp_error", "feature_similarity"):
        assert section in saved, section
    clip = saved["clip"]
    assert clip["pretrained"] is None and clip["prompt"] == "a portrait photo of an astronaut"
    assert clip["weights"] == "random"  # what the table captions read
    assert len(clip["per_frame"]) == 4 and len(clip["consistency_per_pair"]) == 3
    assert all(-1 <= v <= 1 for v in clip["per_frame"] + clip["consistency_per_pair"])

    warp = saved["warp_error"]
    assert warp["backend"] == "exact"  # the synthetic pan carries its ground-truth flow
    assert warp["flow_weights"] == "none: exact ground-truth flow"
    assert len(warp["per_pair"]) == 3 and 0 < warp["valid_fraction"] < 1
    assert warp["warp_error_unmasked"] > warp["warp_error"] > 0
    assert warp["source"]["warp_error"] < 1e-9  # the source itself: zero with its exact flow (the floor)
    assert warp["source"]["warp_error_unmasked"] > 1  # ... while the unmasked border penalty is not

    feats = saved["feature_similarity"]
    assert feats["layer"] == "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
    assert len(feats["per_step"]) == 5 and feats["timesteps"] == [1, 201, 401, 601, 801]
    assert feats["mean"] == pytest.approx(np.mean(feats["per_step"]))
    assert (feats["flow_backend"], feats["flow_weights"]) == ("exact", "none: exact ground-truth flow")
    for name in (feats["plot"], feats["pca"]):
        image = iio.imread(run_dir / name)  # a real PNG, decodable
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0, name


def test_a_run_with_a_random_clip_yields_a_caption_saying_so(all_metrics_run, tmp_path):
    """The metrics.json a random-CLIP run wrote, as a job of a sweep: its table's caption and sidecar
    name the CLIP weights as random and not comparable to the paper, and the frames it scored.
    Mutation caught: the evaluator not recording the weights (the caption would read them as unknown)."""
    from test_provenance import make_sweep

    from stem.reporting.tables import write_sweep_outputs

    run_dir, _ = all_metrics_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    root = make_sweep(tmp_path / "sweep", [(["metrics=all"], saved, "tiny", None)])
    got = write_sweep_outputs(root, "t", columns=["metrics"])["provenance"]
    assert got["random_metric_weights"] is True
    assert got["metric_weights"] == ("CLIP ViT-B-32-quickgelu (random weights: not comparable to the paper), "
                                     "flow exact (none: exact ground-truth flow)")
    assert f"metric weights: {got['metric_weights']}" in got["caption"] and "frames scored: synthetic_pan 1-4" \
        in got["caption"]
    assert json.loads((root / "t.json").read_text())["metric_weights"] == got["metric_weights"]


def test_run_metrics_equal_the_library_functions(all_metrics_run):
    run_dir, metrics = all_metrics_run
    video = camera_pan(n_frames=4)
    recon = torch.from_numpy(read_frames(run_dir / "reconstruction.mp4")[0]).permute(0, 3, 1, 2).float() / 255
    # the mp4 is lossy: only the source floor can be recomputed exactly from files
    source = warp_error(video.frames, video.frames, flow=video.flow, progress=False)
    assert metrics["warp_error"]["source"]["warp_error_unmasked"] == pytest.approx(source["warp_error_unmasked"])
    approx = warp_error(recon, video.frames, flow=video.flow, progress=False)["warp_error"]
    assert approx == pytest.approx(metrics["warp_error"]["warp_error"], rel=0.2)
    clip = ClipScorer(pretrained=None, device="cpu").score(video.frames, video.prompt)
    vs_input = reconstruction_metrics(recon, {"input": video.frames})["input"]
    assert vs_input["psnr"] == pytest.approx(metrics["vs_input"]["psnr"], abs=0.3)
    assert clip["frame_consistency"] > 0.9  # random CLIP still sees four near-identical pan frames as close


def test_metrics_recon_is_the_default_and_has_no_edit_sections(tmp_path):
    from stem.app.job import run_job

    metrics = run_job(compose_config(tmp_path), tmp_path / "run")
    assert {"vs_input", "vs_vae", "vae_vs_input"} <= set(metrics)
    assert not {"clip", "warp_error", "feature_similarity"} & set(metrics)
    assert not list((tmp_path / "run").glob("*.png"))


def test_feature_similarity_on_a_cache_hit_inverts_again_and_agrees(tmp_path):
    from stem.app.job import run_job

    first = run_job(compose_config(tmp_path, "metrics=all", RANDOM_CLIP), tmp_path / "a")
    second = run_job(compose_config(tmp_path, "metrics=all", RANDOM_CLIP), tmp_path / "b")
    assert not first["inversion_cache"]["hit"] and second["inversion_cache"]["hit"]
    assert second["feature_similarity"]["per_step"] == pytest.approx(first["feature_similarity"]["per_step"],
                                                                     abs=1e-6)


def test_static_video_has_feature_similarity_one_at_every_step(tiny_model):
    pan = camera_pan(n_frames=1, width=64, height=64)
    video = Video(frames=pan.frames.repeat(3, 1, 1, 1), fps=10, prompt=pan.prompt, name="static",
                  flow=torch.zeros(2, 2, 64, 64))
    from stem.inversion.methods import DDIMInversion
    from stem.runs.reconstruction import invert_video

    ev = Evaluator(reconstruction=False, features={"pca_steps": [0]}, device="cpu", progress=False)
    method = DDIMInversion("1frame", num_steps=3)
    recorder = ev.feature_recorder(tiny_model, video, method.num_steps)
    invert_video(tiny_model, video, method, observer=recorder, progress=False)
    section = ev.evaluate(video.frames, video, recorder=recorder)["feature_similarity"]
    assert section["per_step"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_flow_of_a_real_video_is_estimated_once_and_cached(tmp_path):
    from stem.app.job import run_job

    pan = camera_pan(n_frames=4, width=64, height=64, dx=2, dy=1)
    write_video(tmp_path / "pan", pan.frames, fps=10)  # a frame folder: no ground-truth flow
    args = ("data=video", f"data.path={tmp_path / 'pan'}", "data.prompt=a pan", "metrics=edit", RANDOM_CLIP,
            "metrics.flow.backend=dis")
    first = run_job(compose_config(tmp_path, *args), tmp_path / "a")
    assert first["warp_error"]["backend"] == "dis"
    assert first["warp_error"]["flow_weights"] == "none: OpenCV DIS, no learned weights"
    assert 0 < first["warp_error"]["source"]["warp_error"] < 1  # DIS on a clean pan: near zero
    entries = list(TensorCache(tmp_path / "cache" / "flow").root.iterdir())
    assert len(entries) == 1
    second = run_job(compose_config(tmp_path, *args, "inversion=ddim_allframe"), tmp_path / "b")
    assert list(TensorCache(tmp_path / "cache" / "flow").root.iterdir()) == entries  # same source: cache hit
    assert second["warp_error"]["source"] == first["warp_error"]["source"]


def test_wandb_logs_summary_per_frame_columns_and_figures(tmp_path, monkeypatch):
    from stem.app.job import run_job

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    metrics = run_job(compose_config(tmp_path, "logger=wandb", "metrics=all", RANDOM_CLIP), tmp_path / "run")
    summary = {}
    for record in read_wandb_records(tmp_path / "run"):
        if record.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    assert summary["clip/clip_score"] == pytest.approx(metrics["clip"]["clip_score"])
    assert summary["warp_error/warp_error"] == pytest.approx(metrics["warp_error"]["warp_error"])
    assert summary["feature_similarity/mean"] == pytest.approx(metrics["feature_similarity"]["mean"])
    (table,) = (tmp_path / "run").glob("wandb/offline-run-*/files/media/table/per_frame_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][0] == "frame" and "clip/per_frame" in content["columns"]
    column = content["columns"].index("clip/per_frame")
    assert [row[column] for row in content["data"]] == pytest.approx(metrics["clip"]["per_frame"])
    images = {p.name.split("_")[0] for p in (tmp_path / "run").glob("wandb/offline-run-*/files/media/images/*.png")}
    assert {"feature"} <= images and len(list((tmp_path / "run").glob("wandb/offline-run-*/files/media/images/*"))) == 2


def test_summary_scalars_and_per_frame_columns_pick_metric_sections():
    metrics = {"vs_input": {"psnr": 20.0, "psnr_per_frame": [19.0, 21.0]}, "video": {"width": 256},
               "warp_error": {"warp_error": 4.0, "backend": "dis", "source": {"warp_error": 0.1}},
               "clip": {"clip_score": 0.3, "per_frame": [0.2, 0.4]}, "seconds": {"inversion": 3.0}}
    assert summary_scalars(metrics) == {"vs_input/psnr": 20.0, "warp_error/warp_error": 4.0,
                                        "warp_error/source/warp_error": 0.1, "clip/clip_score": 0.3}
    assert per_frame_columns(metrics) == {"vs_input/psnr_per_frame": [19.0, 21.0], "clip/per_frame": [0.2, 0.4]}


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip={"modle": "x"}), r"metrics.clip: unknown setting\(s\) \['modle'\]"),
    (dict(flow={"backend": "farneback"}), r"metrics.flow.backend='farneback' is not one of auto, raft, dis"),
    (dict(flow={"batch_size": 0}), r"metrics.flow.batch_size=0 must be an integer of at least 1"),
    (dict(features={"pca_frames": 0}), r"metrics.features.pca_frames=0"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Evaluator(**kwargs)


def test_prepare_refuses_what_the_video_cannot_be_scored_with():
    one = camera_pan(n_frames=1, width=64, height=64)
    with pytest.raises(MetricError, match=r"warp error: need at least 2 frames.*has 1; set data.n_frames"):
        Evaluator(warp_error=True).prepare(one)
    small = camera_pan(n_frames=3, width=64, height=64)
    small.flow = None
    with pytest.raises(MetricError, match=r"RAFT needs frames of at least 128x128, the video is 64x64; "
                                          r"use metrics.flow.backend=dis"):
        Evaluator(warp_error=True, flow={"backend": "raft"}).prepare(small)
    with pytest.raises(ConfigError, match=r"pca_steps=\[0, 7\]: \[7\] outside the 5 inversion steps"):
        Evaluator(features={"pca_steps": [0, 7]}).prepare(small, num_steps=5)


def test_cli_bad_metric_input_is_one_line_and_exit_2_before_the_model(tmp_path):
    proc = run_cli(*FAST, "metrics=edit", "data.n_frames=1", f"hydra.run.dir={tmp_path / 'run'}",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2
    (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert "need at least 2 frames" in line and "metrics=recon" in line
    assert "built tiny" not in proc.stdout + proc.stderr  # refused before the model was built
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_cli_without_clip_weights_says_how_to_provide_them(tmp_path):
    proc = run_cli(*FAST, "metrics=edit", f"metrics.clip.pretrained={tmp_path / 'missing.safetensors'}",
                   f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2
    (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert "clip_score" in line and "missing.safetensors" in line
    assert not (tmp_path / "run" / "metrics.json").exists()

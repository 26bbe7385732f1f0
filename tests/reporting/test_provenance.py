"""Provenance of a sweep's tables (stem.reporting.provenance, stem.diffusion.device.device_name) on hand-written sweep
folders: no model runs. `make_sweep` is shared with tests/reporting/test_tables.py."""

import json
from pathlib import Path

import pytest
import yaml

from stem.diffusion.device import device_name
from stem.reporting.provenance import sweep_provenance
from stem.reporting.tables import collect_runs, write_sweep_outputs

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"
TARGETS = {"tiny": "stem.diffusion.models.build_tiny", "sd15_arch": "stem.diffusion.models.build_sd15_arch",
           "sd15": "stem.diffusion.models.load_pretrained"}


def job_metrics(psnr=30.0, ssim=0.9, *, model="tiny-seed0", device="cpu", name="AMD EPYC 7B13", dtype="torch.float32",
                clip_name="synthetic", frames=4, size=(64, 64), steps=5, inversion=None, **extra):
    """A metrics.json as run_job writes it (only the fields tables and provenance read); name=None: a run
    from before `device_name` was recorded."""
    out = {"vs_input": {"psnr": psnr, "ssim": ssim}, "vs_vae": {"psnr": psnr + 10, "ssim": ssim},
           "model": model, "device": device, "dtype": dtype,
           "video": {"name": clip_name, "frames": frames, "width": size[0], "height": size[1], "fps": 8},
           "inversion": {"method": "ddim", "context": "1frame", "num_steps": steps, **(inversion or {})},
           "seconds": {"inversion": 60.0, "inversion_per_frame": 60.0 / frames},
           "memory": {"inversion_peak_mib": 10.0}, **extra}
    if name is not None:
        out["device_name"] = name
    return out


def make_sweep(root: Path, jobs: list, params: dict | None = None, spec: dict | None = None) -> Path:
    """A sweep folder as `python run.py -m` leaves it. jobs: (overrides, metrics or None (a failed job),
    model option for .hydra/config.yaml or None (no config), git.json dict or None)."""
    for i, (overrides, result, model, git) in enumerate(jobs):
        hydra_dir = root / str(i) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if model is not None:
            (hydra_dir / "config.yaml").write_text(yaml.safe_dump(
                {"model": {"_target_": TARGETS[model], "seed": "${seed}"}, "seed": 0}))
        if result is not None:
            (root / str(i) / "metrics.json").write_text(json.dumps(result))
            (root / str(i) / "git.json").write_text(json.dumps(git or {"commit": SHA, "dirty": False}))
    hydra = {"sweeper": {"params": params or {}}, "callbacks": {"sweep_table": spec or {}}}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    return root


def facts(root):
    return sweep_provenance(collect_runs(root))


def test_tiny_cpu_sweep_names_model_device_clip_steps_commit_and_random_weights(tmp_path):
    """Mutations caught: the device type written instead of its name; the random-weights warning
    dropped; frames/size/steps/commit/dirty taken from the wrong field; a failed job counted as finished."""
    root = make_sweep(tmp_path, [(["inversion=ddim_1frame"], job_metrics(), "tiny", None),
                                 (["inversion=stem"], job_metrics(), "tiny", {"commit": SHA, "dirty": True}),
                                 (["inversion=ddim_2frame"], None, "tiny", None)])
    got = facts(root)
    caption = got.pop("caption")
    assert got == {"model": "tiny", "model_name": "tiny-seed0", "random_weights": True, "dtype": "float32",
                   "device": "cpu", "device_name": "AMD EPYC 7B13", "clips": "synthetic (4 frames, 64x64)",
                   "frames": "unknown", "same_frames": None, "metric_weights": "none", "random_metric_weights": False,
                   "steps": "5", "commit": f"{SHA}, {SHA} (dirty)", "dirty": True, "jobs": 3, "jobs_finished": 2,
                   "jobs_not_finished": {"failed": 1}}
    assert caption == ("Model tiny (random weights: mechanics only), float32, on AMD EPYC 7B13 (cpu); "
                       "clips: synthetic (4 frames, 64x64); 5 DDIM steps; "
                       f"commit {SHA[:10]}, {SHA[:10]} (dirty); 2 of 3 jobs finished (1 failed: the table's Not "
                       "finished column says why).")


def test_real_weights_carry_no_random_weights_wording(tmp_path):
    """Mutation caught: every model called random (or none: see the test above), e.g. the
    warning keyed on the dtype or always on."""
    real = job_metrics(model="stable-diffusion-v1-5", device="cuda:0", name="NVIDIA H200", dtype="torch.float16",
                       clip_name="car-turn", frames=8, size=(512, 512), steps=50)
    root = make_sweep(tmp_path, [([], real, "sd15", None)])
    got = facts(root)
    assert (got["model"], got["model_name"], got["random_weights"]) == ("sd15", "stable-diffusion-v1-5", False)
    assert "random" not in got["caption"]
    assert got["caption"].startswith("Model sd15, float16, on NVIDIA H200 (cuda:0); clips: car-turn (8 frames, "
                                     "512x512); 50 DDIM steps;")


@pytest.mark.parametrize("name,kind,random", [("tiny-seed3", "tiny", True), ("sd15_arch-seed0", "sd15_arch", True),
                                               ("stable-diffusion-v1-5", "sd15", False)])
def test_without_the_job_config_the_model_name_tells_random_weights(tmp_path, name, kind, random):
    """Mutation caught: only `.hydra/config.yaml` consulted, so a job folder without it loses the
    warning (or sd15_arch, random too, is taken for real weights)."""
    got = facts(make_sweep(tmp_path, [([], job_metrics(model=name), None, None)]))
    assert (got["model"], got["random_weights"]) == (kind, random)
    assert ("random weights: mechanics only" in got["caption"]) is random


def test_values_that_differ_between_jobs_are_all_listed(tmp_path):
    """Mutation caught: the first job's facts stand for the sweep (a mixed sweep looks uniform)."""
    root = make_sweep(tmp_path, [
        ([], job_metrics(clip_name="car-turn", frames=8, size=(512, 512)), "tiny", None),
        ([], job_metrics(clip_name="wolf", frames=8, size=(512, 512), steps=50, device="cuda:0", name="NVIDIA H200",
                         dtype="torch.float16"), "sd15", {"commit": OTHER_SHA, "dirty": False}),
        ([], job_metrics(clip_name="car-turn", frames=16, size=(256, 256)), "tiny", None)])
    got = facts(root)
    assert got["model"] == "tiny, sd15" and got["random_weights"] is True
    assert (got["dtype"], got["device"], got["device_name"]) == ("float32, float16", "cpu, cuda:0",
                                                                 "AMD EPYC 7B13, NVIDIA H200")
    assert got["clips"] == "car-turn (8/16 frames, 512x512 / 256x256), wolf (8 frames, 512x512)"
    assert (got["steps"], got["commit"], got["dirty"]) == ("5, 50", f"{SHA}, {OTHER_SHA}", False)
    assert got["caption"].startswith("Model tiny (random weights: mechanics only), sd15, float32, float16, on "
                                     "AMD EPYC 7B13, NVIDIA H200 (cpu, cuda:0);")


def test_runs_from_before_the_device_name_still_build_their_table(tmp_path):
    """Mutation caught: metrics["device_name"] read unconditionally (KeyError: old sweeps can no longer
    be rebuilt), or the missing name silently dropped from a mixed list."""
    root = make_sweep(tmp_path, [(["inversion=ddim_1frame"], job_metrics(name=None), "tiny", None),
                                 (["inversion=stem"], job_metrics(name=None), "tiny", None)])
    out = write_sweep_outputs(root, "t", columns=["inversion"])
    assert out["provenance"]["device_name"] == "unknown"
    assert "on cpu (device name not recorded);" in out["provenance"]["caption"]
    assert (root / "t.md").read_text().startswith(f"Provenance: {out['provenance']['caption']}\n\n| Inversion |")
    (root / "0" / "metrics.json").write_text(json.dumps(job_metrics()))  # one new job beside an old one
    assert facts(root)["device_name"] == "AMD EPYC 7B13, unknown"


def test_device_name_is_the_processor_model_not_the_device_type():
    """Mutation caught: device_name returning str(device) ("cpu"), as metrics.json's "device" does."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "model name" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo model name on this machine")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.split(":", 1)[0].strip() == "model name"]
    assert device_name("cpu") == names[0] != "cpu"


# ------------------------------------------------------------------------------ metric weights, frames

NOT_PAPER = "not comparable to the paper"


def edit_metrics(*, clip_weights="openai", backend="raft", flow_weights=None, frame_numbers=None, **kwargs):
    """An editing job's metrics.json: CLIP and warp sections as stem.metrics.evaluation writes them; clip_weights
    None: a run from before `weights` was recorded, with `pretrained` only (here None: random)."""
    clip = {"model": "ViT-B-32-quickgelu", "pretrained": None if clip_weights in (None, "random") else clip_weights,
            "clip_score": 0.3}
    if clip_weights is not None:
        clip["weights"] = clip_weights
    warp = {"warp_error": 4.0, "backend": backend}
    if flow_weights is not None:
        warp["flow_weights"] = flow_weights
    out = job_metrics(model="stable-diffusion-v1-5", clip=clip, warp_error=warp, **kwargs)
    if frame_numbers is not None:
        out["video"]["frame_numbers"] = frame_numbers
    return out


def test_a_random_clip_is_named_in_the_caption_and_sidecar_as_not_comparable(tmp_path):
    """Real SD with a random CLIP (metrics.clip.pretrained=null): the caption and the sidecar say so.
    Mutations caught: only the diffusion model's weights checked (the table looks like the paper's);
    a run from before `weights` was recorded (pretrained null) read as real weights."""
    for i, clip_weights in enumerate(("random", None)):
        root = make_sweep(tmp_path / str(i), [(["table2=tokenflow"], edit_metrics(clip_weights=clip_weights),
                                               "sd15", None)])
        out = write_sweep_outputs(root, "t", columns=["table2"])
        got = out["provenance"]
        assert got["random_weights"] is False and got["random_metric_weights"] is True
        assert got["metric_weights"] == (f"CLIP ViT-B-32-quickgelu (random weights: {NOT_PAPER}), "
                                         "flow raft (Raft_Large_Weights.C_T_SKHT_V2)")
        assert f"; metric weights: {got['metric_weights']}; commit" in got["caption"]
        sidecar = json.loads((root / "t.json").read_text())
        assert sidecar["random_metric_weights"] is True and sidecar["metric_weights"] == got["metric_weights"]
        assert (root / "t.md").read_text().startswith(f"Provenance: {got['caption']}\n")


def test_paper_weights_carry_no_mark(tmp_path):
    """OpenAI CLIP and RAFT's C_T_SKHT_V2: named, not marked (mutation: the mark always on)."""
    root = make_sweep(tmp_path, [([], edit_metrics(flow_weights="Raft_Large_Weights.C_T_SKHT_V2"), "sd15", None)])
    got = facts(root)
    assert got["random_metric_weights"] is False and NOT_PAPER not in got["caption"]
    assert got["metric_weights"] == "CLIP ViT-B-32-quickgelu (openai), flow raft (Raft_Large_Weights.C_T_SKHT_V2)"


def test_a_mixed_sweep_lists_every_metric_weight_and_marks_the_table(tmp_path):
    """One job on the paper's weights, one on a random CLIP with DIS flow (the offline fallback), one on
    a custom RAFT module: all listed, the table marked. Mutation caught: the first job's weights standing
    for the sweep; DIS (no learned weights) or a custom RAFT passing as the paper's flow."""
    root = make_sweep(tmp_path, [
        (["table2=tokenflow"], edit_metrics(), "sd15", None),
        (["table2=fatezero"], edit_metrics(clip_weights="random", backend="dis",
                                           flow_weights="none: OpenCV DIS, no learned weights"), "sd15", None),
        (["table2=stem_tokenflow"], edit_metrics(backend="raft-custom"), "sd15", None)])
    got = facts(root)
    assert got["random_metric_weights"] is True
    assert got["metric_weights"] == (
        "CLIP ViT-B-32-quickgelu (openai), flow raft (Raft_Large_Weights.C_T_SKHT_V2), "
        f"CLIP ViT-B-32-quickgelu (random weights: {NOT_PAPER}), "
        f"flow dis (none: OpenCV DIS, no learned weights: {NOT_PAPER}), flow raft-custom (custom model: {NOT_PAPER})")
    assert got["metric_weights"] in got["caption"]


def test_the_caption_says_which_frames_every_job_scored(tmp_path):
    """Frame numbers (1-based, metrics.json video.frame_numbers) as spans per clip; rows on different
    frames are called out. Mutations caught: the frame count only (20 spread frames look like 1-20);
    jobs of a clip that differ reported as the first one's frames."""
    same = make_sweep(tmp_path / "same", [
        ([], edit_metrics(clip_name="car_turn", frame_numbers=list(range(1, 9))), "sd15", None),
        ([], edit_metrics(clip_name="wolf", frame_numbers=list(range(1, 21))), "sd15", None),
        ([], edit_metrics(clip_name="wolf", frame_numbers=list(range(1, 21))), "sd15", None)])
    got = facts(same)
    assert (got["frames"], got["same_frames"]) == ("car_turn 1-8, wolf 1-20", True)
    assert "; frames scored: car_turn 1-8, wolf 1-20; " in got["caption"]
    spread = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40]  # 20 of 40, evenly
    differ = make_sweep(tmp_path / "differ", [
        (["table2=tokenflow"], edit_metrics(clip_name="wolf", frame_numbers=list(range(1, 41))), "sd15", None),
        (["table2=fatezero"], edit_metrics(clip_name="wolf", frame_numbers=spread), "sd15", None),
        (["table2=stem_tokenflow"], edit_metrics(clip_name="wolf", frame_numbers=list(range(1, 41, 2))), "sd15",
         None)])
    got = facts(differ)
    assert (got["frames"], got["same_frames"]) == ("wolf 1-40 (1 job) / 20 of 1-40 (1 job) / 1-39 every 2 (1 job)",
                                                   False)
    assert f"; frames scored (they differ between jobs of a clip): {got['frames']}; " in got["caption"]


# ------------------------------------------------------------------------------ each row of an edit table


def test_the_caption_names_each_rows_method_weights_and_settings(tmp_path):
    """Table 2 rows: TokenFlow on the job's model, Pix2Video on its editor's depth model (another name and
    fingerprint) with its depth estimator, Tune-A-Video failed (the editor its config asked for). Mutations
    caught: one model named for the whole table (Pix2Video's depth model hidden), the extra weights dropped,
    a failed row missing from the list, prompts (per clip) listed as settings, a reconstruction table given rows."""
    settings = {"method": "TokenFlow", "prompt": "a fox", "negative_prompt": "ugly", "guidance_scale": 7.5,
                "num_steps": 50, "qk_layers": ["up_blocks.1.attentions.1"], "freeu": None, "propagate": True}
    tokenflow = edit_metrics(method="TokenFlow", inversion_method="ddim_1frame", model_fingerprint="0123abcd",
                             editing=settings)
    pix2video = {**edit_metrics(method="Pix2Video", inversion_method="ddim_1frame", model_fingerprint="9876fedc",
                                editing={"method": "Pix2Video", "guidance_scale": 7.5},
                                weights={"sd2_depth": "stabilityai/stable-diffusion-2-depth",
                                         "depth_estimator": "Intel/dpt-hybrid-midas"}),
                 "model": "stable-diffusion-2-depth"}   # the editor's base model, as run_job records it
    root = make_sweep(tmp_path, [(["table2=tokenflow"], tokenflow, "sd15", None),
                                 (["table2=pix2video"], pix2video, "sd15", None),
                                 (["table2=tuneavideo"], None, None, None)])
    (root / "2" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"editing": {"_target_": "stem.editing.baselines.tuneavideo.TuneAVideoEditor"}}))
    got = sweep_provenance(collect_runs(root), ["table2"])
    assert [(r["row"], r["method"], r["model"], r["fingerprint"], r["jobs_finished"]) for r in got["rows"]] == [
        ("tokenflow", "TokenFlow", "stable-diffusion-v1-5", "0123abcd", 1),
        ("pix2video", "Pix2Video", "stable-diffusion-2-depth", "9876fedc", 1),
        ("tuneavideo", "TuneAVideoEditor (no job of the row finished)", "unknown", "unknown", 0)]
    assert got["rows"][0]["settings"] == settings   # all of them in the sidecar
    assert got["caption"].endswith(
        " Rows: TokenFlow: TokenFlow on ddim_1frame inversion, weights stable-diffusion-v1-5 (fingerprint 0123abcd), "
        "settings {guidance_scale 7.5, num_steps 50, propagate true}; "
        "Pix2Video: Pix2Video on ddim_1frame inversion, weights stable-diffusion-2-depth (fingerprint 9876fedc) "
        "+ sd2_depth stabilityai/stable-diffusion-2-depth + depth_estimator Intel/dpt-hybrid-midas, "
        "settings {guidance_scale 7.5}; Tune-A-Video: TuneAVideoEditor (no job of the row finished).")
    reconstruction = make_sweep(tmp_path / "r", [(["inversion=stem"], job_metrics(), "tiny", None)])
    assert "rows" not in sweep_provenance(collect_runs(reconstruction), ["inversion"])

"""Table 1's definition of inversion time, the warm-up, inversion-only jobs, and the plain reconstruction
an editing run reports beside its edit (issue 11, points 7 and 17)."""

import json
import time

import pytest
import torch
from conftest import run_cli

from stem.data.synthetic import camera_pan
from stem.inversion.methods import DDIMInversion
from stem.runs.reconstruction import invert_video


def small_video(n=2, size=64):
    return camera_pan(n_frames=n, width=size, height=size)


def test_inversion_time_is_the_inversion_loop_only(tiny_model, monkeypatch):
    """A fake clock that only the VAE encoder and the inversion loop advance, by 100 and 7 ticks: the
    reported inversion time is exactly the loop's 7, the encoding's 100 is reported on its own.
    Catches: timing VAE encoding into the inversion (the old definition)."""
    import stem.runs.reconstruction as rec

    clock = {"now": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    real_encode, method = rec.encode_frames, DDIMInversion(num_steps=2)
    real_invert = method.invert

    def encode(*args, **kwargs):
        clock["now"] += 100
        return real_encode(*args, **kwargs)

    def invert(*args, **kwargs):
        clock["now"] += 7
        return real_invert(*args, **kwargs)

    monkeypatch.setattr(rec, "encode_frames", encode)
    monkeypatch.setattr(method, "invert", invert)
    inverted = invert_video(tiny_model, small_video(), method, progress=False)
    assert inverted.seconds == 7 and inverted.encode_seconds == 100


def test_warm_up_runs_untimed_steps_before_the_timed_inversion(tiny_model):
    """UNet calls in order: `warmup_steps` warm-up calls, then the method's own steps; the method keeps
    its step count and the trajectory is the one without warm-up. Catches: no warm-up, a warm-up that
    changes the method (num_steps left at the warm-up's), or a warm-up inside the timed region's output."""
    calls = []
    handle = tiny_model.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    try:
        method = DDIMInversion(num_steps=3)
        warm = invert_video(tiny_model, small_video(), method, progress=False, warmup_steps=2)
        n_warm = len(calls)
        cold = invert_video(tiny_model, small_video(), method, progress=False)
    finally:
        handle.remove()
    assert method.num_steps == 3
    assert n_warm == 2 + 3 and len(calls) == 5 + 3
    assert calls[:2] != calls[2:4]          # the warm-up's own 2-step schedule, then the 3-step one
    assert calls[2:5] == calls[5:8] == warm.trajectory.timesteps.tolist()
    torch.testing.assert_close(warm.trajectory.latents, cold.trajectory.latents, rtol=0, atol=0)


def run_json(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    proc = run_cli("progress=false", "data.n_frames=2", "data.width=64", "data.height=64", "inversion.num_steps=2",
                   f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_inversion_only_job_skips_the_reconstruction(tmp_path):
    """`reconstruct=false` (Table 1's jobs): timings and memory, no sampling back, no video, no PSNR.
    Catches: a timing job that still reconstructs (twice the UNet calls) or writes an empty video."""
    run_dir, metrics = run_json(tmp_path, "invert", "reconstruct=false", "use_cache=false", "warmup_steps=1")
    assert set(metrics["seconds"]) == {"inversion", "vae_encode", "inversion_per_frame", "metrics"}
    assert metrics["seconds"]["inversion"] > 0 and "vs_input" not in metrics
    assert not list(run_dir.glob("*.mp4"))
    log = (run_dir / "run.log").read_text()
    assert "PSNR/SSIM skipped" in log


def test_inversion_only_job_refuses_metrics_that_need_a_video(tmp_path):
    proc = run_cli("progress=false", "reconstruct=false", "metrics=edit", f"paths.cache_dir={tmp_path / 'c'}",
                   f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: reconstruct=false writes no video")


# ddim_1frame is slow (34 s): the same code path as stem, which stays in the default run
@pytest.mark.parametrize("inversion", [pytest.param("ddim_1frame", marks=pytest.mark.slow), "stem"])
def test_editing_run_reports_the_plain_reconstruction_of_its_latents(tmp_path, inversion):
    """An edit's `reconstruction_vs_*` sections equal the plain reconstruction job on the same (cached)
    latents: DDIM from z_T under the source prompt, guidance 1, the inversion's own self-attention.
    Catches: reporting the PnP/TokenFlow reconstruction, a second (different) inversion, or guidance 7.5."""
    stem = ["inversion.num_bases=2"] if inversion == "stem" else []
    edit_dir, edit = run_json(tmp_path, "edit", f"inversion={inversion}", *stem, "editing=tokenflow",
                              "editing.prompt=a painting", "metrics=recon")
    _, plain = run_json(tmp_path, "plain", f"inversion={inversion}", *stem)
    assert plain["inversion_cache"]["hit"] and plain["inversion_cache"]["key"] == edit["inversion_cache"]["key"]
    for ref in ("input", "vae"):
        for key in ("psnr", "ssim"):
            assert edit[f"reconstruction_vs_{ref}"][key] == pytest.approx(plain[f"vs_{ref}"][key], rel=1e-5)
    assert (edit_dir / "reconstruction.mp4").is_file() and (edit_dir / "edited.mp4").is_file()
    if inversion == "stem":  # the edit reports its inversion's K per layer (not the editing's); the cached
        # plain run the same, from the cache entry (mutations: the edit's sampling reported, the hit reporting none)
        assert set(edit["bases"]) == {"auto", "inversion"} and edit["bases"]["inversion"]["mean_k"] == 2
        assert plain["bases"]["inversion"] == edit["bases"]["inversion"]


def test_report_reconstruction_off_adds_nothing(tmp_path):
    _, edit = run_json(tmp_path, "edit", "editing=tokenflow", "editing.prompt=a painting", "metrics=recon",
                       "report_reconstruction=false")
    assert not [k for k in edit if k.startswith("reconstruction_")]

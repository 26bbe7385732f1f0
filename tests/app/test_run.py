"""run.py end to end: the run directory, the inversion cache, W&B offline, and bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAST, ROOT, compose_config, read_wandb_records, run_cli
from safetensors.torch import load_file

from stem.core.errors import StemError
from stem.data.video import load_video, write_video


def test_default_cli_run_writes_the_run_directory_and_reuses_the_cache(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_cli(*FAST, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "git.json",
                 "reconstruction.mp4", "comparison.mp4"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for ref in ("vs_input", "vs_vae", "vae_vs_input"):
        assert len(metrics[ref]["psnr_per_frame"]) == len(metrics[ref]["ssim_per_frame"]) == 4
        assert metrics[ref]["psnr"] == pytest.approx(sum(metrics[ref]["psnr_per_frame"]) / 4)
    # the VAE round trip is the ceiling: reconstruction vs VAE is far closer than vs input (random VAE)
    assert metrics["vs_vae"]["psnr"] > metrics["vs_input"]["psnr"] + 10
    assert metrics["method"] == "ddim_1frame" and metrics["inversion"]["num_steps"] == 5
    # no STEM bases: no "bases" section, no K-per-layer plot (mutation: an empty section for every method)
    assert "bases" not in metrics and not (run_dir / "bases_per_layer.png").exists()
    assert json.loads((run_dir / "git.json").read_text())["commit"]

    video = load_video(run_dir / "comparison.mp4", prompt="")
    recon = load_video(run_dir / "reconstruction.mp4", prompt="")
    assert (video.num_frames, video.width, video.height) == (4, 512, 256)
    assert (recon.num_frames, recon.width, recon.height) == (4, 256, 256)

    entry = (run_dir / "inverted_latents").resolve()
    assert entry.parent == (cache / "inversion").resolve() and entry.name == metrics["inversion_cache"]["key"]
    tensors = load_file(entry / "tensors.safetensors")
    assert tensors["latents"].shape == (6, 4, 4, 32, 32) and tensors["timesteps"].tolist() == [1, 201, 401, 601, 801]
    assert metrics["inversion_cache"]["hit"] is False

    again = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run2'}", f"paths.cache_dir={cache}")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert second["inversion_cache"] == {**metrics["inversion_cache"], "hit": True}
    # same z_T, same sampler: equal up to float summation order across processes
    assert second["vs_input"]["psnr_per_frame"] == pytest.approx(metrics["vs_input"]["psnr_per_frame"], rel=1e-6)


def test_changed_settings_miss_the_cache(tmp_path):
    from stem.app.job import run_job

    first = run_job(compose_config(tmp_path), tmp_path / "a")
    other = run_job(compose_config(tmp_path, "inversion=ddim_2frame"), tmp_path / "b")
    tuned = run_job(compose_config(tmp_path, "inversion=ddim_2frame", "inversion.pairing=tuneavideo"), tmp_path / "c")
    keys = {m["inversion_cache"]["key"] for m in (first, other, tuned)}
    assert len(keys) == 3 and not any(m["inversion_cache"]["hit"] for m in (first, other, tuned))
    assert len(list((tmp_path / "cache" / "inversion").iterdir())) == 3


class RecordingLogger:
    """A logger that records how it was finished."""

    finished: list = []

    def __init__(self, **kwargs):
        pass

    def log_run(self, metrics, run_dir):
        raise RuntimeError("boom")  # fail after the run directory is written

    def finish(self, failed):
        RecordingLogger.finished.append(failed)


def test_logger_is_finished_and_marked_failed_when_the_job_raises(tmp_path):
    from stem.app.job import run_job

    cfg = compose_config(tmp_path, f"logger._target_={__name__}.RecordingLogger")
    RecordingLogger.finished.clear()
    with pytest.raises(RuntimeError, match="boom"):
        run_job(cfg, tmp_path / "run")
    assert RecordingLogger.finished == [True]


def wandb_summary_and_exit(run_dir):
    summary, exit_codes = {}, []
    for record in read_wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
        elif kind == "exit":
            exit_codes.append(record.exit.exit_code)
    return summary, exit_codes


def test_wandb_offline_run_records_metrics_table_and_video(tmp_path, monkeypatch):
    from stem.app.job import run_job

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    metrics = run_job(compose_config(tmp_path, "logger=wandb"), tmp_path / "run")
    summary, exit_codes = wandb_summary_and_exit(tmp_path / "run")
    assert exit_codes == [0]
    assert summary["vs_input/psnr"] == pytest.approx(metrics["vs_input"]["psnr"])
    assert summary["vs_vae/ssim"] == pytest.approx(metrics["vs_vae"]["ssim"])
    (table,) = (tmp_path / "run").glob("wandb/offline-run-*/files/media/table/per_frame_*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert [row[1] for row in rows] == pytest.approx(metrics["vs_input"]["psnr_per_frame"])
    assert list((tmp_path / "run").glob("wandb/offline-run-*/files/media/videos/comparison_*.mp4"))


def test_wandb_run_is_marked_failed_when_the_job_fails(tmp_path, monkeypatch):
    from stem.app.job import run_job

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config(tmp_path, "logger=wandb", "data=video", "data.path=/nonexistent/clip.mp4", "data.prompt=x")
    with pytest.raises(StemError):
        run_job(cfg, tmp_path / "run")
    assert wandb_summary_and_exit(tmp_path / "run")[1] == [1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    (root / "corrupt.mp4").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (root / "empty").mkdir()
    write_video(root / "short.mp4", torch.rand(3, 3, 64, 64), fps=10)
    return root


BAD_INPUT = {
    "missing file": (["data=video", "data.path={clips}/nope.mp4", "data.prompt=x"], 2, "not found"),
    "corrupt video": (["data=video", "data.path={clips}/corrupt.mp4", "data.prompt=x"], 2, "cannot read"),
    "folder without frames": (["data=video", "data.path={clips}/empty", "data.prompt=x"], 2, "no frames"),
    "n_frames beyond the clip": (["data=video", "data.path={clips}/short.mp4", "data.prompt=x", "data.n_frames=10"],
                                 2, "has 3 frames"),
    "width not a multiple of 8": (["data.width=250"], 2, "use 248 or 256"),
    "unknown pairing": (["inversion=ddim_2frame", "inversion.pairing=odd"], 2, "pairing='odd'"),
    "unknown inversion option": (["inversion=ddim_3frame"], 1, "Could not find 'inversion/ddim_3frame'"),
    "prompt over 77 tokens": ([f"data.prompt='{'a very long prompt ' * 8}'"], 2, "more than the text encoder's 77"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_with_one_clear_line_and_writes_no_cache(tmp_path, clips, case):
    overrides, code, words = BAD_INPUT[case]
    cache = tmp_path / "cache"
    proc = run_cli(*FAST, *[o.format(clips=clips) for o in overrides], f"hydra.run.dir={tmp_path / 'run'}",
                   f"paths.cache_dir={cache}")
    assert proc.returncode == code, proc.stderr[-2000:]
    assert words in proc.stderr
    if code == 2:  # our own errors: exactly one line on stderr, no traceback
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.rglob("*"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_library_errors_name_the_config_group(tmp_path):
    from stem.app.job import run_job

    with pytest.raises(StemError, match=r"^data: .*not found"):
        run_job(compose_config(tmp_path, "data=video", "data.path=/nonexistent/clip.mp4", "data.prompt=x"),
                tmp_path / "run")


# The demo at full length (50 steps, 8 frames 256x256) for each context. Measured PSNR of the
# reconstruction vs the VAE round trip: 43.63 (1frame), 43.62 (2frame), 43.63 dB (allframe); bound 40 dB.
@pytest.mark.slow
@pytest.mark.parametrize("inversion", ["ddim_1frame", "ddim_2frame", "ddim_allframe"])
def test_full_length_demo_reconstructs_each_context(tmp_path, inversion):
    from stem.app.job import run_job

    metrics = run_job(compose_config(tmp_path, f"inversion={inversion}", "progress=false", fast=False), tmp_path / "r")
    assert metrics["inversion"]["num_steps"] == 50 and metrics["video"]["frames"] == 8
    assert metrics["vs_vae"]["psnr"] > 40


DENORMAL_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
if {import_run}:
    import run  # noqa: F401
x = torch.full((1 << 22,), 1e-39)   # a denormal in fp32; 4M elements: every intra-op worker takes a share
torch.set_num_threads(max(2, torch.get_num_threads()))
print(int((x * 1.5 != 0).sum()))
"""


@pytest.mark.parametrize("import_run", [True, False])
def test_importing_run_flushes_denormals_in_every_torch_worker_thread(import_run):
    """run.py sets flush-to-zero at import, before any torch op starts the CPU worker threads, which take the mode
    from the thread that starts them: every element of a parallel op on denormals is then flushed. The plain
    process (no import of run) keeps them, so the check can tell. Mutation seen failing: setup_cpu() called only
    when the model is built (after building the data had started the workers: 8x slower auto-K inversions)."""
    code = DENORMAL_CHECK.format(root=str(ROOT), import_run=import_run)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    kept = int(out.stdout.split()[-1])
    assert (kept == 0) if import_run else (kept == 1 << 22), kept

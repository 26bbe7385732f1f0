"""What a run directory holds besides Hydra's `.hydra/`: metrics, videos, git revision.

Every file is written under a temporary name and renamed into place, so a failed run never
leaves a half-written `metrics.json` that a table script could mistake for a result.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from stem.core.atomic import atomic_file
from stem.data.video import side_by_side, write_video


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write (inf/nan are written as strings "inf"/"nan", keeping strict JSON)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def git_revision(repo: str | Path = ".") -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the checkout that ran the code."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_run(run_dir: str | Path, video, frames, output: str, inverted, metrics: dict,
              extra: dict | None = None, videos: dict | None = None) -> dict:
    """Write `<output>.mp4` (the reconstructed or edited `frames`; none when `frames` is None, an
    inversion-only run), comparison.mp4 (input | output), `<name>.mp4` for each of `videos`,
    the inverted-latents link, git.json and metrics.json (`metrics` from
    `stem.metrics.evaluation.Evaluator.evaluate`, plus run facts and `extra`) into `run_dir`; return the
    metrics.json content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if frames is not None:
        write_video(run_dir / f"{output}.mp4", frames, video.fps)
        write_video(run_dir / "comparison.mp4", side_by_side(video.frames, frames), video.fps)
    for name, other in (videos or {}).items():
        write_video(run_dir / f"{name}.mp4", other, video.fps)
    if inverted.entry is not None:
        link = run_dir / "inverted_latents"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(inverted.entry).resolve(), target_is_directory=True)
    write_json(run_dir / "git.json", git_revision(Path(__file__).resolve().parent))
    metrics = {
        **metrics,
        "video": {"name": video.name, "source": video.source, "prompt": video.prompt,
                  "frames": video.num_frames, "width": video.width, "height": video.height, "fps": video.fps,
                  "frame_numbers": video.frame_numbers},  # numbered from 1 in the source video, as the paper numbers
        "inversion_cache": {"key": inverted.key, "path": str(inverted.entry) if inverted.entry else None,
                            "hit": inverted.cache_hit},
        **(extra or {}),
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics

"""Fake job folders of a Table 2 sweep with the files a real edit job writes (`.hydra/overrides.yaml`,
`.hydra/config.yaml`, `status.json`, `git.json`, `metrics.json`, `edited.mp4`, `comparison.mp4` = source | edit), and
a small manifest of pairs for the sampling and store tests. Videos are 4 frames of 32x32, each a flat grey level:
the source's level names its clip, the edit's its job, so a test can tell which file it got."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

FRAMES, SIZE = 4, 32
METHOD_OF_ROW = {"fatezero": "FateZero", "stem_fatezero": "STEM-FateZero", "tokenflow": "TokenFlow",
                 "stem_tokenflow": "STEM-TokenFlow", "tuneavideo": "Tune-A-Video",
                 "stem_fatezero_smaller": "STEM-FateZero"}
SOURCE_LEVEL = {"wolf": 40, "car_turn": 120, "taylor": 200, "woman_running": 160}


def flat(level: int, frames: int = FRAMES, width: int = SIZE) -> np.ndarray:
    return np.full((frames, SIZE, width, 3), level, dtype=np.uint8)


def make_job(root: Path, job: int, row: str, clip: str, prompt: str, *, finished: bool = True,
             frame_numbers: list[int] | None = None, videos: bool = True) -> Path:
    """Job folder `<root>/<job>` of `table2=<row> data=<clip>` editing to `prompt`. `finished=False`: a failed job
    (status.json says failed, no metrics.json, no videos)."""
    from stem.data.video import write_video

    folder = root / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"table2={row}", f"data={clip}"]))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"_target_": "stem.diffusion.models.build_tiny"}, "editing": {"_target_": "x.FateZeroEditor"}}))
    (folder / "git.json").write_text(json.dumps({"commit": "0" * 40, "dirty": False}))
    if not finished:
        (folder / "status.json").write_text(json.dumps({"state": "failed", "pid": 1, "host": "h", "reason": "oom"}))
        return folder
    (folder / "status.json").write_text(json.dumps({"state": "done", "pid": 1, "host": "h"}))
    if videos:
        edit_level = 10 + 7 * job
        write_video(folder / "edited.mp4", flat(edit_level), 8.0)
        write_video(folder / "comparison.mp4", np.concatenate([flat(SOURCE_LEVEL[clip]), flat(edit_level)], axis=2),
                    8.0)
    method = METHOD_OF_ROW[row]
    metrics = {"method": method, "edit_prompt": prompt, "inversion_method": "stem_k256" if "stem" in row else "x",
               "editing": {"method": method.removeprefix("STEM-")}, "model": "tiny-seed0", "dtype": "torch.float32",
               "device": "cpu", "video": {"name": clip, "source": f"/clips/{clip}.mp4", "prompt": f"a {clip}",
                                         "frames": FRAMES, "width": SIZE, "height": SIZE, "fps": 8.0,
                                         "frame_numbers": frame_numbers or list(range(1, FRAMES + 1))}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def fake_manifest(count: int) -> dict:
    """A manifest of `count` pairs, alternating the two comparisons (no files: sampling and store need none)."""
    comparisons = (["FateZero", "STEM-FateZero"], ["TokenFlow", "STEM-TokenFlow"])
    pairs = []
    for i in range(count):
        methods = comparisons[i % 2]
        pairs.append({"id": f"p{i:03d}", "clip": f"clip{i}", "prompt": f"prompt {i}", "source_prompt": "a clip",
                      "comparison": " vs ".join(methods), "methods": list(methods),
                      "videos": {m: f"/v/{i}/{m}.mp4" for m in methods}, "runs": {m: f"/r/{i}/{m}" for m in methods},
                      "source": f"/s/{i}.mp4"})
    return {"version": 1, "sweep": "/sweeps/table2", "provenance": "Model tiny.", "pairs": pairs, "skipped": []}

"""scripts/benchmark_editing.py end to end on the tiny model, and its refusals of bad options."""

from __future__ import annotations

import json

import pytest
from conftest import run_script


def bench(*args, timeout=180):
    return run_script("benchmark_editing.py", *args, timeout=timeout)


def test_benchmark_writes_one_row_per_frame_count(tmp_path):
    out = tmp_path / "edit.md"
    proc = bench("--frames", "3,6", "--batch-size", 3, "--width", 32, "--height", 32, "--steps", 1, "--repeats", 1,
                 "--device", "cpu", "--output", out)
    assert proc.returncode == 0, proc.stderr
    raw = json.loads(out.with_suffix(".json").read_text())
    assert [(r["frames"], r["keyframes"]) for r in raw["rows"]] == [(3, 1), (6, 2)]
    assert all(r["seconds"] > 0 and r["peak_mib"] >= 0 and r["cache_mib"] > 0 for r in raw["rows"])
    assert raw["rows"][1]["cache_mib"] == pytest.approx(2 * raw["rows"][0]["cache_mib"])  # one cache per keyframe
    assert out.read_text().count("\n| ") == 3  # header row + two frame counts


@pytest.mark.parametrize("args, words", [
    (["--frames", "0"], "--frames 0"),
    (["--frames", "a"], "invalid literal"),
    (["--batch-size", "0"], "--batch-size=0"),
])
def test_benchmark_refuses_bad_options(args, words):
    proc = bench(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and words in proc.stderr

"""scripts/benchmark_inversion.py end to end on the tiny model, and its refusals of bad options."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT, run_script

SCRIPT = ROOT / "scripts" / "benchmark_inversion.py"


def bench(*args, timeout=180):
    return run_script("benchmark_inversion.py", *args, timeout=timeout)


def test_benchmark_writes_one_row_per_method(tmp_path):
    out = tmp_path / "bench" / "table.md"
    proc = bench("--model", "tiny", "--frames", 4, "--width", 64, "--height", 64, "--steps", 2, "--repeats", 1,
                 "--methods", "ddim_1frame,stem_k4", "--device", "cpu", "--output", out)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["ddim_1frame", "stem_k4"]
    assert rows["ddim_1frame"][2] == "1.00" and rows["ddim_1frame"][4] == "1.00"
    for seconds, per_frame, ratio, _, _ in rows.values():
        assert float(seconds) > 0 and float(per_frame) > 0 and float(ratio) > 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in raw["rows"]] == ["ddim_1frame", "stem_k4"]
    assert all(r["seconds"] > 0 and r["peak_mib"] >= 0 and len(r["runs_seconds"]) == 1 for r in raw["rows"])
    assert any(h.startswith("device: ") for h in raw["header"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("args, words", [
    (["--methods", "ddim_3frame"], "unknown method"),
    (["--steps", "0"], "--steps=0"),
    (["--model", "sd3"], "invalid choice"),
    (["--width", "60"], "multiple of 8"),
    (["--output", "table.json"], "name the markdown file"),
    (["--methods", "stem_k1000", "--excess-bases", "error", "--frames", "1", "--width", "64", "--height", "64"],
     "exceeds"),
])
def test_benchmark_refuses_bad_options(args, words, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_inversion", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        status = script.main(["--device", "cpu", "--frames", "2", *args])
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines

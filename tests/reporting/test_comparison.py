"""The paper's comparison figures (Figs. 5 and 11, stem.reporting.comparison, scripts/make_comparison.py) and a failed
row's reason (table, caption, figures), on a real tiny sweep: `python run.py -m experiment=table2_editing` with two
rows of existing editors (TokenFlow, STEM-TokenFlow) and a third whose setting is refused before any model work
(a real failed job), 4 frames of 64x64, 2 steps."""

import json

import numpy as np
import pytest
from conftest import read_wandb_records, run_cli, run_script

from stem.data.video import read_frames

ROWS = ["tokenflow", "stem_tokenflow", "broken_row"]
LABELS = ["Source", "TokenFlow", "Ours (STEM-TokenFlow)", "broken_row"]  # the paper's names, in the sweep's order
FRAMES, SIZE, BAND = 4, 64, 16   # the clip; the label band over each column: max(16, 64 // 8)
BROKEN = """# @package _global_
defaults:
  - override /inversion: ddim_1frame
  - override /editing: tokenflow
editing:
  pnp_attn_t: 2.0
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep folder and the one-line error its failed job printed."""
    root = tmp_path_factory.mktemp("sweep")
    extra = tmp_path_factory.mktemp("configs")
    (extra / "table2").mkdir()
    (extra / "table2" / "broken_row.yaml").write_text(BROKEN)   # pnp_attn_t is a fraction of the steps: refused
    proc = run_cli("-m", "experiment=table2_editing", "model=tiny", "data=synthetic", "progress=false",
                   f"hydra.sweep.dir={root}", f"paths.cache_dir={root / 'cache'}", f"table2={','.join(ROWS)}",
                   f"hydra.searchpath=[file://{extra}]", "excess_bases=clamp", "inversion.num_steps=2",
                   f"data.n_frames={FRAMES}", f"data.width={SIZE}", f"data.height={SIZE}",
                   "metrics.clip.pretrained=null", timeout=900)
    assert proc.returncode != 0, "the sweep with a refused job must exit non-zero"
    errors = [line[len("error: "):] for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "pnp_attn_t" in errors[0], proc.stderr[-3000:]
    return root, errors[0]


def job_of(root, row):
    for job in root.iterdir():
        if (job / ".hydra").is_dir() and f"table2={row}" in (job / ".hydra" / "overrides.yaml").read_text():
            return job
    raise AssertionError(f"no job of {row}")


def test_a_failed_row_says_why_in_the_table_and_the_caption_counts_it(sweep):
    """The job refused before the model is a row whose Not finished cell is "failed: " + the very line it printed
    (status.json's reason), the finished rows' cells empty; the caption counts 2 of 3 finished, 1 failed, and
    names each row's method and weights (the failed row the editor its config asked for). Mutations caught: the
    reason not recorded (the row reads only "failed"), the reason of another job, a failed job counted silently."""
    root, error = sweep
    status = json.loads((job_of(root, "broken_row") / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == error
    proc = run_script("make_tables.py", root)
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = {r["table2"]: r for r in csv.DictReader((root / "table2_editing.csv").open())}
    assert list(rows) == ROWS
    assert rows["broken_row"]["Not finished"] == f"failed: {error}" and rows["broken_row"]["CLIP score"] == "failed"
    assert rows["tokenflow"]["Not finished"] == rows["stem_tokenflow"]["Not finished"] == ""
    caption = (root / "table2_editing.md").read_text().splitlines()[0]
    assert "; 2 of 3 jobs finished (1 failed: the table's Not finished column says why)." in caption
    assert "TokenFlow: TokenFlow on ddim_1frame inversion, weights tiny-seed0 (fingerprint " in caption
    assert "STEM-TokenFlow: STEM-TokenFlow on stem_k256 inversion, weights tiny-seed0" in caption
    assert "broken_row: TokenFlowEditor (no job of the row finished)" in caption
    assert "num_steps 2" in caption and "pnp_attn_t 0.5" in caption   # each row's settings
    md = (root / "table2_editing.md").read_text()
    assert f"| failed: {error.replace('|', chr(92) + '|')} |" in md


def decoded(path):
    return read_frames(path)[0].astype(np.float64) / 255


def test_comparison_video_is_the_source_then_each_rows_own_frames(sweep):
    """<sweep>/comparison/synthetic_pan.mp4: 4 frames of (1 + 3) columns of 64x64 under a 16-pixel label band; column 0
    the source (the left half of a job's comparison.mp4), columns 1-2 each row's own edited.mp4 (within the mp4
    codec's error), column 3 the failed row's grey tile. Mutations caught: columns in job order instead of the
    sweep's, a row's frames from another job, a failed row left out (3 columns), frames cut or repeated."""
    root, _ = sweep
    assert run_script("make_comparison.py", root).returncode == 0
    video = decoded(root / "comparison" / "synthetic_pan.mp4")
    assert video.shape == (FRAMES, BAND + SIZE, (1 + len(ROWS)) * SIZE, 3)
    columns = [video[:, BAND:, i * SIZE:(i + 1) * SIZE] for i in range(1 + len(ROWS))]
    source = decoded(job_of(root, "tokenflow") / "comparison.mp4")[..., :SIZE, :]
    edited = {row: decoded(job_of(root, row) / "edited.mp4") for row in ROWS[:2]}
    # one more x264 pass (crf 17, yuv420p) over the tiny model's noisy 64x64 frames: ~3/255 mean |error| measured
    tol = 6 / 255
    assert np.abs(columns[0] - source).mean() < tol < np.abs(columns[0] - edited["tokenflow"]).mean()
    # the two rows' edits are close on the tiny random model (~2.6/255 apart), so each column must also be nearer its
    # own row's video than the other row's by a clear margin (measured: 2.9/255 own vs 3.8/255 other)
    for i, (row, other) in enumerate(((ROWS[0], ROWS[1]), (ROWS[1], ROWS[0])), start=1):
        own, wrong = np.abs(columns[i] - edited[row]).mean(), np.abs(columns[i] - edited[other]).mean()
        assert own < tol and own < 0.85 * wrong, (row, own, wrong)
    assert np.abs(columns[3] - 0.5).mean() < 0.1 and np.median(columns[3]) == pytest.approx(128 / 255, abs=2 / 255)
    bands = video[:, :BAND]
    for i in range(1 + len(ROWS)):   # a white band with a dark label in each column
        band = bands[:, :, i * SIZE:(i + 1) * SIZE]
        assert band.mean() > 0.7 and band.min() < 0.3, i


def test_strip_has_one_labelled_row_per_method_at_evenly_spaced_frames(sweep):
    """<clip>.json and the strip (rebuilt as a figure): rows Source, TokenFlow, Ours (STEM-TokenFlow), broken_row in
    that order, 3 evenly spaced frames of 4 (0-based 0, 2, 3, computed here), the failed row a tile with its
    reason; the W&B summary run holds the video as a video and the strip as an image. Mutations caught: frames
    from the start only (0, 1, 2), the paper's names not used, the failed row missing from the strip, the mp4
    logged as an image (or not at all)."""
    from stem.reporting.comparison import clip_columns, clip_groups, strip_figure
    from stem.reporting.tables import collect_runs

    root, error = sweep
    proc = run_script("make_comparison.py", root, "--count", "3", "--wandb")
    assert proc.returncode == 0, proc.stderr
    count = 3
    expected = [int(np.floor(i * (FRAMES - 1) / (count - 1) + 0.5)) for i in range(count)]   # [0, 2, 3]
    record = json.loads((root / "comparison" / "synthetic_pan.json").read_text())
    assert record["labels"] == LABELS and record["strip_indices"] == expected
    assert record["strip_frame_numbers"] == [i + 1 for i in expected]
    assert record["missing"] == {"broken_row": f"failed: {error}"}
    assert (root / "comparison" / "synthetic_pan_strip.png").stat().st_size > 1000
    (group,) = clip_groups(collect_runs(root), ["table2"], {"table2": ROWS})
    fig, indices = strip_figure(clip_columns(group, ["table2"]), count)
    assert indices == expected
    axes = fig.axes
    assert [axes[r * count].get_ylabel().replace("\n", " ") for r in range(len(LABELS))] == LABELS
    assert [ax.get_title() for ax in axes[:count]] == [f"frame {i + 1}" for i in expected]
    records = read_wandb_records(root)
    logged = {tuple(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for i in r.history.item if i.nested_key}
    assert logged[("comparison/synthetic_pan", "_type")] == "video-file"
    assert logged[("comparison/synthetic_pan_strip", "_type")] == "image-file"


def test_the_script_refuses_a_folder_without_runs(tmp_path):
    """Mutation caught: an empty folder writing nothing and exiting 0 (a silent empty figure set)."""
    proc = run_script("make_comparison.py", tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: no job folders in ") and not (tmp_path / "comparison").exists()

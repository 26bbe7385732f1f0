"""Table 3 from a study's answers (stem.study.table3): percentages, Wilson intervals, counts, the paper's values."""

import csv
import json
import math
import random

import pytest
from study_fakes import fake_manifest

from stem.core.errors import StudyError
from stem.study.store import AnswerStore
from stem.study.table3 import table3_rows, wilson, write_table3

Z = 1.959963984540054


def wilson_reference(k, n):
    """The Wilson score interval as its formula reads: centre (p + z^2/(2n)) / (1 + z^2/n), half-width
    z / (1 + z^2/n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))."""
    p = k / n
    centre = (p + Z ** 2 / (2 * n)) / (1 + Z ** 2 / n)
    half = Z / (1 + Z ** 2 / n) * math.sqrt(p * (1 - p) / n + Z ** 2 / (4 * n ** 2))
    return centre - half, centre + half


def test_wilson_interval_matches_its_formula_and_known_values():
    """Known values (no scipy): 8/10 -> [0.490, 0.943], 0/10 -> [0, 0.278], 10/10 -> [0.722, 1], 50/100 ->
    [0.404, 0.596]; and the formula above for every k of n = 1, 7, 40. Bugs caught: the Wald interval (8/10 ->
    [0.552, 1.048]), z = 1.645 (90%), z^2/n for z^2/(2n) in the centre, an interval not clipped to [0, 1]."""
    for (k, n), (low, high) in {(8, 10): (0.490, 0.943), (0, 10): (0.0, 0.278), (10, 10): (0.722, 1.0),
                                (50, 100): (0.404, 0.596)}.items():
        got = wilson(k, n)
        assert got == pytest.approx((low, high), abs=5e-4), (k, n, got)
    for n in (1, 7, 40):
        for k in range(n + 1):
            low, high = wilson_reference(k, n)
            assert wilson(k, n) == pytest.approx((max(0.0, low), min(1.0, high)), abs=1e-12)
    assert all(math.isnan(x) for x in wilson(0, 0))


@pytest.fixture
def study(tmp_path):
    """A database of 9 simulated participants answering all 12 of 16 pairs (seeded choices, STEM favoured), and the
    counts the simulation tallied itself: (comparison's STEM method, question) -> [STEM chosen, answers, people]."""
    manifest = fake_manifest(16)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    tally = {}
    rng = random.Random(0)
    with AnswerStore(tmp_path / "answers.sqlite", manifest, seed=1) as store:
        for person in range(9):
            who = f"user{person}"
            for shown in store.plan(who):
                stem_side = "left" if shown["left"].startswith("STEM-") else "right"
                stem = shown[stem_side]
                for question, favour in (("fidelity", 0.8), ("consistency", 0.65)):
                    pick_stem = rng.random() < favour
                    store.answer(who, shown["pair"], question,
                                 stem_side if pick_stem else {"left": "right", "right": "left"}[stem_side])
                    cell = tally.setdefault((stem, question), [0, 0, set()])
                    cell[0] += pick_stem
                    cell[1] += 1
                    cell[2].add(who)
    return tmp_path, tally


def test_percentages_counts_and_intervals_match_the_answers_given(study):
    """Each cell against the simulation's own tally: answers of the comparison to the question, choices of each
    method (the STEM side's and the other's adding up), participants, percent = 100 k/n, the Wilson interval of
    the formula above, the paper's value. Bugs caught: a method's choices counted over both comparisons, the
    percentage of all answers instead of its comparison's, the two questions mixed, participants counted as answers,
    the left side counted as the chosen method (every cell then near 50%)."""
    root, tally = study
    out = write_table3(root / "answers.sqlite", root / "manifest.json", root)
    rows = {(r["method"], r["question"]): r for r in out["rows"]}
    paper = {("FateZero", "fidelity"): 17, ("FateZero", "consistency"): 33, ("STEM-FateZero", "fidelity"): 83,
             ("STEM-FateZero", "consistency"): 67, ("TokenFlow", "fidelity"): 25, ("TokenFlow", "consistency"): 33,
             ("STEM-TokenFlow", "fidelity"): 75, ("STEM-TokenFlow", "consistency"): 67}
    assert set(rows) == set(paper)
    for (stem, question), (k, n, people) in tally.items():
        base = stem.removeprefix("STEM-")
        for method, chosen in ((stem, k), (base, n - k)):
            row = rows[(method, question)]
            assert (row["chosen"], row["answers"], row["participants"]) == (chosen, n, len(people))
            assert row["percent"] == pytest.approx(100 * chosen / n)
            low, high = wilson_reference(chosen, n)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((100 * max(0, low), 100 * min(1, high)))
            assert row["paper_percent"] == paper[(method, question)]
    assert sum(r["answers"] for r in out["rows"]) == 2 * (9 * 12 * 2)   # each answer in its two method rows


def test_table_files_in_the_papers_layout_with_a_caption_naming_the_sweep(study):
    """table3.md: the caption (the manifest's sweep and provenance, participants, answers), then the paper's rows in
    its order with each cell "x% [lo, hi] (k/n)" beside the paper's value; table3.csv: the rows' numbers. Bugs
    caught: rows in another order, the paper's values under the wrong method, a caption without the sweep."""
    root, tally = study
    out = write_table3(root / "answers.sqlite", root / "manifest.json", root)
    md = (root / "table3.md").read_text()
    assert md == out["markdown"]
    caption, _, header, _, *lines = md.splitlines()
    assert "videos from the sweep /sweeps/table2" in caption and "9 participants, 216 answers" in caption
    assert "Model tiny." in caption
    assert header == "| Method | Edit fidelity | Paper | Temporal consistency | Paper | Participants |"
    assert [line.split(" | ")[0] for line in lines] == ["| FateZero", "| Ours (STEM-FateZero)", "| TokenFlow",
                                                        "| Ours (STEM-TokenFlow)"]
    k, n, _ = tally[("STEM-FateZero", "fidelity")]
    low, high = wilson_reference(k, n)
    assert f"| Ours (STEM-FateZero) | {100 * k / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}] ({k}/{n}) | 83% |" \
        in md
    assert [line.split(" | ")[2] for line in lines] == ["17%", "83%", "25%", "75%"]
    with (root / "table3.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and rows[0]["method"] == "FateZero" and rows[0]["question"] == "fidelity"
    assert int(rows[1]["chosen"]) == tally[("STEM-FateZero", "consistency")][1] - tally[("STEM-FateZero",
                                                                                          "consistency")][0]


def test_no_answers_reads_no_answers_and_another_manifest_is_refused(tmp_path):
    """A comparison nobody answered reads "no answers" (never 0% or a division by zero); a database of another
    manifest is refused. Bug caught: Table 3 built from answers to other pairs than the manifest lists."""
    manifest = fake_manifest(4)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    AnswerStore(tmp_path / "a.sqlite", manifest).close()
    out = write_table3(tmp_path / "a.sqlite", tmp_path / "manifest.json", tmp_path)
    assert out["markdown"].count("no answers") == 8
    assert all(r["percent"] is None for r in table3_rows([]))
    (tmp_path / "other.json").write_text(json.dumps(fake_manifest(5)))
    with pytest.raises(StudyError, match="another manifest"):
        write_table3(tmp_path / "a.sqlite", tmp_path / "other.json", tmp_path)

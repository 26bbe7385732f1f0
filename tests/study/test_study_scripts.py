"""scripts/make_study.py and scripts/make_table3.py end to end, and their one-line errors (exit status 2)."""

import json

import pytest
from conftest import run_script
from study_fakes import fake_manifest, make_job

from stem.study.store import AnswerStore


def one_error_line(proc) -> str:
    """The stderr of a refused script: exactly one line, starting "error: ", and exit status 2."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_make_study_then_answers_then_make_table3(tmp_path):
    """A sweep of one TokenFlow pair -> manifest with 1 pair (stdout names it, no method in its id line but the
    comparison) -> 2 answers -> table3.md/.csv with 1 participant and 2 answers. Bug caught: the scripts' paths or
    arguments out of step with the library (the study built but Table 3 refusing its database)."""
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, "tokenflow", "wolf", "a wolf in the snow")
    make_job(sweep, 1, "stem_tokenflow", "wolf", "a wolf in the snow")
    proc = run_script("make_study.py", sweep, tmp_path / "study")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "study" / "manifest.json").read_text())
    (pair,) = manifest["pairs"]
    assert proc.stdout == f"{pair['id']}: wolf -> 'a wolf in the snow': TokenFlow vs STEM-TokenFlow\n"
    with AnswerStore(tmp_path / "study" / "answers.sqlite", manifest) as store:
        store.answer("alice", pair["id"], "fidelity", "left")
        store.answer("alice", pair["id"], "consistency", "right")
    proc = run_script("make_table3.py", tmp_path / "study" / "answers.sqlite", tmp_path / "study" / "manifest.json",
                      tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "table3.csv").is_file()
    assert proc.stdout == (tmp_path / "out" / "table3.md").read_text()
    assert "1 participant, 2 answers" in proc.stdout and f"videos from the sweep {sweep.resolve()}" in proc.stdout


@pytest.mark.parametrize("case,words", [
    ("missing", "not a folder"), ("empty", "no job folders"), ("one_side", "no pairs in"),
    ("duplicate", "two finished jobs of TokenFlow"),
])
def test_make_study_refuses_bad_input_in_one_line(tmp_path, case, words):
    """Bug caught: a traceback (or a manifest with no pairs) for a wrong folder, a sweep without both sides."""
    sweep = tmp_path / "sweep"
    if case != "missing":
        sweep.mkdir()
    if case in ("one_side", "duplicate"):
        make_job(sweep, 0, "tokenflow", "wolf", "a wolf")
    if case == "duplicate":
        make_job(sweep, 1, "tokenflow", "wolf", "a wolf")
        make_job(sweep, 2, "stem_tokenflow", "wolf", "a wolf")
    line = one_error_line(run_script("make_study.py", sweep, tmp_path / "study"))
    assert words in line
    assert not (tmp_path / "study" / "manifest.json").exists()


@pytest.mark.parametrize("case,words", [
    ("no_db", "answers database not found"), ("junk_db", "is not a study database"),
    ("no_manifest", "manifest not found"), ("bad_manifest", "cannot read the manifest"),
    ("other_manifest", "holds the answers of another manifest"),
])
def test_make_table3_refuses_bad_input_in_one_line(tmp_path, case, words):
    """Bug caught: sqlite3 creating an empty database for a mistyped path (a table of 0 answers), a traceback for a
    damaged file, a table built from another study's database."""
    manifest = fake_manifest(4)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    db = tmp_path / "answers.sqlite"
    if case != "no_db":
        AnswerStore(db, manifest if case != "other_manifest" else fake_manifest(6)).close()
    if case == "junk_db":
        db.write_text("not sqlite\n" * 200)
    if case == "no_manifest":
        (tmp_path / "manifest.json").unlink()
    if case == "bad_manifest":
        (tmp_path / "manifest.json").write_text("{")
    line = one_error_line(run_script("make_table3.py", db, tmp_path / "manifest.json", tmp_path / "out"))
    assert words in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "nowhere.sqlite").exists()
    if case == "no_db":
        assert not db.exists()

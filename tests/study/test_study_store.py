"""Answers in SQLite (stem.study.store): committed at once, one per question, refused with nothing written."""

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT
from study_fakes import fake_manifest

from stem.core.errors import StudyError
from stem.study.store import AnswerStore, read_answers

MANIFEST = fake_manifest(20)


def count(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_answers_survive_closing_and_reopening_and_record_the_shown_sides(tmp_path):
    """Every answer given is there after close and reopen, with the methods on each side as the participant's plan
    showed them and the chosen method the one on the side clicked; the journal is WAL. Bugs caught: answers kept in
    memory or in an open transaction until close (a crash loses them), left and right recorded from the manifest's
    order instead of the participant's, the chosen method taken from the wrong side."""
    path = tmp_path / "answers.sqlite"
    given = []
    with AnswerStore(path, MANIFEST, seed=3) as store:
        plan = store.plan("alice")
        for i, shown in enumerate(plan[:5]):
            side = "left" if i % 2 else "right"
            store.answer("alice", shown["pair"], "fidelity", side, shown_at="2026-01-01T00:00:00Z")
            given.append((shown["pair"], shown["left"], shown["right"], side, shown[side]))
        with sqlite3.connect(path) as other:   # another connection sees each answer before close: committed
            assert other.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 5
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with AnswerStore(path, MANIFEST, seed=3) as store:
        rows = store.answers("alice")
    assert [(r["pair"], r["left_method"], r["right_method"], r["side"], r["chosen"]) for r in rows] == given
    assert all(r["question"] == "fidelity" and r["answered_at"] and r["shown_at"] == "2026-01-01T00:00:00Z"
               for r in rows)


WRITER = """
import sys, json
from stem.study.store import AnswerStore
manifest = json.load(open(sys.argv[2]))
store = AnswerStore(sys.argv[1], manifest, seed=0)
i = 0
while True:   # answers until killed: a participant per 12 pairs, both questions
    who = f"p{i // 24}"
    plan = store.plan(who)
    shown = plan[(i // 2) % 12]
    store.answer(who, shown["pair"], ("fidelity", "consistency")[i % 2], "left")
    i += 1
    print(f"committed {who} {shown['pair']} {i}", flush=True)
"""


def test_a_killed_writer_loses_no_committed_answer(tmp_path):
    """A real writer process answering in a loop is killed with SIGKILL after it reported 40 answers committed;
    reopened, the database holds every answer it reported, in order (and any it committed after), passes SQLite's
    integrity check, and takes new answers. Bugs caught: commits batched or deferred (synchronous off, one
    transaction per participant), a journal mode that leaves the file unreadable after a crash."""
    path, manifest_path = tmp_path / "answers.sqlite", tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(MANIFEST))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(manifest_path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    reported = []
    try:
        for line in proc.stdout:
            reported.append(line.split()[1:3])
            if len(reported) == 40:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and len(reported) == 40
    with AnswerStore(path, MANIFEST, seed=0) as store:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = [[r["participant"], r["pair"]] for r in store.answers()]
        assert len(stored) >= 40 and stored[:40] == reported   # it may have gone on a little before the kill
        store.answer("newcomer", store.progress("newcomer")["plan"][0]["pair"], "fidelity", "right")
    assert count(path) == len(stored) + 1


def test_a_second_answer_to_the_same_question_is_refused_with_nothing_written(tmp_path):
    """The same (participant, pair, question) again, even with the other side: StudyError naming it, the table
    unchanged (the first answer kept as given); the other question of the pair is still accepted. Bugs caught: a
    duplicate counted twice in Table 3, the later answer replacing the first (INSERT OR REPLACE), a refusal after a
    partial write."""
    path = tmp_path / "answers.sqlite"
    with AnswerStore(path, MANIFEST) as store:
        pair = store.plan("alice")[0]["pair"]
        first = store.answer("alice", pair, "fidelity", "left")
        before = store.answers()
        with pytest.raises(StudyError, match=f"participant 'alice' already answered 'fidelity' for pair '{pair}'"):
            store.answer("alice", pair, "fidelity", "right")
        assert store.answers() == before and before[0]["side"] == "left" and before[0]["id"] == first["id"]
        store.answer("alice", pair, "consistency", "right")
    assert count(path) == 2


def test_unknown_pairs_and_pairs_outside_the_sample_are_refused_with_nothing_written(tmp_path):
    """An id not in the manifest, a manifest pair the participant was not shown, an unknown question or side: each a
    StudyError, no row written. Bugs caught: any pair id accepted (answers to pairs nobody saw, or a request naming
    another study's pair), a free-text question or side stored."""
    path = tmp_path / "answers.sqlite"
    with AnswerStore(path, MANIFEST) as store:
        plan = store.plan("alice")
        unseen = next(p["id"] for p in MANIFEST["pairs"] if p["id"] not in {s["pair"] for s in plan})
        for args, words in [(("nope", "fidelity", "left"), "unknown pair 'nope'"),
                            (("../../etc/passwd", "fidelity", "left"), "unknown pair"),
                            ((unseen, "fidelity", "left"), "not in participant 'alice''s sample"),
                            ((plan[0]["pair"], "beauty", "left"), "unknown question"),
                            ((plan[0]["pair"], "fidelity", "FateZero"), "unknown side")]:
            with pytest.raises(StudyError, match=words):
                store.answer("alice", *args)
    assert count(path) == 0


def test_progress_tells_a_reloading_participant_where_to_continue(tmp_path):
    """Three pairs answered fully and the fourth's fidelity only, then the store reopened (a reload after a restart):
    progress says pair index 3 next with only "consistency" left, 3 of 12 done, the same plan; after every answer it
    says finished. Bugs caught: a reload starting over (duplicates refused, participant stuck), counting a half-
    answered pair as done, skipping it."""
    path = tmp_path / "answers.sqlite"
    with AnswerStore(path, MANIFEST, seed=5) as store:
        assert store.progress("bob")["next"] == 0
        plan = store.plan("bob")
        for shown in plan[:3]:
            for question in ("fidelity", "consistency"):
                store.answer("bob", shown["pair"], question, "left")
        store.answer("bob", plan[3]["pair"], "fidelity", "right")
    with AnswerStore(path, MANIFEST, seed=5) as store:
        where = store.progress("bob")
        assert (where["next"], where["remaining"], where["done"], where["total"], where["finished"]) == \
            (3, ["consistency"], 3, 12, False)
        assert where["plan"] == plan
        assert store.progress("carol")["next"] == 0
        for i, shown in enumerate(plan):
            for question in ("fidelity", "consistency"):
                if i > 3 or (i == 3 and question == "consistency"):
                    store.answer("bob", shown["pair"], question, "left")
        where = store.progress("bob")
        assert where["finished"] and where["next"] is None and where["done"] == 12


def test_a_database_of_another_study_is_refused(tmp_path):
    """Reopening with another seed, n or manifest: StudyError, nothing changed. Bug caught: answers recorded with sides
    from another plan than the one the earlier answers were given under. A file that is not SQLite is refused too."""
    path = tmp_path / "answers.sqlite"
    with AnswerStore(path, MANIFEST, seed=0) as store:
        store.answer("alice", store.plan("alice")[0]["pair"], "fidelity", "left")
    for kwargs, words in [({"seed": 1}, "seed 0 there, 1 asked"), ({"n": 6}, "n 12 there, 6 asked")]:
        with pytest.raises(StudyError, match=words):
            AnswerStore(path, MANIFEST, **kwargs)
    with pytest.raises(StudyError, match="manifest"):
        AnswerStore(path, fake_manifest(21))
    assert count(path) == 1 and len(read_answers(path)[0]) == 1
    (tmp_path / "junk.sqlite").write_text("not a database\n" * 100)
    with pytest.raises(StudyError, match="is not a study database"):
        AnswerStore(tmp_path / "junk.sqlite", MANIFEST)
    with pytest.raises(StudyError, match="not found"):
        read_answers(tmp_path / "none.sqlite")


def test_a_pages_videos_come_from_the_manifest_only(tmp_path):
    """`video(participant, pair, slot)`: the source, or the edit of the method the participant's plan put on that side,
    exactly as the manifest lists them; a slot or pair id that is a path, a pair outside the sample: refused. Bugs
    caught: the left slot serving the manifest's first method whatever the plan (unblinding by position), a request's
    text joined into a path."""
    with AnswerStore(tmp_path / "answers.sqlite", MANIFEST) as store:
        plan = store.plan("alice")
        assert any(s["left"] != next(p for p in MANIFEST["pairs"] if p["id"] == s["pair"])["methods"][0] for s in plan)
        for shown in plan:
            entry = next(p for p in MANIFEST["pairs"] if p["id"] == shown["pair"])
            assert str(store.video("alice", shown["pair"], "source")) == entry["source"]
            for side in ("left", "right"):
                assert str(store.video("alice", shown["pair"], side)) == entry["videos"][shown[side]]
        shown = plan[0]
        unseen = next(p["id"] for p in MANIFEST["pairs"] if p["id"] not in {s["pair"] for s in store.plan("alice")})
        for pair, slot, words in [(shown["pair"], "../../etc/passwd", "unknown video"),
                                  ("../manifest.json", "left", "unknown pair"), (unseen, "left", "sample")]:
            with pytest.raises(StudyError, match=words):
                store.video("alice", pair, slot)

"""The study's answers in SQLite (stdlib `sqlite3`, WAL journal): each answer committed the moment it is given.

    with AnswerStore("study/answers.sqlite", load_manifest("study/manifest.json"), seed=0) as store:
        where = store.progress("alice")       # {"next": 0, "plan": [...], "remaining": ["fidelity", "consistency"]}
        store.answer("alice", where["plan"][0]["pair"], "fidelity", "left")

One row per (participant, pair, question), enforced by the table's UNIQUE constraint: participant id, pair id,
question ("fidelity": which edit follows the target prompt better; "consistency": which is temporally more
consistent), the methods shown left and right, the side chosen and its method, when the pair was shown (given by
the caller) and when the answer arrived (UTC, ISO 8601). The caller gives the side the participant clicked, never a
method name: the store looks the methods up in the participant's plan (`stem.study.sampling.participant_plan`), so
a page needs no method name; `video` gives the file a page's slot shows from the manifest alone. Refused, with
nothing written (one INSERT per answer, in autocommit): a second answer
to the same question, an unknown pair, a pair not in the participant's sample, an unknown question or side.

Durability: every answer is its own transaction, committed before `answer` returns (`synchronous=FULL`), so a
killed server loses nothing it has confirmed and a restarted one finds every answer. A database belongs to one
study: its seed, pairs per participant and the manifest's pairs (`manifest_digest`) are stored in it at creation,
and opening it with others is refused (the plans, and so the sides recorded, would no longer match).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from stem.core.errors import StudyError
from stem.study.pairs import manifest_digest
from stem.study.sampling import DEFAULT_PAIRS, check_participant, participant_plan

QUESTIONS = ("fidelity", "consistency")   # Table 3's columns: edit fidelity, temporal consistency
SIDES = ("left", "right")
SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    participant TEXT NOT NULL,
    pair TEXT NOT NULL,
    question TEXT NOT NULL CHECK (question IN ('fidelity', 'consistency')),
    left_method TEXT NOT NULL,
    right_method TEXT NOT NULL,
    side TEXT NOT NULL CHECK (side IN ('left', 'right')),
    chosen TEXT NOT NULL,
    shown_at TEXT,
    answered_at TEXT NOT NULL,
    UNIQUE (participant, pair, question)
);
"""
COLUMNS = ("id", "participant", "pair", "question", "left_method", "right_method", "side", "chosen", "shown_at",
           "answered_at")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)   # autocommit: each statement its own transaction
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StudyError(f"the database {path} cannot use the WAL journal (got {mode!r}): put it on a local disk")
        db.execute("PRAGMA synchronous=FULL")   # a commit is on disk before answer() returns
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        db.close()
        raise StudyError(f"{path} is not a study database: {e}") from None
    except BaseException:
        db.close()
        raise
    return db


class AnswerStore:
    """The answers of one study (a manifest, a seed, `n` pairs per participant) in the SQLite file `path`,
    created when missing. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | Path, manifest: dict, *, seed: int = 0, n: int = DEFAULT_PAIRS):
        self.path = Path(path)
        self.pairs = {p["id"]: p for p in manifest["pairs"]}
        self.manifest, self.seed, self.n = manifest, seed, n
        participant_plan(manifest["pairs"][:1], "check", seed, n)   # bad seed or n: refused before any file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = _connect(self.path)
        try:
            self._claim({"seed": str(seed), "n": str(n), "manifest": manifest_digest(manifest)})
        except BaseException:
            self.db.close()
            raise

    def _claim(self, settings: dict) -> None:
        """Store the study's settings in a new database; refuse a database made with other settings."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            stored = dict(self.db.execute("SELECT key, value FROM study").fetchall())
            if not stored:
                self.db.executemany("INSERT INTO study (key, value) VALUES (?, ?)", settings.items())
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        differ = {k: (stored[k], v) for k, v in settings.items() if stored and stored.get(k) != v}
        if differ:
            raise StudyError(f"the database {self.path} belongs to another study: " + ", ".join(
                f"{k} {old} there, {new} asked" for k, (old, new) in differ.items()) + "; use its settings or a new "
                "database file")

    def __enter__(self) -> AnswerStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def plan(self, participant: str) -> list[dict]:
        """The participant's pairs and sides (`participant_plan` with this study's seed and n)."""
        return participant_plan(self.manifest["pairs"], participant, self.seed, self.n)

    def answer(self, participant: str, pair: str, question: str, side: str, shown_at: str | None = None) -> dict:
        """Record that `participant` chose the edit on `side` ("left" | "right") of `pair` for `question`, committed
        before returning; returns the row. StudyError, with nothing written, for an unknown pair, question or side,
        a pair not in the participant's sample, or a second answer to the same question."""
        check_participant(participant)
        if question not in QUESTIONS:
            raise StudyError(f"unknown question {question!r}: one of {', '.join(QUESTIONS)}")
        if side not in SIDES:
            raise StudyError(f"unknown side {side!r}: one of {', '.join(SIDES)}")
        shown = self._shown(participant, pair, "; nothing recorded")
        left, right = shown["left"], shown["right"]
        row = {"participant": participant, "pair": pair, "question": question, "left_method": left,
               "right_method": right, "side": side, "chosen": left if side == "left" else right,
               "shown_at": shown_at, "answered_at": _now()}
        try:
            cursor = self.db.execute(f"INSERT INTO answers ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                     tuple(row.values()))
        except sqlite3.IntegrityError:
            raise StudyError(f"participant {participant!r} already answered {question!r} for pair {pair!r}: one "
                             "answer per question; nothing recorded") from None
        return {"id": cursor.lastrowid, **row}

    def _shown(self, participant: str, pair: str, note: str = "") -> dict:
        """The participant's plan entry {"pair", "left", "right"} for `pair`; StudyError (ending with `note`) for a
        pair not in the manifest or not in the participant's sample."""
        if pair not in self.pairs:
            raise StudyError(f"unknown pair {pair!r}: not in the study's manifest{note}")
        shown = {p["pair"]: p for p in self.plan(participant)}
        if pair not in shown:
            raise StudyError(f"pair {pair!r} is not in participant {participant!r}'s sample{note}")
        return shown[pair]

    def video(self, participant: str, pair: str, slot: str) -> Path:
        """The file a participant's page shows for `pair` in `slot` ("source" | "left" | "right"): always a path the
        manifest lists (the source, or the edit of the method the plan put on that side), never one built from the
        request. StudyError for an unknown slot or pair, or a pair not in the participant's sample."""
        check_participant(participant)
        if slot not in ("source", *SIDES):
            raise StudyError(f"unknown video {slot!r}: one of source, {', '.join(SIDES)}")
        shown = self._shown(participant, pair)
        entry = self.pairs[pair]
        return Path(entry["source"] if slot == "source" else entry["videos"][shown[slot]])

    def answers(self, participant: str | None = None) -> list[dict]:
        """The stored answers (of one participant, or all), in the order given."""
        query = f"SELECT {', '.join(COLUMNS)} FROM answers"
        rows = self.db.execute(query + " WHERE participant = ? ORDER BY id", (participant,)) if participant \
            else self.db.execute(query + " ORDER BY id")
        return [dict(zip(COLUMNS, r)) for r in rows.fetchall()]

    def progress(self, participant: str) -> dict:
        """Where `participant` stands: {"plan": their pairs and sides, "answered": {pair: [questions]}, "done":
        pairs with both questions answered, "total", "next": the plan index of the first pair with a question
        unanswered (None when finished), "remaining": that pair's unanswered questions, "finished"}."""
        plan = self.plan(participant)
        answered: dict[str, list[str]] = {}
        for row in self.answers(participant):
            answered.setdefault(row["pair"], []).append(row["question"])
        todo = [(i, [q for q in QUESTIONS if q not in answered.get(p["pair"], [])]) for i, p in enumerate(plan)]
        todo = [(i, qs) for i, qs in todo if qs]
        return {"participant": participant, "plan": plan, "answered": answered, "total": len(plan),
                "done": len(plan) - len(todo), "next": todo[0][0] if todo else None,
                "remaining": todo[0][1] if todo else [], "finished": not todo}


def read_answers(path: str | Path) -> tuple[list[dict], dict]:
    """(answers, the study's settings) of the database at `path`, read only. StudyError when it is missing or is not
    a study database."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"answers database not found: {path}")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise StudyError(f"cannot open {path}: {e}") from None
    try:
        settings = dict(db.execute("SELECT key, value FROM study").fetchall())
        rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM answers ORDER BY id").fetchall()
    except sqlite3.DatabaseError as e:
        raise StudyError(f"{path} is not a study database: {e}") from None
    finally:
        db.close()
    return [dict(zip(COLUMNS, r)) for r in rows], settings

"""Each participant's pairs: a random sample of `n` of the manifest's pairs (the paper: 12 per user) in a random
order, and for each a random side for each method, so a method's name never follows from where it is shown.

    plan = participant_plan(manifest["pairs"], "alice", seed=0)          # twelve pairs (all when fewer)
    plan[0]   # {"pair": "p3fa2...", "left": "STEM-TokenFlow", "right": "TokenFlow"}

The plan is a function of (study seed, participant id, the manifest's pair ids) alone: a participant who reloads,
or a server restarted mid-study, gets the same pairs in the same order on the same sides. Each participant's
generator is seeded with a hash of seed and id (never Python's `hash`, which changes between processes), so two
participants' plans are independent draws and, over many participants, each method is on the left half of the time.
"""

from __future__ import annotations

import hashlib
import random

from stem.core.errors import StudyError, check_number

DEFAULT_PAIRS = 12   # Table 3: "each user saw 12 randomly sampled videos"
MAX_PARTICIPANT_CHARS = 128


def check_participant(participant) -> str:
    """`participant` if it is a usable id (a non-empty printable string of at most 128 characters), else StudyError."""
    if not isinstance(participant, str) or not participant.strip() or len(participant) > MAX_PARTICIPANT_CHARS \
            or not participant.isprintable():
        raise StudyError(f"participant id {participant!r} must be a non-empty printable text of at most "
                         f"{MAX_PARTICIPANT_CHARS} characters")
    return participant


def participant_rng(seed: int, participant: str) -> random.Random:
    """The generator of one participant: seeded with SHA-256 of (seed, participant), the same in every process."""
    digest = hashlib.sha256(f"{int(seed)}\0{check_participant(participant)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def participant_plan(pairs: list[dict], participant: str, seed: int = 0, n: int = DEFAULT_PAIRS) -> list[dict]:
    """`min(n, len(pairs))` of `pairs` (manifest pairs: "id", "methods"), drawn without replacement in a random
    order, each with its methods' sides: [{"pair", "left", "right"}]. Reproducible from (seed, participant): the
    pairs are taken in id order before drawing, so the manifest's listing order does not matter."""
    check_number("n", n, low=1, integer=True, fix="the number of pairs each participant sees (the paper: 12)")
    check_number("seed", seed, integer=True, fix="the study's seed, an integer")
    rng = participant_rng(seed, participant)
    ordered = sorted(pairs, key=lambda p: p["id"])
    chosen = rng.sample(ordered, min(n, len(ordered)))
    plan = []
    for pair in chosen:
        first, second = pair["methods"]
        swap = rng.random() < 0.5
        plan.append({"pair": pair["id"], "left": second if swap else first, "right": first if swap else second})
    return plan

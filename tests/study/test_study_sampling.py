"""Each participant's sample of pairs and sides (stem.study.sampling.participant_plan)."""

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT
from study_fakes import fake_manifest

from stem.core.errors import ConfigError, StudyError
from stem.study.sampling import DEFAULT_PAIRS, participant_plan

PAIRS = fake_manifest(30)["pairs"]


def test_a_participants_plan_is_reproducible_from_seed_and_id(tmp_path):
    """The same (seed, id) gives the same pairs, order and sides: called twice, with the manifest listed in another
    order, and in a fresh Python process with another hash seed; another id or seed gives another plan. Bugs
    caught: a generator seeded from the clock or global state, from Python's salted `hash` (a reload after a server
    restart would show other pairs or swapped sides), from the manifest's listing order."""
    plan = participant_plan(PAIRS, "alice", seed=7)
    assert participant_plan(PAIRS, "alice", seed=7) == plan
    shuffled = PAIRS[:]
    random.Random(1).shuffle(shuffled)
    assert participant_plan(shuffled, "alice", seed=7) == plan
    assert participant_plan(PAIRS, "bob", seed=7) != plan and participant_plan(PAIRS, "alice", seed=8) != plan
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    code = ("import json, sys; from stem.study.sampling import participant_plan; "
            "print(json.dumps(participant_plan(json.load(open(sys.argv[1])), 'alice', seed=7)))")
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pairs.json")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed}, check=True)
        assert json.loads(out.stdout) == plan


def test_twelve_distinct_pairs_of_the_manifest_by_default_and_all_when_fewer():
    """12 of 30 (the paper's number), distinct, each with its own methods on the two sides; 5 of 5 when the manifest
    has fewer; `n` configurable; n=0 refused. Bugs caught: sampling with replacement (a pair shown twice), an index
    error or a short plan when n > pairs, sides with a method of another comparison."""
    methods = {p["id"]: p["methods"] for p in PAIRS}
    plan = participant_plan(PAIRS, "alice")
    assert DEFAULT_PAIRS == 12 and len(plan) == 12 and len({p["pair"] for p in plan}) == 12
    assert all(sorted([p["left"], p["right"]]) == sorted(methods[p["pair"]]) for p in plan)
    assert sorted(p["pair"] for p in participant_plan(PAIRS[:5], "alice")) == [p["id"] for p in PAIRS[:5]]
    assert len(participant_plan(PAIRS, "alice", n=20)) == 20
    with pytest.raises(ConfigError, match="n=0 must be an integer of at least 1"):
        participant_plan(PAIRS, "alice", n=0)
    for bad in ("", "a\nb", "x" * 129, None):
        with pytest.raises(StudyError, match="participant id"):
            participant_plan(PAIRS, bad)


def test_each_side_equally_often_and_each_pair_equally_often_over_many_participants():
    """2000 participants x 12 pairs of 30. The first-listed method is on the left in Binomial(24000, 1/2) draws:
    within 4.5 standard deviations (sqrt(24000)/2) of half, and per pair within 4.5 sd of half its showings; each pair
    is shown to Binomial(2000, 12/30) participants, within 4.5 sd of 800. (Chance of a false failure for fair code:
    below 1e-3 over all 61 bounds; the test is deterministic, its ids fixed.) Bugs caught: sides never swapped,
    swapped with a biased threshold, the same side for every pair of a participant (then each participant's sides
    move together and per-participant balance fails below), a sample favouring the manifest's first pairs."""
    participants, n, total = 2000, 12, len(PAIRS)
    left_first, shown, per_participant = Counter(), Counter(), []
    first = {p["id"]: p["methods"][0] for p in PAIRS}
    for i in range(participants):
        plan = participant_plan(PAIRS, f"participant-{i}", seed=0)
        lefts = [p["left"] == first[p["pair"]] for p in plan]
        per_participant.append(sum(lefts))
        for p, is_first in zip(plan, lefts):
            shown[p["pair"]] += 1
            left_first[p["pair"]] += is_first
    draws = participants * n
    assert abs(sum(left_first.values()) - draws / 2) < 4.5 * math.sqrt(draws) / 2
    for pair in first:
        m = shown[pair]
        assert abs(left_first[pair] - m / 2) < 4.5 * math.sqrt(m) / 2, pair
        p = n / total
        assert abs(m - participants * p) < 4.5 * math.sqrt(participants * p * (1 - p)), pair
    # sides independent within a participant: the count of first-on-left per participant is Binomial(12, 1/2), whose
    # variance is 3; all-or-nothing sides would give variance 36
    mean = sum(per_participant) / participants
    variance = sum((x - mean) ** 2 for x in per_participant) / (participants - 1)
    assert 2.5 < variance < 3.5

"""The study's pairs and manifest (stem.study.pairs) from fake job folders of a Table 2 sweep (study_fakes)."""

import json
from pathlib import Path

import pytest
from study_fakes import SIZE, SOURCE_LEVEL, make_job

from stem.core.errors import StudyError
from stem.data.video import read_frames
from stem.study.pairs import METHODS, find_pairs, load_manifest, read_runs, write_study

# job -> (table2 row, clip, target prompt, finished)
JOBS = {
    0: ("fatezero", "wolf", "a wolf in the snow", True),
    1: ("stem_fatezero", "wolf", "a wolf in the snow", True),
    2: ("tokenflow", "wolf", "a wolf in the snow", True),
    3: ("stem_tokenflow", "wolf", "a wolf in the snow", True),
    4: ("tuneavideo", "wolf", "a wolf in the snow", True),             # not a study method
    5: ("stem_fatezero_smaller", "wolf", "a wolf in the snow", True),  # not the paper's row: no duplicate
    6: ("fatezero", "car_turn", "a red car", True),                    # its STEM side failed: no pair
    7: ("stem_fatezero", "car_turn", "a red car", False),
    8: ("tokenflow", "car_turn", "a red car", True),                   # STEM side on another prompt: no pair
    9: ("stem_tokenflow", "car_turn", "a watercolor car", True),
    10: ("tokenflow", "taylor", "taylor swift dancing", True),          # both sides, 10 sorts after 2
    11: ("stem_tokenflow", "taylor", "taylor swift dancing", True),
}
# the pairs, written out here: (clip, prompt, comparison) -> (job of the method, job of its STEM counterpart)
EXPECTED = {
    ("wolf", "a wolf in the snow", "FateZero vs STEM-FateZero"): (0, 1),
    ("wolf", "a wolf in the snow", "TokenFlow vs STEM-TokenFlow"): (2, 3),
    ("taylor", "taylor swift dancing", "TokenFlow vs STEM-TokenFlow"): (10, 11),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for job, (row, clip, prompt, finished) in JOBS.items():
        make_job(root, job, row, clip, prompt, finished=finished)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_pairs_only_for_matching_clip_and_prompt_with_both_methods_finished(sweep):
    """Exactly the three pairs written above, each side's video its own job's edited.mp4. Bugs caught: pairing by clip
    alone (car_turn's TokenFlow with a STEM-TokenFlow of another prompt), a failed job's side counted (its folder
    has no edit), a pair with one side, another Table 2 row (Tune-A-Video, the smaller-ratio STEM-FateZero) taken as
    a study method or refused as a duplicate, the two sides swapped."""
    runs, _ = read_runs([sweep])
    pairs, skipped = find_pairs(runs)
    got = {(p["clip"], p["prompt"], p["comparison"]): p for p in pairs}
    assert set(got) == set(EXPECTED)
    for key, (base, stem) in EXPECTED.items():
        pair = got[key]
        assert pair["methods"] == list(key[2].split(" vs "))
        assert pair["videos"] == {pair["methods"][0]: str((sweep / str(base) / "edited.mp4").resolve()),
                                  pair["methods"][1]: str((sweep / str(stem) / "edited.mp4").resolve())}
    assert skipped == ["'car_turn' -> 'a red car': FateZero vs STEM-FateZero: only FateZero finished",
                       "'car_turn' -> 'a red car': TokenFlow vs STEM-TokenFlow: only TokenFlow finished",
                       "'car_turn' -> 'a watercolor car': TokenFlow vs STEM-TokenFlow: only STEM-TokenFlow finished"]


def test_manifest_lists_each_pairs_source_and_edits_and_names_no_method_in_ids(sweep, tmp_path):
    """manifest.json (valid for load_manifest) lists the pairs; every path it names exists; each source is the left
    half of the pair's comparison.mp4 (its clip's grey level, not an edit's); pair ids and source file names carry no
    method name (blinding); the sweep folder and a provenance caption are recorded; no temporary file is left. Bugs
    caught: the source taken from the edited half, a path to a file not written, ids like "wolf-fatezero"."""
    manifest = write_study([sweep], tmp_path / "study")
    assert load_manifest(tmp_path / "study" / "manifest.json") == json.loads(
        (tmp_path / "study" / "manifest.json").read_text()) == manifest
    assert manifest["sweep"] == str(sweep.resolve()) and "tiny" in manifest["provenance"]
    assert len(manifest["pairs"]) == 3
    for pair in manifest["pairs"]:
        for path in [pair["source"], *pair["videos"].values()]:
            assert Path(path).is_file(), path
        frames, _ = read_frames(pair["source"])
        assert frames.shape == (4, SIZE, SIZE, 3)
        assert abs(frames.astype(float).mean() - SOURCE_LEVEL[pair["clip"]]) < 3
        words = (pair["id"] + pair["source"].rsplit("/", 1)[1]).lower()
        assert not any(w in words for m in METHODS for w in (m.lower(), m.lower().replace("-", "_"), "stem", "fate",
                                                             "token"))
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["manifest.json", "sources"]


def test_two_jobs_of_one_method_on_one_clip_and_prompt_are_refused(tmp_path):
    """Bug caught: the second job silently replacing the first (which edit participants saw would be a guess)."""
    make_job(tmp_path, 0, "tokenflow", "wolf", "a wolf")
    make_job(tmp_path, 1, "stem_tokenflow", "wolf", "a wolf")
    make_job(tmp_path, 2, "stem_tokenflow", "wolf", "a wolf")
    with pytest.raises(StudyError, match="two finished jobs of STEM-TokenFlow edit clip 'wolf' to 'a wolf'"):
        find_pairs(read_runs([tmp_path])[0])


def test_sides_on_different_frames_are_not_a_pair(tmp_path):
    """Bug caught: two edits of different frames of a clip shown as a comparison (one source cannot stand for both)."""
    make_job(tmp_path, 0, "tokenflow", "wolf", "a wolf", frame_numbers=[1, 3, 5, 7])
    make_job(tmp_path, 1, "stem_tokenflow", "wolf", "a wolf")
    pairs, skipped = find_pairs(read_runs([tmp_path])[0])
    assert pairs == [] and skipped == ["'wolf' -> 'a wolf': TokenFlow vs STEM-TokenFlow: the two edits are of "
                                       "different frames or sizes"]


def test_run_folders_are_sources_too(sweep, tmp_path):
    """Two run folders given one by one make the same pair as their sweep; a run folder without .hydra/ or a missing
    folder is refused. Bug caught: a run folder read as a sweep (no jobs: no pairs)."""
    runs, _ = read_runs([sweep / "10", sweep / "11"])
    pairs, _ = find_pairs(runs)
    assert [(p["clip"], p["comparison"]) for p in pairs] == [("taylor", "TokenFlow vs STEM-TokenFlow")]
    with pytest.raises(StudyError, match="not a folder"):
        read_runs([tmp_path / "nowhere"])
    with pytest.raises(StudyError, match="no job folders"):
        read_runs([tmp_path])


def test_no_pairs_says_what_was_found(tmp_path):
    make_job(tmp_path, 0, "fatezero", "wolf", "a wolf")
    with pytest.raises(StudyError, match=r"no pairs in .*finished: FateZero; 'wolf' -> 'a wolf': FateZero vs "
                                         r"STEM-FateZero: only FateZero finished"):
        write_study([tmp_path], tmp_path / "study")
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("text,words", [
    ("{", "cannot read the manifest"), ('{"version": 2}', "not a study manifest"),
    ('{"version": 1, "pairs": []}', "lists no pairs"),
    ('{"version": 1, "pairs": [{"id": "p1"}]}', "pair 0 lacks clip"),
])
def test_a_bad_manifest_is_one_clear_error(tmp_path, text, words):
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(StudyError, match=words):
        load_manifest(tmp_path / "m.json")
    with pytest.raises(StudyError, match="manifest not found"):
        load_manifest(tmp_path / "none.json")


def test_a_manifest_pair_with_methods_of_two_comparisons_is_refused(tmp_path):
    """Bug caught: a hand-edited manifest pairing FateZero with STEM-TokenFlow counted in Table 3."""
    from study_fakes import fake_manifest

    manifest = fake_manifest(2)
    manifest["pairs"][1]["methods"] = ["FateZero", "STEM-TokenFlow"]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(StudyError, match="has methods"):
        load_manifest(tmp_path / "m.json")


def test_a_comparison_video_of_another_size_is_refused(tmp_path):
    """A comparison.mp4 that is not source | edit at the size metrics.json records (e.g. a job folder overwritten by
    another run): StudyError, no manifest. Bug caught: half of the wrong video served as the source."""
    import numpy as np
    from study_fakes import flat

    from stem.data.video import write_video

    make_job(tmp_path, 0, "tokenflow", "wolf", "a wolf")
    make_job(tmp_path, 1, "stem_tokenflow", "wolf", "a wolf")
    for job in (0, 1):
        write_video(tmp_path / str(job) / "comparison.mp4", np.concatenate([flat(40, width=16)] * 2, axis=2), 8.0)
    with pytest.raises(StudyError, match="not source \\| edit at 32x32 each"):
        write_study([tmp_path], tmp_path / "study")
    assert not (tmp_path / "study" / "manifest.json").exists()

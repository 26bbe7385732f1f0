"""Versioned inversion cache keys (issue 13, point 2): the version enters the key, and a checked-in digest of the
code that produces the inverted latents makes a change of that code without a version bump fail here."""

import runpy
from pathlib import Path

import torch

import stem.runs.cache_version as cv
from stem.runs.cache import TensorCache


def test_inversion_code_matches_the_digest_recorded_with_the_cache_version():
    """The SHA-256 of the sources in `INVERSION_SOURCES` (recomputed from the imported modules' files) equals the
    digest recorded when `INVERSION_CACHE_VERSION` was last set. Catches: a change of the EM/DDIM/attention/VAE/
    prompt maths (checked: one EM constant in stem/inversion/em.py changed) that would silently reuse old latents."""
    digest = cv.sources_digest()
    assert digest == cv.INVERSION_SOURCES_DIGEST, (
        f"inversion code changed: bump INVERSION_CACHE_VERSION and update the digest "
        f"(run `python -m stem.runs.cache_version --update`; add --keep-version only if the change cannot alter any "
        f"inverted latent, e.g. comments or docstrings). Recorded {cv.INVERSION_SOURCES_DIGEST}, now {digest}")


def test_the_digest_covers_each_source_and_ignores_line_endings(monkeypatch):
    """Each listed source feeds the digest, by its text with line endings normalised (a Windows checkout with
    CRLF gives the same digest). Catches: a source left out of the hash, a digest of file names only, a digest
    that differs with git's autocrlf."""
    texts = {name: cv.source_text(name) for name in cv.INVERSION_SOURCES}
    assert all(len(t) > 100 and "\r" not in t for t in texts.values())
    assert "def em_bases" in texts["stem.inversion.em"]
    assert "def clip_groupnorm" in texts["stem.editing.fatezero:clip_groupnorm"]
    assert "def edit" not in texts["stem.editing.fatezero:clip_groupnorm"]  # the function only, not its module
    base = cv.sources_digest(texts)
    assert base == cv.sources_digest()
    assert cv.sources_digest({k: v.replace("\n", "\r\n") for k, v in texts.items()}) == base
    changed = {cv.sources_digest({**texts, name: texts[name] + " "}) for name in texts}
    assert len(changed) == len(texts) and base not in changed


def test_update_rewrites_the_version_and_the_digest(tmp_path):
    """`update` (what `python -m stem.runs.cache_version --update` runs) on a copy of the module bumps the version by
    one and records the current digest; with bump=False it records the digest only. Catches: an update that
    forgets the bump, writes the wrong digest, or edits nothing."""
    copy = tmp_path / "cache_version.py"
    text = Path(cv.__file__).read_text()
    stale = text.replace(f'INVERSION_SOURCES_DIGEST = "{cv.INVERSION_SOURCES_DIGEST}"',
                         'INVERSION_SOURCES_DIGEST = "stale"')
    assert stale != text
    for bump in (True, False):
        copy.write_text(stale)
        cv.update(copy, bump=bump)
        written = runpy.run_path(str(copy))
        assert written["INVERSION_SOURCES_DIGEST"] == cv.sources_digest()
        assert written["INVERSION_CACHE_VERSION"] == cv.INVERSION_CACHE_VERSION + bump
        assert len(copy.read_text().splitlines()) == len(text.splitlines())


def test_check_command_exits_zero_when_the_digest_matches_and_one_when_it_does_not(capsys, monkeypatch):
    """`python -m stem.runs.cache_version` (no arguments, `main([])`) checks: prints the digest, exits 0 on this
    checkout and 1 with a recorded digest that differs. Catches: a check that always passes."""
    assert cv.main([]) == 0 and cv.INVERSION_SOURCES_DIGEST in capsys.readouterr().out
    monkeypatch.setattr(cv, "INVERSION_SOURCES_DIGEST", "stale")
    assert cv.main([]) == 1 and "--update" in capsys.readouterr().out


def test_a_version_bump_changes_the_inversion_key_so_old_entries_miss(tiny_model, tmp_path, monkeypatch):
    """Same video, model and method: the entry written under one version is a hit under it and a miss (another
    key, another entry) after a bump. Catches: a version that does not enter the inversion key."""
    from stem.data.synthetic import camera_pan
    from stem.inversion.methods import DDIMInversion
    from stem.runs.reconstruction import invert_video

    video = camera_pan(n_frames=2, width=64, height=64)
    cache = TensorCache(tmp_path / "cache")

    def invert():
        return invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=1), cache, progress=False)

    first = invert()
    assert not first.cache_hit and invert().cache_hit
    monkeypatch.setattr(cv, "INVERSION_CACHE_VERSION", cv.INVERSION_CACHE_VERSION + 1)
    bumped = invert()
    assert not bumped.cache_hit and bumped.key != first.key
    assert torch.equal(bumped.trajectory.latents, first.trajectory.latents)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.key, bumped.key])

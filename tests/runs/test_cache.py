"""Content-addressed tensor cache (stem.runs.cache) and atomic writes (stem.core.atomic)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stem.runs.cache
from stem.core.atomic import atomic_dir, atomic_file
from stem.runs.cache import META, TENSORS, TensorCache, content_key

ROOT = Path(__file__).resolve().parents[2]


def _parts(**changes) -> dict:
    parts = dict(frames=torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7,
                 model="34e329d5f8f8d070", prompt="a woman is running",
                 method={"name": "ddim_1frame", "steps": 50, "frames": [0, 1]})
    parts.update(changes)
    return parts


def test_content_key_is_stable_and_independent_of_argument_and_dict_order():
    key = content_key(**_parts())
    assert len(key) == 24 and int(key, 16) >= 0
    assert content_key(**_parts()) == key  # fresh but equal tensors and dicts
    reordered = dict(reversed(list(_parts().items())))
    reordered["method"] = dict(reversed(list(reordered["method"].items())))
    assert content_key(**reordered) == key


def test_content_key_is_the_same_in_another_process():
    code = ("import torch; from stem.runs.cache import content_key; "
            "print(content_key(frames=torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7, "
            "model='34e329d5f8f8d070', prompt='a woman is running', "
            "method={'name': 'ddim_1frame', 'steps': 50, 'frames': [0, 1]}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == content_key(**_parts())


def test_content_key_changes_with_every_part():
    base = _parts()
    key = content_key(**base)
    one_value = base["frames"].clone()
    one_value[1, 2, 3] += 1e-6
    variants = {
        "tensor value": _parts(frames=one_value),
        "dtype": _parts(frames=base["frames"].double()),
        "shape": _parts(frames=base["frames"].reshape(3, 2, 4)),  # same bytes, other shape
        "settings value": _parts(method={**base["method"], "steps": 49}),
        "settings list": _parts(method={**base["method"], "frames": [1, 0]}),
        "string": _parts(prompt="a woman is running "),
        "part name": {("prompt_src" if k == "prompt" else k): v for k, v in base.items()},
        "missing part": {k: v for k, v in base.items() if k != "model"},
        "extra part": {**base, "seed": 0},
    }
    keys = {name: content_key(**parts) for name, parts in variants.items()}
    assert all(k != key for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)


def test_content_key_hashes_tensor_values_not_memory_layout():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = t.T  # a non-contiguous view
    assert not transposed.is_contiguous()
    assert content_key(x=transposed) == content_key(x=transposed.contiguous())
    assert content_key(x=transposed) != content_key(x=t.reshape(4, 3))  # same shape, other values
    assert content_key(x=t.requires_grad_(True)) == content_key(x=t.detach().clone())


def test_content_key_accepts_a_scalar_tensor():
    assert content_key(t=torch.tensor(981)) != content_key(t=torch.tensor(1))


def test_save_then_load_round_trips(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    tensors = {"latents": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
               "timesteps": torch.arange(1, 1000, 20),
               "half": torch.randn(2, 5, generator=torch.Generator().manual_seed(1)).half(),
               "strided": torch.arange(6.0).reshape(2, 3).T}
    meta = {"video": "pan", "frames": [3, 3, 64, 64], "seconds": 1.5}
    key = content_key(**tensors)
    entry = cache.save(key, tensors, meta)
    assert entry == tmp_path / "cache" / key and entry == cache.path(key)
    assert sorted(p.name for p in entry.iterdir()) == sorted([TENSORS, META])
    loaded, loaded_meta = cache.load(key)
    assert loaded_meta == meta
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    on_disk = json.loads((entry / META).read_text())
    assert {k: v for k, v in on_disk.items() if k not in (stem.runs.cache.CHECKSUM, stem.runs.cache.RECORD)} == meta


def test_save_keeps_an_existing_complete_entry_and_replaces_a_damaged_one(tmp_path):
    """Item 3 of issue 23: the first complete entry of a key wins (same key, same inputs: a later writer's bytes
    may differ only by nondeterministic kernels, and earlier runs' metrics point to the first). Catches: an
    install that always replaces (last writer wins), or one that also keeps a damaged entry."""
    cache = TensorCache(tmp_path)
    assert cache.save("k", {"a": torch.zeros(2)}, {"v": 1}) == tmp_path / "k"
    assert cache.save("k", {"b": torch.ones(3)}, {"v": 2}) == tmp_path / "k"
    tensors, meta = cache.load("k")
    assert list(tensors) == ["a"] and torch.equal(tensors["a"], torch.zeros(2)) and meta == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary or old folder left
    _truncate(tmp_path / "k" / TENSORS, 0.5)
    cache.save("k", {"b": torch.ones(3)}, {"v": 2})
    tensors, meta = cache.load("k")
    assert list(tensors) == ["b"] and torch.equal(tensors["b"], torch.ones(3)) and meta == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_load_returns_none_for_missing_or_incomplete_entries(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    assert cache.load("0" * 24) is None  # root does not even exist
    only_meta = tmp_path / "cache" / "a"
    only_meta.mkdir(parents=True)
    (only_meta / META).write_text("{}")
    assert cache.load("a") is None
    only_tensors = tmp_path / "cache" / "b"
    cache.save("b", {"x": torch.ones(2)}, {})
    (only_tensors / META).unlink()
    assert cache.load("b") is None
    empty = tmp_path / "cache" / "c"
    empty.mkdir()
    assert cache.load("c") is None


def test_failed_save_leaves_no_entry_and_no_temporary_folder(tmp_path, monkeypatch):
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    cache = TensorCache(tmp_path / "cache")
    cache.save("old", {"x": torch.ones(2)}, {"v": 1})
    monkeypatch.setattr(stem.runs.cache, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        cache.save("new", {"x": torch.zeros(2)}, {"v": 2})
    with pytest.raises(OSError, match="disk full"):
        cache.save("old", {"x": torch.zeros(2)}, {"v": 2})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["old"]  # hidden names included
    assert cache.load("new") is None
    tensors, meta = cache.load("old")  # the complete entry survives a failed overwrite
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"v": 1}


def test_atomic_file_writes_on_success_and_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp != target
            raise RuntimeError("interrupted")
    assert list((tmp_path / "sub").iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_text('{"psnr": 30}')
        assert not target.exists()  # not visible before the body finishes
    assert target.read_text() == '{"psnr": 30}'
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["metrics.json"]


def test_atomic_file_keeps_the_old_file_when_the_body_raises(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_leaves_nothing_when_the_body_raises(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "f").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


UMASKS = pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])


def _write_with_umask(root: Path, umask: int) -> Path:
    old = os.umask(umask)
    try:
        with atomic_file(root / "m.json") as tmp:
            tmp.write_text("{}")
        return TensorCache(root / "cache").save("k", {"x": torch.ones(1)}, {})
    finally:
        os.umask(old)


@UMASKS
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    entry = _write_with_umask(tmp_path, umask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == file_mode
    assert stat.S_IMODE(entry.stat().st_mode) == dir_mode
    assert stat.S_IMODE((entry / META).stat().st_mode) == file_mode


@pytest.mark.parametrize("umask, file_mode, dir_mode", [
    (0o022, 0o644, 0o755),
    (0o077, 0o600, 0o700)])
def test_cached_tensors_file_follows_the_umask(tmp_path, umask, file_mode, dir_mode):
    entry = _write_with_umask(tmp_path, umask)
    assert stat.S_IMODE((entry / TENSORS).stat().st_mode) == file_mode


def test_content_key_hashes_numpy_arrays_by_value():
    a = np.zeros(5000, dtype=np.float32)
    b = a.copy()
    b[2500] = 1  # str() of both arrays is the same abbreviated "[0. 0. 0. ... 0. 0. 0.]"
    assert content_key(x=a) != content_key(x=b)
    assert content_key(x=a) == content_key(x=torch.from_numpy(a.copy()))


# --- damaged entries and checksums (issue 13, point 1) ---------------------------------------------------------


def _entry(tmp_path) -> tuple[TensorCache, Path, dict]:
    cache = TensorCache(tmp_path / "cache")
    tensors = {"latents": torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
               "timesteps": torch.tensor([1, 501])}
    return cache, cache.save("k", tensors, {"v": 1}), tensors


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGES = {
    "empty tensors": lambda e: _truncate(e / TENSORS, 0.0),
    "truncated tensors": lambda e: _truncate(e / TENSORS, 0.5),
    "truncated meta": lambda e: _truncate(e / META, 0.5),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_entry_is_a_miss_with_a_warning_naming_it_and_the_next_save_replaces_it(tmp_path, caplog, damage):
    """A truncated/empty tensors file or a truncated meta.json: load gives None (a miss) and a warning with the
    entry's path, not a traceback on every rerun; the next save replaces the entry and leaves no temporary or old
    folder. Catches: load without a guard around reading/parsing (the old behaviour), a miss without a warning."""
    cache, entry, tensors = _entry(tmp_path)
    DAMAGES[damage](entry)
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        assert cache.load("k") is None
    assert any(str(entry) in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), caplog.text
    cache.save("k", tensors, {"v": 2})
    loaded, meta = cache.load("k")
    assert torch.equal(loaded["latents"], tensors["latents"]) and meta == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k"]  # hidden .tmp/.old names included


def test_meta_records_the_key_tensors_and_checksums(tmp_path):
    """meta.json records (computed here independently) the entry's key, each tensor's dtype and shape, the
    SHA-256 of the safetensors file's bytes, and a SHA-256 over the canonical JSON (sorted keys, no spaces) of
    all the rest of meta.json; load returns the caller's meta without them. Catches: no record or checksum
    stored, a checksum of something else, a meta checksum that leaves the record out."""
    import hashlib

    cache, entry, _ = _entry(tmp_path)
    on_disk = json.loads((entry / META).read_text())
    record = {"key": "k", "tensors": {"latents": {"dtype": "float32", "shape": [3, 2, 4, 8, 8]},
                                      "timesteps": {"dtype": "int64", "shape": [2]}},
              "tensors_sha256": hashlib.sha256((entry / TENSORS).read_bytes()).hexdigest()}
    rest = {"v": 1, "entry": record}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    assert on_disk == {**rest, "sha256": hashlib.sha256(canonical).hexdigest()}
    assert cache.load("k")[1] == {"v": 1}


def test_overwritten_tensor_values_in_a_valid_file_are_a_miss_with_a_warning(tmp_path, caplog):
    """64 float32 values of z_T overwritten in place: the file still parses (checked), so only the checksum can
    tell. Catches: a load that does not verify the checksum (a silent hit on wrong latents, the reported bug)."""
    from safetensors.torch import load_file

    cache, entry, tensors = _entry(tmp_path)
    data = bytearray((entry / TENSORS).read_bytes())
    z_t = tensors["latents"][-1].reshape(-1)
    where = bytes(data).find(z_t[:64].numpy().tobytes())
    assert where > 0
    data[where:where + 256] = (z_t[:64] + 1).numpy().tobytes()
    (entry / TENSORS).write_bytes(bytes(data))
    assert not torch.equal(load_file(entry / TENSORS)["latents"], tensors["latents"])  # valid file, other values
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        assert cache.load("k") is None
    assert any(str(entry) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("old_format", ["no checksum", "tensors checksum only"])
def test_an_entry_of_an_older_format_is_a_miss_with_a_warning_and_is_replaced(tmp_path, caplog, old_format):
    """An entry written by an older version, either without any checksum or with only the tensors' SHA-256
    (`tensors_sha256`, no key or shape record, meta.json not covered: the format before issue 23 item 2), cannot
    be verified: a miss with a warning naming it, and the next save replaces it (not kept as a complete entry).
    Catches: accepting unverifiable entries silently (the previous format was a hit before the fix), an old entry
    that a save keeps because it is there."""
    import hashlib

    from safetensors.torch import save_file

    entry = tmp_path / "cache" / "k"
    entry.mkdir(parents=True)
    save_file({"x": torch.ones(2)}, entry / TENSORS)
    meta = {"v": 1}
    if old_format == "tensors checksum only":
        meta["tensors_sha256"] = hashlib.sha256((entry / TENSORS).read_bytes()).hexdigest()
    (entry / META).write_text(json.dumps(meta))
    cache = TensorCache(tmp_path / "cache")
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        assert cache.load("k") is None
    assert any(str(entry) in r.getMessage() and "older version" in r.getMessage() for r in caplog.records), \
        caplog.text
    cache.save("k", {"x": torch.zeros(3)}, {"v": 2})
    tensors, meta = cache.load("k")
    assert torch.equal(tensors["x"], torch.zeros(3)) and meta == {"v": 2}


# --- through the inversion cache (issue 13, points 1 and 7) ----------------------------------------------------


def _reconstruct(model, cache, invert_only: bool = False):
    from stem.data.synthetic import camera_pan
    from stem.inversion.methods import DDIMInversion
    from stem.runs.reconstruction import invert_video, reconstruct_video

    video = camera_pan(n_frames=2, width=64, height=64)
    return (invert_video if invert_only else reconstruct_video)(model, video, DDIMInversion("1frame", num_steps=2),
                                                                cache, progress=False)


def test_reconstruction_on_a_cache_hit_is_bit_identical_to_the_miss(tiny_model, tmp_path):
    """The miss's trajectory and the hit's (loaded from safetensors) must give the same frames bit for bit.
    Catches: a trajectory in channels-last memory format on a miss and contiguous on a hit (the convolutions
    then sum in another order, ~1e-4 dB of PSNR), or any other difference between the two paths."""
    cache = TensorCache(tmp_path / "cache")
    miss = _reconstruct(tiny_model, cache)
    hit = _reconstruct(tiny_model, cache)
    assert not miss.inverted.cache_hit and hit.inverted.cache_hit
    assert torch.equal(miss.inverted.trajectory.latents, hit.inverted.trajectory.latents)
    assert torch.equal(miss.frames, hit.frames) and torch.equal(miss.vae_frames, hit.vae_frames)


def test_a_truncated_inversion_entry_is_inverted_again_and_replaced(tiny_model, tmp_path, caplog):
    """A truncated tensors file in the inversion cache: the rerun warns with the entry's path, inverts again (the
    same latents) and writes a verified entry in its place, with no leftovers. Catches: a traceback on every
    rerun, or a damaged entry that is never replaced."""
    cache = TensorCache(tmp_path / "cache")
    first = _reconstruct(tiny_model, cache, invert_only=True)
    _truncate(first.entry / TENSORS, 0.5)
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        again = _reconstruct(tiny_model, cache, invert_only=True)
    assert not again.cache_hit and str(first.entry) in caplog.text
    assert torch.equal(again.trajectory.latents, first.trajectory.latents)
    assert torch.equal(cache.load(first.key)[0]["latents"], first.trajectory.latents)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.key]


# --- mislabelled and edited entries (issue 23, item 2) ---------------------------------------------------------


def _invert(model, cache, n_frames: int = 2, prompt: str = "a portrait photo of an astronaut"):
    from stem.data.synthetic import camera_pan
    from stem.inversion.methods import DDIMInversion
    from stem.runs.reconstruction import invert_video

    video = camera_pan(n_frames=n_frames, width=64, height=64, prompt=prompt)
    return invert_video(model, video, DDIMInversion("1frame", num_steps=2), cache, progress=False)


def _copy_entry(source: Path, target: Path) -> None:
    for name in (TENSORS, META):
        (target / name).write_bytes((source / name).read_bytes())


# Bug caught: an entry trusted by its checksum alone, so another key's files in this key's folder are a silent hit
# with the wrong latents (before the fix: a hit, cache_hit True, the other prompt's latents / 4 frames returned).
@pytest.mark.parametrize("other", ["another prompt", "4 frames under a 2-frame key"])
def test_another_keys_entry_copied_into_a_keys_folder_is_a_miss_with_a_warning_and_is_replaced(
        tiny_model, tmp_path, caplog, other):
    cache = TensorCache(tmp_path / "cache")
    mine = _invert(tiny_model, cache)
    theirs = _invert(tiny_model, cache, **({"prompt": "a red car"} if other == "another prompt" else {"n_frames": 4}))
    assert theirs.key != mine.key
    _copy_entry(theirs.entry, mine.entry)
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        again = _invert(tiny_model, cache)
    assert not again.cache_hit
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(mine.entry) in w and theirs.key in w and mine.key in w for w in warnings), warnings
    assert again.trajectory.latents.shape == mine.trajectory.latents.shape == (3, 2, 4, 8, 8)
    assert torch.equal(again.trajectory.latents, mine.trajectory.latents)
    assert torch.equal(cache.load(mine.key)[0]["latents"], mine.trajectory.latents)  # replaced by the right one
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([mine.key, theirs.key])


# Bug caught: meta.json outside the checksum, so an edited `bases` record (or any other value) is a hit and reported
# as the run's K per layer (before the fix: load returned the edited meta).
def test_an_edited_meta_json_is_a_miss_with_a_warning(tmp_path, caplog):
    cache = TensorCache(tmp_path / "cache")
    bases = {"mean_k": 72.0, "layers": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": {"k": [64]}}}
    entry = cache.save("k", {"latents": torch.ones(3, 2, 4, 8, 8)}, {"v": 1, "bases": bases})
    assert cache.load("k")[1]["bases"] == bases
    meta = json.loads((entry / META).read_text())
    meta["bases"]["mean_k"] = 512.0
    (entry / META).write_text(json.dumps(meta, indent=2))
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        assert cache.load("k") is None
    assert any(str(entry) in r.getMessage() and "edited" in r.getMessage() for r in caplog.records), caplog.text


# Bug caught: a load that trusts the record's checksums but not the tensors it describes (a writer that recorded
# other names or shapes than it wrote): here the record says 4 frames while the file holds 2 (checksums valid).
def test_tensors_that_differ_from_their_record_are_a_miss_with_a_warning(tmp_path, caplog):
    import hashlib

    cache = TensorCache(tmp_path / "cache")
    entry = cache.save("k", {"latents": torch.ones(3, 2, 4, 8, 8)}, {"v": 1})
    meta = json.loads((entry / META).read_text())
    del meta["sha256"]
    meta["entry"]["tensors"]["latents"]["shape"] = [3, 4, 4, 8, 8]
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    (entry / META).write_text(json.dumps({**meta, "sha256": hashlib.sha256(canonical).hexdigest()}))
    with caplog.at_level("WARNING", logger="stem.runs.cache"):
        assert cache.load("k") is None
    assert any(str(entry) in r.getMessage() and "[3, 2, 4, 8, 8]" in r.getMessage() for r in caplog.records), \
        caplog.text


@pytest.mark.parametrize("existing", ["folder", "file"])
def test_atomic_dir_without_keep_replaces_an_existing_folder_or_file(tmp_path, existing):
    """Without `keep` (e.g. exported frame folders) the new folder replaces what is there, nothing is left beside
    it. Catches: an install that tries the rename first and gives up on a file in the way (ENOTDIR), or that
    keeps the old folder when no `keep` was given."""
    target = tmp_path / "frames"
    if existing == "folder":
        target.mkdir()
        (target / "old.png").write_text("old")
    else:
        target.write_text("a file")
    with atomic_dir(target) as tmp:
        (tmp / "new.png").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.png"] and [p.name for p in tmp_path.iterdir()] == ["frames"]

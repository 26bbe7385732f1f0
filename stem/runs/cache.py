"""Content-addressed cache of tensors (inverted latents, later flows) in safetensors.

An entry is a folder `<root>/<key>/` holding `tensors.safetensors` and `meta.json`. The key
is a SHA-256 of everything that determines the result (`content_key`), so asking for the
same inversion again reuses it, and any change of frames, weights, prompt or settings
misses. Entries are written to a temporary folder and renamed into place: a crash or a
refused input never leaves a half-written entry behind.

meta.json holds, beside the caller's metadata, the entry's own record (`RECORD`): its key, each
tensor's dtype and shape, and the SHA-256 of the safetensors file's bytes; and a SHA-256 of all
of that (`CHECKSUM`, over the canonical JSON of the rest of meta.json), so neither file can change
unnoticed. Every load verifies both checksums, that the record's key is the key asked for (the
folder's name) and that the tensors have the recorded names, dtypes and shapes. An entry that
fails any of this is a miss with a warning naming it and what failed: one that cannot be read
(truncated or empty tensors file, truncated meta.json), whose files were edited or overwritten,
that was copied into another key's folder, or that has no record (written by an older version,
so it cannot be verified). The caller recomputes and its save replaces the entry atomically.

Concurrent writers of one key: the first complete entry is kept, later ones are discarded, and
a reader never finds a complete entry missing while another writer installs (`stem.core.atomic`).
Each save first removes the temporary folders that killed writers on this host left in the cache
folder (`stem.core.atomic.remove_dead_leftovers`); `python -m stem.runs.cache clean FOLDER` does it alone.

A cache folder that cannot be written is refused up front (`check_writable`): run.py checks it before
building the model, `stem.runs.reconstruction.invert_video` before inverting, so no finished inversion is
thrown away by a failing save. A save that fails anyway (a disk that fills up meanwhile) raises one
of `WRITE_ERRORS`: safetensors reports a failed write as a `SafetensorError`, not an OSError.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from stem.core.atomic import atomic_dir, remove_dead_leftovers, umask, unwritable
from stem.core.errors import ConfigError

TENSORS, META = "tensors.safetensors", "meta.json"
RECORD = "entry"     # key in meta.json: {"key", "tensors": {name: {"dtype", "shape"}}, "tensors_sha256"}
CHECKSUM = "sha256"  # key in meta.json: SHA-256 (hex) of the canonical JSON of the rest of meta.json
WRITE_ERRORS = (OSError, SafetensorError)  # what a failed `TensorCache.save` raises (e.g. a full disk)

log = logging.getLogger(__name__)


def content_key(**parts) -> str:
    """SHA-256 (24 hex digits) of named parts: tensors/arrays by dtype, shape and bytes, the rest as JSON."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        h.update(name.encode() + b"\0")
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _meta_checksum(meta: dict) -> str:
    """SHA-256 of `meta` as canonical JSON (sorted keys, no spaces): the same for the dict written and read back."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _describe(tensor: torch.Tensor) -> dict:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


class TensorCache:
    """A folder of content-keyed entries of named tensors plus JSON metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    key = staticmethod(content_key)   # for callers below this layer (editors) that get a cache handed in

    def sibling(self, name: str) -> TensorCache:
        """The cache folder `name` beside this one (e.g. an editing method's own entries beside "inversion")."""
        return TensorCache(self.root.parent / name)

    def path(self, key: str) -> Path:
        return self.root / key

    def check_writable(self) -> TensorCache:
        """Check that entries can be written (a probe folder is created and removed in the cache folder, or in
        its nearest existing parent when it does not exist yet: nothing is left behind, so a run refused later
        creates no cache folder); return the cache. Else a one-line ConfigError naming the folder and the fixes.

        An error rather than a warning and a run without saving: it comes before any model work (the project's
        promise for bad input), and a cache that silently stops saving would recompute every rerun. A read-only
        cache of finished entries is therefore refused too; use a writable copy of it. A symbolic link on the way
        that leads nowhere (a loop, a missing target) is probed through, so it is refused too.
        """
        problem = unwritable(self.root)
        if problem:
            raise ConfigError(f"cache folder {self.root} is not writable ({problem}): set paths.cache_dir "
                              f"to a writable folder, or use_cache=false to run without the cache")
        return self

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of a complete, verified entry, or None when there is none (a miss).

        A damaged, mislabelled or unverifiable entry is a miss too, with a warning naming it (module docstring).
        """
        entry = self.path(key)
        if not entry.exists():
            return None
        try:
            return self._verified(entry, key)
        except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
            log.warning("cache entry %s is unusable (%s); treating it as a miss, it is replaced when written again",
                        entry, e)
            return None

    def _verified(self, entry: Path, key: str) -> tuple[dict[str, torch.Tensor], dict]:
        """`load` of an existing entry; a ValueError says what does not verify."""
        if not (entry / TENSORS).is_file() or not (entry / META).is_file():
            raise ValueError(f"incomplete (needs {TENSORS} and {META})")
        meta = json.loads((entry / META).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{META} is not a JSON object")
        expected, record = meta.pop(CHECKSUM, None), meta.get(RECORD)
        if expected is None or not isinstance(record, dict):
            raise ValueError(f"no checksummed record of the key and tensors in {META} (written by an older "
                             "version, so it cannot be verified)")
        if _meta_checksum(meta) != expected:
            raise ValueError(f"{META} does not match its checksum (edited)")
        if record.get("key") != key:
            raise ValueError(f"it holds the entry of key {record.get('key')}, not {key} (copied or moved)")
        data = (entry / TENSORS).read_bytes()
        if hashlib.sha256(data).hexdigest() != record.get("tensors_sha256"):
            raise ValueError(f"{TENSORS} does not match the checksum in {META} (overwritten or truncated)")
        tensors = load(data)
        found = {name: _describe(t) for name, t in tensors.items()}
        if found != record.get("tensors"):
            raise ValueError(f"tensors {found} differ from those recorded in {META}: {record.get('tensors')}")
        del meta[RECORD]
        return tensors, meta

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write an entry atomically (temporary folder, then rename) with its record and checksums in meta.json
        (`RECORD`, `CHECKSUM`: reserved keys) and return its path. First, leftovers of killed writers in the
        cache folder are removed (module docstring).

        A complete, verified entry of `key` already there (installed before, or by another writer while this one
        was writing: same key, same inputs) is kept and this one is discarded; a damaged one is replaced.
        A failed write raises one of `WRITE_ERRORS` and leaves no entry or temporary folder."""
        if RECORD in meta or CHECKSUM in meta:
            raise ValueError(f"{RECORD!r} and {CHECKSUM!r} are reserved keys of the cache's {META}")
        for leftover in remove_dead_leftovers(self.root):
            log.info("removed %s, left by a cache writer that was killed", leftover)
        entry = self.path(key)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_dir(entry, keep=lambda _: self.load(key) is not None) as tmp:
            save_file(tensors, tmp / TENSORS)
            os.chmod(tmp / TENSORS, 0o666 & ~umask())  # safetensors writes 0o600 whatever the umask
            record = {"key": key, "tensors": {k: _describe(v) for k, v in tensors.items()},
                      "tensors_sha256": hashlib.sha256((tmp / TENSORS).read_bytes()).hexdigest()}
            full = json.loads(json.dumps({**meta, RECORD: record}, default=str))  # as it will be read back
            (tmp / META).write_text(json.dumps({**full, CHECKSUM: _meta_checksum(full)}, indent=2, sort_keys=True))
        return entry

    def save_or_warn(self, key: str, tensors: dict[str, torch.Tensor], meta: dict, what: str) -> Path | None:
        """`save`, or None with a warning naming the entry when the write fails (one of `WRITE_ERRORS`, e.g. a
        full disk): for results already computed, which the run keeps and goes on with. `what` names the entry
        in the warning ("inversion", "flow")."""
        try:
            return self.save(key, tensors, meta)
        except WRITE_ERRORS as e:
            log.warning("could not write the %s cache entry %s (%s: %s); continuing without caching it",
                        what, self.path(key), type(e).__name__, e)
            return None


def main(argv: list[str] | None = None) -> int:
    """`python -m stem.runs.cache clean FOLDER...`: remove killed writers' leftovers (`stem.core.atomic`) in each FOLDER
    and its subfolders one level down (so `paths.cache_dir` covers its inversion/ and flow/ caches)."""
    parser = argparse.ArgumentParser(prog="python -m stem.runs.cache", description=main.__doc__)
    parser.add_argument("command", choices=["clean"])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for folder in args.folders:
        subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] \
            if folder.is_dir() else []
        for each in (folder, *subfolders):
            for leftover in remove_dead_leftovers(each):
                print(f"removed {leftover}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

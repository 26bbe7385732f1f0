"""Content-addressed cache of tensors (inverted latents, later flows) in safetensors.

An entry is a folder `<root>/<key>/` holding `tensors.safetensors` and `meta.json`. The key
is a SHA-256 of everything that determines the result (`content_key`), so asking for the
same inversion again reuses it, and any change of frames, weights, prompt or settings
misses. Entries are written to a temporary folder and renamed into place: a crash or a
refused input never leaves a half-written entry behind.

meta.json also holds the SHA-256 of the safetensors file's bytes (`CHECKSUM`), verified on every
load. An entry that cannot be read (truncated or empty tensors file, truncated meta.json), whose
tensors do not match their checksum, or that has no checksum (written before checksums existed,
so it cannot be verified) is a miss with a warning naming it: the caller recomputes and its save
replaces the entry atomically.

A cache folder that cannot be written is refused up front (`check_writable`): run.py checks it before
building the model, `stem.runs.reconstruction.invert_video` before inverting, so no finished inversion is
thrown away by a failing save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from stem.core.atomic import atomic_dir, umask
from stem.core.errors import ConfigError

TENSORS, META = "tensors.safetensors", "meta.json"
CHECKSUM = "tensors_sha256"  # key in meta.json: SHA-256 (hex) of the bytes of TENSORS

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


class TensorCache:
    """A folder of content-keyed entries of named tensors plus JSON metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def check_writable(self) -> TensorCache:
        """Check that entries can be written (a probe folder is created and removed in the cache folder, or in
        its nearest existing parent when it does not exist yet: nothing is left behind, so a run refused later
        creates no cache folder); return the cache. Else a one-line ConfigError naming the folder and the fixes.

        An error rather than a warning and a run without saving: it comes before any model work (the project's
        promise for bad input), and a cache that silently stops saving would recompute every rerun. A read-only
        cache of finished entries is therefore refused too; use a writable copy of it.
        """
        try:
            existing = self.root
            while not existing.exists():  # a file on the way makes mkdtemp fail: not writable either
                existing = existing.parent
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-check."))
        except OSError as e:
            raise ConfigError(f"cache folder {self.root} is not writable ({e.strerror or e}): set paths.cache_dir "
                              f"to a writable folder, or use_cache=false to run without the cache") from None
        return self

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of a complete, verified entry, or None when there is none (a miss).

        A damaged or unverifiable entry is a miss too, with a warning naming it (module docstring).
        """
        entry = self.path(key)
        if not entry.exists():
            return None
        try:
            if not (entry / TENSORS).is_file() or not (entry / META).is_file():
                raise ValueError(f"incomplete (needs {TENSORS} and {META})")
            meta = json.loads((entry / META).read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"{META} is not a JSON object")
            expected = meta.pop(CHECKSUM, None)
            if expected is None:
                raise ValueError(f"no checksum in {META} (written before checksums were stored)")
            data = (entry / TENSORS).read_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise ValueError(f"{TENSORS} does not match the checksum in {META} (overwritten or truncated)")
            return load(data), meta
        except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
            log.warning("cache entry %s is unusable (%s); treating it as a miss, it is replaced when written again",
                        entry, e)
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write an entry atomically (temporary folder, then rename) with the tensors' checksum in meta.json
        (`CHECKSUM`, a reserved key) and return its path.

        An existing entry is replaced. Concurrent writers of one key (`stem.core.atomic.atomic_dir`): a complete,
        verified entry that another writer installed while this one was writing is kept (same key, same inputs)
        and this one is discarded; a damaged one is replaced."""
        entry = self.path(key)
        with atomic_dir(entry, keep=lambda _: self.load(key) is not None) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / TENSORS)
            os.chmod(tmp / TENSORS, 0o666 & ~umask())  # safetensors writes 0o600 whatever the umask
            checksum = hashlib.sha256((tmp / TENSORS).read_bytes()).hexdigest()
            (tmp / META).write_text(json.dumps({**meta, CHECKSUM: checksum}, indent=2, sort_keys=True, default=str))
        return entry

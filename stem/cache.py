"""Content-addressed cache of tensors (inverted latents, later flows) in safetensors.

An entry is a folder `<root>/<key>/` holding `tensors.safetensors` and `meta.json`. The key
is a SHA-256 of everything that determines the result (`content_key`), so asking for the
same inversion again reuses it, and any change of frames, weights, prompt or settings
misses. Entries are written to a temporary folder and renamed into place: a crash or a
refused input never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stem.atomic import atomic_dir, umask

TENSORS, META = "tensors.safetensors", "meta.json"


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

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of a complete entry, or None when there is none."""
        entry = self.path(key)
        if not (entry / TENSORS).is_file() or not (entry / META).is_file():
            return None
        return load_file(entry / TENSORS), json.loads((entry / META).read_text())

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write an entry atomically (temporary folder, then rename) and return its path."""
        entry = self.path(key)
        with atomic_dir(entry) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / TENSORS)
            os.chmod(tmp / TENSORS, 0o666 & ~umask())  # safetensors writes 0o600 whatever the umask
            (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        return entry

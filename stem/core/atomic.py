"""Atomic writes: build a file or folder under a temporary name beside it, then rename.

A crash, a refused input or a Ctrl-C leaves either the old content or nothing, never a
half-written file that a later run (or a table script) could take for a result. Temporary
names start with "." so listings and globs skip them. Permissions follow the umask, as a
plain `open(path, "w")` would give (mkstemp alone would leave them private).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); rename it to `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an existing
    folder is swapped out only once the new one is complete).

    Safe with concurrent writers of the same `path`: when the final rename finds that another writer
    installed a folder meanwhile, `keep(path)` decides: True keeps that folder and discards this one
    (e.g. a complete cache entry of the same key), False or no `keep` replaces it. A folder that another
    writer moved away first is not an error. No temporary or swapped-out folder is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        _install(tmp, path, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, path: Path, keep: Callable[[Path], bool] | None, attempts: int = 10) -> None:
    """Rename the folder `tmp` to `path` (module docstring of `atomic_dir` for concurrent writers)."""
    aside = []
    try:
        if path.exists():
            aside.append(_move_aside(path))
        for _ in range(attempts):
            try:
                os.rename(tmp, path)  # atomic; fails while `path` is a non-empty folder
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if keep is not None and keep(path):  # installed by another writer since the check above
                return
            aside.append(_move_aside(path))
        raise OSError(f"could not install {path}: other writers kept replacing it ({attempts} attempts)")
    finally:
        for old in aside:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def _move_aside(path: Path) -> Path | None:
    """Rename `path` to a hidden unique name beside it and return that name; None if `path` is gone (another
    writer moved it first)."""
    old = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
    try:
        os.rename(path, old)
    except FileNotFoundError:
        return None
    return old

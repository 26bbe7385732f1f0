"""Atomic writes: build a file or folder under a temporary name beside it, then rename.

A crash, a refused input or a Ctrl-C leaves either the old content or nothing, never a
half-written file that a later run (or a table script) could take for a result. Temporary
names start with "." so listings and globs skip them. Permissions follow the umask, as a
plain `open(path, "w")` would give (mkstemp alone would leave them private).

A writer killed with SIGKILL cannot clean up: its temporary folder (`.tmp`) and an old folder it
had moved aside (`.old`) stay. Their names carry the writer's pid and host (with its pid namespace:
`.<name>.<pid>@<host>.<random>.tmp`), so `remove_dead_leftovers` can tell them from a live writer's:
it removes those whose writer is no longer running on this host, and leaves other hosts' (whose
processes it cannot see) and live writers' alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# a temporary or swapped-out folder of `atomic_dir` (`hidden_name`): name, writer's pid and host, random part
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)\.[0-9a-f]{8}\.(?:tmp|old)$")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    """This host's name, with the pid namespace where /proc shows it (containers that share a host name do not see
    each other's processes)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    with contextlib.suppress(OSError):
        name += f"_pidns{os.stat('/proc/self/ns/pid').st_ino}"
    return name


def hidden_name(name: str, suffix: str) -> str:
    """A unique hidden name for a temporary ("tmp") or swapped-out ("old") folder of `name`, naming this process
    and host (`LEFTOVER`)."""
    return f".{name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}.{suffix}"


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
    """Yield a temporary folder beside `path`; on success it is renamed to `path`.

    An existing `path` (installed before, or by another writer meanwhile): `keep(path)` decides. True keeps it
    and discards this folder, so the first complete folder wins and is never moved away (a reader never finds
    it missing); False, or no `keep`, moves it aside and installs this one. A folder that another writer moved
    away first is not an error. No temporary or swapped-out folder is left behind, except by a killed writer
    (`remove_dead_leftovers`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(hidden_name(path.name, "tmp"))
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        _install(tmp, path, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, path: Path, keep: Callable[[Path], bool] | None, attempts: int = 10) -> None:
    """Rename the folder `tmp` to `path` (`atomic_dir` for an existing `path` and concurrent writers)."""
    aside = []
    try:
        for _ in range(attempts):
            try:
                os.rename(tmp, path)  # atomic; fails while `path` is a non-empty folder or a file
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):  # ENOTDIR: `path` is a file
                    raise
            if keep is not None and keep(path):  # a complete folder is there: it wins, ours is discarded
                return
            aside.append(_move_aside(path))
        raise OSError(f"could not install {path}: other writers kept replacing it ({attempts} attempts)")
    finally:
        for old in aside:
            if old is not None:
                _remove(old)


def _move_aside(path: Path) -> Path | None:
    """Rename `path` to a hidden unique name beside it and return that name; None if `path` is gone (another
    writer moved it first)."""
    old = path.with_name(hidden_name(path.name, "old"))
    try:
        os.rename(path, old)
    except FileNotFoundError:
        return None
    return old


def _remove(path: Path) -> None:
    """Remove a folder tree or a file (one moved aside may be either); gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporary and swapped-out folders (`LEFTOVER` names) in `folder` whose writer was on this host
    and is no longer running (killed); return them. Other hosts' and live writers' are kept, and nothing else
    is touched (installed folders have no hidden name). A pid reused by a new process keeps its leftovers
    until that process ends."""
    removed, host = [], _host()
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet: nothing to clean
        return removed
    for name in names:
        match = LEFTOVER.match(name)
        if match is None or match["host"] != host or pid_alive(int(match["pid"])):
            continue
        leftover = Path(folder) / name
        _remove(leftover)
        removed.append(leftover)
    return removed


def unwritable(folder: str | Path, size: int = 0) -> str | None:
    """Why `folder` (or its nearest existing parent when it does not exist yet) cannot take a new folder holding
    `size` bytes, e.g. "Read-only file system: /mnt/x"; None when it can. A file, a symbolic link loop or a
    dangling link on the way is refused (the probe goes through it). The probe, a hidden folder named after this
    process (`hidden_name`), is removed: nothing is left behind, so a check creates no folder."""
    existing = Path(folder).absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    probe = existing / hidden_name("write-check", "tmp")
    try:
        os.mkdir(probe)
    except OSError as e:
        return f"{e.strerror or e}: {existing}"
    try:
        if size:
            with open(probe / "probe", "wb") as f:
                f.write(bytes(size))
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        return f"{e.strerror or e}: {existing}"
    finally:
        _remove(probe)
    return None

"""Uploaded clips of the demo, stored by content: `<folder>/<sha256 of the bytes, 24 hex><suffix>`. The same file
uploaded again is the same path, so its frames (and the inversion cache key made from them) are the same.

Each upload is checked before it is kept: the size while it streams in (413 past the limit), the format by its
suffix, then the library's reader (`stem.data.video.read_frames`) decodes it, refusing a frame larger than
`max_side` before any frame is decoded and more than `max_frames` frames (400). A refused upload leaves nothing:
it is written under a hidden temporary name and renamed into place only once every check passed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from stem.app.demo_form import FormError
from stem.core.atomic import hidden_name
from stem.core.errors import StemError
from stem.data.video import FFMPEG_SUFFIXES, read_frames

SUFFIXES = (*FFMPEG_SUFFIXES, ".gif")   # what the library's reader decodes from a file
CHUNK = 1 << 20
DIGEST_CHARS = 24


class UploadRefused(FormError):
    """An upload refused (one line), with its HTTP status (400: not a usable video; 413: too large)."""


@dataclass(frozen=True)
class Upload:
    path: Path
    frames: int
    width: int
    height: int
    reused: bool   # the same bytes were uploaded before


class UploadStore:
    """Uploads under `folder`, at most `max_mb` MB, `max_frames` frames and `max_side` pixels a side."""

    def __init__(self, folder, *, max_mb: float, max_frames: int, max_side: int):
        self.folder = Path(folder)
        self.max_bytes = int(max_mb * 1e6)
        self.max_mb, self.max_frames, self.max_side = max_mb, max_frames, max_side

    def limits(self) -> str:
        return (f"{'/'.join(s[1:] for s in SUFFIXES)}, at most {self.max_mb:g} MB, {self.max_frames} frames, "
                f"{self.max_side} pixels a side")

    def store(self, stream, filename: str) -> Upload:
        """Read `stream` (a file object) uploaded as `filename`, check it and keep it; UploadRefused otherwise."""
        suffix = Path(filename or "").suffix.lower()
        if suffix not in SUFFIXES:
            raise UploadRefused(f"{(filename or 'the file')[:60]!r} is not a video this demo reads: upload "
                                f"{', '.join(SUFFIXES)}")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (hidden_name("upload", "tmp") + suffix)   # the reader picks its decoder by the suffix
        try:
            digest = self._copy(stream, tmp)
            frames, width, height = self._check(tmp)
            path = self.folder / f"{digest[:DIGEST_CHARS]}{suffix}"
            reused = path.is_file()
            if reused:
                tmp.unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Upload(path=path, frames=frames, width=width, height=height, reused=reused)

    def _copy(self, stream, tmp: Path) -> str:
        digest, size = hashlib.sha256(), 0
        with open(tmp, "xb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise UploadRefused(f"the upload is larger than {self.max_mb:g} MB: cut or compress the clip",
                                        413)
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise UploadRefused("the uploaded file is empty: choose a video file")
        return digest.hexdigest()

    def _check(self, path: Path) -> tuple[int, int, int]:
        """(frames, width, height) of a video the library reads, within the limits; UploadRefused otherwise."""
        def before_decode(width: int, height: int, count: int | None) -> None:
            if max(width, height) > self.max_side:
                raise UploadRefused(f"the video is {width}x{height}: resize it to at most {self.max_side} pixels a "
                                    "side")
            if count is not None and count > self.max_frames:
                raise UploadRefused(f"the video has about {count} frames: cut it to at most {self.max_frames}")

        try:
            frames, _ = read_frames(path, before_decode=before_decode)
        except UploadRefused:
            raise
        except StemError as e:   # the reader's one line names our temporary file: say what it means instead
            raise UploadRefused(f"the upload is not a readable video ({str(e).replace(str(path), 'file')[:200]})"
                                ) from None
        if len(frames) > self.max_frames:
            raise UploadRefused(f"the video has {len(frames)} frames: cut it to at most {self.max_frames}")
        return len(frames), frames.shape[2], frames.shape[1]

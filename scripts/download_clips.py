"""Download the paper's sample clips from the public repositories of the code releases.

    python scripts/download_clips.py                        # every clip into data/videos/ (where run.py looks)
    python scripts/download_clips.py --only wolf car_turn   # some clips (names as in data=...)
    python scripts/download_clips.py --dest /data/videos    # elsewhere; then export STEM_DATA_ROOT=/data/videos
    python scripts/download_clips.py --base-url https://mirror.example/raw   # a mirror (layout below)

| clip (`data=`) | file(s) under the destination | from |
|---|---|---|
| woman_running | woman-running.mp4 | omerbt/TokenFlow `data/` (TokenFlow) |
| wolf | wolf.mp4 | omerbt/TokenFlow `data/` |
| taylor | taylor.mp4 | STEM-Inv/STEM-Inv `TokenFlow-Edit/data/` (the STEM-Inv release) |
| car_turn | car-turn/00000.png ... 00007.png | ChenyangQiQi/FateZero `data/teaser_car-turn/` (FateZero) |

Each file is fetched from `<base url>/<owner>/<repository>/<commit>/<path>` (default base url:
https://raw.githubusercontent.com, at the pinned commits in `REPOSITORIES`), so a mirror only has to
keep that layout. The sha256 checksums were computed from copies of these files taken from those
repositories (the project's shared sample folder, byte-identical to the repositories' git blobs at
the pinned commits).

The destination defaults to where `configs/paths/default.yaml` looks for clips: $STEM_DATA_ROOT
if set, else `data/videos` under the current folder (run this from the folder you run
`python run.py` or `stem-run` from). A file already there with the right checksum is skipped.
A download goes to `<file>.part`, is resumed from there with an HTTP Range request when the
server supports it (from the start otherwise), is checked against its size and then its sha256, and
only then renamed to its final name: an interrupted or corrupt download never sits under the final
name. A connection that drops (also one that just ends the body early) keeps the `.part` for the next
run to resume; at most the file's size is written, so a body longer than the file (or endless) is
refused and deleted instead of filling the disk. Errors (offline, a dropped connection, a wrong size
or checksum, a different file already in the way) are one line `error: ...` naming the file, the URL
and what to do; exit status 1 (2 for bad options, such as a --base-url that is not a URL).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
REPOSITORIES = {  # repository -> pinned commit (the newest commit checked; the files are unchanged since added)
    "omerbt/TokenFlow": "5dd6a696277e9d18c23adc034dc4c052ccd64cb5",
    "STEM-Inv/STEM-Inv": "63ad9dddd28ce71e06e6baf7d66a17eefdd57cb4",
    "ChenyangQiQi/FateZero": "9b6cb7b4dea2b2154df71ad7be0f61a66ca46d88",
}
CHUNK = 1 << 16
TIMEOUT = 60  # seconds without an answer before a download counts as failed


@dataclass(frozen=True)
class ClipFile:
    """One file of a clip: where it goes (relative to the destination), where it comes from, its sha256 and size."""

    name: str
    repo: str
    path: str
    sha256: str
    size: int


def _car_turn() -> list[ClipFile]:
    sums = ["5a44ff824b031bcd6c6547f95eb7ff8532bdfbe9efbfa34506fc0cb3ed1f9923",
            "0bd08cc5c2e5eb2078148e3f7d78e19922b66ec984ee2a3689a3197084ef7fa3",
            "5e241abc23a5bbc63afd5d8607a7b4efd566635921562a7b1be157480fd09292",
            "c124f133164223458b136c538b67811282c5d862fb34f470ed55d9788436886d",
            "5c57427aa5a33d0552be2dba4e34dcbbc324bccad7a28f21af2185776e5aac54",
            "1edef4dfee18a654d9828c24a69ddb8a73fe6c7c7c8589530fc8f0e240219a5d",
            "32a9e63c65c8797e6d8d95b8a278089ed48fc7510b2e1a444ce915e6bc7a992c",
            "9dbe65f7358f2bbfae87958a9437f9715e31a738aef56d469508587f77533564"]
    sizes = [420934, 425987, 432155, 425496, 414891, 431210, 428020, 415206]
    return [ClipFile(f"car-turn/{i:05d}.png", "ChenyangQiQi/FateZero", f"data/teaser_car-turn/{i:05d}.png", s, n)
            for i, (s, n) in enumerate(zip(sums, sizes))]


CLIPS = {  # name as in `data=<name>` -> its files
    "woman_running": [ClipFile("woman-running.mp4", "omerbt/TokenFlow", "data/woman-running.mp4",
                               "c622e40ca8b01a6a678eae719be376cb7969a2b7460955706a214720104880b7", 1285788)],
    "wolf": [ClipFile("wolf.mp4", "omerbt/TokenFlow", "data/wolf.mp4",
                      "d8a657961bcf25eae644dc7a456130537121422f6a19b8a67226b90767b4894a", 378711)],
    "taylor": [ClipFile("taylor.mp4", "STEM-Inv/STEM-Inv", "TokenFlow-Edit/data/taylor.mp4",
                        "8adabd5dd0049aaa7f1837aab5b7b7a3edcc9183d964b7564f3d152b0ebd386c", 95586)],
    "car_turn": _car_turn(),
}


class DownloadError(Exception):
    """A file that could not be fetched or verified; the message is one line naming the file and the fix."""


def url_for(file: ClipFile, base_url: str = DEFAULT_BASE_URL, repositories: dict | None = None) -> str:
    """`<base_url>/<owner>/<repository>/<commit>/<path>` (raw.githubusercontent.com's layout)."""
    commit = (repositories or REPOSITORIES)[file.repo]
    return f"{base_url.rstrip('/')}/{file.repo}/{commit}/{file.path}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, part: Path, size: int | None, opener, timeout: float, progress: bool) -> None:
    """Add the rest of `url` to `part`: resume from its length with a Range request; start again from 0 when the
    server sends the whole file instead (200: no Range support, e.g. file://) or a range that starts elsewhere."""
    offset = part.stat().st_size if part.exists() else 0
    if offset:
        try:
            response = opener(urllib.request.Request(url, headers={"Range": f"bytes={offset}-"}), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # nothing left to send: the .part may be whole already (its checksum says)
                return
            raise
        resumed = getattr(response, "status", None) == 206 and str(
            response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-")
        if resumed:
            return _write(response, url, part, offset, size, progress)
        if getattr(response, "status", None) == 206:  # another range than asked: of no use, ask for everything
            response.close()
        else:
            return _write(response, url, part, 0, size, progress)
    _write(opener(urllib.request.Request(url), timeout=timeout), url, part, 0, size, progress)


def _content_length(response) -> int | None:
    text = str(response.headers.get("Content-Length", "")).strip()
    return int(text) if text.isdigit() else None


def _write(response, url: str, part: Path, offset: int, size: int | None, progress: bool) -> None:
    """Stream `response` into `part` from byte `offset` (0: truncate first), with a progress bar, writing at most
    up to the file's `size` (else offset + the response's Content-Length). DownloadError (one line) when the
    server announces another size, when the body is longer (the .part is deleted) and when it ends short: a
    server that closes the connection early makes read() return short without an error, so the byte count is
    what tells; the short .part is kept for the next run's Range request."""
    length = _content_length(response)
    expected = size if size is not None else (None if length is None else offset + length)
    if length is not None and expected is not None and offset + length != expected:
        response.close()
        raise DownloadError(f"{url} is {offset + length} bytes, not the expected {expected}: it is another file; "
                            f"check --base-url (a mirror needs <base>/<owner>/<repo>/<commit>/<path>) or fetch "
                            f"the file by hand from the repository")
    got = offset
    with response, open(part, "ab" if offset else "wb") as out, \
            tqdm(total=expected, initial=offset, unit="B", unit_scale=True, desc=part.name[:-len(".part")],
                 disable=None if progress else True, leave=False) as bar:
        while expected is None or got < expected:
            block = response.read(CHUNK if expected is None else min(CHUNK, expected - got))
            if not block:
                break
            out.write(block)
            got += len(block)
            bar.update(len(block))
        longer = expected is not None and got == expected and response.read(1)
    if longer:
        part.unlink()
        raise DownloadError(f"{url} sends more than the expected {expected} bytes: it is another file (the download "
                            f"was stopped there and deleted); check --base-url or fetch the file by hand")
    if expected is not None and got < expected:
        raise DownloadError(f"the connection dropped after {got} of {expected} bytes of {url}: the partial "
                            f"download is kept in {part.absolute()}; run again to resume it")


def download(file: ClipFile, dest: Path, base_url: str = DEFAULT_BASE_URL, opener=urllib.request.urlopen,
             timeout: float = TIMEOUT, progress: bool = True, repositories: dict | None = None) -> str:
    """Put `file` under `dest` with its checksum verified; returns "present" (already there) or "downloaded".

    Raises DownloadError (one line) when offline or the connection drops (the .part is kept: the next call resumes
    it), on a wrong size or checksum (the bad .part is deleted, nothing is left under the final name) or when a
    different file is already in the way."""
    target = dest / file.name
    url = url_for(file, base_url, repositories)
    if target.is_file():
        if sha256_of(target) == file.sha256:
            return "present"
        raise DownloadError(f"{target} is already there but is not the expected file (sha256 differs): "
                            f"delete or move it and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    if part.exists() and file.size is not None and part.stat().st_size > file.size:
        part.unlink()  # longer than the file: not a prefix of it
    try:
        if not (part.exists() and part.stat().st_size == file.size):
            _fetch(url, part, file.size, opener, timeout, progress)
    except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError) as e:
        if isinstance(e, urllib.error.HTTPError):
            problem = f"HTTP {e.code} {e.reason}"
        else:
            problem = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}; offline?"
        raise DownloadError(
            f"cannot download {url} ({problem}): download it by hand (or copy it from another machine) to "
            f"{target.absolute()}, or pass --base-url of a mirror; run again to resume".replace("\n", " ")) from e
    got = sha256_of(part)
    if got != file.sha256:
        part.unlink()
        raise DownloadError(f"{target}: sha256 {got} of the download from {url} is not the expected {file.sha256}; "
                            f"the download was deleted: run again, or fetch the file by hand from the repository")
    os.replace(part, target)
    return "downloaded"


def default_dest() -> Path:
    """Where `configs/paths/default.yaml` looks for clips: $STEM_DATA_ROOT, else data/videos under the cwd."""
    return Path(os.environ.get("STEM_DATA_ROOT") or "data/videos")


def _clip_name(text: str) -> str:
    name = text.replace("-", "_")
    if name not in CLIPS:
        raise argparse.ArgumentTypeError(f"unknown clip {text!r}: choose from {', '.join(CLIPS)}")
    return name


def main(argv: list[str] | None = None, opener=urllib.request.urlopen) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="destination folder (default: $STEM_DATA_ROOT, else data/videos under the current folder)")
    parser.add_argument("--only", nargs="+", type=_clip_name, metavar="CLIP",
                        help=f"clips to fetch (default: all of {', '.join(CLIPS)})")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help="a mirror with the layout <base>/<owner>/<repo>/<commit>/<path> (file:// works too)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait for an answer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    base = urllib.parse.urlsplit(args.base_url)
    if base.scheme not in ("http", "https", "ftp", "file") or (base.scheme != "file" and not base.netloc):
        print(f"error: --base-url {args.base_url} is not a URL: give a mirror's address such as {DEFAULT_BASE_URL} "
              "or file:///path/to/mirror", file=sys.stderr)
        return 2
    dest = args.dest if args.dest is not None else default_dest()
    names = list(dict.fromkeys(args.only)) if args.only else list(CLIPS)
    try:
        for name in names:
            states = [download(f, dest, args.base_url, opener, args.timeout, not args.no_progress)
                      for f in CLIPS[name]]
            where = dest / CLIPS[name][0].name.split("/")[0]
            print(f"{name}: {where} ({', '.join(f'{states.count(s)} {s}' for s in dict.fromkeys(states))})")
    except (DownloadError, OSError) as e:  # OSError: the destination cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    if dest.resolve() != default_dest().resolve():
        print(f"clips are in {dest}: run with STEM_DATA_ROOT={dest} (or paths.data_root={dest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/download_clips.py against local mirrors built here (file:// URLs, the upstream layout
<base>/<owner>/<repo>/<commit>/<path>) and against injected openers that play an HTTP server with or
without Range support, failing mid-stream or not. Each test names the bug (mutation) it catches."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

SCRIPT = ROOT / "scripts" / "download_clips.py"


def _load():
    spec = importlib.util.spec_from_file_location("download_clips", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


dl = _load()


def _mirror(root: Path, clips: dict, repositories: dict, source) -> str:
    """A file:// mirror under `root` with raw.githubusercontent.com's layout; `source(file)` gives each file's bytes."""
    for files in clips.values():
        for f in files:
            path = root / f.repo / repositories[f.repo] / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(source(f))
    return root.as_uri()


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a small fake table (no network, no sample clips needed) ---------------------------------------------------

PAYLOAD = {"a.mp4": os.urandom(5000), "b/00000.png": os.urandom(3000), "b/00001.png": os.urandom(2000)}


def _file(name: str, repo: str, path: str) -> dl.ClipFile:
    data = PAYLOAD[name]
    return dl.ClipFile(name, repo, path, hashlib.sha256(data).hexdigest(), len(data))


FAKE_REPOS = {"own/one": "a" * 40, "other/two": "b" * 40}
FAKE_CLIPS = {"one": [_file("a.mp4", "own/one", "data/a.mp4")],
              "two": [_file("b/00000.png", "other/two", "data/teaser_b/00000.png"),
                      _file("b/00001.png", "other/two", "data/teaser_b/00001.png")]}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The script with the fake table, and a file:// mirror of it."""
    monkeypatch.setattr(dl, "CLIPS", FAKE_CLIPS)
    monkeypatch.setattr(dl, "REPOSITORIES", FAKE_REPOS)
    return _mirror(tmp_path / "mirror", FAKE_CLIPS, FAKE_REPOS, lambda f: PAYLOAD[f.name])


class CountingOpener:
    """urlopen that counts its calls (file:// URLs)."""

    def __init__(self):
        self.urls = []

    def __call__(self, request, timeout=None):
        import urllib.request

        self.urls.append(request.full_url)
        return urllib.request.urlopen(request, timeout=timeout)


def test_downloads_everything_then_skips_what_is_there(fake, tmp_path, capsys):
    """Catches: files not verified-and-kept on a second run (re-downloaded: the opener is called again), the
    mirror layout built wrongly (<base>/<owner>/<repo>/<commit>/<path>), a frame folder not stored under its
    own name, a `.part` left behind."""
    dest, opener = tmp_path / "videos", CountingOpener()
    assert dl.main(["--base-url", fake, "--dest", str(dest), "--no-progress"], opener=opener) == 0
    assert _tree(dest) == PAYLOAD
    assert opener.urls == [f"{fake}/own/one/{'a' * 40}/data/a.mp4",
                           *(f"{fake}/other/two/{'b' * 40}/data/teaser_b/0000{i}.png" for i in (0, 1))]
    again = CountingOpener()
    assert dl.main(["--base-url", fake, "--dest", str(dest), "--no-progress"], opener=again) == 0
    assert again.urls == [] and _tree(dest) == PAYLOAD
    assert "one: " in capsys.readouterr().out


def test_only_fetches_the_named_clips(fake, tmp_path):
    """Catches: --only ignored (everything fetched), or names with '-' not accepted as data= names."""
    dest = tmp_path / "videos"
    assert dl.main(["--base-url", fake, "--dest", str(dest), "--only", "two", "--no-progress"]) == 0
    assert sorted(_tree(dest)) == ["b/00000.png", "b/00001.png"]
    with pytest.raises(SystemExit) as e:
        dl.main(["--only", "three"])
    assert e.value.code == 2


def test_checksum_mismatch_is_an_error_and_leaves_nothing(fake, tmp_path, capsys):
    """Catches: renaming before verifying (a corrupt file under the final name), keeping the bad .part (every
    later run would resume a corrupt prefix), an error that does not name the file."""
    bad = tmp_path / "mirror" / "own/one" / ("a" * 40) / "data/a.mp4"
    bad.write_bytes(PAYLOAD["a.mp4"][:-1] + b"x")
    dest = tmp_path / "videos"
    assert dl.main(["--base-url", fake, "--dest", str(dest), "--only", "one", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(dest / "a.mp4") in err and "sha256" in err
    assert list(dest.iterdir()) == []


def test_a_different_file_in_the_way_is_kept(fake, tmp_path, capsys):
    """Catches: silently overwriting (or silently accepting) a file of the same name with other content."""
    dest = tmp_path / "videos"
    dest.mkdir()
    (dest / "a.mp4").write_bytes(b"mine")
    assert dl.main(["--base-url", fake, "--dest", str(dest), "--only", "one", "--no-progress"]) == 1
    assert (dest / "a.mp4").read_bytes() == b"mine"
    assert "delete or move it" in capsys.readouterr().err


# --- resuming, at the function level with an HTTP-like opener ----------------------------------------------------

class FakeServer:
    """Plays an HTTP server for one file: 206 + Content-Range for a Range request when `ranges`, else 200 with the
    whole file; `fail_after` bytes into a response the connection drops (ConnectionResetError)."""

    def __init__(self, data: bytes, ranges: bool = True, fail_after: int | None = None, range_start=None):
        self.data, self.ranges, self.fail_after, self.range_start = data, ranges, fail_after, range_start
        self.requests = []

    def __call__(self, request, timeout=None):
        header = request.get_header("Range")
        self.requests.append(header)
        if not (header and self.ranges):
            return FakeResponse(self.data, 200, {}, self.fail_after)
        start = int(header[len("bytes="):-1]) if self.range_start is None else self.range_start
        content_range = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        return FakeResponse(self.data[start:], 206, {"Content-Range": content_range}, self.fail_after)


class FakeResponse:
    def __init__(self, body: bytes, status: int, headers: dict, fail_after: int | None):
        self.body, self.status, self.headers, self.fail_after, self.sent = io.BytesIO(body), status, headers, \
            fail_after, 0

    def read(self, n):
        if self.fail_after is not None:
            n = min(n, self.fail_after - self.sent)
            if n <= 0:
                raise ConnectionResetError("connection reset by peer")
        block = self.body.read(n)
        self.sent += len(block)
        return block

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


FILE = FAKE_CLIPS["one"][0]
DATA = PAYLOAD["a.mp4"]


def _download(tmp_path, server):
    return dl.download(FILE, tmp_path, "https://example.invalid", opener=server, progress=False,
                       repositories=FAKE_REPOS)


def test_resume_asks_for_the_rest_and_appends(tmp_path):
    """Catches: an existing .part ignored (no Range request, all bytes fetched again) or the rest written over
    it instead of after it."""
    (tmp_path / "a.mp4.part").write_bytes(DATA[:1234])
    server = FakeServer(DATA)
    assert _download(tmp_path, server) == "downloaded"
    assert server.requests == ["bytes=1234-"]
    assert (tmp_path / "a.mp4").read_bytes() == DATA and not (tmp_path / "a.mp4.part").exists()


@pytest.mark.parametrize("server", [FakeServer(DATA, ranges=False), FakeServer(DATA, range_start=1000)],
                         ids=["no-range-support", "other-range"])
def test_resume_restarts_when_the_server_sends_something_else(tmp_path, server):
    """Catches: appending whatever comes back to the .part (a server without Range support answers 200 with the
    whole file; one that answers another range than asked), which gives a corrupt file."""
    (tmp_path / "a.mp4.part").write_bytes(DATA[:1234])
    assert _download(tmp_path, server) == "downloaded"
    assert (tmp_path / "a.mp4").read_bytes() == DATA


def test_interrupted_download_keeps_its_part_and_resumes(tmp_path):
    """Catches: writing straight to the final name (a truncated file would pass as present), deleting the .part on
    a network error (nothing to resume), a multi-line or file-less error."""
    with pytest.raises(dl.DownloadError) as e:
        _download(tmp_path, FakeServer(DATA, fail_after=3000))
    message = str(e.value)
    assert "\n" not in message and "https://example.invalid/own/one/" in message and "by hand" in message
    assert str((tmp_path / "a.mp4").absolute()) in message and "ConnectionResetError" in message
    assert not (tmp_path / "a.mp4").exists() and (tmp_path / "a.mp4.part").read_bytes() == DATA[:3000]
    server = FakeServer(DATA)
    assert _download(tmp_path, server) == "downloaded"
    assert server.requests == ["bytes=3000-"] and (tmp_path / "a.mp4").read_bytes() == DATA


def test_complete_part_is_verified_without_asking_again(tmp_path):
    """Catches: a .part that already holds the whole file sent to the server as `bytes=<size>-` (an HTTP 416
    error) instead of being verified and renamed."""
    (tmp_path / "a.mp4.part").write_bytes(DATA)
    server = FakeServer(DATA)
    assert _download(tmp_path, server) == "downloaded" and server.requests == []
    assert (tmp_path / "a.mp4").read_bytes() == DATA


# --- the real table ------------------------------------------------------------------------------------------------

def test_offline_is_one_line_and_exit_1(tmp_path):
    """The script as a user runs it, with a base URL that cannot be opened (what offline looks like to urllib).
    Catches: a traceback instead of one line, exit status 0, an error without the URL or the way out."""
    dest = tmp_path / "videos"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--base-url", (tmp_path / "nowhere").as_uri(), "--dest",
                           str(dest), "--only", "taylor"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download file://"), proc.stderr
    url = dl.url_for(dl.CLIPS["taylor"][0], (tmp_path / "nowhere").as_uri())
    assert url in lines[0] and "by hand" in lines[0] and str(dest / "taylor.mp4") in lines[0]
    assert not (dest / "taylor.mp4").exists()


def test_real_table_against_the_shared_copies(shared_videos, tmp_path):
    """The pinned table (commits, paths, sha256, sizes) against a mirror made of the shared copies, through the
    script's command line. Catches: a wrong checksum or size in the table, car-turn not stored as `car-turn/`."""
    mirror = _mirror(tmp_path / "mirror", dl.CLIPS, dl.REPOSITORIES, lambda f: (shared_videos / f.name).read_bytes())
    dest = tmp_path / "videos"
    for _ in range(2):  # the second run finds every file present
        proc = subprocess.run([sys.executable, str(SCRIPT), "--base-url", mirror, "--dest", str(dest)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert "car_turn: " in proc.stdout and "8 present" in proc.stdout
    expected = {f.name for files in dl.CLIPS.values() for f in files}
    assert set(_tree(dest)) == expected and len(expected) == 11
    for name in expected:
        assert (dest / name).read_bytes() == (shared_videos / name).read_bytes()


def test_data_configs_read_the_download_folder(monkeypatch, tmp_path):
    """data=<clip> resolves to the file or folder the script writes, both for the default destination
    (data/videos under the cwd) and for $STEM_DATA_ROOT. Catches: the script and configs/paths disagreeing on
    the default folder, a clip name or file name that differs between the table and configs/data/."""
    for root in (None, tmp_path / "elsewhere"):
        if root is None:
            monkeypatch.delenv("STEM_DATA_ROOT", raising=False)
        else:
            monkeypatch.setenv("STEM_DATA_ROOT", str(root))
        dest = dl.default_dest().absolute()
        for name, files in dl.CLIPS.items():
            cfg = compose_config(tmp_path, f"data={name}")
            assert Path(cfg.data.path) == dest / files[0].name.split("/")[0], name



# --- a real local HTTP server: a body that ends early, an endless body, Range requests ---------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves DATA for any path as `server.mode` says: "whole" (honours `Range: bytes=N-` with 206), "short" (a
    full Content-Length but only `server.cut` bytes of a 200 body, then the connection closes; Range requests are
    answered whole) or "endless" (a 200 body without Content-Length that never ends, up to `server.cap` bytes)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        start = 0
        if server.mode == "endless":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            block = bytes(range(256)) * 256
            try:
                while server.sent < server.cap:
                    self.wfile.write(block)
                    server.sent += len(block)
            except OSError:  # the client stopped reading and closed the connection
                server.client_closed = True
            self.close_connection = True
            return
        header = self.headers.get("Range")
        if header and header.startswith("bytes=") and header.endswith("-"):
            start = int(header[len("bytes="):-1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if server.mode == "short" and not header:
            body = body[:server.cut]
        self.wfile.write(body)
        server.sent += len(body)
        self.close_connection = True


@pytest.fixture
def http_server():
    """A real http.server on 127.0.0.1 in a thread; yields it (set `.mode`), its base URL is `.url`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mode, server.cut, server.cap, server.sent, server.client_closed = "whole", 3000, 64 << 20, 0, False
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _http_download(tmp_path, server):
    return dl.download(FILE, tmp_path, server.url, progress=False, repositories=FAKE_REPOS, timeout=10)


def test_body_that_ends_early_keeps_its_part_and_the_next_run_resumes(http_server, tmp_path):
    """Item 4. A server that closes the connection after 3000 of 5000 bytes: urllib's read() then returns short
    without an error. Catches: hashing the short file and reporting a checksum mismatch (and deleting the
    .part, so nothing is resumed) instead of saying that the connection dropped; the next run not asking for
    the rest with a Range request."""
    http_server.mode = "short"
    with pytest.raises(dl.DownloadError) as e:
        _http_download(tmp_path, http_server)
    message = str(e.value)
    assert "\n" not in message and "sha256" not in message, message
    assert "3000 of 5000 bytes" in message and "run again" in message and http_server.url in message
    assert (tmp_path / "a.mp4.part").read_bytes() == DATA[:3000] and not (tmp_path / "a.mp4").exists()
    http_server.mode = "whole"
    assert _http_download(tmp_path, http_server) == "downloaded"
    assert http_server.requests == [None, "bytes=3000-"] and (tmp_path / "a.mp4").read_bytes() == DATA
    assert not (tmp_path / "a.mp4.part").exists()


def test_endless_body_stops_at_the_expected_size(fake, http_server, tmp_path, capsys):
    """Item 4. A server whose body never ends (no Content-Length): the script must stop reading at the file's
    5000 bytes and fail with one line. Catches: writing without a cap (the .part grows until the disk is full;
    here until the server's 64 MiB cap), a multi-line error."""
    http_server.mode = "endless"
    dest = tmp_path / "videos"
    args = ["--base-url", http_server.url, "--dest", str(dest), "--only", "one", "--no-progress"]
    assert dl.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "more than the expected 5000 bytes" in err, err
    assert http_server.sent < http_server.cap and not (dest / "a.mp4").exists()
    assert not (dest / "a.mp4.part").exists() or (dest / "a.mp4.part").stat().st_size <= 5000


def test_base_url_that_is_not_a_url_is_one_line_and_exit_2(tmp_path):
    """Item 4. `--base-url notaurl` as a user types it. Catches: urllib's ValueError ("unknown url type") escaping
    as a traceback (exit 1), or a usage dump instead of one `error:` line."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--base-url", "notaurl", "--dest", str(tmp_path / "videos"),
                           "--only", "taylor"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --base-url notaurl") and "https://" in lines[0], lines
    assert not (tmp_path / "videos").exists()


def test_announced_size_of_another_file_is_refused_before_writing(http_server, tmp_path):
    """Item 4. A mirror whose file has another length than the table's (Content-Length 5000 for an expected 6000).
    Catches: downloading it whole and only then failing on the checksum (or, with the byte count, calling it a
    dropped connection and asking for a rerun that can never succeed)."""
    other = dl.ClipFile(FILE.name, FILE.repo, FILE.path, FILE.sha256, 6000)
    with pytest.raises(dl.DownloadError) as e:
        dl.download(other, tmp_path, http_server.url, progress=False, repositories=FAKE_REPOS, timeout=10)
    assert "is 5000 bytes, not the expected 6000" in str(e.value) and "\n" not in str(e.value)
    assert http_server.requests == [None] and list(tmp_path.iterdir()) == []

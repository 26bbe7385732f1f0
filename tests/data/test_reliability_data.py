"""Loading a clip under faults (issue 23): a size that cannot fit in memory is refused before any frame is
decoded (item 6), and a truncated mp4 read to its end warns that frames are missing (item 8). The real clips
come from ../shared/videos (skipped with a reason when absent); the truncated file is written with the
project's own writer and really cut."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import skimage.data
from conftest import run_cli

from stem.core.errors import ConfigError, VideoError
from stem.data.video import load_video, read_frames, write_video

TAYLOR = (48, 640, 360)  # frames, width, height of taylor.mp4 (shared/videos/README.md)


class FrameDecoded(Exception):
    """Raised by the guarded decoder at the first frame: the check did not run before decoding."""


@pytest.fixture
def guarded_decoder(monkeypatch):
    """imageio-ffmpeg's reader, wrapped so that it hands out the header but raises FrameDecoded instead of the
    first frame: a load that gets past the memory check stops there, before allocating anything large (today's
    code, which checks nothing, must not get to allocate tens of GiB on a shared machine)."""
    real = imageio_ffmpeg.read_frames

    def read_frames_guarded(*args, **kwargs):
        reader = real(*args, **kwargs)
        try:
            yield next(reader)  # the header (size, fps, duration)
            raise FrameDecoded("a frame was decoded before the memory check")
        finally:
            reader.close()

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", read_frames_guarded)


def _meminfo() -> dict:
    path = Path("/proc/meminfo")
    if not path.is_file():
        pytest.skip("no /proc/meminfo: cannot size a load between the available and the total memory here")
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in path.read_text().splitlines()}


def _decoded(exc: BaseException) -> bool:
    return isinstance(exc, FrameDecoded) or isinstance(exc.__cause__, FrameDecoded)


def test_size_beyond_any_memory_is_refused_before_decoding(shared_videos, guarded_decoder):
    """Item 6: `data.width=100000 data.height=100000` on a real clip. Catches: decoding and resizing first (today
    the allocator fails with a multi-line error once 48 frames are decoded), a check after the decode, a message
    without the fix."""
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_video(shared_videos / "taylor.mp4", "a prompt", width=100000, height=100000)
    assert not _decoded(e.value) and time.monotonic() - start < 10
    message = str(e.value)
    n, w, h = TAYLOR
    need = n * (w * h * 3 * 5 + 100000 * 100000 * 3 * 4)  # uint8 + float32 frames, the resized float32 frames
    assert "\n" not in message and f"{n} frames of {w}x{h} resized to 100000x100000" in message
    assert f"need at least {need / 2**30:.2f} GiB" in message and "check_memory=false" in message
    assert "data.width" in message and "data.n_frames" in message


def test_size_between_the_available_and_the_total_memory_is_refused(shared_videos, guarded_decoder):
    """Item 6: a size whose frames the kernel would still hand out (less than the machine's total memory, so
    the allocation succeeds under overcommit) but that cannot fit in the memory available: today it is decoded,
    allocated and written page by page (swapping or the OOM killer) before any check. Catches: a guard against
    impossible sizes only (more than the total memory), or one that counts the native frames only."""
    info = _meminfo()
    target_bytes = (info["MemAvailable"] + info["MemTotal"]) // 2
    n, w, h = TAYLOR
    side = int((target_bytes / (n * 3 * 4)) ** 0.5) // 8 * 8  # square frames: n x side^2 x 3 float32 ~ target
    assert n * side * side * 12 > info["MemAvailable"] - n * w * h * 15  # the test's own premise
    with pytest.raises(ConfigError) as e:
        load_video(shared_videos / "taylor.mp4", "a prompt", width=side, height=side)
    assert not _decoded(e.value) and f"resized to {side}x{side}" in str(e.value)


def test_check_memory_false_decodes_anyway(shared_videos, guarded_decoder):
    """`check_memory=false` (data.check_memory follows the top-level switch) lets the same load go on to decode.
    Catches: the switch not read by the loader (a refusal that cannot be overridden)."""
    with pytest.raises(VideoError) as e:
        load_video(shared_videos / "taylor.mp4", "a prompt", width=100000, height=100000, check_memory=False)
    assert _decoded(e.value)


def test_run_refuses_a_huge_size_with_one_line(shared_videos, tmp_path):
    """Item 6 as a user meets it: `python run.py data=taylor data.width=100000 data.height=100000`. Catches: the
    allocator's multi-line RuntimeError (a traceback, exit 1) instead of one `error:` line and exit 2."""
    proc = run_cli("data=taylor", f"paths.data_root={shared_videos}", "data.width=100000", "data.height=100000",
                   "progress=false", "device=cpu", f"paths.log_dir={tmp_path}/logs",
                   f"paths.cache_dir={tmp_path}/cache", "logger=none", cwd=tmp_path, timeout=240)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "resized to 100000x100000" in lines[0], lines


def test_data_check_memory_follows_the_top_level_switch(tmp_path):
    """The data group reads the one switch `check_memory`. Catches: a data.check_memory that ignores
    `check_memory=false`, so the loader refuses what the user asked to run anyway."""
    from conftest import compose_config

    assert compose_config(tmp_path, "data=taylor", "check_memory=false").data.check_memory is False
    assert compose_config(tmp_path, "data=taylor").data.check_memory is True


# --- a truncated mp4 --------------------------------------------------------------------------------------------

def _truncated_mp4(tmp_path: Path, cut: int = 200) -> tuple[Path, int]:
    """A 4-frame mp4 written by `write_video`, with its last `cut` bytes cut off, and the frames it decodes to."""
    photo = skimage.data.astronaut()
    frames = np.stack([photo[100 + 8 * t:164 + 8 * t, 150 + 8 * t:214 + 8 * t] for t in range(4)])
    whole = write_video(tmp_path / "clip.mp4", frames, fps=10)
    data = whole.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[:-cut])
    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)
    decoded = sum(1 for _ in reader)
    assert decoded < 4, "cutting the file did not lose a frame: the test's premise"
    return path, decoded


def test_truncated_mp4_read_to_the_end_warns_with_the_counts(tmp_path, caplog):
    """Item 8: an mp4 cut short (a cut-off copy) read with n_frames=null. Catches: the file read as fewer frames
    without a word (today: 3 of 4 frames, no warning), a warning that does not name the file or the counts."""
    path, decoded = _truncated_mp4(tmp_path)
    caplog.set_level(logging.WARNING, logger="stem.data.video")
    video = load_video(path, "a prompt")
    assert video.num_frames == decoded
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and f"only {decoded} frames decoded" in warnings[0]
    assert "declares 4" in warnings[0] and "truncated" in warnings[0]


def test_truncated_mp4_warns_through_stride_even_too(tmp_path, caplog):
    """stride=even reads the whole file too. Catches: the check tied to one call path of read_frames."""
    path, decoded = _truncated_mp4(tmp_path)
    caplog.set_level(logging.WARNING, logger="stem.data.video")
    load_video(path, "a prompt", stride="even", n_frames=2)
    assert any(f"only {decoded} frames decoded" in r.getMessage() for r in caplog.records)


def test_whole_mp4_and_early_stop_do_not_warn(tmp_path, caplog, shared_videos):
    """No false alarm: the intact file, a read that stops at n_frames before the end, and the real clips (taylor's
    header says 2.02 s at 23.98 fps, 48.4 frames, for 48). Catches: a comparison without the header's rounding, or
    one made when the reader stopped early on purpose."""
    path, _ = _truncated_mp4(tmp_path)
    caplog.set_level(logging.WARNING, logger="stem.data.video")
    assert len(read_frames(tmp_path / "clip.mp4")[0]) == 4
    assert len(read_frames(path, n_frames=2)[0]) == 2
    for name in ("taylor.mp4", "wolf.mp4", "woman-running.mp4"):
        read_frames(shared_videos / name)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_truncated_mp4_asked_for_all_its_declared_frames_is_refused(tmp_path):
    """n_frames=4 of the cut file: refused with one line (the existing too-short error). Catches: a warning in
    place of the refusal, or a refusal that became multi-line."""
    path, decoded = _truncated_mp4(tmp_path)
    with pytest.raises(VideoError) as e:
        load_video(path, "a prompt", n_frames=4)
    assert "\n" not in str(e.value) and f"has {decoded} frames" in str(e.value)


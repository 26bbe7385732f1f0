"""Reading, writing and resizing videos (`stem.data.video`)."""

import logging
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import stem.data.video
from stem.core.errors import ConfigError, VideoError
from stem.data.video import load_video, side_by_side, to_uint8, write_video

SHARED_VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "videos"


def clip(n=6, width=64, height=48):
    """uint8 (N, H, W, 3): windows of a real photo sliding by (2, 3) px per frame."""
    photo = skimage.data.astronaut()
    return np.stack([photo[100 + 3 * t : 100 + 3 * t + height, 150 + 2 * t : 150 + 2 * t + width] for t in range(n)])


def as_float(array):
    """Reference uint8 (N, H, W, 3) -> float (N, 3, H, W), written out independently of stem."""
    return torch.tensor(array.transpose(0, 3, 1, 2).astype(np.float64) / 255.0)


def levels(frames):
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) integer levels, by the formula round(255 x)."""
    return np.rint(frames.numpy().transpose(0, 2, 3, 1) * 255).astype(int)


def psnr(a, b):
    """PSNR for signals in [0, 1]: 10 log10(1 / MSE)."""
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return 10 * np.log10(1.0 / mse)


def write_pngs(folder, array, names=None):
    folder.mkdir(parents=True)
    for i, frame in enumerate(array):
        Image.fromarray(frame).save(folder / (names[i] if names else f"{i:05d}.png"))
    return folder


# ------------------------------------------------------------------------------------ round trips


def test_folder_round_trip_is_bitwise_exact(tmp_path, caplog):
    frames = torch.rand(4, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    write_video(tmp_path / "frames", frames, fps=7)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    caplog.set_level(logging.INFO, logger="stem.data.video")
    video = load_video(tmp_path / "frames", prompt="noise")
    quantised = torch.round(frames.double() * 255) / 255  # the only change a PNG may make
    assert video.frames.dtype == torch.float32 and video.frames.shape == (4, 3, 24, 32)
    assert torch.equal(video.frames, quantised.float())
    assert video.fps == 10 and "fps=10" in caplog.text  # folders carry no fps: default, logged
    assert (video.num_frames, video.height, video.width, video.name) == (4, 24, 32, "frames")


def test_uint8_array_input_and_existing_folder_is_replaced(tmp_path):
    write_video(tmp_path / "out", clip(6), fps=10)
    write_video(tmp_path / "out", clip(3), fps=10)  # fewer frames: no stale 00003.png left
    assert np.array_equal(levels(load_video(tmp_path / "out", prompt="p").frames), clip(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_folder_of_other_files_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt"):
        write_video(tmp_path / "out", clip(2), fps=10)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_rgba_frames_are_composited_on_white_with_one_warning(tmp_path, caplog):
    """Bug caught: `convert("RGB")` dropped alpha silently, so a transparent pixel came back as whatever colour
    it stored (here the clip's photo) instead of the documented white background, with no word in the log.
    Also catches: compositing on black, the straight (non-premultiplied) formula inverted, one warning per
    frame, and opaque RGBA frames treated as transparent (the second folder must load with no warning)."""
    rgb = clip(3, width=16, height=16)
    alpha = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1)).astype(np.uint8)
    alpha[0, 0, 0], alpha[0, 0, 1] = 0, 255  # a fully transparent and a fully opaque pixel
    folder = write_pngs(tmp_path / "rgba", np.concatenate([rgb, alpha], axis=-1))
    caplog.set_level(logging.INFO, logger="stem.data.video")
    video = load_video(folder, prompt="p")
    a = alpha.astype(np.float64) / 255  # straight alpha compositing over white (255), by the formula
    expected = np.rint(rgb * a + 255 * (1 - a)).astype(int)
    assert np.array_equal(levels(video.frames), expected)
    assert np.array_equal(levels(video.frames)[0, 0, :2], [[255, 255, 255], rgb[0, 0, 1]])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "white" in warnings[0].getMessage() and str(folder) in warnings[0].getMessage()
    assert "3 of 3" in warnings[0].getMessage()

    caplog.clear()
    opaque = write_pngs(tmp_path / "opaque", np.concatenate([rgb, np.full_like(alpha, 255)], axis=-1))
    assert np.array_equal(levels(load_video(opaque, prompt="p").frames), rgb)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_transparent_gif_is_composited_on_white(tmp_path, caplog):
    """Bug caught: GIF frames went through `convert("RGB")` too, so the transparent palette entry came back as
    its stored colour (black here) with no warning. Frame 0: top half transparent; frame 1: bottom half."""
    frames = []
    for t in range(2):
        index = np.ones((8, 8), np.uint8)
        index[(slice(0, 4) if t == 0 else slice(4, 8))] = 0
        frame = Image.fromarray(index, mode="P")
        frame.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        frames.append(frame)
    frames[0].save(tmp_path / "t.gif", save_all=True, append_images=frames[1:], transparency=0, duration=100,
                   disposal=2)  # fmt: skip
    caplog.set_level(logging.INFO, logger="stem.data.video")
    video = load_video(tmp_path / "t.gif", prompt="p")
    expected = np.full((2, 8, 8, 3), [200, 100, 50])
    expected[0, :4] = expected[1, 4:] = 255
    assert np.array_equal(levels(video.frames), expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 2" in warnings[0] and "white" in warnings[0]


def test_natural_sort_order(tmp_path):
    colours = {"f1.png": 10, "f2.png": 20, "f10.png": 30, "f9.jpg": 40}
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, value in colours.items():
        Image.new("RGB", (16, 8), (value, 0, 0)).save(folder / name, quality=100)
    (folder / "flow.txt").write_text("not a frame")
    red = load_video(folder, prompt="p").frames[:, 0, 4, 8] * 255
    assert torch.allclose(red, torch.tensor([10.0, 20.0, 40.0, 30.0]), atol=1.5)  # 1 < 2 < 9 < 10


def test_mp4_round_trip(tmp_path):
    array = clip(6)  # 64x48: not a multiple of 16, the size must not change
    path = write_video(tmp_path / "sub" / "a.mp4", as_float(array).float(), fps=12)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["a.mp4"]
    video = load_video(path, prompt="p")
    assert video.frames.shape == (6, 3, 48, 64) and video.fps == 12
    per_frame = [psnr(a, b) for a, b in zip(video.frames, as_float(array))]
    # measured (libx264 crf 17, imageio-ffmpeg 0.8.1, ffmpeg 9.0): whole clip 36.64 dB, worst frame 36.21 dB
    assert psnr(video.frames, as_float(array)) > 36.3 and min(per_frame) > 35.9


def test_gif_round_trip_keeps_every_frame(tmp_path):
    array = clip(5)
    array = np.concatenate([array[:3], array[2:3], array[3:]])  # a repeated frame must survive
    write_video(tmp_path / "a.gif", array, fps=10)
    video = load_video(tmp_path / "a.gif", prompt="p")
    assert video.frames.shape == (6, 3, 48, 64) and video.fps == 10
    per_frame = [psnr(a, b) for a, b in zip(video.frames, as_float(array))]
    # measured (one 256-colour palette for the clip, no dithering): whole clip 41.50 dB, worst frame 41.32 dB
    assert psnr(video.frames, as_float(array)) > 41.2 and min(per_frame) > 41.0


# ------------------------------------------------------------------------------------ selection


@pytest.fixture(params=["folder", "mp4"])
def clip_path(request, tmp_path):
    path = tmp_path / ("frames" if request.param == "folder" else "a.mp4")
    write_video(path, clip(7), fps=10)
    return path


@pytest.mark.parametrize(("start", "stride", "n_frames"), [(0, 1, 3), (1, 2, 3), (2, 3, None), (6, 1, 1), (0, 2, None)])
def test_selection_matches_indexing_the_full_clip(clip_path, start, stride, n_frames):
    full = load_video(clip_path, prompt="p").frames
    selected = load_video(clip_path, prompt="p", start=start, stride=stride, n_frames=n_frames).frames
    expected = full[start::stride]
    expected = expected if n_frames is None else expected[:n_frames]
    assert len(full) == 7 and torch.equal(selected, expected)


@pytest.mark.parametrize(("start", "n_frames", "picks"), [(0, 3, [0, 3, 6]), (0, 4, [0, 2, 4, 6]), (1, 4, [1, 3, 4, 6]),
                                                     (0, 7, list(range(7))), (2, 1, [2])])
def test_even_stride_spreads_frames_over_the_clip(clip_path, start, n_frames, picks):
    full = load_video(clip_path, prompt="p").frames
    video = load_video(clip_path, prompt="p", start=start, stride="even", n_frames=n_frames, edit_prompt="q")
    assert torch.equal(video.frames, full[picks]) and video.edit_prompt == "q"


def test_even_stride_needs_a_count_that_fits(clip_path):
    with pytest.raises(ConfigError, match="set n_frames too"):
        load_video(clip_path, prompt="p", stride="even")
    with pytest.raises(VideoError, match=r"has 7 frames from frame 0; cannot spread 8 evenly"):
        load_video(clip_path, prompt="p", stride="even", n_frames=8)


@pytest.mark.parametrize(("kwargs", "picks"), [
    ({"max_frames": 3}, [0, 3, 6]),                               # capped: spread over the clip, ends kept
    ({"max_frames": 4}, [0, 2, 4, 6]),
    ({"max_frames": 7}, list(range(7))),                          # exactly the clip: all of it
    ({"max_frames": 20}, list(range(7))),                         # fewer frames than the cap: all, no error
    ({"max_frames": 2, "start": 1, "stride": 2}, [1, 5]),         # spread over the selection 1, 3, 5
    ({"max_frames": 3, "stride": "even", "n_frames": 5}, [0, 3, 6]),  # even picks 0, 2, 3, 5, 6 -> 0, 3, 6
])
def test_max_frames_keeps_at_most_that_many_spread_evenly(clip_path, kwargs, picks):
    """Paper B.4's "at most 20 frames": indices written out by hand. Mutations caught: the first
    max_frames frames instead of spread (picks [0, 1, 2]); an error or a cap to exactly max_frames when
    the clip is shorter; the spread over the whole clip instead of the start/stride selection."""
    full = load_video(clip_path, prompt="p").frames
    video = load_video(clip_path, prompt="p", **kwargs)
    assert torch.equal(video.frames, full[picks])


def test_max_frames_drops_stored_flow_of_a_capped_folder(tmp_path):
    """The flow beside a frame folder holds for consecutive frames only: kept when the cap does not
    bite, dropped when it does (mutation: keeping it, sliced as if the picks were consecutive)."""
    from stem.data.synthetic import camera_pan
    from stem.data.video import save_video_with_flow

    folder = save_video_with_flow(camera_pan(n_frames=5, width=64, height=64), tmp_path / "pan")
    assert load_video(folder, prompt="p", max_frames=5).flow is not None
    assert load_video(folder, prompt="p", max_frames=3).flow is None


@pytest.mark.parametrize(("kwargs", "picks"), [
    ({"max_frames": 3}, [0, 1, 2]),                               # the first 3, consecutive
    ({"max_frames": 7}, list(range(7))),                          # exactly the clip: all of it
    ({"max_frames": 20}, list(range(7))),                         # fewer frames than the cap: all, no error
    ({"max_frames": 2, "start": 2}, [2, 3]),                      # the first of the selection from start
    ({"max_frames": 2, "start": 1, "stride": 2}, [1, 3]),         # of the selection 1, 3, 5
])
def test_max_frames_keep_first_keeps_the_first_ones(clip_path, kwargs, picks):
    """Table 2's shared window: `max_frames_keep="first"` keeps the first max_frames of the selection
    (indices written out by hand). Mutations caught: the spread picks used anyway ([0, 3, 6]); the last
    max_frames instead of the first; the window taken from frame 0 instead of the selection."""
    full = load_video(clip_path, prompt="p").frames
    video = load_video(clip_path, prompt="p", max_frames_keep="first", **kwargs)
    assert torch.equal(video.frames, full[picks]) and list(video.source_indices) == picks


def test_max_frames_keep_first_keeps_the_stored_flow_of_its_window(tmp_path):
    """The first frames are consecutive, so the folder's flow still applies, sliced to them (mutation:
    dropped as for spread picks, or not sliced)."""
    from stem.data.synthetic import camera_pan
    from stem.data.video import save_video_with_flow

    pan = camera_pan(n_frames=5, width=64, height=64)
    folder = save_video_with_flow(pan, tmp_path / "pan")
    video = load_video(folder, prompt="p", max_frames=3, max_frames_keep="first")
    assert video.flow is not None and torch.equal(video.flow, pan.flow[:2])


@pytest.mark.parametrize("keep", ["last", "First", None, 1])
def test_bad_max_frames_keep_is_a_config_error(clip_path, keep):
    """Refused before decoding, even without a cap (mutation: a typo silently spreading the frames)."""
    with pytest.raises(ConfigError, match=r"max_frames_keep=.*use one of even, first"):
        load_video(clip_path, prompt="p", max_frames_keep=keep)
    with pytest.raises(ConfigError, match=r"max_frames_keep=.*use one of even, first"):
        load_video(clip_path, prompt="p", max_frames=3, max_frames_keep=keep)


@pytest.mark.parametrize("value", [0, -2, 2.5, True])
def test_bad_max_frames_is_a_config_error(clip_path, value):
    with pytest.raises(ConfigError, match=rf"max_frames={value!r} must be an integer >= 1.*null"):
        load_video(clip_path, prompt="p", max_frames=value)


def test_decoding_stops_once_enough_frames_are_read(tmp_path, monkeypatch):
    path = write_video(tmp_path / "a.mp4", clip(12), fps=10)
    pulled = []
    real_reader = imageio_ffmpeg.read_frames

    def counting_reader(*args, **kwargs):
        for item in real_reader(*args, **kwargs):
            pulled.append(item)
            yield item

    monkeypatch.setattr(stem.data.video.imageio_ffmpeg, "read_frames", counting_reader)
    load_video(path, prompt="p", start=1, stride=2, n_frames=3)
    assert len(pulled) == 1 + 6  # meta + frames 0..5 (frame 5 is the last one kept), not all 12


@pytest.mark.parametrize("kind", ["folder", "mp4"])
def test_too_few_frames_says_how_many(tmp_path, kind):
    path = write_video(tmp_path / ("frames" if kind == "folder" else "a.mp4"), clip(6), fps=10)
    with pytest.raises(VideoError) as info:
        load_video(path, prompt="p", start=1, stride=2, n_frames=4)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "has 6 frames" in message and "3 available" in message and "n_frames=4" in message and "null" in message


@pytest.mark.parametrize(
    ("kwargs", "needle"), [({"start": -1}, "start=-1"), ({"stride": 0}, "stride=0"), ({"n_frames": 0}, "n_frames=0")]
)
def test_bad_selection_arguments(clip_path, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        load_video(clip_path, prompt="p", **kwargs)


# ------------------------------------------------------------------------------------ resizing


def test_native_size_not_multiple_of_8_is_resized_and_logged(tmp_path, caplog):
    folder = write_pngs(tmp_path / "frames", clip(2, width=100, height=60))
    with caplog.at_level(logging.WARNING, logger="stem.data.video"):
        video = load_video(folder, prompt="p")
    assert (video.width, video.height) == (96, 56)
    assert [r.levelno for r in caplog.records if "100x60 -> 96x56" in r.getMessage()] == [logging.WARNING]
    assert float(video.frames.min()) >= 0 and float(video.frames.max()) <= 1


@pytest.mark.parametrize(
    ("width", "height", "expected"), [(64, None, (64, 40)), (None, 32, (56, 32)), (48, 48, (48, 48))]
)
def test_given_size(tmp_path, caplog, width, height, expected):
    folder = write_pngs(tmp_path / "frames", clip(2, width=100, height=60))
    if height is None:  # the other side follows the aspect ratio, to the nearest multiple of 8
        assert expected[1] == 8 * round(width * 60 / 100 / 8)
    if width is None:
        assert expected[0] == 8 * round(height * 100 / 60 / 8)
    with caplog.at_level(logging.INFO, logger="stem.data.video"):
        video = load_video(folder, prompt="p", width=width, height=height)
    assert (video.width, video.height) == expected
    assert f"100x60 -> {expected[0]}x{expected[1]}" in caplog.text


def test_resize_matches_pillow_bicubic(tmp_path):
    array = clip(2, width=100, height=60)
    folder = write_pngs(tmp_path / "frames", array)
    ours = to_uint8(load_video(folder, prompt="p", width=64).frames).astype(int)
    pillow = np.stack([np.asarray(Image.fromarray(f).resize((64, 40), Image.BICUBIC)) for f in array]).astype(int)
    # measured: max 1 level, mean 0.176 levels (float vs Pillow's fixed-point arithmetic)
    assert np.abs(ours - pillow).max() <= 1 and np.abs(ours - pillow).mean() < 0.2


def test_resize_never_crops(tmp_path):
    frame = np.zeros((1, 60, 100, 3), np.uint8)
    frame[:, :2] = frame[:, -2:] = frame[:, :, :2] = frame[:, :, -2:] = (255, 0, 0)  # 2-px red border
    video = load_video(write_pngs(tmp_path / "frames", frame), prompt="p")  # 100x60 -> 96x56
    border = video.frames[0][:, [0, 0, -1, -1, 0, -1, 28, 28], [0, -1, 0, -1, 48, 48, 0, -1]].T
    # a crop of 100->96 loses >= 2 px on some side, i.e. all of that side's border;
    # measured after the resize: exactly (1, 0, 0) at all four corners and edge midpoints
    assert torch.allclose(border, torch.tensor([1.0, 0.0, 0.0]).expand(8, 3), atol=0.02)


@pytest.mark.parametrize(
    ("kwargs", "nearest"),
    [({"width": 850}, ("848", "856")), ({"height": 12}, ("8", "16")), ({"width": 0}, ("8", "16"))],
)
def test_size_not_multiple_of_8_is_config_error(clip_path, kwargs, nearest):
    with pytest.raises(ConfigError) as info:
        load_video(clip_path, prompt="p", **kwargs)
    message = str(info.value)
    assert str(next(iter(kwargs.values()))) in message and all(n in message for n in nearest)


# ------------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError) as info:
        load_video(path, prompt="p")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "data.path" in message and "STEM_DATA_ROOT" in message


def test_corrupt_mp4(tmp_path):
    path = tmp_path / "bad.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError) as info:
        load_video(path, prompt="p")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "Invalid data" in message  # ffmpeg's reason


def test_folder_without_frames(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="no frames in folder .*empty"):
        load_video(tmp_path / "empty", prompt="p")


def test_unsupported_suffix_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"\.xyz"):
        write_video(tmp_path / "sub" / "a.xyz", clip(2), fps=10)
    with pytest.raises(ConfigError, match="even"):
        write_video(tmp_path / "a.mp4", clip(2, width=63), fps=10)
    assert list(tmp_path.iterdir()) == []


def test_failed_mp4_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_run(cmd, *args, **kwargs):  # the encoder raising midway (e.g. a pipe error), after some output
        Path(cmd[-1]).write_bytes(b"half a video")
        raise OSError("disk full")

    monkeypatch.setattr(stem.data.video.subprocess, "run", failing_run)
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "a.mp4", clip(3), fps=10)
    assert list(tmp_path.iterdir()) == []


def fake_ffmpeg(folder, body):
    """An executable standing in for ffmpeg (via IMAGEIO_FFMPEG_EXE): a bash script running `body`,
    whose last argument is the output path."""
    folder.mkdir()
    exe = folder / "ffmpeg"
    exe.write_text(f"#!/bin/bash\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.parametrize("name", ["a.mp4", "a.gif"])
def test_failing_ffmpeg_is_an_error_and_leaves_nothing(tmp_path, monkeypatch, name):
    """Bug caught: ffmpeg's exit status ignored, so its partial output was renamed into place and the run
    went on (a full disk left an unreadable 64 KiB mp4 under the final name)."""
    body = 'printf "half a video" > "${@: -1}"; echo "No space left on device" >&2; exit 1'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path / "bin", body))
    monkeypatch.chdir(tmp_path)  # a read-back through the fake would write to its last argument, "-"
    out = tmp_path / "out"
    with pytest.raises(VideoError) as info:
        write_video(out / name, clip(3, width=16, height=16), fps=10)
    message = str(info.value)
    assert "\n" not in message and str(out / name) in message and "exit 1" in message
    assert "No space left on device" in message  # ffmpeg's reason, passed on
    assert list(out.iterdir()) == []  # neither the final name nor the temporary file


def test_video_with_missing_frames_is_refused(tmp_path, monkeypatch):
    """Bug caught: no read-back of the frame count before the rename. A real ffmpeg that exits 0 but
    keeps only 2 of 3 frames (`-frames:v 2` slipped in before the output path when encoding from stdin)."""
    real = imageio_ffmpeg.get_ffmpeg_exe()
    body = (f'if [[ " $* " == *" -i - "* ]]; then exec "{real}" "${{@:1:$#-1}}" -frames:v 2 "${{@: -1}}"; '
            f'else exec "{real}" "$@"; fi')
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path / "bin", body))
    out = tmp_path / "out"
    with pytest.raises(VideoError, match=r"a\.mp4.* 2 frames.* 3 were sent"):
        write_video(out / "a.mp4", clip(3, width=16, height=16), fps=10)
    assert list(out.iterdir()) == []
    write_video(out / "frames", clip(3, width=16, height=16), fps=10)  # PNG folders never go through ffmpeg


@pytest.mark.parametrize("fps", [-5, 0, float("nan"), float("inf"), 1e-9, "10", True])
def test_bad_fps_is_a_config_error_before_any_work(tmp_path, fps):
    """Bug caught: `data.fps=-5` was taken as given; ffmpeg then refused it and left 0-byte mp4s after the
    whole run. 1e-9 is positive but ffmpeg's rational rounds it to 0/1. The check must fire where the data
    is built (load_video, Video) and in write_video, before anything is written."""
    folder = write_pngs(tmp_path / "frames", clip(2, width=16, height=16))
    with pytest.raises(ConfigError, match=r"fps=.*positive.*fps"):
        load_video(folder, prompt="p", fps=fps)
    with pytest.raises(ConfigError, match=r"fps="):
        stem.data.video.Video(frames=torch.zeros(2, 3, 16, 16), fps=fps, prompt="p", name="n")
    with pytest.raises(ConfigError, match=r"fps="):
        write_video(tmp_path / "out" / "a.mp4", clip(2, width=16, height=16), fps=fps)
    assert not (tmp_path / "out").exists()  # not even the parent folder


def test_failed_folder_write_keeps_the_old_frames(tmp_path, monkeypatch):
    write_video(tmp_path / "frames", clip(3), fps=10)
    real_save, calls = Image.Image.save, []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "frames", clip(5), fps=10)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]
    assert np.array_equal(levels(load_video(tmp_path / "frames", prompt="p").frames), clip(3))


# ------------------------------------------------------------------------------------ helpers


def test_to_uint8_rounds_and_clamps():
    values = torch.tensor([-0.2, 0.0019, 0.101, 0.498, 0.702, 1.0, 1.3]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    expected = [0, 0, 26, 127, 179, 255, 255]  # round(255 * clamp(v, 0, 1)): 0.48 -> 0, 25.76 -> 26, 126.99 -> 127
    out = to_uint8(values)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3) and out[0, 0, :, 0].tolist() == expected


def test_side_by_side():
    a, b = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 6)
    both = side_by_side(a, b)
    assert both.shape == (2, 3, 4, 11) and torch.equal(both[..., :5], a) and torch.equal(both[..., 5:], b)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\).*\(2, 3, 8, 5\)"):
        side_by_side(a, torch.rand(2, 3, 8, 5))


# ------------------------------------------------------------------------------------ sample videos


def test_shared_sample_videos():
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"../shared/videos is absent ({SHARED_VIDEOS}): sample videos live outside the repo")
    car = load_video(SHARED_VIDEOS / "car-turn", prompt="a silver jeep driving down a curvy road in the countryside")
    assert car.frames.shape == (8, 3, 512, 512) and car.name == "car-turn" and car.flow is None
    woman = load_video(SHARED_VIDEOS / "woman-running.mp4", prompt="A woman is running", n_frames=8)
    assert woman.frames.shape == (8, 3, 512, 512) and woman.fps == 20 and woman.name == "woman-running"
    for video in (car, woman):  # real content: not blank, within [0, 1], frames differ
        assert video.frames.std() > 0.05 and 0 <= video.frames.min() and video.frames.max() <= 1
        assert (video.frames[1:] - video.frames[:-1]).abs().mean() > 1e-3

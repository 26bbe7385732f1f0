"""The synthetic camera pan and its exact ground-truth flow (`stem.data.synthetic`)."""

import logging

import numpy as np
import pytest
import skimage.data
import torch

from stem.core.errors import ConfigError, VideoError
from stem.data.synthetic import camera_pan
from stem.data.video import load_video, save_video_with_flow


def test_shapes_range_and_metadata():
    video = camera_pan(n_frames=5, width=64, height=48, dx=3, dy=-2, fps=12)
    assert video.frames.shape == (5, 3, 48, 64) and video.frames.dtype == torch.float32
    assert float(video.frames.min()) >= 0 and float(video.frames.max()) <= 1 and video.frames.std() > 0.05
    assert video.flow.shape == (4, 2, 48, 64) and video.flow.dtype == torch.float32
    assert torch.all(video.flow[:, 0] == -3) and torch.all(video.flow[:, 1] == 2)
    assert (video.fps, video.name, video.prompt) == (12, "synthetic_pan", "a portrait photo of an astronaut")
    assert "astronaut" in video.source


def locate(frame):
    """Every top-left corner (y, x) where the float frame (3, h, w) is an exact crop of the photo."""
    photo, crop = skimage.data.astronaut(), np.rint(frame.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    h, w = crop.shape[:2]
    ys, xs = np.nonzero(np.all(photo == crop[0, 0], axis=-1))
    return [(y, x) for y, x in zip(ys.tolist(), xs.tolist()) if np.array_equal(photo[y : y + h, x : x + w], crop)]


def test_frames_are_crops_of_the_photo():
    video = camera_pan(n_frames=3, width=32, height=24, dx=5, dy=1)
    [(y0, x0)] = locate(video.frames[0])
    assert [locate(frame) for frame in video.frames] == [[(y0 + t, x0 + 5 * t)] for t in range(3)]


def warp_agrees(frames, flow):
    """frame_{t+1}[p + F(p)] == frame_t[p] for every pixel p with p + F(p) inside the frame."""
    height, width = frames.shape[2:]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for t in range(len(flow)):
        assert torch.equal(flow[t], flow[t].round())  # integer pixels
        qx, qy = xs + flow[t, 0].long(), ys + flow[t, 1].long()
        inside = (qx >= 0) & (qx < width) & (qy >= 0) & (qy < height)
        assert inside.sum() > 0
        if not torch.equal(frames[t + 1][:, qy[inside], qx[inside]], frames[t][:, ys[inside], xs[inside]]):
            return False
    return True


@pytest.mark.parametrize(("dx", "dy"), [(4, 2), (-3, 5), (0, -7), (6, 0), (0, 0)])
def test_ground_truth_flow_is_exact(dx, dy):
    video = camera_pan(n_frames=4, width=40, height=32, dx=dx, dy=dy)
    assert warp_agrees(video.frames, video.flow)
    if (dx, dy) != (0, 0):
        assert not warp_agrees(video.frames, video.flow + torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))  # check can fail
        assert not torch.equal(video.frames[0], video.frames[1])


def test_other_photo():
    coffee = camera_pan(n_frames=3, width=64, height=64, image="coffee")
    assert coffee.name == "synthetic_pan_coffee" and warp_agrees(coffee.frames, coffee.flow)
    assert not torch.equal(coffee.frames, camera_pan(n_frames=3, width=64, height=64).frames)
    with pytest.raises(ConfigError, match="'camera'.*astronaut"):
        camera_pan(image="camera")  # grayscale


@pytest.mark.parametrize(("dx", "dy", "limit"), [(4, 2, 65), (-4, 2, 65), (1, -8, 33)])
def test_windows_must_fit_inside_the_photo(dx, dy, limit):
    # astronaut is 512x512, window 256: the largest n_frames has 256 + |d| (n - 1) <= 512
    assert limit == min((512 - 256) // abs(d) + 1 for d in (dx, dy) if d)
    video = camera_pan(n_frames=limit, width=256, height=256, dx=dx, dy=dy)
    [(y_first, x_first)], [(y_last, x_last)] = locate(video.frames[0]), locate(video.frames[-1])
    assert (x_last - x_first, y_last - y_first) == ((limit - 1) * dx, (limit - 1) * dy)  # no clipping or wrapping
    with pytest.raises(ConfigError, match=f"n_frames <= {limit}"):
        camera_pan(n_frames=limit + 1, width=256, height=256, dx=dx, dy=dy)


def test_size_validation():
    with pytest.raises(ConfigError, match="width=100 .*96 or 104"):
        camera_pan(width=100)
    with pytest.raises(ConfigError, match="height <= 512"):
        camera_pan(height=520, dy=0)


def test_save_and_load_with_flow(tmp_path, caplog):
    video = camera_pan(n_frames=5, width=32, height=24, dx=2, dy=-3)
    folder = save_video_with_flow(video, tmp_path / "pan")
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(5)] + ["flow.npy"]
    loaded = load_video(folder, prompt=video.prompt, fps=video.fps)
    assert torch.equal(loaded.frames, video.frames) and torch.equal(loaded.flow, video.flow)
    part = load_video(folder, prompt="p", start=1, n_frames=3)
    assert torch.equal(part.frames, video.frames[1:4]) and torch.equal(part.flow, video.flow[1:3])
    with caplog.at_level(logging.INFO, logger="stem.data.video"):
        assert load_video(folder, prompt="p", stride=2).flow is None
        assert load_video(folder, prompt="p", width=16).flow is None
    assert caplog.text.count("ignoring") == 2


def test_flow_of_the_wrong_shape_is_an_error(tmp_path):
    folder = save_video_with_flow(camera_pan(n_frames=3, width=16, height=16), tmp_path / "pan")
    np.save(folder / "flow.npy", np.zeros((3, 2, 16, 16), np.float32))  # 3 frames have 2 flows
    with pytest.raises(VideoError, match="flow.npy.*regenerate"):
        load_video(folder, prompt="p")


def test_pan_records_which_pan_frames_it_kept():
    """With max_frames, the kept frames' source indices are the pan times they were cut at (the figures
    number frames by them). Bug caught: source_indices left out, so frame numbers read 1..N."""
    kept = camera_pan(n_frames=9, width=64, height=64, dx=3, dy=0, max_frames=3)
    full = camera_pan(n_frames=9, width=64, height=64, dx=3, dy=0)
    assert full.source_indices == tuple(range(9))
    assert len(kept.source_indices) == 3 and kept.source_indices[0] == 0 and kept.source_indices[-1] == 8
    for frame, t in zip(kept.frames, kept.source_indices):   # each kept frame is the full pan's frame t
        torch.testing.assert_close(frame, full.frames[t], rtol=0, atol=0)


def test_pan_keep_first_cuts_the_first_frames_with_their_flow():
    """`max_frames_keep="first"`, as `load_video`: the pan's first max_frames frames, their source
    indices 0.. and the one-frame flow (-dx, -dy) between them (mutations: spread picks, or the flow
    scaled by a spread gap)."""
    kept = camera_pan(n_frames=9, width=64, height=64, dx=3, dy=1, max_frames=4, max_frames_keep="first")
    full = camera_pan(n_frames=9, width=64, height=64, dx=3, dy=1)
    assert kept.source_indices == (0, 1, 2, 3)
    torch.testing.assert_close(kept.frames, full.frames[:4], rtol=0, atol=0)
    assert torch.equal(kept.flow[:, 0], torch.full((3, 64, 64), -3.0))
    assert torch.equal(kept.flow[:, 1], torch.full((3, 64, 64), -1.0))
    with pytest.raises(ConfigError, match="max_frames_keep='last'"):
        camera_pan(n_frames=9, width=64, height=64, max_frames=4, max_frames_keep="last")

"""Warp error, flow backends and the forward-backward mask (stem.metrics.warp/flow) on known answers.

References: the exact flow of the synthetic camera pan (stem.data.synthetic), naive per-pixel loops for
bilinear sampling and the consistency test, and explicit formulas for the zero-padded border error
(spec/METRICS.md, "Temporal consistency: warp error"). Bounds below were measured on this CPU.
"""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import Raft_Large_Weights, raft_small

import stem.metrics.flow as flow_mod
from stem.core.errors import MetricError
from stem.data.synthetic import camera_pan
from stem.metrics.flow import estimate_flow, pad_to_multiple, unpad
from stem.metrics.warp import consistency_mask, in_bounds_mask, warp, warp_error

DX, DY = 4, 2  # camera_pan default shift: exact flow (-4, -2) on 256x256 frames, 8 frames


@pytest.fixture(scope="module")
def pan():
    return camera_pan(n_frames=8, width=256, height=256, dx=DX, dy=DY)


@pytest.fixture(scope="module")
def dis(pan):
    return estimate_flow(pan.frames, "dis", progress=False)


# ---- bilinear warp and masks against naive loops ----

def _bilinear(img: np.ndarray, x: float, y: float, border: bool) -> np.ndarray:
    """img (C, H, W) at (x, y): zero outside (or clamped coordinates when `border`)."""
    _, h, w = img.shape
    if border:
        x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(img.shape[0])
    for xi, yi, wt in ((x0, y0, (x0 + 1 - x) * (y0 + 1 - y)), (x0 + 1, y0, (x - x0) * (y0 + 1 - y)),
                       (x0, y0 + 1, (x0 + 1 - x) * (y - y0)), (x0 + 1, y0 + 1, (x - x0) * (y - y0))):
        if 0 <= xi < w and 0 <= yi < h:
            out += wt * img[:, yi, xi]
    return out


def test_warp_matches_naive_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    flow = (torch.rand(2, 2, 6, 7, generator=g, dtype=torch.float64) - 0.5) * 5  # some samples leave the frame
    got = warp(frames, flow)
    ref = np.zeros(got.shape)
    for b in range(2):
        for i in range(6):
            for j in range(7):
                x, y = j + flow[b, 0, i, j].item(), i + flow[b, 1, i, j].item()
                ref[b, :, i, j] = _bilinear(frames[b].numpy(), x, y, border=False)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    inb = in_bounds_mask(flow)
    x = torch.arange(7) + flow[:, 0]
    y = torch.arange(6)[:, None] + flow[:, 1]
    assert torch.equal(inb, (x >= 0) & (x <= 6) & (y >= 0) & (y <= 5)) and 0 < inb.sum() < inb.numel()


def test_warp_with_exact_pan_flow_pulls_next_frame_onto_previous(pan):
    frames, gt = pan.frames.double(), pan.flow.double()
    pulled = warp(frames[1:], gt)
    valid = in_bounds_mask(gt)
    h, w = frames.shape[-2:]
    band = torch.zeros(h, w, dtype=torch.bool)
    band[DY:, DX:] = True  # p + (-4, -2) stays inside only from column 4 and row 2 on
    assert torch.equal(valid, band.expand_as(valid))
    assert (pulled - frames[:-1]).abs()[:, :, band].max() < 1e-12  # integer shift: exact up to float64 rounding
    assert pulled[:, :, ~band].abs().max() < 1e-12  # zero padding outside (a 1e-15 weight at the edge)


def test_consistency_mask_constant_shift_band_leaving_the_frame_is_invalid():
    h, w = 20, 24
    fwd = torch.empty(1, 2, h, w, dtype=torch.float64)
    fwd[:, 0], fwd[:, 1] = -3, 2
    valid = consistency_mask(fwd, -fwd)
    expected = torch.zeros(1, h, w, dtype=torch.bool)
    expected[:, : h - 2, 3:] = True  # x - 3 >= 0 and y + 2 <= h - 1
    assert torch.equal(valid, expected)
    assert not consistency_mask(fwd, fwd)[:, : h - 2, 3:].any()  # |F + B(F)|^2 = 4*13 > 0.01*26 + 0.5


def test_consistency_mask_marks_pixels_covered_by_a_moving_square():
    # A 10x10 square moves 4 px right over a static background: background pixels in columns 20..23
    # are covered in frame t+1 (occluded); their forward flow 0 disagrees with the backward flow -4 there.
    h, w = 32, 40
    fwd = torch.zeros(1, 2, h, w, dtype=torch.float64)
    bwd = torch.zeros_like(fwd)
    fwd[:, 0, 10:20, 10:20] = 4
    bwd[:, 0, 10:20, 14:24] = -4
    expected = torch.ones(1, h, w, dtype=torch.bool)
    expected[:, 10:20, 20:24] = False
    assert torch.equal(consistency_mask(fwd, bwd), expected)


def test_consistency_mask_matches_naive_formula_on_random_flows():
    g = torch.Generator().manual_seed(1)
    fwd = (torch.rand(1, 2, 9, 11, generator=g, dtype=torch.float64) - 0.5) * 4
    bwd = -fwd + (torch.rand(1, 2, 9, 11, generator=g, dtype=torch.float64) - 0.5) * 3
    got = consistency_mask(fwd, bwd)
    ref = np.zeros((9, 11), dtype=bool)
    for i in range(9):
        for j in range(11):
            f = fwd[0, :, i, j].numpy()
            x, y = j + f[0], i + f[1]
            b = _bilinear(bwd[0].numpy(), x, y, border=True)
            consistent = ((f + b) ** 2).sum() <= 0.01 * ((f ** 2).sum() + (b ** 2).sum()) + 0.5
            ref[i, j] = consistent and 0 <= x <= 10 and 0 <= y <= 8
    assert np.array_equal(got[0].numpy(), ref) and 0 < ref.sum() < ref.size


# ---- warp error on the camera pan ----

def test_warp_error_with_exact_flow_is_zero_masked_and_border_penalty_unmasked(pan):
    frames, gt = pan.frames, pan.flow
    r = warp_error(frames, frames, flow=gt, backward_flow=-gt, device="cpu", progress=False)
    n, _, h, w = frames.shape
    band = torch.zeros(h, w, dtype=torch.bool)
    band[DY:, DX:] = True
    assert r["backend"] == "given" and len(r["per_pair"]) == n - 1
    assert r["warp_error"] < 1e-20  # measured 5.3e-29: integer shift, float64 rounding only
    assert r["valid_fraction"] == (h - DY) * (w - DX) / (h * w)
    # Unmasked: outside the band the pulled value is 0 (zero padding), so the error there is frame_t^2.
    f64 = frames.double()
    ref = [float(f64[t][:, ~band].pow(2).sum() / (3 * h * w)) * 1e3 for t in range(n - 1)]
    np.testing.assert_allclose(r["per_pair_unmasked"], ref, rtol=1e-9)
    assert r["warp_error_unmasked"] > 8  # measured 9.23: the border alone, hidden by the mask
    in_bounds_only = warp_error(frames, frames, flow=gt, device="cpu", progress=False)
    assert in_bounds_only["valid_fraction"] == r["valid_fraction"] and in_bounds_only["warp_error"] < 1e-20


def test_wrong_flow_direction_gives_a_larger_error(pan, dis):
    frames, gt = pan.frames, pan.flow
    wrong = warp_error(frames, frames, flow=-gt, backward_flow=gt, progress=False)
    assert wrong["warp_error"] > 40  # measured 46.2 (the right direction: 5e-29)
    fwd, bwd, _ = dis
    right = warp_error(frames, frames, flow=fwd, backward_flow=bwd, progress=False)
    swapped = warp_error(frames, frames, flow=bwd, backward_flow=fwd, progress=False)
    assert right["warp_error"] < 0.01 and swapped["warp_error"] > 40  # measured 0.0043 and 46.1


def test_dis_flow_matches_the_exact_pan_flow(pan, dis):
    fwd, bwd, name = dis
    gt = pan.flow
    assert name == "dis" and fwd.shape == bwd.shape == gt.shape and fwd.dtype == torch.float32
    valid = consistency_mask(gt.double(), -gt.double())
    epe_f = (fwd - gt).norm(dim=1)[valid]
    epe_b = (bwd + gt).norm(dim=1)[valid]
    # measured: forward mean end-point error 0.017 px, 99th percentile 0.31 px; backward mean 0.043 px
    assert epe_f.mean() < 0.03 and epe_f.quantile(0.99) < 0.5 and epe_b.mean() < 0.06


def test_dis_warp_error_of_the_video_is_near_zero_and_large_when_shuffled(pan):
    frames = pan.frames
    same = warp_error(frames, frames, flow_backend="dis", progress=False)
    assert same["backend"] == "dis"
    assert same["warp_error"] < 0.01  # measured 0.0043 (x1e-3)
    assert same["warp_error_unmasked"] > 8  # measured 8.95: the border penalty the mask removes
    assert 0.96 < same["valid_fraction"] < (256 - DY) * (256 - DX) / 256**2  # measured 0.967
    perm = torch.tensor([4, 0, 7, 3, 2, 5, 1, 6])  # torch.randperm(8) with seed 0
    shuffled = warp_error(frames[perm], frames, flow_backend="dis", progress=False)
    assert shuffled["warp_error"] > 60  # measured 72.0


# ---- backends, cache, fallback ----

def test_flow_cache_reuses_entries_by_content(pan, tmp_path, monkeypatch):
    frames = pan.frames[:3]
    fwd, bwd, _ = estimate_flow(frames, "dis", cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("flow recomputed despite a cache entry")

    monkeypatch.setattr(flow_mod, "dis_flow", boom)
    f2, b2, name = estimate_flow(frames, "dis", cache_dir=tmp_path, progress=False)
    assert name == "dis" and torch.equal(f2, fwd) and torch.equal(b2, bwd)
    r = warp_error(frames, frames, flow_backend="dis", cache_dir=tmp_path, progress=False)
    assert r["backend"] == "dis"
    with pytest.raises(AssertionError, match="recomputed"):
        estimate_flow(pan.frames[1:4], "dis", cache_dir=tmp_path, progress=False)  # other content: a miss


def test_auto_falls_back_to_dis_when_raft_weights_cannot_load(pan, monkeypatch, caplog):
    def offline():
        raise OSError("no network")

    monkeypatch.setattr(flow_mod, "load_raft", offline)
    with caplog.at_level(logging.WARNING, logger="stem.metrics.flow"):
        r = warp_error(pan.frames[:3], pan.frames[:3], flow_backend="auto", progress=False)
    assert r["backend"] == "dis" and "using OpenCV DIS" in caplog.text
    with pytest.raises(MetricError, match="RAFT weights"):
        estimate_flow(pan.frames[:3], "raft", progress=False)


def test_pad_unpad_helpers_are_exact():
    x = torch.rand(2, 2, 480, 854)
    padded, pads = pad_to_multiple(x)
    assert padded.shape == (2, 2, 480, 856) and pads == (1, 1, 0, 0)
    assert torch.equal(unpad(padded, pads), x)
    assert torch.equal(padded[..., 0], x[..., 0]) and torch.equal(padded[..., -1], x[..., -1])  # replicate
    y = torch.rand(1, 3, 130, 132)
    padded, pads = pad_to_multiple(y)
    assert padded.shape == (1, 3, 136, 136) and pads == (2, 2, 3, 3)
    assert torch.equal(unpad(padded, pads), y)
    assert torch.equal(padded[..., :3, 2:-2], y[..., :1, :].expand(-1, -1, 3, -1))
    z = torch.rand(1, 2, 16, 24)
    assert pad_to_multiple(z) == (z, (0, 0, 0, 0)) and torch.equal(unpad(z, (0, 0, 0, 0)), z)


@pytest.fixture(scope="module")
def tiny_raft():
    torch.manual_seed(0)
    return raft_small(weights=None).eval()


def test_raft_batched_pairs_equal_direct_calls_on_padded_inputs(tiny_raft):
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(3, 3, 130, 132, generator=g)
    fwd, bwd, name = estimate_flow(frames, "raft", model=tiny_raft, raft_iters=2, batch_size=3, device="cpu",
                                   progress=False)
    assert name == "raft-custom" and fwd.shape == bwd.shape == (2, 2, 130, 132)
    transforms = Raft_Large_Weights.C_T_SKHT_V2.transforms()
    with torch.no_grad():
        for t in range(2):
            for a, b, got in ((frames[t], frames[t + 1], fwd[t]), (frames[t + 1], frames[t], bwd[t])):
                a, b = transforms(a[None], b[None])
                assert a.min() < -0.9 and a.max() > 0.9  # [0, 1] mapped to [-1, 1]
                a, b = (F.pad(v, (2, 2, 3, 3), mode="replicate") for v in (a, b))
                ref = tiny_raft(a, b, num_flow_updates=2)[-1][0, :, 3:-3, 2:-2]
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    r = warp_error(frames, frames, flow_backend="raft", model=tiny_raft, raft_iters=2, device="cpu",
                   progress=False)
    assert r["backend"] == "raft-custom" and len(r["per_pair"]) == 2


def test_raft_halves_the_batch_when_memory_runs_out(tiny_raft, caplog):
    frames = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    ref = estimate_flow(frames, "raft", model=tiny_raft, raft_iters=2, batch_size=1, device="cpu", progress=False)

    def small_memory(module, args):  # a device that fits two pairs at a time
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = tiny_raft.register_forward_pre_hook(small_memory)
    try:
        with caplog.at_level(logging.WARNING):
            got = estimate_flow(frames, "raft", model=tiny_raft, raft_iters=2, batch_size=4, device="cpu",
                                progress=False)
    finally:
        handle.remove()
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-4)
    assert "batches of 2 pairs" in caplog.text and "batches of 1 pairs" not in caplog.text


def test_raft_runs_end_to_end_on_854x480(tiny_raft):
    frames = torch.rand(3, 3, 480, 854, generator=torch.Generator().manual_seed(3))
    fwd, bwd, _ = estimate_flow(frames, "raft", model=tiny_raft, raft_iters=2, batch_size=4, device="cpu",
                                progress=False)
    assert fwd.shape == bwd.shape == (2, 2, 480, 854)  # 856-wide padding undone
    assert torch.isfinite(fwd).all() and torch.isfinite(bwd).all()


# ---- bad input ----

def _nan_video(pan):
    v = pan.frames[:3].clone()
    v[1, 0, 5, 5] = float("nan")
    return v


@pytest.mark.parametrize("case, match", [
    ("length", r"edited \(3, 3, 256, 256\) and source \(4, 3, 256, 256\)"),
    ("size", r"edited \(3, 3, 128, 256\) and source \(3, 3, 256, 256\)"),
    ("one_frame", r"\(1, 3, 256, 256\) has 1 frame"),
    ("nan", r"edited \(3, 3, 256, 256\) contains NaN"),
    ("range", r"values in \[0, 255\]"),
    ("raft_small_frames", r"at least 128x128, got \(3, 3, 120, 120\)"),
    ("flow_shape", r"flow must be \(N-1, 2, H, W\) = \(2, 2, 256, 256\).*got \(3, 2, 256, 256\)"),
])
def test_bad_input_raises_a_clear_value_error(pan, case, match):
    v = pan.frames
    args = {
        "length": (v[:3], v[:4], {}),
        "size": (v[:3, :, :128], v[:3], {}),
        "one_frame": (v[:1], v[:1], {}),
        "nan": (_nan_video(pan), v[:3], {}),
        "range": (v[:3] * 255, v[:3], {}),
        "raft_small_frames": (v[:3, :, :120, :120], v[:3, :, :120, :120], {"flow_backend": "raft"}),
        "flow_shape": (v[:3], v[:3], {"flow": pan.flow[:3]}),
    }[case]
    with pytest.raises(ValueError, match="warp error") as e:
        warp_error(args[0], args[1], progress=False, **args[2])
    assert e.match(match)

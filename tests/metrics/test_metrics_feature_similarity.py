"""Feature temporal similarity (paper Fig. 6, Fig. 9): known answers, a naive reference, the hook."""

import math

import pytest
import torch
import torch.nn.functional as F

from stem.data.synthetic import camera_pan
from stem.diffusion.prompts import encode_prompt
from stem.diffusion.vae import encode_frames
from stem.inversion.methods import DDIMInversion
from stem.metrics.feature_similarity import (
    FeatureRecorder,
    capture_features,
    feature_pca,
    feature_temporal_similarity,
    last_decoder_self_attention,
    similarity_per_step,
)


def _constant_flow(shifts, height, width):
    flow = torch.empty(len(shifts), 2, height, width)
    for t, (fx, fy) in enumerate(shifts):
        flow[t, 0], flow[t, 1] = fx, fy
    return flow


def test_identical_frames_with_zero_flow_score_one():
    frame = torch.randn(1, 16, 6, 7, generator=torch.Generator().manual_seed(0))
    out = feature_temporal_similarity(frame.repeat(3, 1, 1, 1), torch.zeros(2, 2, 48, 56))
    assert abs(out["mean"] - 1.0) < 1e-6
    assert len(out["per_pair"]) == 2 and all(abs(v - 1.0) < 1e-6 for v in out["per_pair"])


def test_equals_naive_loop_for_integer_shifts():
    gen = torch.Generator().manual_seed(1)
    n, c, h, w, s = 3, 5, 6, 7, 4  # pixel flow is 4x the feature grid
    feats = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    shifts = [(1, -2), (-2, 1)]  # in feature cells
    flow = _constant_flow([(fx * s, fy * s) for fx, fy in shifts], h * s, w * s)
    expected = []
    for t, (fx, fy) in enumerate(shifts):
        values = []
        for y in range(h):
            for x in range(w):
                ty, tx = y + fy, x + fx
                if 0 <= ty < h and 0 <= tx < w:
                    a, b = feats[t, :, y, x], feats[t + 1, :, ty, tx]
                    values.append(float((a * b).sum() / (a.norm() * b.norm())))
        expected.append(sum(values) / len(values))
    out = feature_temporal_similarity(feats.float(), flow)
    assert out["per_pair"] == pytest.approx(expected, abs=1e-6)
    assert out["mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)


def test_shuffled_pan_scores_lower_than_ordered():
    video = camera_pan(n_frames=6, width=64, height=64, dx=4, dy=4)
    feats = F.avg_pool2d(video.frames, 4)  # 16x16 "features"; the pan moves one cell per frame
    feats = feats - feats.mean(dim=(0, 2, 3), keepdim=True)  # centred, so cosine tells colours apart
    ordered = feature_temporal_similarity(feats, video.flow)["mean"]
    shuffled = feature_temporal_similarity(feats[[3, 0, 5, 1, 4, 2]], video.flow)["mean"]
    assert ordered > 0.999
    assert shuffled < ordered - 0.1


def test_bad_inputs_raise_naming_metric_and_shapes():
    with pytest.raises(ValueError, match=r"feature temporal similarity.*\(1, 4, 8, 8\)"):
        feature_temporal_similarity(torch.zeros(1, 4, 8, 8), torch.zeros(0, 2, 64, 64))
    with pytest.raises(ValueError, match=r"feature temporal similarity.*\(3, 4, 8, 8\).*\(3, 2, 64, 64\)"):
        feature_temporal_similarity(torch.zeros(3, 4, 8, 8), torch.zeros(3, 2, 64, 64))


def test_hook_captures_one_tensor_per_call_and_leaves_output_unchanged(tiny_model):
    unet = tiny_model.unet
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 6, generator=gen)
    cond = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor(501)
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=cond).sample
        with capture_features(unet, latent_hw=(8, 6)) as captured:
            hooked = [unet(z, t, encoder_hidden_states=cond).sample for _ in range(2)]
        unet(z, t, encoder_hidden_states=cond)  # after the context: hook removed
    assert last_decoder_self_attention(unet) == "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
    assert len(captured) == 2
    width = unet.config.block_out_channels[0]
    assert all(f.shape == (2, width, 8, 6) and f.dtype == torch.float32 and f.device.type == "cpu"
               for f in captured)
    assert all(torch.equal(h, plain) for h in hooked)
    with pytest.raises(ValueError, match="feature temporal similarity.*not a self-attention"):
        with capture_features(unet, layer="up_blocks.3.attentions.2"):
            pass


def test_similarity_per_step_on_synthetic_pan(tiny_model):
    video = camera_pan(n_frames=4, width=64, height=64, dx=8, dy=0)
    latents = encode_frames(tiny_model, video.frames)
    cond = encode_prompt(tiny_model, video.prompt)
    values = similarity_per_step(tiny_model, latents, cond, DDIMInversion("1frame", num_steps=3), video.flow)
    assert len(values) == 3
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in values)


def test_recorder_streams_the_same_values_as_capturing_everything(tiny_model):
    video = camera_pan(n_frames=4, width=64, height=64, dx=8, dy=0)
    latents = encode_frames(tiny_model, video.frames)
    cond = encode_prompt(tiny_model, video.prompt)
    method = DDIMInversion("1frame", num_steps=3)
    with capture_features(tiny_model.unet, latent_hw=(8, 8)) as captured:
        method.invert(tiny_model, latents, cond, progress=False)
    with FeatureRecorder(tiny_model.unet, video.flow, latent_hw=(8, 8), keep_calls={2}, keep_frames=[0, 3]) as rec:
        method.invert(tiny_model, latents, cond, progress=False)
    assert rec.per_call == pytest.approx([feature_temporal_similarity(f, video.flow)["mean"] for f in captured],
                                         abs=1e-9)
    assert list(rec.kept) == [2] and torch.equal(rec.kept[2], captured[2][[0, 3]])
    assert rec.layer == last_decoder_self_attention(tiny_model.unet)
    assert not tiny_model.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn1._forward_hooks


def test_recorder_scores_the_last_frames_of_a_guidance_batch(tiny_model):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, 8, 8, generator=gen)  # [uncond x3, cond x3]
    cond = torch.randn(6, 77, 32, generator=gen)
    flow = torch.zeros(2, 2, 64, 64)
    with capture_features(tiny_model.unet, latent_hw=(8, 8)) as captured, \
            FeatureRecorder(tiny_model.unet, flow, latent_hw=(8, 8)) as rec, torch.no_grad():
        tiny_model.unet(z, torch.tensor(301), encoder_hidden_states=cond)
    assert rec.per_call == pytest.approx([feature_temporal_similarity(captured[0][3:], flow)["mean"]], abs=1e-9)
    with pytest.raises(ValueError, match="batch 5 is not a multiple of the flow's 3 frames"), \
            FeatureRecorder(tiny_model.unet, flow, latent_hw=(8, 8)), torch.no_grad():
        tiny_model.unet(z[:5], torch.tensor(301), encoder_hidden_states=cond[:5])


def test_recorder_refuses_frames_outside_the_video():
    with pytest.raises(ValueError, match=r"keep_frames \[4\] are outside the video's 3 frames"):
        FeatureRecorder(None, torch.zeros(2, 2, 8, 8), keep_frames=[0, 4])


def test_pca_recovers_known_components_in_order_with_fixed_signs():
    gen = torch.Generator().manual_seed(0)
    f, c, h, w = 2, 6, 5, 4
    # three zero-mean, orthonormal spatial patterns over all f*h*w tokens, and orthonormal channel directions
    patterns, _ = torch.linalg.qr(torch.randn(f * h * w, 3, generator=gen, dtype=torch.float64)
                                  - torch.randn(1, 3, generator=gen, dtype=torch.float64))
    patterns = patterns - patterns.mean(0)
    patterns, _ = torch.linalg.qr(patterns)
    directions, _ = torch.linalg.qr(torch.randn(c, 3, generator=gen, dtype=torch.float64))
    directions = directions * torch.sign(directions.gather(0, directions.abs().argmax(0, keepdim=True)))
    strengths = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    tokens = (patterns * strengths) @ directions.T + torch.randn(1, c, generator=gen, dtype=torch.float64)
    features = tokens.reshape(f, h, w, c).permute(0, 3, 1, 2).float()
    out = feature_pca(features)
    assert out.shape == (f, 3, h, w) and out.min() >= 0 and out.max() <= 1
    for k in range(3):
        p = patterns[:, k]
        expected = ((p - p.min()) / (p.max() - p.min())).reshape(f, h, w)
        assert torch.allclose(out[:, k].double(), expected, atol=1e-4), k


def test_pca_bad_input_names_the_shape():
    with pytest.raises(ValueError, match=r"at least 3 channels, got features \(2, 2, 4, 4\)"):
        feature_pca(torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"features \(1, 4, 2, 2\) contain NaN"):
        feature_pca(torch.full((1, 4, 2, 2), float("nan")))

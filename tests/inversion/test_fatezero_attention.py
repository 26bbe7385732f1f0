"""FateZero's spatio-temporal self-attention against explicit references."""

import math

import pytest
import torch

from stem.core.errors import ConfigError
from stem.inversion.attention import FrameContextAttnProcessor, self_attention_processors
from stem.inversion.fatezero_attention import (
    SpatioTemporalAttnProcessor,
    fatezero_frames,
    layer_channels,
    spatio_temporal_processors,
)

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"


def test_frame_tables():
    assert fatezero_frames(5, ["mid"]).tolist() == [[2]] * 5
    assert fatezero_frames(5, ["first", "last"], "concat").tolist() == [[n, 0, 4] for n in range(5)]
    assert fatezero_frames(4, [-1, 1]).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]  # clipped at the ends
    assert fatezero_frames(4, ["mid"]).tolist() == [[1]] * 4  # (N-1)//2
    for bad in (["middle"], [1.5], []):
        with pytest.raises(ConfigError):
            fatezero_frames(4, bad)
    with pytest.raises(ConfigError, match="attention_mode='stack'"):
        fatezero_frames(4, ["mid"], "stack")


def _reference(attn, x, table):
    """softmax(q k^T / sqrt(d)) v per frame and head, keys/values concatenated from `table[n]`."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    h = attn.heads
    d = q.shape[-1] // h
    out = torch.empty_like(q)
    for n in range(x.shape[0]):
        keys, values = torch.cat([k[f] for f in table[n]]), torch.cat([v[f] for f in table[n]])
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            w = torch.softmax(q[n, :, sl] @ keys[:, sl].T / math.sqrt(d), dim=-1)
            out[n, :, sl] = w @ values[:, sl]
    return attn.to_out[1](attn.to_out[0](out))


def test_one_frame_with_mid_equals_vanilla_attention(tiny_model):
    attn = tiny_model.unet.get_submodule(LAYER)
    x = torch.randn(1, 12, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vanilla = FrameContextAttnProcessor(1, "1frame")(attn, x)
        for mode in ("replace", "concat"):
            torch.testing.assert_close(SpatioTemporalAttnProcessor(1, ["mid"], mode)(attn, x), vanilla,
                                       atol=1e-6, rtol=1e-5)


def test_first_and_mid_equal_explicit_concatenation(tiny_model):
    attn = tiny_model.unet.get_submodule(LAYER)
    x = torch.randn(5, 6, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode, table in (("replace", [[0, 2]] * 5), ("concat", [[n, 0, 2] for n in range(5)])):
            got = SpatioTemporalAttnProcessor(5, [-10, "mid"], mode)(attn, x)  # -10: clipped to frame 0
            torch.testing.assert_close(got, _reference(attn, x, table), atol=1e-5, rtol=1e-5)


def test_channel_threshold_leaves_narrow_layers_per_frame(tiny_model):
    unet = tiny_model.unet
    widths = {name.removesuffix(".processor"): layer_channels(unet, name.removesuffix(".processor"))
              for name in unet.attn_processors if ".attn1." in name}
    threshold = sorted(set(widths.values()))[1]  # some layers below, some at or above
    seen = {}
    with self_attention_processors(unet, per_layer=spatio_temporal_processors(unet, 4, ["mid"], "replace",
                                                                              threshold)):
        for name, proc in unet.attn_processors.items():
            if ".attn1." in name:
                seen[name.removesuffix(".processor")] = type(proc).__name__
    assert seen == {layer: "SpatioTemporalAttnProcessor" if w >= threshold else "FrameContextAttnProcessor"
                    for layer, w in widths.items()}
    assert set(seen.values()) == {"SpatioTemporalAttnProcessor", "FrameContextAttnProcessor"}

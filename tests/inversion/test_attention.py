"""Self-attention processors against explicit softmax(QK^T/sqrt(d))V references."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stem.core.errors import ConfigError
from stem.inversion.attention import FrameContextAttnProcessor, context_frames, self_attention_processors

N, S, C, HEADS = 5, 6, 16, 2


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS, bias=False).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2 * N, S, C, generator=torch.Generator().manual_seed(1))  # 2 groups of N frames


def reference(attn, x, frames_for):
    """Naive: for each group g and frame n, K/V = concatenated tokens of frames_for(n)."""
    out = torch.empty_like(x)
    d = C // HEADS
    for g in range(x.shape[0] // N):
        for n in range(N):
            q = attn.to_q(x[g * N + n])
            ctx = torch.cat([x[g * N + m] for m in frames_for(n)])
            k, v = attn.to_k(ctx), attn.to_v(ctx)
            heads = []
            for h in range(HEADS):
                sl = slice(h * d, (h + 1) * d)
                w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
                heads.append(w @ v[:, sl])
            out[g * N + n] = attn.to_out[0](torch.cat(heads, dim=-1))
    return out


def run(attn, x, processor):
    with torch.no_grad():
        return processor(attn, x)


def test_one_frame_equals_diffusers_default_and_reference(attn, x):
    ours = run(attn, x, FrameContextAttnProcessor(N, "1frame"))
    torch.testing.assert_close(ours, run(attn, x, AttnProcessor2_0()), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours, reference(attn, x, lambda n: [n]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pairing,frames_for", [
    ("fatezero", lambda n: [n, (N - 1) // 2]),
    ("tuneavideo", lambda n: [0, max(n - 1, 0)]),
])
def test_two_frame_pairings_equal_explicit_concatenation(attn, x, pairing, frames_for):
    ours = run(attn, x, FrameContextAttnProcessor(N, "2frame", pairing))
    with torch.no_grad():
        torch.testing.assert_close(ours, reference(attn, x, frames_for), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_chunk", [None, 7, 1000])  # 7 does not divide N*S = 30
def test_all_frame_equals_explicit_concatenation(attn, x, query_chunk):
    ours = run(attn, x, FrameContextAttnProcessor(N, "allframe", query_chunk=query_chunk))
    with torch.no_grad():
        torch.testing.assert_close(ours, reference(attn, x, lambda n: range(N)), rtol=1e-5, atol=1e-6)


def test_context_tables():
    assert context_frames(8, "2frame", "fatezero").tolist() == [[n, 3] for n in range(8)]
    assert context_frames(7, "2frame", "fatezero").tolist() == [[n, 3] for n in range(7)]  # round(7/2)=4, 1-based
    assert context_frames(4, "2frame", "tuneavideo").tolist() == [[0, 0], [0, 0], [0, 1], [0, 2]]
    assert context_frames(3, "1frame").tolist() == [[0], [1], [2]]


def test_processors_go_on_attn1_only_and_are_restored(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    proc = FrameContextAttnProcessor(2, "allframe")
    with self_attention_processors(unet, proc):
        inside = unet.attn_processors
        assert all((p is proc) == (".attn1." in name) for name, p in inside.items())
        assert sum(".attn1." in name for name in inside) == 16  # 7 down/up transformer blocks x ... + mid
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_one_frame_unet_equals_default_unet(tiny_model):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3)).expand(3, -1, -1)
    with torch.no_grad():
        default = tiny_model.unet(z, 501, encoder_hidden_states=cond).sample
        with self_attention_processors(tiny_model.unet, FrameContextAttnProcessor(3, "1frame")):
            ours = tiny_model.unet(z, 501, encoder_hidden_states=cond).sample
    torch.testing.assert_close(ours, default, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,word", [({"context": "3frame"}, "context"), ({"pairing": "odd"}, "pairing"),
                                         ({"query_chunk": 0}, "query_chunk")])
def test_bad_options_raise_config_errors(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        FrameContextAttnProcessor(4, **{"context": "2frame", **kwargs})

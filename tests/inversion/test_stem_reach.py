"""Where and when STEM self-attention runs (issue #11, point 19): on every attn1 of the UNet and on no
attn2, at every UNet call of both the inversion and the reconstruction."""

import pytest
import torch

from stem.diffusion.prompts import encode_prompt
from stem.inversion.attention import FrameContextAttnProcessor
from stem.inversion.methods import STEMInversion
from stem.inversion.stem_attention import STEMAttnProcessor

# SD 1.5's self-attention layers, written out: 2 per attention down block (3 of them), 1 in the mid
# block, 3 per attention up block (3 of them). The tiny UNet has the same topology.
SD_ATTN1 = sorted(
    [f"down_blocks.{b}.attentions.{i}.transformer_blocks.0.attn1" for b in range(3) for i in range(2)]
    + ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    + [f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn1" for b in (1, 2, 3) for i in range(3)])
STEPS = 2


def observe(unet):
    """Per UNet call, {attention module path: type of the processor it ran with}. Returns (calls, handles)."""
    calls, handles = [], [unet.register_forward_pre_hook(lambda module, args: calls.append({}))]
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            handles.append(module.register_forward_pre_hook(
                lambda module, args, name=name: calls[-1].__setitem__(name, type(module.processor))))
    return calls, handles


@pytest.mark.parametrize("stem_in_reconstruction", [True, False])
def test_stem_runs_on_every_attn1_and_no_attn2_at_every_step(tiny_model, stem_in_reconstruction):
    """Catches: STEM installed on part of the UNet (e.g. down blocks only: seen failing), on attn2 too,
    only for some steps, or not (or always) during reconstruction against stem_in_reconstruction."""
    unet = tiny_model.unet
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # 2 frames of 64x64
    cond = encode_prompt(tiny_model, "a photo")
    method = STEMInversion(num_bases=2, num_steps=STEPS, stem_in_reconstruction=stem_in_reconstruction)
    calls, handles = observe(unet)
    try:
        traj = method.invert(tiny_model, latents, cond, progress=False)
        inversion_calls = len(calls)
        method.reconstruct(tiny_model, traj.latents[-1], cond, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert inversion_calls == STEPS and len(calls) == 2 * STEPS
    attn2 = [name.replace(".attn1", ".attn2") for name in SD_ATTN1]
    for i, call in enumerate(calls):
        expected = STEMAttnProcessor if i < STEPS or stem_in_reconstruction else FrameContextAttnProcessor
        assert sorted(n for n in call if n.endswith(".attn1")) == SD_ATTN1
        assert {n: call[n] for n in SD_ATTN1} == dict.fromkeys(SD_ATTN1, expected), f"UNet call {i}"
        assert sorted(n for n in call if n.endswith(".attn2")) == sorted(attn2)
        assert not any(issubclass(call[n], (STEMAttnProcessor, FrameContextAttnProcessor)) for n in attn2)
    # and nothing stays installed afterwards
    assert not any(isinstance(p, STEMAttnProcessor) for p in unet.attn_processors.values())

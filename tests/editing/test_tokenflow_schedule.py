"""TokenFlow: WHEN (which steps) and WHERE (which modules) the PnP injections happen in an end-to-end
edit, and which frames the keyframe draw can pick."""

import pytest
import torch
from test_tokenflow import reference_pivot

from stem.data.synthetic import camera_pan
from stem.diffusion.ddim import sampling_timesteps
from stem.editing.tokenflow import TokenFlowEditor, chunk_spans, draw_keyframes
from stem.inversion.methods import DDIMInversion
from stem.runs.reconstruction import invert_video

STEPS = 5  # int(5 * 0.5) = 2 steps of Q/K injection, int(5 * 0.8) = 4 of conv injection
QK_LAYER, PLAIN_LAYER = "up_blocks.1.attentions.1", "up_blocks.1.attentions.0"  # released: injected / not
CONV_LAYER, OTHER_RESNET = "up_blocks.1.resnets.1", "up_blocks.1.resnets.0"


@pytest.fixture(scope="module")
def recorded(tiny_model):
    """One default-knob edit (3 frames in chunks of 2: a pivot pass and 2 chunk passes per step), with
    observing hooks: per UNet call its step, the attn1 inputs/outputs of two layers and, for two resnets,
    the raw conv2 output (observed before the editor's injection hook runs) and the resnet's input/output."""
    unet = tiny_model.unet
    video = camera_pan(n_frames=3, width=64, height=64)
    traj = invert_video(tiny_model, video, DDIMInversion("1frame", num_steps=STEPS), progress=False).trajectory
    timesteps = sampling_timesteps(tiny_model.scheduler, STEPS).tolist()
    calls = []

    def on_unet(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append({"step": timesteps.index(int(t))})

    def keep(name, what):
        def hook(module, args, output):
            calls[-1][name] = (args[0].detach().clone(), output.detach().clone()) if what == "io" else output.clone()
        return hook

    handles = [unet.register_forward_pre_hook(on_unet, with_kwargs=True)]
    for layer in (QK_LAYER, PLAIN_LAYER):
        handles.append(unet.get_submodule(f"{layer}.transformer_blocks.0.attn1").register_forward_hook(
            keep(layer, "io")))
    for layer in (CONV_LAYER, OTHER_RESNET):
        handles.append(unet.get_submodule(f"{layer}.conv2").register_forward_hook(keep(f"{layer}.conv2", "out")))
        handles.append(unet.get_submodule(layer).register_forward_hook(keep(layer, "io")))
    try:
        edit = TokenFlowEditor("a portrait photo of a robot", num_steps=STEPS, batch_size=2).edit(
            tiny_model, traj, video.prompt, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return tiny_model, edit, calls


def _conv_injected(model, call, layer) -> bool:
    """Whether the guided branches' residual output of `layer` was the source branch's in this call:
    the resnet output must equal shortcut(own input) + the source's raw conv2 output (injected), or
    + their own raw conv2 output (not injected); exactly one of the two must hold."""
    resnet = model.unet.get_submodule(layer)
    (x, out), raw = call[layer], call[f"{layer}.conv2"]
    with torch.no_grad():
        shortcut = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
    b = len(x) // 3
    injected = torch.cat([raw[:b]] * 3)
    match = [torch.allclose(out, (shortcut + r) / resnet.output_scale_factor, atol=1e-5, rtol=1e-5)
             for r in (injected, raw)]
    assert match.count(True) == 1, f"{layer}: output is neither injected nor plain ({match})"
    return match[0]


def _qk_injected(model, call, layer) -> bool:
    """Whether the pivot pass of `layer` in this call used the source branch's Q/K in uncond and cond."""
    attn = model.unet.get_submodule(f"{layer}.transformer_blocks.0.attn1")
    x, out = call[layer]
    with torch.no_grad():
        match = [torch.allclose(out, reference_pivot(attn, x, inject), atol=1e-5, rtol=1e-5)
                 for inject in (True, False)]
    assert match.count(True) == 1, f"{layer}: pivot output is neither injected nor plain ({match})"
    return match[0]


def test_conv_injection_fires_at_up_blocks_1_resnets_1_in_exactly_the_first_int_T_pnp_f_t_steps(recorded):
    """Catches: conv injection moved to up_blocks.1.resnets.0 (or any other resnet); the threshold one step
    short or long (e.g. `i < conv_steps - 1`, `i <= conv_steps`); injecting in the pivot pass only."""
    model, edit, calls = recorded
    assert len(calls) == STEPS * 3  # per step: pivot + 2 chunks, and the hooked resnet ran in every call
    assert all(CONV_LAYER in call for call in calls)
    injected = {(c["step"], _conv_injected(model, c, CONV_LAYER)) for c in calls}
    conv_steps = int(STEPS * 0.8)
    assert injected == {(i, i < conv_steps) for i in range(STEPS)}  # every call of a step agrees
    assert not any(_conv_injected(model, c, OTHER_RESNET) for c in calls)


def test_qk_injection_happens_in_the_pivot_pass_of_exactly_the_first_int_T_pnp_attn_t_steps(recorded):
    """Catches: the Q/K threshold one step short or long; Q/K injected into a layer outside qk_layers
    (up_blocks.1.attentions.0 is not injected in the release); the source branch attending across keyframes."""
    model, edit, calls = recorded
    pivots = calls[::3]  # the first UNet call of every step is the pivot pass
    assert [c["step"] for c in pivots] == list(range(STEPS)) and all(len(c[QK_LAYER][0]) == 3 * 2 for c in pivots)
    qk_steps = int(STEPS * 0.5)
    assert [_qk_injected(model, c, QK_LAYER) for c in pivots] == [i < qk_steps for i in range(STEPS)]
    assert not any(_qk_injected(model, c, PLAIN_LAYER) for c in pivots)


def test_keyframe_draw_covers_every_frame_of_every_chunk_including_the_last_and_a_partial_chunk():
    """Catches: a keyframe never drawn as the last frame of its chunk (e.g. randint(b - a - 1)), or never
    the first, or a partial last chunk drawing outside its 2 frames."""
    chunks = chunk_spans(14, 4)  # (0,4) (4,8) (8,12) (12,14)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_keyframes(chunks, gen) for _ in range(200)])  # P(a frame missed) < 4 * 0.75^200
    for c, (a, b) in enumerate(chunks):
        assert set(draws[:, c].tolist()) == set(range(a, b)), (c, sorted(set(draws[:, c].tolist())))

"""FreeU (Si et al. 2024) on the decoder of an SD UNet, at the sites the STEM release chooses.

FreeU re-weights what enters each decoder ResNet, the concatenation [h, r] of the backbone
feature h (from the block below) and the skip feature r (from the encoder):

    h[:, :C/2] <- b h[:, :C/2]                     backbone: the first half of h's C channels scaled by b
    r          <- IFFT(FFT(r) * m_s)                skip: its lowest frequencies scaled by s

with m_s = s on the 2x2 frequencies {0, -1} x {0, -1} (threshold 1 around the centre after fftshift)
and 1 elsewhere, computed in float32.

Which resnet inputs get (b1, s1) and which (b2, s2) is where the two implementations differ:
- `sites="release"` (the STEM release's FreeU in its TokenFlow fork): keyed by h's channel count,
  1280 -> (b1, s1), 640 -> (b2, s2), at every resnet input of the up blocks. On SD 1.5 that is the
  10 inputs up_blocks.0.resnets.0-2, up_blocks.1.resnets.0-2, up_blocks.2.resnets.0 (h of 1280)
  and up_blocks.2.resnets.1-2, up_blocks.3.resnets.0 (h of 640). The release's literals 1280 and 640
  are SD's `block_out_channels[2]` and `[1]`; they are read from the UNet's config (`widths`), so the
  rule carries to narrower test UNets (where widths repeat, e.g. the tiny 32, 32, 64, 64, the stage of
  SD's 320 is hit too: all 12 tiny up-block resnets).
- `sites="diffusers"` (diffusers' `unet.enable_freeu`): keyed by up-block index, up_blocks.0 ->
  (b1, s1), up_blocks.1 -> (b2, s2), all their resnets.

The release rewrites the up blocks' `forward`; here forward pre-hooks on the chosen resnets
rewrite their input instead (the same tensor [h, r], h's width known from the UNet's layout), and
are removed when the context exits.
"""

from __future__ import annotations

import contextlib

import torch

from stem.core.errors import ConfigError, check_choice

FREEU_SITES = ("release", "diffusers")
THRESHOLD = 1  # half-width of the scaled low-frequency square (the release and diffusers: 1)


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = THRESHOLD) -> torch.Tensor:
    """x (B, C, H, W) with its centred low frequencies (rows/columns H//2 - threshold .. H//2 + threshold - 1
    after fftshift) multiplied by `scale`; float32 FFT, returned in x's dtype."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(freq.shape[-2:], device=x.device)
    row, col = freq.shape[-2] // 2, freq.shape[-1] // 2
    mask[row - threshold:row + threshold, col - threshold:col + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def _up_resnets(unet):
    """(name, resnet, width of its backbone input h) for every resnet of the UNet's up blocks.

    In diffusers' UNet2DConditionModel, resnet j of up block i takes h from the block below
    (j = 0: the previous up block, or the mid block for i = 0) or from resnet j - 1 of its own block,
    so h has reversed(block_out_channels)[i - 1 if j == 0 else i] channels (i - 1 clipped at 0).
    """
    widths = list(reversed(unet.config.block_out_channels))
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", ())):
            hidden = widths[max(i - 1, 0)] if j == 0 else widths[i]
            if resnet.in_channels <= hidden:
                raise ConfigError(f"FreeU: up_blocks.{i}.resnets.{j} takes {resnet.in_channels} channels, not a "
                                  f"backbone of {hidden} plus a skip; this UNet's layout is not SD's")
            yield f"up_blocks.{i}.resnets.{j}", resnet, hidden


def freeu_sites(unet, sites: str = "release", widths: tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
    """{resnet name: (stage, width of h)} for the resnets whose input FreeU changes; stage 1 gets
    (b1, s1), stage 2 (b2, s2).

    sites="release": h of `widths[0]` channels -> stage 1, of `widths[1]` -> stage 2 (default
    (block_out_channels[2], block_out_channels[1]): 1280 and 640 on SD 1.5/2.x, as the release's literals).
    sites="diffusers": every resnet of up_blocks.0 -> stage 1, of up_blocks.1 -> stage 2.
    """
    check_choice("editing.freeu_sites", sites, FREEU_SITES)
    if widths is None:
        channels = unet.config.block_out_channels
        widths = (channels[2], channels[1]) if len(channels) > 2 else (channels[-1], channels[0])
    out = {}
    for name, _, hidden in _up_resnets(unet):
        if sites == "release":
            stage = 1 if hidden == widths[0] else 2 if hidden == widths[1] else None
        else:
            stage = {"up_blocks.0": 1, "up_blocks.1": 2}.get(name.rsplit(".", 2)[0])
        if stage is not None:
            out[name] = (stage, hidden)
    return out


def _input_hook(hidden: int, b: float, s: float):
    """A resnet forward pre-hook (with kwargs) that applies FreeU to its input [h, r], h of `hidden` channels."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input_tensor"]
        half = hidden // 2
        x = torch.cat([x[:, :half] * b, x[:, half:hidden], fourier_filter(x[:, hidden:], s)], dim=1)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "input_tensor": x}
    return hook


@contextlib.contextmanager
def freeu_hooks(unet, b1: float, b2: float, s1: float, s2: float, sites: str = "release",
                widths: tuple[int, int] | None = None):
    """FreeU on the UNet's decoder inside the block (forward pre-hooks on the `freeu_sites` resnets),
    removed on exit, also when the block raises."""
    plan = freeu_sites(unet, sites, widths)
    scales = {1: (b1, s1), 2: (b2, s2)}
    handles = []
    try:
        for name, (stage, hidden) in plan.items():
            hook = _input_hook(hidden, *scales[stage])
            handles.append(unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        yield plan
    finally:
        for handle in handles:
            handle.remove()

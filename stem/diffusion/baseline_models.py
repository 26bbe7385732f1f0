"""Weights of the Table 2 baselines beyond Stable Diffusion 1.5: tiny random, or real (safetensors only).

- Pix2Video edits with **Stable Diffusion 2 depth** (`stabilityai/stable-diffusion-2-depth`): an SD 2 UNet whose
  input has 5 channels, the 4 latent channels plus a depth map at the latent size (diffusers'
  `StableDiffusionDepth2ImgPipeline` concatenates them). `build_tiny_depth_model` / `load_depth_model`.
- Text2Video-Zero edits with **ControlNet depth** on SD 1.5 (`lllyasviel/sd-controlnet-depth`), a
  `diffusers.ControlNetModel` taking the depth image (B, 3, H, W) in [0, 1] at pixel resolution.
  `build_tiny_controlnet` / `load_controlnet`.
- Both get their depth from **MiDaS DPT-hybrid** (`Intel/dpt-hybrid-midas`, a `DPTForDepthEstimation`; SD 2
  depth's own `depth_estimator/` is the same model). `build_tiny_depth_estimator` / `load_depth_estimator`;
  `stem.editing.baselines.depth` runs it.

The tiny variants are built in code from a seed like `stem.diffusion.models.build_tiny` (no download); their numbers
show mechanics, not quality. Every builder returns modules in eval mode on the resolved device and dtype. Cache keys
take `DiffusionModel.fingerprint`, or `module_fingerprint(module)` for a ControlNet or an estimator (the same code).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, DPTConfig, DPTForDepthEstimation

from stem.core.errors import PICKLE_RISK, StemError
from stem.diffusion.device import resolve_device, resolve_dtype
from stem.diffusion.models import (
    PICKLED_SUFFIXES,
    SD2_DEPTH_HUB_ID,
    SD15_UNET,
    SD15_VAE,
    TEXT_MAX_LENGTH,
    TINY_DEPTH_UNET,
    TINY_UNET,
    DiffusionModel,
    _build_random,
    _load_diffusion_model,
    _sd15_unet_config,
    _sd15_vae_config,
    build_tiny,
    first_line,
    module_fingerprint,
    sd2_depth_unet_config,
    seeded,
    tiny_depth_unet_config,
    tiny_tokenizer,
)

__all__ = ["build_tiny_depth_model", "load_depth_model", "build_tiny_controlnet", "load_controlnet",
           "build_tiny_depth_estimator", "load_depth_estimator", "module_fingerprint", "tiny_depth_unet_config",
           "build_sd2_depth_arch", "build_controlnet_arch", "build_dpt_hybrid_arch"]

log = logging.getLogger(__name__)

CONTROLNET_DEPTH_HUB_ID = "lllyasviel/sd-controlnet-depth"
DEPTH_ESTIMATOR_HUB_ID = "Intel/dpt-hybrid-midas"

DEPTH_UNET_IN_CHANNELS = TINY_DEPTH_UNET["in_channels"]  # SD 2 depth: 4 latent channels + 1 depth channel

# The ControlNet's conditioning embedding: stride-2 convolutions between its blocks take the pixel image down to
# the latent size, one per factor 2 of the VAE (8 = 2**3: four blocks, as SD's (16, 32, 96, 256)). Tiny widths.
_TINY_CONTROLNET_EMBEDDING = (8, 16, 16, 32)

# MiDaS DPT-hybrid's layout at tiny widths, without the hybrid's ResNet (BiT) stem: a plain ViT with patch 16 on
# 384x384 inputs, four layers whose outputs the DPT neck reassembles (factors 4, 2, 1, 0.5 as DPT's), a small
# fusion width. The depth head is DPT's (ends in a ReLU: non-negative relative inverse depth).
# transformers' initialisation (normal, std `initializer_range` = 0.02) shrinks the signal through DPT's ~30 random
# convolutions to ~1e-9 (measured on a photo); std 0.1 keeps it near unit scale (`build_tiny_depth_estimator`).
_TINY_DPT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                 image_size=384, patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                 fusion_hidden_size=16, head_in_index=-1, is_hybrid=False, readout_type="project",
                 initializer_range=0.1)


def build_tiny_depth_model(seed: int = 0, device: str = "auto", dtype: str = "auto",
                           out_gain: float = 0.1) -> DiffusionModel:
    """`build_tiny` with SD 2 depth's 5-channel UNet (`models.TINY_DEPTH_UNET`), randomly initialised from `seed`.

    Tokenizer, text encoder and VAE are `build_tiny`'s (same seed, same weights), with its two calibrations: the
    VAE's latent scaling factor and the UNet output gain `out_gain` (`build_tiny`'s docstring)."""
    base = build_tiny(seed=seed, device=device, dtype=dtype, out_gain=out_gain)
    with seeded(seed, base.device):
        unet = UNet2DConditionModel(**tiny_depth_unet_config())
        unet.conv_out.weight.data.mul_(out_gain)
        unet.conv_out.bias.data.mul_(out_gain)
    log.info("built tiny depth UNet (random weights, seed %d) on %s/%s", seed, base.device, base.dtype)
    return replace(base, unet=unet.to(dtype=base.dtype).eval(), name=f"tiny_depth-seed{seed}", _fingerprint=None)


def load_depth_model(path: str = SD2_DEPTH_HUB_ID, revision: str | None = None, local_files_only: bool = False,
                     device: str = "auto", dtype: str = "auto") -> DiffusionModel:
    """Stable Diffusion 2 depth (safetensors only) from a Hub id or a local folder with unet/ vae/ text_encoder/
    tokenizer/ scheduler/ (its depth_estimator/ and feature_extractor/ are not read: `load_depth_estimator`).
    The scheduler is the paper's DDIM over its noise schedule, as for `load_pretrained`."""
    model = _load_diffusion_model(path, revision, device, dtype, local_files_only, hub_id=SD2_DEPTH_HUB_ID,
                                  setting="baseline_models.sd2_depth.path",
                                  pipeline="StableDiffusionDepth2ImgPipeline")
    channels = model.unet.config.in_channels
    if channels != DEPTH_UNET_IN_CHANNELS:
        raise StemError(f"the UNet of '{path}' takes {channels} input channels, not 5 (latents + depth): "
                        f"baseline_models.sd2_depth.path must be a depth-conditioned model such as {SD2_DEPTH_HUB_ID}")
    return model


def build_tiny_controlnet(seed: int = 0, device: str = "auto", dtype: str = "auto") -> ControlNetModel:
    """A ControlNet for `build_tiny`'s UNet: `ControlNetModel.from_unet` of that UNet (built from the same config
    and seed, so the same encoder weights), with a conditioning embedding that takes a (B, 3, H, W) image to the
    tiny latent size (`_TINY_CONTROLNET_EMBEDDING`).

    ControlNet zero-initialises its output convolutions (the embedding's last conv, one per down-block residual
    and the mid block's), so that training starts from the base model; left at zero the random ControlNet would
    add nothing and no test could see it act. They are drawn at random from `seed` as the other layers."""
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    with seeded(seed, device_t):
        unet = UNet2DConditionModel(**_sd15_unet_config(**TINY_UNET))
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_TINY_CONTROLNET_EMBEDDING)
        for zero in (controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                     controlnet.controlnet_mid_block):
            zero.reset_parameters()
    log.info("built tiny ControlNet (random weights, seed %d) on %s/%s", seed, device_t, dtype_t)
    return (controlnet if dtype_t == torch.float32 else controlnet.to(dtype=dtype_t)).eval()


def load_controlnet(path: str = CONTROLNET_DEPTH_HUB_ID, revision: str | None = None, local_files_only: bool = False,
                    device: str = "auto", dtype: str = "auto") -> ControlNetModel:
    """A ControlNet (safetensors only) from a Hub id or a local folder with config.json and
    diffusion_pytorch_model.safetensors (`lllyasviel/sd-controlnet-depth` has both; its .bin is never read)."""
    return _load_single(ControlNetModel, path, revision, local_files_only, device, dtype,
                        hub_id=CONTROLNET_DEPTH_HUB_ID, setting="baseline_models.controlnet_depth.path",
                        what="ControlNet", convert="from diffusers import ControlNetModel as M",
                        save="safe_serialization=True")


def build_tiny_depth_estimator(seed: int = 0, device: str = "auto", dtype: str = "auto") -> DPTForDepthEstimation:
    """A `DPTForDepthEstimation` with tiny widths (`_TINY_DPT`), randomly initialised from `seed`.

    Calibrated like `build_tiny`'s VAE, on a real photo (skimage's astronaut): the depth head's last convolution is
    rescaled so that its output there has mean 1 and std 0.25 before the head's final ReLU. A random head otherwise
    outputs zero (the ReLU) on a large part of the image, and the maps would carry little of the frames' content
    (the real MiDaS outputs positive relative inverse depth almost everywhere)."""
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    with seeded(seed, device_t):
        estimator = DPTForDepthEstimation(DPTConfig(**_TINY_DPT)).eval()
    _calibrate_depth_head(estimator, mean=1.0, std=0.25)
    log.info("built tiny DPT depth estimator (random weights, seed %d) on %s/%s", seed, device_t, dtype_t)
    return (estimator if dtype_t == torch.float32 else estimator.to(dtype=dtype_t)).eval()


def _calibrate_depth_head(estimator: DPTForDepthEstimation, mean: float, std: float) -> None:
    """Rescale the depth head's last convolution so that its output on skimage's astronaut (384x384, normalised by
    mean/std 0.5 as DPT-hybrid-MiDaS's preprocessing) has this mean and std."""
    from skimage.data import astronaut

    image = torch.from_numpy(astronaut().copy()).permute(2, 0, 1)[None].float() / 255
    size = estimator.config.image_size
    pixels = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True) * 2 - 1
    last = estimator.head.head[-2]  # Conv2d(32, 1, 1); the ReLU follows
    seen = []
    hook = last.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            estimator(pixel_values=pixels.to(estimator.device))
    finally:
        hook.remove()
    out = seen[0].float()
    scale = std / float(out.std())
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - float(out.mean())) * scale + mean)


def load_depth_estimator(path: str = DEPTH_ESTIMATOR_HUB_ID, revision: str | None = None,
                         local_files_only: bool = False, device: str = "auto", dtype: str = "auto",
                         subfolder: str | None = None) -> DPTForDepthEstimation:
    """A DPT depth estimator (safetensors only) from a Hub id or a local folder with config.json and
    model.safetensors. `subfolder="depth_estimator"` with `path=stabilityai/stable-diffusion-2-depth` reads the
    same MiDaS DPT-hybrid from SD 2 depth's folder."""
    return _load_single(DPTForDepthEstimation, path, revision, local_files_only, device, dtype,
                        hub_id=DEPTH_ESTIMATOR_HUB_ID, setting="baseline_models.depth_estimator.path",
                        what="depth estimator", convert="from transformers import DPTForDepthEstimation as M",
                        save="safe_serialization=True", subfolder=subfolder)


def _load_single(cls, path: str, revision: str | None, local_files_only: bool, device: str, dtype: str, *,
                 hub_id: str, setting: str, what: str, convert: str, save: str, subfolder: str | None = None):
    """One diffusers/transformers model (`cls`) from a Hub id or a local folder, safetensors only; errors are one
    line naming the download or the conversion command."""
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    local = Path(path).expanduser()
    if local.is_absolute() and not local.exists():
        raise StemError(f"{what} folder {path} does not exist; set {setting} to a folder with config.json and "
                        "safetensors weights")
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        files = [p for p in folder.glob("*") if p.is_file()]
        pickled = sorted(p.name for p in files if p.suffix in PICKLED_SUFFIXES)
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            out = f"{folder}_safetensors"
            raise StemError(f"{folder} has only pickled weights ({', '.join(pickled)}), which are refused; convert "
                            f"them to safetensors once, {PICKLE_RISK}: python -c \"{convert}; M.from_pretrained("
                            f"'{folder}', use_safetensors=False).save_pretrained('{out}', {save})\" and set "
                            f"{setting}={out}")
    source = str(local) if local.exists() else path
    kwargs = dict(local_files_only=local_files_only, use_safetensors=True)
    kwargs.update({k: v for k, v in (("revision", revision), ("subfolder", subfolder)) if v})  # else the defaults
    kwargs["torch_dtype" if issubclass(cls, ControlNetModel) else "dtype"] = dtype_t  # diffusers' / transformers' name
    try:
        module = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise StemError(f"could not load the {what} from '{path}' ({first_line(e)}); download it once on a machine "
                        f"with internet (hf download {hub_id} --local-dir /that/folder; convert it if it has only "
                        f".bin weights) and set {setting}=/that/folder") from e
    log.info("loaded %s %s on %s/%s", what, path, device_t, dtype_t)
    return module.to(device_t).eval()


# --- full-size architectures with random weights (model=sd15_arch): real shapes and cost, no download ----------------

def build_sd2_depth_arch(seed: int = 0, device: str = "auto", dtype: str = "auto") -> DiffusionModel:
    """SD 2 depth's architecture with random weights: its UNet (`models.SD2_DEPTH_UNET`, 5 input channels), SD's
    VAE, and OpenCLIP ViT-H/14's text tower as SD 2 uses it (1024-d, 23 layers: the penultimate layer's output)."""
    tok_size = len(tiny_tokenizer())
    return _build_random(
        "sd2_depth_arch", sd2_depth_unet_config(), _sd15_vae_config(**SD15_VAE),
        CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                       num_attention_heads=16, max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="gelu",
                       projection_dim=512, bos_token_id=tok_size - 2, eos_token_id=tok_size - 1,
                       pad_token_id=tok_size - 1),
        seed, device, dtype,
    )


def build_controlnet_arch(seed: int = 0, device: str = "auto", dtype: str = "auto") -> ControlNetModel:
    """ControlNet for SD 1.5 (lllyasviel/sd-controlnet-depth's architecture: `from_unet` of SD 1.5's UNet, the
    default 16/32/96/256 conditioning embedding) with random weights."""
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    with seeded(seed, device_t):
        controlnet = ControlNetModel.from_unet(UNet2DConditionModel(**_sd15_unet_config(**SD15_UNET)))
    return (controlnet if dtype_t == torch.float32 else controlnet.to(dtype=dtype_t)).eval()


# MiDaS DPT-hybrid (Intel/dpt-hybrid-midas config.json): ViT-B/16 on a BiT ResNet stem (transformers' default BiT
# backbone for is_hybrid: depths 3/4/9), the neck reading two backbone stages and ViT layers 9 and 12.
DPT_HYBRID = dict(is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  image_size=384, patch_size=16, backbone_out_indices=[2, 5, 8, 11], readout_type="project",
                  reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768], fusion_hidden_size=256,
                  backbone_featmap_shape=[1, 1024, 24, 24], neck_ignore_stages=[0, 1], head_in_index=-1)


def build_dpt_hybrid_arch(seed: int = 0, device: str = "auto", dtype: str = "auto") -> DPTForDepthEstimation:
    """MiDaS DPT-hybrid's architecture (`DPT_HYBRID`) with random weights."""
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    with seeded(seed, device_t):
        estimator = DPTForDepthEstimation(DPTConfig(**DPT_HYBRID))
    return (estimator if dtype_t == torch.float32 else estimator.to(dtype=dtype_t)).eval()

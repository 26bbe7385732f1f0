"""Depth maps of a clip from a DPT depth estimator (MiDaS), as Pix2Video and Text2Video-Zero condition on them.

`estimate_depth` runs a `transformers.DPTForDepthEstimation` (`stem.diffusion.baseline_models`) with its own
preprocessing, transformers' `DPTImageProcessor` with the settings of `Intel/dpt-hybrid-midas`'s
preprocessor_config.json (the same as SD 2 depth's feature_extractor/): resize to 384x384 (bilinear, aspect ratio
not kept), normalise with mean 0.5 and std 0.5. The prediction, MiDaS's relative inverse depth (larger = nearer,
unnormalised), is upsampled bicubically to the frames' size (transformers' `post_process_depth_estimation`; diffusers'
depth-to-image pipeline upsamples the same way, to the latent size). Each method normalises this raw map as its
official code does.

`depth_maps` computes them once per clip: entries of the cache folder "depth" beside the inversion cache, keyed by
the frames, the estimator's weights and the preprocessing.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DPTImageProcessor

from stem.core.errors import StemError
from stem.diffusion.baseline_models import module_fingerprint

log = logging.getLogger(__name__)

# Intel/dpt-hybrid-midas's preprocessor_config.json (resample 2 = bilinear). Frames arrive as floats in [0, 1], so the
# processor's rescaling of 8-bit values (1/255) is off.
DPT_HYBRID_MIDAS_PREPROCESSING = dict(do_resize=True, size={"height": 384, "width": 384}, keep_aspect_ratio=False,
                                      ensure_multiple_of=1, resample=2, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                                      image_std=[0.5, 0.5, 0.5])


def depth_processor(**overrides) -> DPTImageProcessor:
    """transformers' DPTImageProcessor with Intel/dpt-hybrid-midas's settings (`overrides` replace them), for frames
    in [0, 1]."""
    return DPTImageProcessor(**{**DPT_HYBRID_MIDAS_PREPROCESSING, **overrides, "do_rescale": False})


@torch.no_grad()
def estimate_depth(estimator, frames: torch.Tensor, batch_size: int = 8, processor: DPTImageProcessor | None = None,
                   progress: bool = False, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, 1, H, W) float32 CPU: the estimator's relative inverse depth of each frame of `frames` ((N, 3, H, W) in
    [0, 1]) at the frames' resolution, or at `size` = (h, w) (diffusers' depth-to-image pipeline upsamples the
    prediction straight to the latent size), `batch_size` frames per estimator call (a tqdm bar over batches)."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise StemError(f"estimate_depth needs frames (N, 3, H, W), got {tuple(frames.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise StemError(f"estimate_depth: batch_size={batch_size} must be an integer >= 1")
    processor = processor or depth_processor()
    device, dtype = estimator.device, estimator.dtype
    height, width = size or frames.shape[-2:]
    maps = []
    for start in tqdm(range(0, len(frames), batch_size), desc="depth maps", unit="batch", disable=not progress):
        batch = frames[start:start + batch_size].float().cpu()
        pixels = processor(images=list(batch), return_tensors="pt").pixel_values
        # Half precision under autocast, as diffusers' depth-to-image pipeline runs DPT-hybrid (its ResNet stem's
        # normalisation layers are not reliable in fp16 otherwise).
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
            depth = estimator(pixel_values=pixels.to(device, dtype)).predicted_depth  # (B, h, w)
        depth = F.interpolate(depth[:, None].float(), size=(height, width), mode="bicubic", align_corners=False)
        maps.append(depth.cpu())
    return torch.cat(maps)


def depth_key(cache, fingerprint: str, frames: torch.Tensor, processor: DPTImageProcessor,
              size: tuple[int, int] | None = None) -> str:
    """The cache key of a clip's depth maps: its frames, the estimator's weights (`fingerprint`, from
    `module_fingerprint`), the preprocessing and the output size."""
    return cache.key(what="depth", frames=frames, estimator=fingerprint, preprocessing=processor.to_dict(),
                     size=list(size or frames.shape[-2:]))


def depth_maps(estimator, video, cache=None, progress: bool = True, batch_size: int = 8,
               processor: DPTImageProcessor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """`estimate_depth` of `video.frames` (at `size`, default the frames'), computed once per clip: kept in
    `cache.sibling("depth")` (`cache`: the job's inversion cache, a `stem.runs.cache.TensorCache`), recomputed and
    not stored when `cache` is None."""
    processor = processor or depth_processor()
    if cache is None:
        return estimate_depth(estimator, video.frames, batch_size, processor, progress, size)
    store = cache.sibling("depth")
    fingerprint = module_fingerprint(estimator)
    key = depth_key(cache, fingerprint, video.frames, processor, size)
    found = store.load(key)
    if found is not None:
        log.info("depth maps of %s from the cache (%s)", video.name, store.path(key))
        return found[0]["depth"]
    depth = estimate_depth(estimator, video.frames, batch_size, processor, progress, size)
    store.save_or_warn(key, {"depth": depth}, {"video": video.name, "estimator": fingerprint},
                       what="depth")
    return depth

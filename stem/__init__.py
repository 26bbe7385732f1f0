"""stem: STEM inversion for zero-shot video editing (CVPR 2024).

A plain-Python library: no Hydra, OmegaConf or W&B imports outside `stem.app` (`run.py`, the one Hydra
entry point, calls into it). One package per concern, lower layers never importing higher ones
(docs/ARCHITECTURE.md; import-linter checks it):

- `stem.core`         errors users see, atomic file writes
- `stem.diffusion`    Stable Diffusion pieces: DDIM (Eq. 3), VAE, prompt encoding, model builders, device
- `stem.data`         videos and frame folders, the synthetic camera pan with exact flow
- `stem.distributed`  frame slices and collectives of a frame-sharded job
- `stem.inversion`    inversion methods and their attention processors: EM (Eq. 8-11), STEM attention (Eq. 7)
- `stem.editing`      TokenFlow and FateZero editing on any inversion; the other Table 2 baselines
- `stem.runs`         invert (cached), reconstruct or edit; the cache, run directory, prechecks
- `stem.reporting`    tables rebuilt from run directories, plots, display names, provenance
- `stem.metrics`      PSNR/SSIM, warp error, CLIP score, feature similarity; a run's evaluation
- `stem.study`        Table 3's user study: pairs and manifest, blinded samples, answers in SQLite, Table 3
- `stem.app`          the Hydra application (job, loggers, SIGTERM, launch, callbacks)

What a library user calls is importable from here (`from stem import STEMInversion, camera_pan`); each name
is imported on first use, so `import stem` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "StemError": "stem.core.errors", "ConfigError": "stem.core.errors",
    "build_tiny": "stem.diffusion.models", "build_sd15_arch": "stem.diffusion.models",
    "load_pretrained": "stem.diffusion.models",
    "Video": "stem.data.video", "load_video": "stem.data.video", "write_video": "stem.data.video",
    "camera_pan": "stem.data.synthetic",
    "InversionMethod": "stem.inversion.methods", "DDIMInversion": "stem.inversion.methods",
    "STEMInversion": "stem.inversion.methods", "FateZeroInversion": "stem.inversion.methods",
    "Edit": "stem.editing.base", "Editor": "stem.editing.base",
    "TokenFlowEditor": "stem.editing.tokenflow", "FateZeroEditor": "stem.editing.fatezero",
    "TuneAVideoEditor": "stem.editing.baselines.tuneavideo", "Pix2VideoEditor": "stem.editing.baselines.pix2video",
    "Text2VideoZeroEditor": "stem.editing.baselines.text2video_zero",
    "TensorCache": "stem.runs.cache", "invert_video": "stem.runs.reconstruction",
    "reconstruct_video": "stem.runs.reconstruction", "edit_video": "stem.runs.edit",
    "psnr": "stem.metrics.reconstruction", "ssim": "stem.metrics.reconstruction",
    "reconstruction_metrics": "stem.metrics.reconstruction", "warp_error": "stem.metrics.warp",
    "estimate_flow": "stem.metrics.flow", "ClipScorer": "stem.metrics.clip_score",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

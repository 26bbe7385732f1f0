"""stem: STEM inversion for zero-shot video editing (CVPR 2024).

A plain-Python library: no Hydra, OmegaConf or W&B imports (`run.py` is the only
Hydra entry point). Modules:

- `stem.diffusion.models`          build or load SD-1.5-shaped components (tiny, full architecture, real weights)
- `stem.data.video`           read/write videos and frame folders, resizing to multiples of 8
- `stem.data.synthetic`       a camera-pan video cut from a real photo, with exact ground-truth flow
- `stem.inversion.attention`       self-attention processors: 1-frame, 2-frame and all-frame context
- `stem.inversion.em`              EM of K bases (paper Eq. 8-11), streamed over token chunks
- `stem.inversion.stem_attention`  STEM self-attention over the bases (paper Eq. 7)
- `stem.diffusion.ddim`            DDIM inversion and sampling loops (paper Eq. 3)
- `stem.inversion.methods`       inversion methods as objects: DDIMInversion, STEMInversion
- `stem.runs.reconstruction`  invert (cached) + reconstruct + PSNR/SSIM
- `stem.runs.cache`           content-hashed safetensors cache of inverted latents
- `stem.metrics`         PSNR and SSIM as defined in docs/METRICS.md
"""

__version__ = "0.1.0"

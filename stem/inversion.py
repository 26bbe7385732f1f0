"""Inversion methods: what every `attn1` does while DDIM inverts and reconstructs a video.

A method is a small object with the paper's knobs as keyword arguments. It builds the
self-attention processor for a video of N frames, inverts clean latents into the full
trajectory z_0 ... z_T (paper Eq. 3) and reconstructs z_0 from z_T with guidance 1.
`settings()` lists everything that changes the result; it goes into cache keys and logs.
"""

from __future__ import annotations

import torch

from stem.attention import FrameContextAttnProcessor, self_attention_processors
from stem.ddim import Callback, Trajectory, ddim_invert, ddim_sample
from stem.errors import ConfigError


class DDIMInversion:
    """DDIM inversion with 1-frame, 2-frame or all-frame self-attention context (Eq. 6).

    Args:
        context: "1frame" (Pix2Video/TokenFlow), "2frame" or "allframe" (paper Table 1/6 rows).
        pairing: for "2frame": "fatezero" (frames n and the middle one) or "tuneavideo"
            (first and previous frame).
        num_steps: DDIM steps (paper: 50).
        query_chunk: query tokens per attention call for "allframe" (bounds memory); None = all.
    """

    def __init__(self, context: str = "1frame", pairing: str = "fatezero", num_steps: int = 50,
                 query_chunk: int | None = 2048):
        if num_steps < 1:
            raise ConfigError(f"num_steps={num_steps} must be at least 1")
        self.context, self.pairing, self.num_steps, self.query_chunk = context, pairing, num_steps, query_chunk
        self.processor(num_frames=1)  # validates context, pairing and query_chunk now, before model work

    @property
    def name(self) -> str:
        return f"ddim_{self.context}" + (f"_{self.pairing}" if self.context == "2frame" else "")

    def settings(self) -> dict:
        """Everything that changes the inverted latents (query_chunk does not)."""
        return {"method": "ddim", "context": self.context, "num_steps": self.num_steps,
                **({"pairing": self.pairing} if self.context == "2frame" else {})}

    def processor(self, num_frames: int) -> FrameContextAttnProcessor:
        return FrameContextAttnProcessor(num_frames, self.context, self.pairing, self.query_chunk)

    def invert(self, model, latents: torch.Tensor, cond: torch.Tensor, callback: Callback | None = None,
               progress: bool = True) -> Trajectory:
        """Invert clean latents (N, 4, h, w) under the source prompt embedding `cond`."""
        with self_attention_processors(model.unet, self.processor(len(latents))):
            return ddim_invert(model.unet, latents, cond, model.scheduler, self.num_steps, callback, progress)

    def reconstruct(self, model, noise: torch.Tensor, cond: torch.Tensor, callback: Callback | None = None,
                    progress: bool = True) -> torch.Tensor:
        """DDIM-sample z_0 back from z_T with the same prompt, guidance 1 and attention context."""
        with self_attention_processors(model.unet, self.processor(len(noise))):
            return ddim_sample(model.unet, noise, cond, model.scheduler, self.num_steps, callback, progress)

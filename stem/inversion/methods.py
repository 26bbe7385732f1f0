"""Inversion methods: what every `attn1` does while DDIM inverts and reconstructs a video.

A method is a small object with the paper's knobs as keyword arguments. It builds the
self-attention processor for a video of N frames, inverts clean latents into the full
trajectory z_0 ... z_T (paper Eq. 3) and reconstructs z_0 from z_T with guidance 1.
`settings()` lists everything that changes the result; it goes into cache keys and logs.
`check()` refuses, before any model work, settings that cannot run on a given video.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from stem.core.errors import ConfigError, check_number
from stem.diffusion.ddim import Callback, Trajectory, ddim_invert, ddim_sample
from stem.distributed.sharding import FrameShard
from stem.inversion.adaptive import resolve_auto
from stem.inversion.attention import FrameContextAttnProcessor, self_attention_processors
from stem.inversion.em import MASS_EPS
from stem.inversion.fatezero_attention import fatezero_frames, spatio_temporal_processors
from stem.inversion.stem_attention import STEMAttnProcessor, excess_bases_error, group_spans

log = logging.getLogger(__name__)


class InversionMethod:
    """DDIM inversion/reconstruction with the processor `processor(num_frames)` on every attn1."""

    def __init__(self, num_steps: int = 50):
        check_number("num_steps", num_steps, low=1, integer=True, fix="DDIM steps (paper: 50)")
        self.num_steps = num_steps

    def settings(self) -> dict:
        raise NotImplementedError

    def processor(self, num_frames: int):
        raise NotImplementedError

    def reconstruction_processor(self, num_frames: int):
        """The processor used to sample back (the inversion's own by default)."""
        return self.processor(num_frames)

    def check(self, unet, num_frames: int, latent_height: int, latent_width: int) -> None:
        """Raise ConfigError if the method cannot run on such a video (default: it always can). `unet`: the
        UNet or its config dict (run.py checks before building the model, `stem.runs.precheck`)."""

    def install(self, unet, num_frames: int, reconstruction: bool = False):
        """Context manager installing this method's attn1 processors (one for all layers by default)."""
        proc = self.reconstruction_processor(num_frames) if reconstruction else self.processor(num_frames)
        return self_attention_processors(unet, proc)

    def invert(self, model, latents: torch.Tensor, cond: torch.Tensor, callback: Callback | None = None,
               progress: bool = True) -> Trajectory:
        """Invert clean latents (N, 4, h, w) under the source prompt embedding `cond`."""
        self.check(model.unet, *latents.shape[:1], *latents.shape[-2:])
        with self.install(model.unet, len(latents)):
            return ddim_invert(model.unet, latents, cond, model.scheduler, self.num_steps, callback, progress)

    def reconstruct(self, model, noise: torch.Tensor, cond: torch.Tensor, callback: Callback | None = None,
                    progress: bool = True) -> torch.Tensor:
        """DDIM-sample z_0 back from z_T with the same prompt and guidance 1."""
        with self.install(model.unet, len(noise), reconstruction=True):
            return ddim_sample(model.unet, noise, cond, model.scheduler, self.num_steps, callback, progress)


class DDIMInversion(InversionMethod):
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
        super().__init__(num_steps)
        self.context, self.pairing, self.query_chunk = context, pairing, query_chunk
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


def _attn1_names(config) -> list[str]:
    """The attn1 layer names diffusers gives an SD-style UNet with this config (no UNet built)."""
    layers = config.get("layers_per_block", 2)
    names = [f"down_blocks.{i}.attentions.{j}" for i, kind in enumerate(config["down_block_types"])
             if "CrossAttn" in kind for j in range(layers)]
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        names.append("mid_block.attentions.0")
    names += [f"up_blocks.{i}.attentions.{j}" for i, kind in enumerate(config["up_block_types"])
              if "CrossAttn" in kind for j in range(layers + 1)]
    return [f"{name}.transformer_blocks.0.attn1" for name in names]


def self_attention_tokens(unet, latent_height: int, latent_width: int) -> dict[str, tuple[int, int]]:
    """(h, w) token grid of every attn1 of an SD-style UNet for latents of that size.

    `unet`: a UNet2DConditionModel, or its config as a dict (checks before the model is built,
    `stem.diffusion.models.architecture`). down_blocks.i works at the latent size halved i times (stride-2
    convs round up), the mid block at the smallest size, up_blocks.j mirrors down_blocks.(L-1-j).
    """
    config = unet.config if hasattr(unet, "config") else unet
    names = list(unet.attn_processors) if hasattr(unet, "attn_processors") else _attn1_names(config)
    levels = len(config["block_out_channels"])
    sizes = [(latent_height, latent_width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    grid = {}
    for name in names:
        if ".attn1" not in name:
            continue
        part, index = name.split(".")[:2]
        if part == "mid_block":
            level = levels - 1
        else:
            level = int(index) if part == "down_blocks" else levels - 1 - int(index)
        grid[name.removesuffix(".processor")] = sizes[level]
    return grid


class FateZeroInversion(InversionMethod):
    """DDIM inversion with FateZero's spatio-temporal self-attention (`stem.inversion.fatezero_attention`):
    layers with at least `min_channels` channels attend to `frames` (default the middle frame,
    replacing the frame's own keys as released), narrower layers per frame."""

    def __init__(self, frames=("mid",), mode: str = "replace", min_channels: int = 640, num_steps: int = 50):
        super().__init__(num_steps)
        fatezero_frames(2, frames, mode)  # validates the knobs now
        check_number("min_channels", min_channels, low=0, integer=True,
                     fix="layers with fewer channels attend per frame (SD: 640; 0 = every layer)")
        self.frames, self.mode, self.min_channels = list(frames), mode, min_channels

    @property
    def name(self) -> str:
        return "fatezero"

    def settings(self) -> dict:
        return {"method": "fatezero", "num_steps": self.num_steps, "frames": self.frames, "mode": self.mode,
                "min_channels": self.min_channels}

    def install(self, unet, num_frames: int, reconstruction: bool = False):
        return self_attention_processors(unet, per_layer=spatio_temporal_processors(
            unet, num_frames, self.frames, self.mode, self.min_channels))


class STEMInversion(InversionMethod):
    """STEM inversion (paper Sec. 4, Alg. 1): DDIM inversion with STEM self-attention.

    Args (defaults: the `stem` preset, `configs/inversion/stem.yaml`: the paper's numbers, with the
    released code's normalised bases and reseeded dead bases; `stem_literal.yaml` is Eq. 8-11 to the
    letter, `stem_official.yaml` the released code; docs/STEM.md):
        num_bases: K (paper: 256), or "auto": K chosen per layer (`auto`, docs/STEM.md "Adaptive K").
        n_iters: R EM iterations (paper: 3). tau: E-step temperature (0.05).
        space: "features" (EM on the attention input, one mu for all heads, as written in the
            paper) or "keys" (per-head EM on projected keys, value bases from the last
            responsibilities, as the released code does).
        group: frames per EM group; None = the whole video (the paper's global bases).
        init: "gaussian" | "random_tokens" | "kmeans++". normalize_bases: l2-normalise the
            bases in the E-step (Eq. 8 has exp(mu X^T / tau), unnormalised; the released code
            normalises). dead_bases: "keep" (Eq. 10 as written, released code) | "reseed". seed: initialisation seed.
        excess_bases: a layer whose EM group has fewer tokens than K: "error" (checked
            before any model work), "clamp" (use as many bases as tokens there, logged) or
            "allow" (K bases anyway, as the released code; logged). Not read with num_bases="auto".
        mass_eps: M-step denominator sum Z + mass_eps (paper: none written; released code: 1e-4).
        m_step: "eps" (sum Z X / (sum Z + mass_eps), the `stem` preset and the released code) or "literal"
            (Eq. 10's weighted mean sum Z X / sum Z, computed in the log domain so that a basis whose
            responsibilities underflow in fp32 is still its weighted mean; mass_eps unused; `stem_literal`).
        stem_in_reconstruction: also use STEM self-attention when sampling back (as the
            released code); False samples back with plain per-frame attention.
        num_steps: DDIM steps. chunk_size, query_chunk: memory bounds (no effect on results
            beyond float summation order).
        measure_attention_error: with an integer K, also estimate the attention error of the bases at each layer's
            first call (as num_bases="auto" with criterion attention does, on auto.queries sampled queries drawn from
            a separate generator: latents unchanged), recorded per layer in `bases_report()`. Not a setting of the
            result (not in `settings()`, not in the cache key).
        auto: settings of num_bases="auto": target, k_min, k_max, k_step, when, criterion, queries
            (`stem.inversion.adaptive.AUTO_DEFAULTS` fills the missing ones); validated whatever num_bases is,
            read only when it is "auto".

    `bases_report()` gives the K used per layer (and chosen, with its error, when auto) by the last
    inversion and reconstruction.
    """

    def __init__(self, num_bases: int | Literal["auto"] = 256, n_iters: int = 3, tau: float = 0.05,
                 space: str = "features", group: int | None = None, init: str = "gaussian",
                 normalize_bases: bool = True, dead_bases: str = "reseed", seed: int = 0, excess_bases: str = "error",
                 mass_eps: float = MASS_EPS, stem_in_reconstruction: bool = True, num_steps: int = 50,
                 chunk_size: int | None = 16384, query_chunk: int | None = 65536, auto: dict | None = None,
                 m_step: str = "eps", measure_attention_error: bool = False):
        super().__init__(num_steps)
        self.kwargs = dict(num_bases=num_bases, n_iters=n_iters, tau=tau, space=space, group=group, init=init,
                           normalize_bases=normalize_bases, dead_bases=dead_bases, seed=seed,
                           excess_bases=excess_bases, mass_eps=mass_eps, m_step=m_step)
        auto = resolve_auto(auto)  # a bad auto setting is refused even with an integer K
        self.auto = auto if num_bases == "auto" else None
        self.memory = dict(chunk_size=chunk_size, query_chunk=query_chunk)
        if not isinstance(measure_attention_error, bool):
            raise ConfigError(f"measure_attention_error={measure_attention_error!r} must be true or false")
        self.error_queries = auto["queries"] if measure_attention_error and self.auto is None else None
        self.stem_in_reconstruction = stem_in_reconstruction
        self.processors = {}  # phase -> the STEM processor of the last inversion / reconstruction
        self.processor(num_frames=1)  # validates every knob now, before model work

    @property
    def name(self) -> str:
        return "stem_auto" if self.auto else f"stem_k{self.kwargs['num_bases']}"

    def settings(self) -> dict:
        return {"method": "stem", "num_steps": self.num_steps, "stem_in_reconstruction": self.stem_in_reconstruction,
                **self.kwargs, **({"auto": dict(self.auto)} if self.auto else {})}

    def processor(self, num_frames: int, shard: FrameShard | None = None,
                  phase: str = "inversion") -> STEMAttnProcessor:
        return STEMAttnProcessor(num_frames, **self.kwargs, **self.memory, shard=shard, auto=self.auto, phase=phase,
                                 error_queries=self.error_queries)

    def reconstruction_processor(self, num_frames: int, shard: FrameShard | None = None):
        if self.stem_in_reconstruction:
            return self.processor(num_frames, shard, phase="reconstruction")
        return FrameContextAttnProcessor(num_frames, "1frame")

    def phase_processor(self, num_frames: int, reconstruction: bool = False, shard: FrameShard | None = None):
        """The processor of an inversion (or reconstruction) about to run; its records go to `bases_report`."""
        phase = "reconstruction" if reconstruction else "inversion"
        proc = self.reconstruction_processor(num_frames, shard) if reconstruction else self.processor(num_frames, shard)
        if isinstance(proc, STEMAttnProcessor):
            self.processors[phase] = proc
        else:  # stem_in_reconstruction=False: per-frame attention, no bases
            self.processors.pop(phase, None)
        return proc

    def install(self, unet, num_frames: int, reconstruction: bool = False):
        return self_attention_processors(unet, self.phase_processor(num_frames, reconstruction))

    def bases_report(self) -> dict | None:
        """K per attn1 layer of the last inversion and reconstruction (docs/STEM.md "Adaptive K"):
        {"auto": settings or None, "inversion": {"layers": {path: {"k", "error", "tried"}}, "mean_k"},
        "reconstruction": the same when STEM attention sampled back}; None before any STEM attention ran."""
        phases = {phase: proc.bases_record() for phase, proc in self.processors.items()}
        phases = {phase: record for phase, record in phases.items() if record is not None}
        return {"auto": dict(self.auto) if self.auto else None, **phases} if phases else None

    def check(self, unet, num_frames: int, latent_height: int, latent_width: int) -> None:
        """K must not exceed the tokens of an EM group at any layer (the smallest one binds); num_bases="auto"
        caps its candidates at the tokens there, so it always runs."""
        if self.auto:
            return
        k = self.kwargs["num_bases"]
        frames = min(size for _, _, size in group_spans(num_frames, self.kwargs["group"]))
        grids = self_attention_tokens(unet, latent_height, latent_width)
        layer, (h, w) = min(grids.items(), key=lambda item: item[1][0] * item[1][1])
        tokens = h * w * frames
        if tokens >= k:
            return
        where = f"{layer} ({frames} frame{'s' if frames > 1 else ''} x {h}x{w} tokens)"
        if self.kwargs["excess_bases"] != "error":
            log.info("num_bases=%d > %d tokens per EM group at %s: %s", k, tokens, where,
                     "fewer bases where tokens are fewer" if self.kwargs["excess_bases"] == "clamp"
                     else "K bases anyway (excess_bases=allow, as released)")
            return
        raise excess_bases_error(k, tokens, where)

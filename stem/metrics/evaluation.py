"""The metrics of one run, chosen per run (`configs/metrics/{recon,edit,all}.yaml`); docs/METRICS.md.

    ev = Evaluator(reconstruction=True, clip={"pretrained": "/ckpt/open_clip_vit_b32.safetensors"},
                   warp_error=True, features={"pca_steps": [0, -1]})
    ev.prepare(video, num_steps=50)              # bad settings and missing weights fail before model work
    recorder = ev.feature_recorder(model, video)  # None unless features are on; enter it around the inversion
    ... invert (under `recorder`), reconstruct or edit ...
    metrics = ev.evaluate(frames, video, prompt, references={"input": video.frames, "vae": vae_frames},
                          recorder=recorder, run_dir=run_dir)

Sections of the returned dict (each present only when its metric is on):
- "vs_<ref>" for each reference, and "<ref>_vs_<first ref>" for the others: PSNR/SSIM per frame and mean
  (a reconstruction has references; an edit has none, so PSNR/SSIM are skipped there).
- "clip": CLIP score of the output with `prompt` and the frame-to-frame CLIP consistency; `weights` is
  the CLIP weights' tag or file, or "random" (`pretrained=None`: not comparable to the paper).
- "warp_error": masked/unmasked warp error x1e-3 of the output and, as a floor, of the source, the
  valid-pixel fraction, the flow backend and its `flow_weights` (`stem.metrics.flow.flow_weights`).
- "feature_similarity": per inversion step (flow backend and weights as warp error's), with the PNG
  plot and PCA figure written into `run_dir`.
The table captions read `weights` / `flow_weights` (`stem.reporting.provenance`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stem.core.errors import ConfigError, MetricError, check_choice, check_number
from stem.data.video import Video
from stem.metrics import ClipScorer, estimate_flow, reconstruction_metrics, warp_error
from stem.metrics.clip_score import DEFAULT_MODEL, DEFAULT_PRETRAINED
from stem.metrics.feature_similarity import FeatureRecorder, feature_pca
from stem.metrics.flow import BACKENDS, RAFT_MIN_SIZE, flow_weights
from stem.reporting.display import display_value
from stem.reporting.plots import image_grid, plot_curves

log = logging.getLogger(__name__)

SIMILARITY_PLOT = "feature_similarity.png"
PCA_FIGURE = "feature_pca.png"


@dataclass
class ClipSettings:
    model: str = DEFAULT_MODEL                 # ViT-B-32-quickgelu: OpenAI's ViT-B/32 with its own activation
    pretrained: str | None = DEFAULT_PRETRAINED  # open_clip tag, a local checkpoint file, or None (random: tests)
    batch_size: int = 32                       # frames per image-encoder call
    cache_dir: str | None = None               # Hugging Face cache to look in (None: HF's default)


@dataclass
class FlowSettings:
    backend: str = "auto"      # auto (RAFT if its weights load, else OpenCV DIS, with a notice), raft or dis
    raft_iters: int = 12       # RAFT refinement iterations (RAFT's and torchvision's default)
    batch_size: int = 8        # frame pairs per RAFT call: lower it when GPU memory is short
    exact: bool = True         # use a video's ground-truth flow when it has one (the synthetic pan)


@dataclass
class FeatureSettings:
    layer: str | None = None   # attn1 module path; None: the last decoder self-attention (paper Figs. 6, 9)
    pca_steps: list = field(default_factory=lambda: [0, -1])  # inversion steps (0-based, -1 = last) for the PCA
    pca_frames: int = 4        # frames shown in the PCA figure, evenly spaced over the video


def _settings(cls, name: str, value):
    """A settings dataclass from a dict (None when off); unknown keys are a ConfigError naming them."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"metrics.{name}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**value)


class Evaluator:
    """Which metrics a run computes, and their settings (each section None/False = off).

    Args:
        reconstruction: PSNR/SSIM against every reference given to `evaluate`.
        clip: `ClipSettings` fields (dict), True for the defaults, or None.
        warp_error: warp error of the output (and of the source) with the source video's flow.
        features: `FeatureSettings` fields (dict), True for the defaults, or None.
        flow: `FlowSettings` fields, for warp error and feature similarity.
        device: where CLIP and RAFT run ("auto": cuda when available).
        flow_cache_dir: flows of a source are cached here by content hash (None: no cache).
        progress: tqdm bars over frames and pairs.
    """

    def __init__(self, reconstruction: bool = True, clip=None, warp_error: bool = False, features=None,
                 flow=None, device: str = "auto", flow_cache_dir: str | None = None, progress: bool = True):
        self.reconstruction = bool(reconstruction)
        self.clip = _settings(ClipSettings, "clip", clip)
        self.warp_error = bool(warp_error)
        self.features = _settings(FeatureSettings, "features", features)
        self.flow = _settings(FlowSettings, "flow", flow if flow is not None else True)
        check_choice("metrics.flow.backend", self.flow.backend, BACKENDS)
        for name, value in (("flow.raft_iters", self.flow.raft_iters), ("flow.batch_size", self.flow.batch_size)) + (
                (("clip.batch_size", self.clip.batch_size),) if self.clip else ()) + (
                (("features.pca_frames", self.features.pca_frames),) if self.features else ()):
            check_number(f"metrics.{name}", value, low=1, integer=True)
        for step in self.features.pca_steps if self.features else ():
            check_number("metrics.features.pca_steps", step, integer=True,
                         fix="inversion steps, 0-based (negatives count from the end: -1 = the last)")
        self.device, self.flow_cache_dir, self.progress = device, flow_cache_dir, progress
        self._scorer: ClipScorer | None = None
        self._flows: dict[str, tuple] = {}

    def names(self) -> list[str]:
        """The metrics that are on, for logs."""
        on = {"psnr/ssim": self.reconstruction, "clip": self.clip, "warp_error": self.warp_error,
              "feature_similarity": self.features}
        return [k for k, v in on.items() if v]

    # ---- before any model work -------------------------------------------------------------
    def prepare(self, video: Video, num_steps: int | None = None) -> None:
        """Refuse settings this video cannot be scored with, and load CLIP (missing weights fail here)."""
        needs_flow = [m for m, on in (("warp error", self.warp_error), ("feature similarity", self.features)) if on]
        if needs_flow and video.num_frames < 2:
            raise MetricError(f"{' and '.join(needs_flow)}: need at least 2 frames, the video {video.name} has "
                              f"{video.num_frames}; set data.n_frames >= 2 or metrics=recon")
        if needs_flow and self.flow.backend == "raft" and not self._exact(video) \
                and min(video.height, video.width) < RAFT_MIN_SIZE:
            raise MetricError(f"{needs_flow[0]}: RAFT needs frames of at least {RAFT_MIN_SIZE}x{RAFT_MIN_SIZE}, the "
                              f"video is {video.width}x{video.height}; use metrics.flow.backend=dis")
        if self.features and num_steps is not None:
            self._pca_calls(num_steps)
        if self.clip:
            self._clip_scorer()

    def check_without_output(self) -> None:
        """Refuse metrics that score an output video in a run that writes none (`reconstruct=false`);
        PSNR/SSIM are skipped there, feature similarity (of the inversion itself) still runs."""
        scoring = [m for m, on in (("clip", self.clip), ("warp_error", self.warp_error)) if on]
        if scoring:
            raise ConfigError(f"reconstruct=false writes no video, so {' and '.join(scoring)} cannot be scored; "
                              f"use metrics=recon or metrics=features, or reconstruct=true")

    def _clip_scorer(self) -> ClipScorer:
        """The CLIP scorer, loaded once (missing weights fail here, with how to provide them)."""
        if self._scorer is None:
            self._scorer = ClipScorer(self.clip.model, self.clip.pretrained, self.device, self.clip.batch_size,
                                      cache_dir=self.clip.cache_dir, progress=self.progress)
            if self.clip.pretrained is None:
                log.warning("clip_score: randomly initialised CLIP (metrics.clip.pretrained=null): the numbers "
                            "test the mechanics only")
        return self._scorer

    def _pca_calls(self, num_steps: int) -> list[int]:
        steps = list(self.features.pca_steps)
        bad = [s for s in steps if not -num_steps <= int(s) < num_steps]
        if bad:
            raise ConfigError(f"metrics.features.pca_steps={steps}: {bad} outside the {num_steps} inversion "
                              f"steps (0-based, negatives count from the end)")
        return sorted({int(s) % num_steps for s in steps})

    # ---- flow of the source ------------------------------------------------------------------
    def _exact(self, video: Video) -> bool:
        return self.flow.exact and video.flow is not None

    def source_flow(self, video: Video) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(forward, backward or None, backend) flow of the source video, computed once per run
        (and cached on disk by content hash across runs)."""
        key = video.name
        if key not in self._flows:
            if self._exact(video):
                self._flows[key] = (video.flow, None, "exact")
            else:
                self._flows[key] = estimate_flow(video.frames, self.flow.backend, device=self.device,
                                                 raft_iters=self.flow.raft_iters, batch_size=self.flow.batch_size,
                                                 cache_dir=self.flow_cache_dir, progress=self.progress)
            log.info("source flow of %s: %s", video.name, self._flows[key][2])
        return self._flows[key]

    # ---- during the inversion ----------------------------------------------------------------
    def feature_recorder(self, model, video: Video, num_steps: int) -> FeatureRecorder | None:
        """A `FeatureRecorder` to enter around the inversion, or None when feature similarity is off."""
        if not self.features:
            return None
        fwd, _, _ = self.source_flow(video)
        frames = torch.linspace(0, video.num_frames - 1, min(self.features.pca_frames, video.num_frames))
        return FeatureRecorder(model.unet, fwd, self.features.layer, latent_hw=(video.height // 8, video.width // 8),
                               keep_calls=self._pca_calls(num_steps), keep_frames=frames.round().long().tolist())

    # ---- after ---------------------------------------------------------------------------------
    def evaluate(self, frames: torch.Tensor, video: Video, prompt: str | None = None, label: str | None = None,
                 references: dict[str, torch.Tensor] | None = None, recorder: FeatureRecorder | None = None,
                 run_dir: str | Path | None = None, timesteps: list[int] | None = None) -> dict:
        """Score `frames` (N, 3, H, W) in [0, 1], the output for `video`; see the module docstring.

        `prompt`: the CLIP prompt (default the video's own); `label`: the method (its config name, e.g.
        "stem_k256"), shown by its display name in the figures' legends and titles.
        """
        out: dict = {}
        if self.reconstruction and references and frames is not None:
            out.update(_reconstruction_sections(frames, references))
        elif self.reconstruction:
            log.info("PSNR/SSIM skipped: this run has no %s", "reference video (an edit)" if frames is not None
                     else "output video (reconstruct=false)")
        if self.clip:
            score = self._clip_scorer().score(frames, prompt if prompt is not None else video.prompt)
            out["clip"] = {"model": self.clip.model, "pretrained": self.clip.pretrained,
                           "weights": "random" if self.clip.pretrained is None else str(self.clip.pretrained),
                           "prompt": prompt if prompt is not None else video.prompt, **score}
        if self.warp_error:
            fwd, bwd, backend = self.source_flow(video)
            kwargs = dict(flow=fwd, backward_flow=bwd, device=self.device, progress=self.progress)
            out["warp_error"] = {**warp_error(frames, video.frames, **kwargs), "backend": backend,
                                 "flow_weights": flow_weights(backend),
                                 "source": _headline(warp_error(video.frames, video.frames, **kwargs))}
        if self.features:
            if recorder is None or not recorder.per_call:
                raise MetricError("feature similarity: nothing was recorded; enter evaluator.feature_recorder(...) "
                                  "around the inversion")
            out["feature_similarity"] = self._feature_section(recorder, video, run_dir, timesteps, label)
        return out

    def _feature_section(self, recorder: FeatureRecorder, video: Video, run_dir, timesteps, label) -> dict:
        per_step = recorder.per_call
        kept = [v for v in per_step if v == v]
        section = {"layer": recorder.layer, "per_step": per_step, "timesteps": timesteps,
                   "mean": sum(kept) / len(kept) if kept else float("nan"), "flow_backend": self.source_flow(video)[2],
                   "flow_weights": flow_weights(self.source_flow(video)[2])}
        if run_dir is not None:
            run_dir = Path(run_dir)
            method = display_value("inversion", label) if label else video.name
            x = timesteps if timesteps is not None and len(timesteps) == len(per_step) else None
            plot_curves(run_dir / SIMILARITY_PLOT, {method: per_step}, x=x,
                        xlabel="timestep t (inversion runs left to right)" if x else "inversion step",
                        ylabel="feature temporal similarity", title=f"{video.name}: {recorder.layer}")
            rows = {"input": video.frames[recorder.keep_frames]}
            for call in sorted(recorder.kept):
                step = f"step {call + 1}" + (f" (t={timesteps[call]})" if x else "")
                rows[step] = feature_pca(recorder.kept[call])
            numbers = video.frame_numbers  # numbered from 1 in the source video, as in Fig. 4 and metrics.json
            image_grid(run_dir / PCA_FIGURE, rows, [f"frame {numbers[f]}" for f in recorder.keep_frames],
                       title=f"{method} on {video.name}: PCA of {recorder.layer} features (3 components as RGB)")
            section.update(plot=SIMILARITY_PLOT, pca=PCA_FIGURE)
        return section


def _headline(result: dict) -> dict:
    return {k: result[k] for k in ("warp_error", "warp_error_unmasked", "valid_fraction")}


def _reconstruction_sections(frames: torch.Tensor, references: dict[str, torch.Tensor]) -> dict:
    """PSNR/SSIM of `frames` vs every reference ("vs_<ref>"), and of every other reference vs the
    first one ("<ref>_vs_<first>", e.g. how much the VAE alone loses)."""
    names = list(references)
    scores = reconstruction_metrics(frames, references)
    out = {f"vs_{name}": scores[name] for name in names}
    first = names[0]
    for name in names[1:]:
        out[f"{name}_vs_{first}"] = reconstruction_metrics(references[name], {first: references[first]})[first]
    return out


def inversion_reconstruction_sections(frames: torch.Tensor, references: dict[str, torch.Tensor]) -> dict:
    """PSNR/SSIM of an editing run's plain reconstruction of its inversion, as sections
    "reconstruction_vs_<ref>" (and "<ref>_vs_<first ref>"), beside the edit's own metrics."""
    return {(f"reconstruction_{name}" if name.startswith("vs_") else name): values
            for name, values in _reconstruction_sections(frames, references).items()}


def summary_scalars(metrics: dict) -> dict[str, float]:
    """Headline numbers of a metrics.json as flat "section/key" scalars (for trackers and logs)."""
    out = {}
    for section, values in metrics.items():
        if isinstance(values, dict) and _is_metric_section(section):
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{section}/{key}"] = float(value)
                elif isinstance(value, dict):
                    out.update({f"{section}/{key}/{k}": float(v) for k, v in value.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def per_frame_columns(metrics: dict) -> dict[str, list[float]]:
    """Per-frame lists of a metrics.json as {"section/key": values}, in section order."""
    return {f"{section}/{key}": list(value) for section, values in metrics.items()
            if isinstance(values, dict) and _is_metric_section(section)
            for key, value in values.items() if key.endswith("per_frame") and isinstance(value, list)}


def _is_metric_section(name: str) -> bool:
    return name.startswith("vs_") or "_vs_" in name or name in ("clip", "warp_error", "feature_similarity")

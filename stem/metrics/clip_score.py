"""Edit fidelity: CLIP score and CLIP frame consistency (paper Table 2; spec/METRICS.md).

Definitions (docs/METRICS.md):
- CLIP score = mean over frames of cos(E_I(frame), E_T(prompt)), the UNSCALED cosine of the
  L2-normalised image and text embeddings (values ~0.3 for a matching prompt; no x100, no
  clipping at 0 as in torchmetrics' CLIPScore).
- Frame consistency = mean over consecutive pairs of cos(E_I(frame_i), E_I(frame_i+1)).
- Model: open_clip `ViT-B-32-quickgelu` with `pretrained="openai"` (OpenAI's ViT-B/32).
  Plain `ViT-B-32` + `openai` builds GELU where the weights were trained with QuickGELU and
  only warns; here any activation mismatch between model name and weight tag is an error.
- Preprocessing: open_clip's own eval transform for the model/tag (resize shortest side to
  224 bicubic with antialiasing, centre crop 224, OpenAI mean/std), applied to float tensors
  in [0, 1]; no PIL round trip, so no uint8 rounding. The only addition: values are clamped
  to [0, 1] after the resize, as PIL's uint8 output is (bicubic overshoots at edges).
- Embeddings are computed in float32 and normalised/compared in float64.

Weights: `pretrained` is an open_clip tag (looked up in the local Hugging Face cache first,
downloaded only when the hub is reachable), a local checkpoint file, or None for a randomly
initialised model (tests only; deterministic under `seed`).
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from stem.core.errors import PICKLE_RISK, ConfigError, MetricError, StemError, check_number, is_safetensors
from stem.diffusion.device import resolve_device

DEFAULT_MODEL = "ViT-B-32-quickgelu"
DEFAULT_PRETRAINED = "openai"
METRIC = "clip_score"

_MODELS: dict[tuple, tuple] = {}  # (model, pretrained, device[, seed]) -> (model, preprocess, tokenizer)
_TRUE = {"1", "true", "yes", "on"}


class ClipWeightsError(StemError):
    """CLIP weights for the CLIP score are not on this machine and cannot be downloaded."""


def _weights_error(model: str, pretrained: str, reason: str) -> ClipWeightsError:
    return ClipWeightsError(
        f"{METRIC}: no open_clip weights for model='{model}' pretrained='{pretrained}' ({reason}); "
        f"on a connected machine run `python -c \"import open_clip; open_clip.create_model('{model}', "
        f"pretrained='{pretrained}')\"` and copy its Hugging Face cache (~/.cache/huggingface/hub, or set "
        f"HF_HOME / cache_dir), or pass pretrained=/path/to/open_clip_model.safetensors")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub with a short timeout. huggingface_hub itself retries an
    unreachable host for ~25 s per file (and open_clip asks for two files)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot: let huggingface_hub try
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_checkpoint(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The file open_clip would download for this tag, if it is already in a local cache."""
    from open_clip import pretrained as oc_pretrained

    if tag_cfg.get("file"):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        for name in (*oc_pretrained._get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _refuse_pickle(model: str, path: str) -> None:
    """A checkpoint file that is not safetensors is refused before anything unpickles it, with how to convert."""
    if not is_safetensors(path):
        out = os.path.splitext(path)[0] + ".safetensors"
        raise ClipWeightsError(
            f"{METRIC}: '{path}' is not a safetensors file (pickled weights are refused); convert it once, "
            f"{PICKLE_RISK}: python -c \"import open_clip; from safetensors.torch import save_file; "
            f"m = open_clip.create_model('{model}', pretrained='{path}'); "
            f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{out}')\" "
            f"and pass pretrained={out}")


def _resolve_weights(model: str, pretrained: str, cache_dir: str | None) -> tuple[str, dict]:
    """(checkpoint file, the tag's preprocessing settings) without waiting on the network."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        if os.path.isfile(pretrained):
            _refuse_pickle(model, pretrained)
            return pretrained, {}
        looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            raise _weights_error(model, pretrained, "no such checkpoint file")
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ConfigError(f"{METRIC}: pretrained='{pretrained}' is neither an open_clip tag of '{model}' "
                          f"(tags: {', '.join(tags) or 'none'}) nor a checkpoint file")
    model_quick = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    tag_quick = bool(tag_cfg.get("quick_gelu", False))
    if model_quick != tag_quick:
        base = model.removesuffix("-quickgelu")
        fix = f"{base}-quickgelu" if tag_quick else base
        raise ConfigError(f"{METRIC}: pretrained='{pretrained}' weights were trained with "
                          f"{'QuickGELU' if tag_quick else 'GELU'} but model='{model}' builds "
                          f"{'QuickGELU' if model_quick else 'GELU'}: use model='{fix}'")
    preprocess = {"image_mean": tag_cfg.get("mean"), "image_std": tag_cfg.get("std"),
                  "image_interpolation": tag_cfg.get("interpolation"),
                  "image_resize_mode": tag_cfg.get("resize_mode")}
    path = _cached_checkpoint(tag_cfg, cache_dir)
    if path is None:
        if _hub_offline():
            raise _weights_error(model, pretrained, "not in the local cache and HF_HUB_OFFLINE is set")
        if not _hub_reachable():
            raise _weights_error(model, pretrained, "not in the local cache and the Hugging Face hub is unreachable")
        try:
            path = open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is the same user-facing problem
            raise _weights_error(model, pretrained, f"download failed: {type(e).__name__}") from e
        if not path or not os.path.isfile(path):
            raise _weights_error(model, pretrained, "download returned no file")
    return path, preprocess


def load_clip(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, device: str = "auto",
              seed: int = 0, cache_dir: str | None = None) -> tuple:
    """(open_clip model in eval mode, its eval image transform, its tokenizer), cached in-process.

    `pretrained=None` builds a randomly initialised model from `seed` (tests only); otherwise
    weights come from a tag (local cache, else download) or a checkpoint file. Always float32.
    """
    device_t = resolve_device(device)
    if pretrained is not None and os.path.isfile(pretrained):
        pretrained = os.path.abspath(pretrained)
    key = (model, pretrained, str(device_t)) + ((seed,) if pretrained is None else ())
    if key in _MODELS:
        return _MODELS[key]
    import open_clip

    if open_clip.get_model_config(model) is None and not model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"{METRIC}: model='{model}' is not an open_clip model name "
                          f"(e.g. {DEFAULT_MODEL}; see open_clip.list_models())")
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None, device="cpu", pretrained_text=False)
        clip = clip.to(device_t)
    elif model.startswith("hf-hub:") and not (_hub_offline() or _hub_reachable()):
        raise _weights_error(model, pretrained, "the Hugging Face hub is unreachable; set HF_HUB_OFFLINE=1 "
                                                "if the model is in the local cache")
    elif model.startswith(("hf-hub:", "local-dir:")):
        clip, _, preprocess = open_clip.create_model_and_transforms(model, device=device_t, cache_dir=cache_dir)
    else:
        path, preprocess_cfg = _resolve_weights(model, pretrained, cache_dir)
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=path, device=device_t, cache_dir=cache_dir, **preprocess_cfg)
        except (RuntimeError, OSError, KeyError) as e:
            raise ClipWeightsError(f"{METRIC}: checkpoint '{path}' does not load into open_clip model "
                                   f"'{model}': {str(e).splitlines()[0][:200]}") from e
    _MODELS[key] = (clip.eval(), preprocess, open_clip.get_tokenizer(model))
    return _MODELS[key]


def _as_frames(frames, name: str = "frames") -> torch.Tensor:
    """(N, 3, H, W) tensor or (N, H, W, 3) array in [0, 1] -> float32 (N, 3, H, W) tensor."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise MetricError(f"{METRIC}: expected {name} as (N, H, W, 3) array or (N, 3, H, W) tensor, "
                             f"got array of shape {frames.shape}")
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if not isinstance(frames, torch.Tensor):
        raise MetricError(f"{METRIC}: expected {name} as a (N, 3, H, W) tensor, got {type(frames).__name__}")
    shape = tuple(frames.shape)
    if frames.ndim != 4 or shape[1] != 3 or 0 in shape:
        raise MetricError(f"{METRIC}: expected {name} (N, 3, H, W) with N, H, W > 0, got shape {shape}")
    if not frames.is_floating_point():
        raise MetricError(f"{METRIC}: expected float {name} in [0, 1], got dtype {frames.dtype} (divide uint8 by 255)")
    frames = frames.detach().float()
    if not torch.isfinite(frames).all():
        raise MetricError(f"{METRIC}: {name} of shape {shape} contain NaN or inf")
    lo, hi = frames.min().item(), frames.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise MetricError(f"{METRIC}: expected {name} in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (shape {shape})")
    return frames.clamp(0, 1)


def _prompts(prompts) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts) if prompts is not None else []
    if not items:
        raise MetricError(f"{METRIC}: expected a prompt or a non-empty list of prompts, got {prompts!r}")
    for p in items:
        if not isinstance(p, str) or not p.strip():
            raise MetricError(f"{METRIC}: every prompt must be a non-empty string, got {p!r}")
    return items


class ClipScorer:
    """CLIP score (text-frame) and CLIP frame consistency (frame-frame) of videos in [0, 1].

    Args:
        model: open_clip model name; the default is OpenAI's ViT-B/32 with its QuickGELU.
        pretrained: open_clip weight tag, a local checkpoint file, or None for random init (tests).
        device: "auto", "cpu", "cuda[:N]".
        batch_size: frames per encoder call.
        seed: seed of the random init; used only when `pretrained is None`.
        cache_dir: Hugging Face cache folder to look in / download to (default: HF's own).
        progress: tqdm bar over batches of frames.
    """

    def __init__(self, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED,
                 device: str = "auto", batch_size: int = 32, seed: int = 0, cache_dir: str | None = None,
                 progress: bool = False):
        check_number(f"{METRIC}: batch_size", batch_size, low=1, integer=True, fix="frames per image-encoder call")
        self.model_name, self.pretrained, self.batch_size, self.progress = model, pretrained, batch_size, progress
        self.device = resolve_device(device)
        self.model, self.preprocess, self.tokenizer = load_clip(model, pretrained, self.device, seed, cache_dir)

    @property
    def quick_gelu(self) -> bool:
        """Whether the built transformer blocks use QuickGELU (x * sigmoid(1.702 x))."""
        from open_clip.transformer import QuickGELU

        return any(isinstance(m, QuickGELU) for m in self.model.modules())

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's eval transform on a float batch; clamp after resizing as PIL's uint8 does."""
        for t in self.preprocess.transforms:
            x = t(x)
            if "Resize" in type(t).__name__:
                x = x.clamp(0, 1)
        return x

    @torch.no_grad()
    def image_features(self, frames) -> torch.Tensor:
        """(N, D) float32 raw (unnormalised) image embeddings on the CPU."""
        x, out = _as_frames(frames), []
        for i in tqdm(range(0, len(x), self.batch_size), desc="CLIP images", disable=not self.progress):
            batch = self._transform(x[i:i + self.batch_size].to(self.device))
            out.append(self.model.encode_image(batch).float().cpu())
        return torch.cat(out)

    def image_embeddings(self, frames) -> torch.Tensor:
        """(N, D) float64 L2-normalised image embeddings."""
        return torch.nn.functional.normalize(self.image_features(frames).double(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(P, D) float64 L2-normalised text embeddings; warns when a prompt is truncated."""
        items = _prompts(prompts)
        context = getattr(self.tokenizer, "context_length", 77)
        if hasattr(self.tokenizer, "encode"):
            for p in items:
                if len(self.tokenizer.encode(p)) + 2 > context:
                    warnings.warn(f"{METRIC}: prompt {p[:40]!r}... is longer than CLIP's {context} tokens "
                                  "and is truncated", stacklevel=2)
        tokens = self.tokenizer(items).to(self.device)
        raw = self.model.encode_text(tokens).float().cpu()
        return torch.nn.functional.normalize(raw.double(), dim=-1)

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """(D,) float64 L2-normalised text embedding of one prompt."""
        if not isinstance(prompt, str):
            raise MetricError(f"{METRIC}: text_embedding takes one prompt string, got {type(prompt).__name__}")
        return self.text_embeddings(prompt)[0]

    def score(self, frames, prompt: str) -> dict:
        """{"clip_score": mean cosine, "per_frame": [cos per frame], "frame_consistency": mean cosine
        of consecutive frames (None for a single frame), "consistency_per_pair": [N - 1 cosines]}."""
        frames = _as_frames(frames)  # validate before any encoding
        text = self.text_embedding(prompt)
        images = self.image_embeddings(frames)
        per_frame = images @ text
        pairs = (images[:-1] * images[1:]).sum(-1)
        return {"clip_score": float(per_frame.mean()), "per_frame": per_frame.tolist(),
                "frame_consistency": float(pairs.mean()) if len(pairs) else None,
                "consistency_per_pair": pairs.tolist()}


def clip_score(frames, prompt: str, **scorer_kwargs) -> dict:
    """`ClipScorer(**scorer_kwargs).score(frames, prompt)`; the model is cached in-process."""
    return ClipScorer(**scorer_kwargs).score(frames, prompt)

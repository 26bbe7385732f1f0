"""Stable Diffusion 1.5 components: tiny random, full-size random, or real weights.

Every builder returns a `DiffusionModel` holding the stock diffusers/transformers modules
(`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel`, `CLIPTokenizer`) and the DDIM
scheduler configured as the paper runs it (spec/STEM.md section 1). Nothing here downloads
anything unless `load_pretrained` is pointed at a Hub id.

- `build_tiny`: SD-1.5 block topology (3 CrossAttnDown + 1 Down, 1 Up + 3 CrossAttnUp,
  2 layers per block) with tiny widths, randomly initialised from a seed: for tests and the
  CPU demo.
- `build_sd15_arch`: the full SD 1.5 architecture with random weights: for timing and
  memory benchmarks without weights.
- `load_pretrained`: real weights (safetensors only) from the Hub or a local folder laid out
  like `stable-diffusion-v1-5/stable-diffusion-v1-5` (unet/ vae/ text_encoder/ tokenizer/
  scheduler/). `save_pretrained` writes that layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stem.core.errors import PICKLE_RISK, StemError
from stem.diffusion.device import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TEXT_MAX_LENGTH = 77  # CLIP text encoder positions (SD 1.5)

# DDIM as used by the paper (spec/STEM.md section 1): SD 1.5's noise schedule, 50 steps,
# "leading" spacing with steps_offset=1 (timesteps 1, 21, ..., 981), no clipping, and the
# final alpha equal to alphas_cumprod[0] (set_alpha_to_one=False).
DDIM_SETTINGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


# Config entries that describe how weights were saved, not what they compute ("_" keys, such
# as diffusers' `_use_default_values`, are skipped too; that one even varies per process).
_SERIALISATION_KEYS = {"architectures", "dtype", "torch_dtype", "transformers_version"}


@dataclass
class DiffusionModel:
    """The components one run needs, on one device and dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    name: str
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def fingerprint(self) -> str:
        """Content hash of the weights (configs plus a sample of every tensor), for cache keys.

        Sampling the first and last 256 values of each parameter tells apart any two
        checkpoints met in practice (fine-tunes change every tensor) without hashing GiBs.
        Computed once: it describes the weights as loaded, not later in-place changes.
        """
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.unet, self.vae, self.text_encoder)
        return self._fingerprint


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """Content hash (16 hex digits) of modules' configs plus a sample of every tensor, for cache keys: the
    code of `DiffusionModel.fingerprint`, for any diffusers or transformers module with a `config` (a
    ControlNet, a depth estimator). Computed on each call (it reads every parameter once)."""
    h = hashlib.sha256()
    for module in modules:
        config = {k: v for k, v in dict(module.config.to_dict() if hasattr(module.config, "to_dict")
                                        else module.config).items()
                  if not k.startswith("_") and k not in _SERIALISATION_KEYS}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, p in module.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:256], flat[-256:]]).float().cpu()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    """A DDIMScheduler with the paper's settings over an optional base config (e.g. SD's)."""
    base = dict(config or {})
    base.update(DDIM_SETTINGS)
    return DDIMScheduler.from_config(base)


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character).

    Real CLIP BPE files cannot be downloaded here; this tokenizer has the same special
    tokens, lower-casing, 77-token limit and save/load format, so every code path that
    handles prompts (padding, truncation, the length check) is exercised.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable + [256 + i for i in range(256 - len(printable))]  # GPT-2 byte-to-unicode map
    chars = [chr(c) for c in codes]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_MAX_LENGTH)


TINY_UNET = dict(widths=(32, 32, 64, 64), heads=2, cross_dim=32, groups=8, sample_size=32)
TINY_VAE = dict(widths=(16, 16, 32, 32), groups=8, layers=1, sample_size=256)
SD15_UNET = dict(widths=(320, 640, 1280, 1280), heads=8, cross_dim=768, groups=32, sample_size=64)
SD15_VAE = dict(widths=(128, 256, 512, 512), groups=32, layers=2, sample_size=512)


def _sd15_unet_config(widths, heads, cross_dim, groups, sample_size) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads in SD 1.5
        cross_attention_dim=cross_dim,
        norm_num_groups=groups,
    )


# SD 2 depth's UNet (stem.diffusion.baseline_models) differs from SD 1.5's in three ways that its tiny variant mirrors:
# a depth input channel (4 latent channels + 1 depth), a constant head width (SD 2: 64 channels per head, so
# 5/10/20/20 heads; tiny: 16 channels, so 2/2/4/4 heads) and linear projections in and out of its transformer blocks.
# Its 1024-d OpenCLIP ViT-H text encoder is kept at the tiny 32-d CLIP encoder (`build_tiny`'s).
SD2_DEPTH_HUB_ID = "stabilityai/stable-diffusion-2-depth"
TINY_DEPTH_UNET = dict(in_channels=5, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True)


# SD 2 depth's UNet at full size (stabilityai/stable-diffusion-2-depth unet/config.json): SD's widths, 64-channel
# heads (5, 10, 20, 20 heads), 1024-d cross-attention, linear projections, 5 input channels.
SD2_DEPTH_UNET = dict(widths=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), cross_dim=1024, groups=32, sample_size=64)


def sd2_depth_unet_config() -> dict:
    """The UNet config of `baseline_models.build_sd2_depth_arch` (SD 2 depth's)."""
    return {**_sd15_unet_config(**SD2_DEPTH_UNET), "in_channels": 5, "use_linear_projection": True}


def tiny_depth_unet_config() -> dict:
    """The UNet config of `baseline_models.build_tiny_depth_model` (here so that `architecture` reads it)."""
    return {**_sd15_unet_config(**TINY_UNET), **TINY_DEPTH_UNET}


def _sd15_vae_config(widths, groups, layers, sample_size) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


@contextmanager
def seeded(seed: int, device: torch.device):
    """Build modules on `device` from the random state `seed`, leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            yield


def _build_random(name: str, unet_cfg: dict, vae_cfg: dict, text_cfg: CLIPTextConfig,
                  seed: int, device: str, dtype: str) -> DiffusionModel:
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    with seeded(seed, device_t):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(text_cfg)
    if dtype_t != torch.float32:
        unet, vae, text_encoder = (m.to(dtype=dtype_t) for m in (unet, vae, text_encoder))
    model = DiffusionModel(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_tokenizer(),
        scheduler=ddim_scheduler(),
        name=f"{name}-seed{seed}",
    )
    log.info("built %s (random weights, seed %d) on %s/%s", name, seed, device_t, dtype_t)
    return model


def build_tiny(seed: int = 0, device: str = "auto", dtype: str = "auto", out_gain: float = 0.1) -> DiffusionModel:
    """SD-1.5-shaped components with tiny widths, randomly initialised from `seed`.

    Two calibrations make the random model behave like a trained one where inversion
    depends on it (the numbers still show mechanics, not quality):
    - the VAE's scaling factor is set to 1 / std of its latents of a real photo, as SD's
      0.18215 was chosen, so latents have unit variance;
    - the UNet's output convolution is scaled by `out_gain`: a trained noise predictor
      varies slowly along the DDIM path, a default-initialised one does not, and its reverse
      ODE then diverges (inversion + reconstruction of the demo video: mean |error| 0.5 of
      unit-variance latents at gain 1, 0.015 at 0.1).
    """
    tok_size = len(tiny_tokenizer())
    model = _build_random(
        "tiny",
        _sd15_unet_config(**TINY_UNET), _sd15_vae_config(**TINY_VAE),
        CLIPTextConfig(vocab_size=tok_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=TEXT_MAX_LENGTH,
                       bos_token_id=tok_size - 2, eos_token_id=tok_size - 1, pad_token_id=tok_size - 1),
        seed, device, dtype,
    )
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(out_gain)
        model.unet.conv_out.bias.mul_(out_gain)
    model.vae.register_to_config(scaling_factor=_latent_scaling_factor(model.vae))
    return model


def _latent_scaling_factor(vae: AutoencoderKL) -> float:
    """1 / std of the VAE posterior mean on a real photo (skimage's astronaut, 128^2)."""
    from skimage.data import astronaut

    image = torch.from_numpy(astronaut()[::4, ::4].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latents = vae.encode((image * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
    return float(1 / latents.float().std())


def build_sd15_arch(seed: int = 0, device: str = "auto", dtype: str = "auto") -> DiffusionModel:
    """The full SD 1.5 architecture (UNet 320/640/1280/1280, 8 heads; VAE 128/256/512/512;
    CLIP ViT-L/14 text encoder) with random weights: real shapes and cost, no download."""
    tok_size = len(tiny_tokenizer())
    return _build_random(
        "sd15_arch",
        _sd15_unet_config(**SD15_UNET), _sd15_vae_config(**SD15_VAE),
        CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="quick_gelu",
                       projection_dim=768, bos_token_id=tok_size - 2, eos_token_id=tok_size - 1,
                       pad_token_id=tok_size - 1),
        seed, device, dtype,
    )


def architecture(target: str, settings: dict) -> dict | None:
    """What the model preset `target(**settings)` will build, read without loading any weights, for checks
    before model work: {"unet": its UNet config, "vae_scale": pixels per latent, "num_train_timesteps": the
    scheduler's}. From the code for `build_tiny`/`build_sd15_arch` (and `baseline_models.build_tiny_depth_model`);
    from unet/config.json and vae/config.json for `load_pretrained` (and `baseline_models.load_depth_model`; a
    local folder, else the Hugging Face cache). None when not known without loading (another target, or configs
    not on this machine): the checks then run after loading, as before."""
    name = target.removeprefix("stem.diffusion.models.")
    if name == "stem.diffusion.baseline_models.load_depth_model":  # the depth-conditioned model Pix2Video runs on
        name, settings = "load_pretrained", {"path": SD2_DEPTH_HUB_ID, **settings}
    if name in ("build_tiny", "build_sd15_arch"):
        unet, vae = (TINY_UNET, TINY_VAE) if name == "build_tiny" else (SD15_UNET, SD15_VAE)
        configs = {"unet": _sd15_unet_config(**unet), "vae": _sd15_vae_config(**vae)}
    elif name == "stem.diffusion.baseline_models.build_tiny_depth_model":
        configs = {"unet": tiny_depth_unet_config(), "vae": _sd15_vae_config(**TINY_VAE)}
    elif name == "stem.diffusion.baseline_models.build_sd2_depth_arch":
        configs = {"unet": sd2_depth_unet_config(), "vae": _sd15_vae_config(**SD15_VAE)}
    elif name == "load_pretrained":
        configs = {sub: _pretrained_config(settings.get("path", SD15_HUB_ID), sub, settings.get("revision"))
                   for sub in ("unet", "vae")}
        if any(c is None or not {"block_out_channels", "down_block_types"} <= set(c) for c in configs.values()):
            return None  # not an SD-style folder: load_pretrained reports it
    else:
        return None
    return {"unet": configs["unet"], "vae_scale": 2 ** (len(configs["vae"]["block_out_channels"]) - 1),
            "num_train_timesteps": DDIM_SETTINGS["num_train_timesteps"]}  # ddim_scheduler() sets it for all


def _pretrained_config(path: str, sub: str, revision: str | None) -> dict | None:
    """`sub`/config.json of a local folder or of a Hub id already in the local cache (no download)."""
    local = Path(path).expanduser() / sub / "config.json"
    if not local.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(path, f"{sub}/config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a valid repo id, no cache: unknown before loading
            return None
        if not isinstance(found, str):
            return None
        local = Path(found)
    try:
        config = json.loads(local.read_text())
    except (OSError, ValueError):
        return None  # load_pretrained reports an unreadable folder with its fix
    return config if isinstance(config, dict) else None


def load_pretrained(path: str = SD15_HUB_ID, revision: str | None = None, device: str = "auto",
                    dtype: str = "auto", local_files_only: bool = False) -> DiffusionModel:
    """Load SD 1.5 weights (safetensors only) from a Hub id or a local folder.

    The folder layout is diffusers' (unet/, vae/, text_encoder/, tokenizer/, scheduler/),
    as written by `save_pretrained` or `StableDiffusionPipeline.save_pretrained`. The
    scheduler folder only contributes the noise schedule; the DDIM settings are the paper's.
    """
    return _load_diffusion_model(path, revision, device, dtype, local_files_only, hub_id=SD15_HUB_ID,
                                 setting="model.path")


def _load_diffusion_model(path: str, revision: str | None, device: str, dtype: str, local_files_only: bool,
                          hub_id: str, setting: str, pipeline: str = "StableDiffusionPipeline") -> DiffusionModel:
    """`load_pretrained`'s loading, for any Stable Diffusion pipeline folder; errors name `hub_id` (the
    download), `setting` (the config key of the path) and `pipeline` (diffusers' class of that folder)."""
    device_t = resolve_device(device)
    dtype_t = resolve_dtype(dtype, device_t)
    local = Path(path).expanduser()
    source = str(local) if local.exists() else path
    if local.is_absolute() and not local.exists():
        raise StemError(f"model folder {path} does not exist; set {setting} to a folder with "
                        "unet/ vae/ text_encoder/ tokenizer/ scheduler/ (safetensors weights)")
    if local.is_dir():
        _refuse_pickled_only(local, setting, pipeline)
    common = dict(revision=revision, local_files_only=local_files_only)
    weights = dict(common, use_safetensors=True, torch_dtype=dtype_t)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", **common)
    except (OSError, ValueError, EnvironmentError) as e:
        raise StemError(f"could not load Stable Diffusion weights from '{path}' ({first_line(e)}); download them "
                        f"once on a machine with internet (hf download {hub_id} --local-dir /that/folder) and "
                        f"set {setting}=/that/folder") from e
    model = DiffusionModel(
        unet=unet.to(device_t).eval(),
        vae=vae.to(device_t).eval(),
        text_encoder=text_encoder.to(device_t).eval(),
        tokenizer=tokenizer,
        scheduler=ddim_scheduler(scheduler_config),
        name=Path(path).name or path,
    )
    log.info("loaded %s on %s/%s", path, device_t, dtype_t)
    return model


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when empty), for one-line errors."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _refuse_pickled_only(folder: Path, setting: str = "model.path", pipeline: str = "StableDiffusionPipeline") -> None:
    """StemError, with the conversion command, for a component folder with pickled weights and no safetensors
    (they are never unpickled here). The command loads safetensors where a component has them and the pickles
    elsewhere (diffusers' default), then writes safetensors only."""
    for sub in ("unet", "vae", "text_encoder"):
        files = [p for p in (folder / sub).glob("*") if p.is_file()]
        pickled = [p.name for p in files if p.suffix in PICKLED_SUFFIXES]
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            out = f"{folder}_safetensors"
            raise StemError(
                f"{folder / sub} has only pickled weights ({', '.join(sorted(pickled))}), which are refused; convert "
                f"the folder to safetensors once, {PICKLE_RISK}: python -c \"from diffusers import "
                f"{pipeline} as P; P.from_pretrained('{folder}', safety_checker=None)"
                f".save_pretrained('{out}', safe_serialization=True)\" and set {setting}={out}")


def save_pretrained(model: DiffusionModel, path: str | Path) -> None:
    """Write `model` in diffusers' pipeline layout (safetensors), loadable by `load_pretrained`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)


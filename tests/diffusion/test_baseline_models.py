"""Weights of the Table 2 baselines (stem.diffusion.baseline_models): the tiny SD 2 depth model, ControlNet and DPT
estimator, their loaders (round trips, safetensors only), fingerprints, pre-model architecture and the presets."""

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file
from transformers import DPTForDepthEstimation

from stem.core.errors import StemError
from stem.diffusion.baseline_models import (
    build_tiny_controlnet,
    build_tiny_depth_estimator,
    build_tiny_depth_model,
    load_controlnet,
    load_depth_estimator,
    load_depth_model,
    module_fingerprint,
)
from stem.diffusion.models import architecture, build_tiny, save_pretrained

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a woman is running on the beach"


@pytest.fixture(scope="module")
def depth_model():
    return build_tiny_depth_model(seed=0, device="cpu")


@pytest.fixture(scope="module")
def controlnet():
    return build_tiny_controlnet(seed=0, device="cpu")


@pytest.fixture(scope="module")
def estimator():
    return build_tiny_depth_estimator(seed=0, device="cpu")


def _cond(model) -> torch.Tensor:
    ids = model.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids)[0]


def _noise(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _one_line_refusal(call, *needles) -> str:
    with pytest.raises(StemError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _pickle_only(folder: Path, name: str) -> None:
    """Replace folder/name.safetensors by a pickled .bin of the same tensors (as an old checkpoint ships)."""
    st = folder / f"{name}.safetensors"
    torch.save(load_file(st), folder / f"{name}.bin")
    st.unlink()


# --- SD 2 depth -------------------------------------------------------------------------------------------------


def test_tiny_depth_model_is_build_tiny_with_a_5_channel_sd2_style_unet(depth_model, tiny_model):
    """Catches: a 4-channel UNet (no depth input), a VAE/text encoder that are not build_tiny's (another seed, the
    VAE's latent scale left uncalibrated), SD 2's head layout or linear projections not mirrored."""
    config = depth_model.unet.config
    assert config.in_channels == 5 and config.out_channels == 4
    assert tuple(config.attention_head_dim) == (2, 2, 4, 4) and config.use_linear_projection is True
    assert tuple(config.block_out_channels) == tuple(tiny_model.unet.config.block_out_channels)
    for name in ("vae", "text_encoder"):
        _assert_same_state(getattr(depth_model, name), getattr(tiny_model, name))
    assert depth_model.vae.config.scaling_factor == tiny_model.vae.config.scaling_factor != 0.18215
    assert depth_model.tokenizer(PROMPT).input_ids == tiny_model.tokenizer(PROMPT).input_ids
    assert not any(m.training for m in (depth_model.unet, depth_model.vae, depth_model.text_encoder))
    assert depth_model.unet.dtype == torch.float32 and depth_model.device.type == "cpu"
    # The 5th input channel reaches the output: latents + depth in, noise (4 channels) out, and the depth matters.
    latents, cond = _noise(1, 4, 8, 8), _cond(depth_model)
    with torch.no_grad():
        out = [depth_model.unet(torch.cat([latents, torch.full((1, 1, 8, 8), d)], 1), 500,
                                encoder_hidden_states=cond).sample for d in (-1.0, 1.0)]
    assert out[0].shape == (1, 4, 8, 8)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_tiny_depth_model_is_deterministic_per_seed_and_calibrated(depth_model):
    """Catches: weights from the global random state (another call, another model) or the output gain not
    applied to the depth UNet (its reverse ODE then diverges, build_tiny's docstring)."""
    again, other = build_tiny_depth_model(seed=0, device="cpu"), build_tiny_depth_model(seed=1, device="cpu")
    _assert_same_state(again.unet, depth_model.unet)
    assert not torch.equal(other.unet.conv_in.weight, depth_model.unet.conv_in.weight)
    ungained = build_tiny_depth_model(seed=0, device="cpu", out_gain=1.0)
    torch.testing.assert_close(depth_model.unet.conv_out.weight, 0.1 * ungained.unet.conv_out.weight,
                               rtol=1e-6, atol=0)


def test_depth_model_round_trips_through_load_depth_model(depth_model, tmp_path):
    """Catches: a loader that drops the depth channel, reads another component, or changes the fingerprint."""
    save_pretrained(depth_model, tmp_path / "sd2_depth")
    loaded = load_depth_model(str(tmp_path / "sd2_depth"), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(loaded, name), getattr(depth_model, name))
    assert loaded.unet.config.in_channels == 5 and not loaded.unet.training
    assert loaded.fingerprint == depth_model.fingerprint
    assert loaded.scheduler.config.steps_offset == 1 and loaded.scheduler.config.timestep_spacing == "leading"
    x = torch.cat([_noise(1, 4, 8, 8), _noise(1, 1, 8, 8, seed=1)], 1)
    with torch.no_grad():
        a = depth_model.unet(x, 500, encoder_hidden_states=_cond(depth_model)).sample
        b = loaded.unet(x, 500, encoder_hidden_states=_cond(loaded)).sample
    # Same weights; safetensors-loaded tensors may take another BLAS kernel (test_models: 5e-8 on ~0.05 outputs).
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_depth_model_refuses_a_4_channel_unet_and_pickles(depth_model, tmp_path):
    """Catches: SD 1.5 weights accepted as the depth model (the depth channel would be silently dropped or fail
    deep inside the UNet), and pickled weights unpickled instead of refused with the conversion command."""
    save_pretrained(build_tiny(seed=0, device="cpu"), tmp_path / "sd15")
    _one_line_refusal(lambda: load_depth_model(str(tmp_path / "sd15"), device="cpu"),
                      "5", "baseline_models.sd2_depth.path", "stabilityai/stable-diffusion-2-depth")
    save_pretrained(depth_model, tmp_path / "pickled")
    _pickle_only(tmp_path / "pickled" / "unet", "diffusion_pytorch_model")
    _one_line_refusal(lambda: load_depth_model(str(tmp_path / "pickled"), device="cpu"),
                      "only pickled weights", "StableDiffusionDepth2ImgPipeline",
                      f"baseline_models.sd2_depth.path={tmp_path / 'pickled'}_safetensors")


# --- ControlNet -------------------------------------------------------------------------------------------------


def _unet_down_shapes(unet, latents, cond) -> tuple[list, tuple]:
    """Shapes of the skip connections the UNet's up path reads (conv_in, then each down block's outputs) and of
    the mid block's output: where ControlNet residuals are added."""
    skips, mid = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o.shape)),
             unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape))]
    hooks += [block.register_forward_hook(lambda m, i, o: skips.extend(r.shape for r in o[1]))
              for block in unet.down_blocks]
    try:
        with torch.no_grad():
            unet(latents, 500, encoder_hidden_states=cond)
    finally:
        for h in hooks:
            h.remove()
    return skips, mid[0]


def test_tiny_controlnet_residuals_fit_the_tiny_unet(controlnet, tiny_model):
    """Catches: a conditioning embedding that does not bring the pixel image to the latent size (a shape error or
    misaligned residuals), residuals that do not match the UNet's skip connections, zero convolutions left at zero
    (the random ControlNet would add nothing), an encoder not copied from the tiny UNet (from_unet)."""
    latents, cond = _noise(2, 4, 8, 8), _cond(tiny_model).expand(2, -1, -1)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # pixels: 8 x the latent size
    with torch.no_grad():
        down, mid = controlnet(latents, 500, encoder_hidden_states=cond, controlnet_cond=image, return_dict=False)
    skips, mid_shape = _unet_down_shapes(tiny_model.unet, latents, cond)
    assert [r.shape for r in down] == skips and len(skips) == 12
    assert mid.shape == mid_shape
    assert all(r.abs().max() > 0 for r in (*down, mid))
    with torch.no_grad():
        plain = tiny_model.unet(latents, 500, encoder_hidden_states=cond).sample
        guided = tiny_model.unet(latents, 500, encoder_hidden_states=cond, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
    assert (guided - plain).abs().max() > 1e-4
    # The conditioning image acts: another depth image, other residuals.
    with torch.no_grad():
        other, _ = controlnet(latents, 500, encoder_hidden_states=cond, controlnet_cond=1 - image, return_dict=False)
    assert (other[0] - down[0]).abs().max() > 1e-4
    _assert_same_state(controlnet.conv_in, tiny_model.unet.conv_in)
    _assert_same_state(controlnet.down_blocks, tiny_model.unet.down_blocks)
    assert not controlnet.training and controlnet.dtype == torch.float32


def test_controlnet_round_trips_and_pickles_are_refused(controlnet, tmp_path):
    """Catches: load_controlnet reading .bin weights or loading another folder; a fingerprint that differs for the
    same weights once saved (a cache miss on every run)."""
    folder = tmp_path / "controlnet"
    controlnet.save_pretrained(folder, safe_serialization=True)
    loaded = load_controlnet(str(folder), device="cpu")
    assert isinstance(loaded, ControlNetModel) and not loaded.training
    _assert_same_state(loaded, controlnet)
    assert module_fingerprint(loaded) == module_fingerprint(controlnet)
    assert load_controlnet(str(folder), device="cpu", dtype="bf16").dtype == torch.bfloat16
    _pickle_only(folder, "diffusion_pytorch_model")
    _one_line_refusal(lambda: load_controlnet(str(folder), device="cpu"), "only pickled weights",
                      "ControlNetModel", f"baseline_models.controlnet_depth.path={folder}_safetensors")
    _one_line_refusal(lambda: load_controlnet(str(tmp_path / "absent"), device="cpu"), str(tmp_path / "absent"))


# --- depth estimator --------------------------------------------------------------------------------------------


def test_tiny_depth_estimator_round_trips_from_a_folder_or_a_subfolder(estimator, tmp_path):
    """Catches: a loader that ignores `subfolder` (SD 2 depth's depth_estimator/), unpickles .bin weights, or
    returns the model in training mode (dropout active: depth maps differ per call)."""
    pixels = _noise(1, 3, 384, 384)
    with torch.no_grad():
        depth = estimator(pixel_values=pixels).predicted_depth
    assert depth.shape == (1, 384, 384) and depth.abs().max() > 0
    estimator.save_pretrained(tmp_path / "sd2" / "depth_estimator")
    for loaded in (load_depth_estimator(str(tmp_path / "sd2" / "depth_estimator"), device="cpu"),
                   load_depth_estimator(str(tmp_path / "sd2"), subfolder="depth_estimator", device="cpu")):
        assert isinstance(loaded, DPTForDepthEstimation) and not loaded.training
        _assert_same_state(loaded, estimator)
        assert module_fingerprint(loaded) == module_fingerprint(estimator)
        with torch.no_grad():
            torch.testing.assert_close(loaded(pixel_values=pixels).predicted_depth, depth, rtol=1e-5, atol=1e-6)
    folder = tmp_path / "sd2" / "depth_estimator"
    assert load_depth_estimator(str(folder), device="cpu", dtype="bf16").dtype == torch.bfloat16
    _pickle_only(folder, "model")
    _one_line_refusal(lambda: load_depth_estimator(str(folder), device="cpu"), "only pickled weights",
                      "DPTForDepthEstimation", f"baseline_models.depth_estimator.path={folder}_safetensors")


def test_builders_honour_dtype_and_seed(controlnet, estimator):
    """Catches: dtype ignored (an fp16/bf16 run would hold fp32 weights) and weights not drawn from the seed."""
    assert build_tiny_controlnet(seed=0, device="cpu", dtype="bf16").dtype == torch.bfloat16
    assert build_tiny_depth_estimator(seed=0, device="cpu", dtype="bf16").dtype == torch.bfloat16
    _assert_same_state(build_tiny_controlnet(seed=0, device="cpu"), controlnet)
    assert module_fingerprint(build_tiny_controlnet(seed=1, device="cpu")) != module_fingerprint(controlnet)
    assert module_fingerprint(build_tiny_depth_estimator(seed=1, device="cpu")) != module_fingerprint(estimator)


# --- fingerprints -----------------------------------------------------------------------------------------------


def _reference_fingerprint(*modules) -> str:
    """The fingerprint written out: SHA-256 over each module's config (without "_" keys and serialisation keys) as
    sorted JSON, then each tensor's name and its first and last 256 values as float32 bytes; 16 hex digits."""
    h = hashlib.sha256()
    for module in modules:
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        config = {k: v for k, v in config.items()
                  if not k.startswith("_") and k not in {"architectures", "dtype", "torch_dtype",
                                                        "transformers_version"}}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in module.state_dict().items():
            flat = tensor.reshape(-1)
            h.update(name.encode())
            h.update(torch.cat([flat[:256], flat[-256:]]).float().numpy().tobytes())
    return h.hexdigest()[:16]


def test_module_fingerprint_is_the_model_fingerprint_and_sees_one_weight(depth_model, controlnet, estimator):
    """Catches: the shared code changing DiffusionModel.fingerprint (every existing inversion cache entry would
    miss), and a fingerprint blind to a weight (a changed estimator reusing stale depth maps)."""
    assert depth_model.fingerprint == _reference_fingerprint(depth_model.unet, depth_model.vae,
                                                             depth_model.text_encoder)
    assert module_fingerprint(controlnet) == _reference_fingerprint(controlnet)
    assert module_fingerprint(estimator) == _reference_fingerprint(estimator)
    changed = build_tiny_depth_estimator(seed=0, device="cpu")
    with torch.no_grad():
        changed.head.head[-2].bias.add_(1e-3)  # the last convolution of the depth head
    assert module_fingerprint(changed) != module_fingerprint(estimator)


# --- pre-model checks and the presets ---------------------------------------------------------------------------


def test_architecture_knows_the_depth_models_before_loading(depth_model, tmp_path):
    """Catches: a job whose base model is the depth model skipping its pre-model checks (DDIM steps, memory, K),
    or checking them against SD 1.5's 4-channel config."""
    built = architecture("stem.diffusion.baseline_models.build_tiny_depth_model", {"seed": 0})
    assert built["vae_scale"] == 8 and built["num_train_timesteps"] == 1000
    for key in ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                "use_linear_projection"):
        expected = depth_model.unet.config[key]
        assert (tuple(built["unet"][key]) if isinstance(expected, (list, tuple)) else built["unet"][key]) == \
            (tuple(expected) if isinstance(expected, (list, tuple)) else expected), key
    save_pretrained(depth_model, tmp_path / "sd2_depth")
    loaded = architecture("stem.diffusion.baseline_models.load_depth_model", {"path": str(tmp_path / "sd2_depth")})
    assert loaded["unet"]["in_channels"] == 5 and loaded["vae_scale"] == 8
    assert architecture("stem.diffusion.baseline_models.build_tiny_controlnet", {}) is None


def _baseline_nodes(preset: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={preset}", "device=cpu"])
    return cfg.baseline_models


def test_tiny_preset_builds_every_baseline_model():
    """Catches: a preset entry naming a missing builder or passing settings it does not take."""
    from hydra.utils import instantiate

    nodes = _baseline_nodes("tiny")
    assert set(nodes) == {"sd2_depth", "controlnet_depth", "depth_estimator"}
    built = {name: instantiate(node) for name, node in nodes.items()}
    assert built["sd2_depth"].unet.config.in_channels == 5
    assert isinstance(built["controlnet_depth"], ControlNetModel)
    assert isinstance(built["depth_estimator"], DPTForDepthEstimation)


def test_sd15_preset_entries_resolve_to_the_loaders():
    """Catches: a real-weights entry whose target does not import, or whose keys are not the loader's arguments
    (the job would fail only after the SD 1.5 weights loaded)."""
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    nodes = OmegaConf.to_container(_baseline_nodes("sd15"), resolve=True)
    expected = {"sd2_depth": (load_depth_model, "stabilityai/stable-diffusion-2-depth"),
                "controlnet_depth": (load_controlnet, "lllyasviel/sd-controlnet-depth"),
                "depth_estimator": (load_depth_estimator, "Intel/dpt-hybrid-midas")}
    assert set(nodes) == set(expected)
    for name, node in nodes.items():
        target = get_method(node.pop("_target_"))
        assert target is expected[name][0]
        assert node["path"] == expected[name][1]
        parameters = inspect.signature(target).parameters
        assert set(node) <= set(parameters), (name, set(node) - set(parameters))
        required = {p for p, v in parameters.items() if v.default is inspect.Parameter.empty}
        assert required <= set(node)


def test_sd15_arch_preset_builds_full_size_baseline_archs_on_meta_device():
    """Catches: model=sd15_arch without the baselines' weights (Table 2 timing on GPU would stop at a ConfigError),
    SD 2 depth's UNet built in SD 1.5's layout (8 heads, 768-d cross-attention, 4 channels), a ControlNet whose
    residuals do not fit SD's UNet at 512x512, a depth estimator that is not DPT-hybrid's 384x384 ViT."""
    from hydra.utils import instantiate

    nodes = _baseline_nodes("sd15_arch")
    built = {name: instantiate(node, device="meta") for name, node in nodes.items()}
    depth = built["sd2_depth"]
    # SD 2's UNet has 865,910,724 parameters; the depth channel adds 320 x 9 conv_in weights.
    assert sum(p.numel() for p in depth.unet.parameters()) == 865_910_724 + 320 * 9
    assert depth.unet.config.in_channels == 5 and tuple(depth.unet.config.attention_head_dim) == (5, 10, 20, 20)
    assert depth.unet.config.cross_attention_dim == 1024 and depth.unet.config.use_linear_projection is True
    assert depth.text_encoder.config.hidden_size == 1024 and depth.text_encoder.config.num_hidden_layers == 23
    assert architecture("stem.diffusion.baseline_models.build_sd2_depth_arch", {})["unet"]["in_channels"] == 5
    controlnet = built["controlnet_depth"]
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731 - shapes only
    with torch.no_grad():
        down, mid = controlnet(meta(1, 4, 64, 64), 500, encoder_hidden_states=meta(1, 77, 768),
                               controlnet_cond=meta(1, 3, 512, 512), return_dict=False)
    # SD 1.5's skip connections at 64x64 latents: conv_in, then 2 resnets + a downsampler per level (none last).
    # Each level's downsampler output is at the next level's size and still at this level's width.
    widths = (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280)
    sizes = (64,) * 3 + (32,) * 3 + (16,) * 3 + (8,) * 3
    assert [tuple(r.shape) for r in down] == [(1, c, s, s) for c, s in zip(widths, sizes)]
    assert tuple(mid.shape) == (1, 1280, 8, 8)
    estimator = built["depth_estimator"]
    assert estimator.config.is_hybrid and estimator.config.hidden_size == 768
    with torch.no_grad():
        assert estimator(pixel_values=meta(1, 3, 384, 384)).predicted_depth.shape == (1, 384, 384)

"""Model builders and the SD 1.5 loader (stem.diffusion.models): round trips, safetensors only, DDIM settings."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from safetensors.torch import load_file
from skimage.data import astronaut, chelsea

from stem.core.errors import StemError
from stem.diffusion.models import DDIM_SETTINGS, build_sd15_arch, build_tiny, load_pretrained, save_pretrained
from stem.diffusion.vae import encode_frames

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a woman is running on the beach"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A folder with build_tiny(seed=0) saved in it: the weights of the `tiny_model` fixture.

    A model of its own is saved, not the shared fixture: saving adds keys to the modules' configs.
    """
    path = tmp_path_factory.mktemp("sd15_tiny")
    save_pretrained(build_tiny(seed=0, device="cpu"), path)
    return path


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _assert_paper_ddim(scheduler) -> None:
    assert isinstance(scheduler, DDIMScheduler)
    for k, v in DDIM_SETTINGS.items():
        assert scheduler.config[k] == v, k
    # SD 1.5's "scaled_linear" betas, written out: linspace in sqrt(beta), squared.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)
    assert float(scheduler.final_alpha_cumprod) == float(scheduler.alphas_cumprod[0])  # set_alpha_to_one=False
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))


def _unet_out(model) -> torch.Tensor:
    ids = model.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = model.text_encoder(ids)[0]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return model.unet(x, 500, encoder_hidden_states=cond).sample


def _assert_same_model(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(a, name), getattr(b, name))
    assert a.tokenizer(PROMPT).input_ids == b.tokenizer(PROMPT).input_ids
    assert a.tokenizer.model_max_length == b.tokenizer.model_max_length == 77
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor
    out = _unet_out(b)
    assert out.abs().sum() > 0
    # Equal weights; safetensors-loaded tensors are not 64-byte aligned, so CPU BLAS may pick another
    # kernel: measured max difference 5e-8 on outputs of ~0.05 (exactly equal once re-allocated).
    torch.testing.assert_close(_unet_out(a), out, rtol=1e-5, atol=1e-6)


def test_save_then_load_pretrained_round_trips(tiny_model, saved):
    loaded = load_pretrained(str(saved), device="cpu")
    _assert_same_model(tiny_model, loaded)
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    _assert_paper_ddim(loaded.scheduler)


def test_fingerprint_is_the_same_for_the_built_and_the_loaded_weights(tiny_model, saved):
    assert load_pretrained(str(saved), device="cpu").fingerprint == tiny_model.fingerprint


def test_model_sd15_config_instantiates_the_same_loader(tiny_model, saved):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["model=sd15", f"model.path={saved}", "device=cpu"])
    assert cfg.model._target_ == "stem.diffusion.models.load_pretrained"
    loaded = instantiate(cfg.model)
    _assert_same_model(tiny_model, loaded)
    _assert_paper_ddim(loaded.scheduler)


def test_saved_folder_has_safetensors_weights_only(saved):
    files = [p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()]
    for sub in ("unet", "vae", "text_encoder"):
        assert any(f.startswith(f"{sub}/") and f.endswith(".safetensors") for f in files), (sub, files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))], files


def test_bin_only_weights_are_refused_with_one_line_error(saved, tmp_path):
    folder = tmp_path / "bin_weights"
    for sub in saved.iterdir():  # a copy of the saved folder (tiny)
        if sub.is_dir():
            (folder / sub.name).mkdir(parents=True)
            for f in sub.iterdir():
                (folder / sub.name / f.name).write_bytes(f.read_bytes())
        else:
            (folder / sub.name).write_bytes(sub.read_bytes())
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(StemError) as info:
        load_pretrained(str(folder), device="cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(folder) in msg and "safetensors" in msg


def test_missing_absolute_folder_raises_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(StemError, match=str(missing)) as info:
        load_pretrained(str(missing), device="cpu")
    assert "\n" not in str(info.value)


def test_non_ddim_scheduler_config_still_gives_paper_ddim(saved, tmp_path):
    folder = tmp_path / "pndm"
    folder.mkdir()  # only the scheduler differs: link the rest
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        os.symlink(saved / sub, folder / sub)
    (folder / "model_index.json").write_bytes((saved / "model_index.json").read_bytes())
    # SD 1.5's released scheduler is PNDM; give it settings that differ from the paper's DDIM.
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=0, set_alpha_to_one=True).save_pretrained(folder / "scheduler")
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "PNDMScheduler" and written["steps_offset"] == 0
    loaded = load_pretrained(str(folder), device="cpu")
    _assert_paper_ddim(loaded.scheduler)


def test_build_tiny_is_deterministic_per_seed(tiny_model):
    again = build_tiny(seed=0, device="cpu")
    _assert_same_model(tiny_model, again)
    assert again.fingerprint == tiny_model.fingerprint
    other = build_tiny(seed=1, device="cpu")
    assert other.fingerprint != tiny_model.fingerprint
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_model, name).state_dict(), getattr(other, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), name


def test_fingerprint_changes_when_one_weight_changes(tiny_model):
    model = build_tiny(seed=0, device="cpu")  # not the shared fixture: this one gets modified
    with torch.no_grad():
        p = model.unet.conv_in.weight
        p.view(-1)[0] += 1e-3
    assert model.fingerprint != tiny_model.fingerprint
    assert len(model.fingerprint) == 16 and int(model.fingerprint, 16) >= 0


def test_tiny_vae_latents_have_unit_std(tiny_model):
    def latent_std(image: np.ndarray) -> float:
        h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
        frames = torch.from_numpy(image[:h, :w].copy()).permute(2, 0, 1)[None].float() / 255
        return float(encode_frames(tiny_model, frames).std())

    # The calibration photo (astronaut at 128x128): unit std by construction.
    assert latent_std(astronaut()[::4, ::4]) == pytest.approx(1.0, abs=1e-4)
    # Other sizes and another photo: measured 0.986 (256^2), 0.963 (64^2), 1.048 (chelsea 72x112).
    # SD's 0.18215 instead of the calibrated factor would give ~0.85.
    assert 0.93 < latent_std(astronaut()[::2, ::2]) < 1.07
    assert 0.93 < latent_std(astronaut()[::8, ::8]) < 1.07
    assert 0.93 < latent_std(chelsea()[::4, ::4]) < 1.12


def test_sd15_arch_has_sd15_parameter_counts_on_meta_device():
    model = build_sd15_arch(device="meta")
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert model.unet.device.type == "meta"

"""Bad settings fail before any model work with one line naming the problem (issue 13, item 9 and 11).

Each in-process test runs `run.run_job` with every model builder replaced by one that fails the test if
called, so "refused before the model" is pinned, not just "refused"."""

from __future__ import annotations

import pytest
from conftest import assert_one_error_line, compose_config, run_cli

from stem.core.errors import StemError


# ---- item 9, bullet 1: a value of the wrong type ----------------------------------------------------------------
# Mutation caught: no type check (4.5 reaches torch.randn inside the EM after the model is built: TypeError).
@pytest.mark.parametrize("value, got", [("4.5", "float"), ("abc", "str")])
def test_non_integer_num_bases_is_refused_before_the_model(refused, value, got):
    message = refused("inversion=stem", f"inversion.num_bases={value}")
    assert f"inversion.num_bases={value!r}" in message.replace('"', "'") or f"num_bases={value}" in message
    assert "type int" in message and got in message


# ---- issue 15: num_bases=auto and its auto block ------------------------------------------------------------------
# Mutations caught: a bad auto setting validated only when the processor meets the video (after the model); the type
# check refusing "auto" (then the first case fails with "type int"); auto.criterion or auto.queries not checked at
# construction (a bad one then fails inside the first layer call, after the model).
@pytest.mark.parametrize("overrides, expected", [
    (("inversion=stem", "inversion.num_bases=auto", "inversion.auto.target=0"), "auto.target=0 must be a number"),
    (("inversion=stem_auto", "inversion.auto.target=1.5"), "auto.target=1.5 must be a number strictly between 0 and 1"),
    (("inversion=stem_auto", "inversion.auto.when=sometimes"), "auto.when='sometimes' is not one of"),
    (("inversion=stem_official", "inversion.num_bases=auto", "+inversion.auto.trget=0.2"),
     "did you mean auto.target?"),
    (("inversion=stem_auto", "inversion.auto.criterion=keys"), "auto.criterion='keys' is not one of"),
    (("inversion=stem_auto", "inversion.auto.queries=0"), "auto.queries=0 must be an integer of at least 1"),
    (("inversion=stem_auto", "inversion.auto.queries=8.5"), "auto.queries=8.5 must be an integer")])
def test_bad_auto_settings_are_refused_before_the_model(refused, overrides, expected):
    assert expected in refused(*overrides)


# ---- item 9, bullet 2: a misspelt key ---------------------------------------------------------------------------
# Mutation caught: no key check (Hydra's "unexpected keyword argument" traceback), or no close match offered.
def test_misspelt_key_names_the_closest_known_key(refused):
    message = refused("inversion=stem", "+inversion.num_base=64")
    assert "inversion.num_base " in message and "did you mean inversion.num_bases?" in message
    assert "n_iters" in message  # the known keys are listed


def test_misspelt_key_in_data_group_is_refused_too(refused):
    message = refused("+data.n_frame=3")
    assert "data.n_frame " in message and "did you mean data.n_frames?" in message


def test_misspelt_key_on_the_command_line_is_one_error_line_with_status_2(tmp_path):
    """The CLI path: rc 2, exactly one stderr line `error: ...`, no traceback, no run work (no model log line)."""
    result = run_cli("progress=false", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run",
                     "device=cpu", "+inversion.num_base=64", timeout=120)
    assert_one_error_line(result, "did you mean inversion.num_steps?")
    assert "built tiny" not in result.stdout + result.stderr
    assert not (tmp_path / "cache").exists()


# ---- item 9, bullet 3: more DDIM steps than the scheduler's training timesteps -----------------------------------
# Mutation caught: no step check before the model (diffusers' ValueError traceback inside set_timesteps, after
# loading), or a limit off by one (1000 steps is legal: every training timestep once).
def test_more_steps_than_training_timesteps_is_refused_before_the_model(refused):
    message = refused("inversion.num_steps=1001")
    assert "inversion.num_steps=1001" in message and "1000 training timesteps" in message


def test_as_many_steps_as_training_timesteps_passes_the_check():
    from stem.data.synthetic import camera_pan
    from stem.inversion.methods import DDIMInversion
    from stem.runs.precheck import check_before_model

    check_before_model({"_target_": "stem.diffusion.models.build_tiny"}, DDIMInversion(num_steps=1000),
                       camera_pan(n_frames=2, width=64, height=64))


# ---- item 9, bullet 7: K above the tokens of an EM group, from the model's config ----------------------------------
# Mutation caught: the check left after model loading only (the model builder is called: the test fails), or the
# token grid of the config-derived layers wrong (a different count or layer in the message).
def test_more_bases_than_tokens_is_refused_before_the_model(refused):
    # debug=fast: 4 frames of 256x256 -> latents 32x32 -> the tiny UNet's mid block at 4x4: 4 x 16 = 64 tokens
    message = refused("inversion=stem")
    assert "num_bases=256 exceeds the 64 tokens" in message and "mid_block" in message and "4x4" in message


def test_token_grids_from_the_config_equal_those_of_the_built_unet(tiny_model):
    """The names and grids derived from the config alone match the built UNet's attn1 layers, odd sizes too.
    Mutation caught: a wrong number of attention layers per up block, or a mid block placed at another level."""
    from stem.diffusion.models import architecture
    from stem.inversion.methods import self_attention_tokens

    config = architecture("stem.diffusion.models.build_tiny", {})["unet"]
    for hw in ((32, 32), (45, 80), (7, 9)):
        assert self_attention_tokens(config, *hw) == self_attention_tokens(tiny_model.unet, *hw)


# ---- item 9, bullet 4: a pickle passed as CLIP weights ----------------------------------------------------------
# Mutation caught: the file handed to open_clip as before (torch.load unpickles it: here the patched torch.load
# fails the test), or a refusal without the conversion command.
def test_pickled_clip_checkpoint_is_refused_before_unpickling(refused, tmp_path, monkeypatch):
    import torch

    path = tmp_path / "clip.pt"
    torch.save({"w": torch.zeros(2)}, path)

    def no_unpickling(*_, **__):
        raise AssertionError("the pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    message = refused("metrics=edit", f"metrics.clip.pretrained={path}")
    assert str(path) in message and "not a safetensors file" in message
    assert "save_file(" in message and f"pretrained={tmp_path / 'clip.safetensors'}" in message
    assert "weights you trust" in message


def test_safetensors_detection_reads_only_the_header(tmp_path):
    """Mutation caught: a check by file extension (a pickle renamed .safetensors passes) or one that rejects a
    real safetensors file."""
    import torch
    from safetensors.torch import save_file

    from stem.core.errors import is_safetensors

    save_file({"w": torch.zeros(3)}, tmp_path / "real.safetensors")
    torch.save({"w": torch.zeros(3)}, tmp_path / "pickle.safetensors")
    assert is_safetensors(tmp_path / "real.safetensors")
    assert not is_safetensors(tmp_path / "pickle.safetensors")


# ---- item 11, second half: .bin-only pretrained weights -----------------------------------------------------------
# Mutation caught: the generic "could not load" message (no conversion command), or a folder check that looks at
# file names only in one component.
def test_bin_only_pretrained_folder_says_how_to_convert(tmp_path, monkeypatch):
    import json
    import subprocess

    import torch

    from stem.diffusion.models import load_pretrained

    folder = tmp_path / "sd"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps({}))
    for sub in ("unet", "text_encoder"):
        (folder / sub / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, folder / "vae" / "diffusion_pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("the pickle was loaded"))
    with pytest.raises(StemError) as info:
        load_pretrained(str(folder), device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(folder / "vae") in message and "diffusion_pytorch_model.bin" in message
    assert "weights you trust" in message and f"model.path={folder}_safetensors" in message
    command = message.split("python -c ")[1].split(" and set model.path")[0]
    code = subprocess.run(["bash", "-c", f"echo {command}"], capture_output=True, text=True).stdout
    compile(code, "<conversion>", "exec")  # the command is valid Python once the shell has unquoted it
    assert "from_pretrained('" + str(folder) in code and "safe_serialization=True" in code


# ---- item 9, bullet 5: `${...}` inside a prompt -----------------------------------------------------------------
# Mutation caught: no interpolation check (OmegaConf's InterpolationKeyError traceback when the logger's run config
# is resolved), or an error that does not say how to escape.
def test_unresolvable_interpolation_in_prompt_explains_the_escape(refused):
    message = refused("data.prompt=a ${x} cat")
    assert message.startswith("data.prompt: ") and "'x' not found" in message
    assert "escape it as \\${...}" in message and "data.prompt='a \\${x} cat'" in message


def test_escaped_interpolation_reaches_the_prompt_literally(tmp_path):
    """The documented fix works: `\\${x}` on the command line is the prompt text `${x}`."""
    from stem.app.job import _build

    cfg = compose_config(tmp_path, "data.prompt=a \\${x} cat", "data.n_frames=1", "data.width=64", "data.height=64")
    assert _build("data", cfg.data).prompt == "a ${x} cat"


# ---- item 9, bullet 6: a resolution that cannot fit in memory ----------------------------------------------------
def test_memory_need_is_four_activations_of_the_largest_self_attention_layer():
    """4 x N x tokens x channels x bytes, written out per case. Mutations caught: the wrong layer (always level 0,
    or the mid block), the VAE's 8x left out, or the dtype's bytes ignored."""
    from types import SimpleNamespace

    from stem.diffusion.models import architecture
    from stem.runs.precheck import memory_need

    tiny = architecture("stem.diffusion.models.build_tiny", {})
    sd = architecture("stem.diffusion.models.build_sd15_arch", {})
    video = SimpleNamespace(num_frames=4, height=256, width=256)
    assert memory_need(tiny, video, 4)[0] == 4 * 4 * (32 * 32) * 32 * 4
    video = SimpleNamespace(num_frames=48, height=360, width=640)   # Table 1: latents 45x80
    assert memory_need(sd, video, 2)[0] == 4 * 48 * (45 * 80) * 320 * 2
    # Without attention at full resolution the largest layer is level 1: 23x40 tokens (halving rounds up), 640 ch.
    no_top = {**sd, "unet": {**sd["unet"], "down_block_types": ("DownBlock2D", *sd["unet"]["down_block_types"][1:]),
                             "up_block_types": (*sd["unet"]["up_block_types"][:-1], "UpBlock2D")}}
    assert memory_need(no_top, video, 2)[0] == 4 * 48 * (23 * 40) * 640 * 2


def test_video_too_large_for_memory_is_refused_with_the_estimate(refused, monkeypatch):
    """Mutation caught: no memory check before the model (the model builder is called)."""
    import stem.runs.precheck

    monkeypatch.setattr(stem.runs.precheck, "available_memory", lambda device: 2**20)  # 1 MiB free
    message = refused("inversion=ddim_allframe")
    need = 4 * 4 * (32 * 32) * 32 * 4   # debug=fast: 4 frames of 256x256, fp32 on the CPU
    assert f"need at least {need / 2**30:.2f} GiB" in message and "0.00 GiB is available" in message
    assert "check_memory=false" in message


def test_check_memory_false_runs_anyway(tmp_path, monkeypatch, no_model):
    """The override: the same run goes on to build the model. Mutation caught: the knob not read."""
    import stem.runs.precheck
    from stem.app.job import run_job

    monkeypatch.setattr(stem.runs.precheck, "available_memory", lambda device: 2**20)
    with pytest.raises(Exception, match="the model was built"):
        run_job(compose_config(tmp_path, "inversion=ddim_allframe", "check_memory=false"), tmp_path / "run")


def test_pretrained_architecture_is_read_from_the_folder_configs(tmp_path):
    """A local pretrained folder's unet/ and vae/ config.json give the architecture, without weights; a folder
    whose configs are not SD-style gives None (the checks then run after loading, no KeyError traceback).
    Mutations caught: the folder's configs ignored (a preset's used instead), or a bad config raising."""
    import json

    from stem.diffusion.models import TINY_UNET, TINY_VAE, _sd15_unet_config, _sd15_vae_config, architecture

    unet = {**_sd15_unet_config(**TINY_UNET), "block_out_channels": [32, 64, 64]}   # 3 levels: not the preset's
    unet["down_block_types"], unet["up_block_types"] = unet["down_block_types"][1:], unet["up_block_types"][1:]
    for sub, config in (("unet", unet), ("vae", _sd15_vae_config(**TINY_VAE))):
        (tmp_path / "sd" / sub).mkdir(parents=True)
        (tmp_path / "sd" / sub / "config.json").write_text(json.dumps(config))
    arch = architecture("stem.diffusion.models.load_pretrained", {"path": str(tmp_path / "sd")})
    assert arch["unet"]["block_out_channels"] == [32, 64, 64] and arch["vae_scale"] == 8
    (tmp_path / "sd" / "unet" / "config.json").write_text("{}")
    assert architecture("stem.diffusion.models.load_pretrained", {"path": str(tmp_path / "sd")}) is None


def test_run_name_from_overrides_keeps_an_interpolation_as_typed(tmp_path):
    """run.py's main names the run from the overrides before run_job; Hydra keeps them as OmegaConf strings, so
    reading them resolved `${x}` and raised (a traceback on the command line). Mutation caught: resolved read."""
    from hydra.core.hydra_config import HydraConfig

    from stem.app.job import job_tracking

    cfg = compose_config(tmp_path, "data.prompt=a ${x} cat")
    assert job_tracking(cfg, HydraConfig.get())["name"].endswith("data.prompt=a ${x} cat")

"""The FateZero presets carry the settings the paper (appendix D) and the release state."""

import pytest
from conftest import compose_config
from omegaconf import OmegaConf


def resolved(tmp_path, *overrides):
    return OmegaConf.to_container(compose_config(tmp_path, *overrides, fast=False), resolve=True)


# cross_edit: the Table 2 rows follow FateZero's code (auto: replace for equal word counts, else refine); the
# teaser preset keeps its config's forced refine (is_replace_controller: False).
@pytest.mark.parametrize("preset, cross, self_, inversion, cross_edit", [
    ("fatezero_paper", 0.5, 0.5, "FateZeroInversion", "auto"),     # appendix D: FateZero fuses t in [0.5T, T]
    ("fatezero", 0.8, 0.8, "FateZeroInversion", "refine"),         # the released teaser config
    ("stem_fatezero", 0.8, 0.5, "STEMInversion", "auto"),          # reading A: cross [0.2T, T], self [0.5T, T]
    ("stem_fatezero_smaller", 0.2, 0.5, "STEMInversion", "auto"),  # reading B: a "smaller" cross ratio
])
def test_fusion_presets(tmp_path, preset, cross, self_, inversion, cross_edit):
    cfg = resolved(tmp_path, f"editing={preset}")
    editing = cfg["editing"]
    assert (editing["cross_replace_steps"], editing["self_replace_steps"]) == (cross, self_)
    assert cfg["inversion"]["_target_"] == f"stem.inversion.methods.{inversion}"
    assert editing["reweight"] is None and editing["cross_edit"] == cross_edit and editing["guidance_scale"] == 7.5
    assert (editing["latent_blend_steps"], editing["latent_blend_mask"], editing["latent_blend_reference"]) == \
        ([0.2, 0.8], "source_or_edit", "step_start")


# The documented reweight command (configs/editing/fatezero.yaml, docs/EDITING.md, table2_editing's header) composes on
# every FateZero preset and reaches the editor. Bug caught (seen before the fix): `reweight: {}` in a preset made
# `editing.reweight={watercolor:10}` a Hydra composition error ("Could not override"), exit 1.
@pytest.mark.parametrize("preset", ["fatezero", "fatezero_paper", "stem_fatezero", "stem_fatezero_smaller"])
def test_documented_reweight_override_composes_and_reaches_the_editor(tmp_path, preset):
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, f"editing={preset}", "editing.prompt=a watercolor car",
                         "editing.reweight={watercolor:10}", fast=False)
    assert OmegaConf.to_container(cfg.editing.reweight) == {"watercolor": 10}
    editor = instantiate(cfg.editing)
    assert editor.settings()["reweight"] == {"watercolor": 10}


def test_spatio_temporal_channel_threshold_is_the_models(tmp_path):
    """640 for SD (the release's least_sc_channel); 64 for the tiny UNet, whose attention layers have 32 or 64
    channels, so tests and debug=fast exercise spatio-temporal attention next to per-frame layers."""
    assert resolved(tmp_path, "editing=stem_fatezero")["editing"]["min_channels"] == 64
    assert resolved(tmp_path, "editing=stem_fatezero", "debug=fast")["editing"]["min_channels"] == 64
    for model in ("sd15", "sd15_arch"):
        assert resolved(tmp_path, "editing=stem_fatezero", f"model={model}")["editing"]["min_channels"] == 640

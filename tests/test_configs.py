"""Every config option composes, and its _target_ resolves to the library."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_method

from conftest import ROOT

CONFIGS = ROOT / "configs"


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_with(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "data", "inversion", "logger", "debug")
                                          for o in options(g)])
def test_each_option_composes_and_targets_exist(group, option):
    cfg = compose_with(f"{group}={option}")
    node = cfg[group] if group != "debug" else cfg
    if "_target_" in node:
        assert callable(get_method(node._target_))


def test_every_experiment_file_composes():
    for option in options("experiment"):
        compose_with(f"experiment={option}")


def test_sample_clip_configs_point_into_the_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("STEM_DATA_ROOT", str(tmp_path))
    for option in ("woman_running", "taylor", "wolf", "car_turn"):
        cfg = compose_with(f"data={option}")
        assert cfg.data.path.startswith(str(tmp_path)) and cfg.data.prompt


def test_inversion_presets():
    assert compose_with("inversion=ddim_2frame").inversion.pairing == "fatezero"
    assert compose_with("inversion=ddim_1frame").inversion.num_steps == 50

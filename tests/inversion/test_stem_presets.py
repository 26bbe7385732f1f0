"""The STEM presets (configs/inversion) against STEMInversion's defaults and the paper (issue #11, point 20)."""

import inspect
from pathlib import Path

import pytest
import yaml

from stem.core.errors import ConfigError
from stem.inversion.adaptive import AUTO_DEFAULTS
from stem.inversion.methods import STEMInversion
from stem.inversion.stem_attention import STEMAttnProcessor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / "inversion" / f"{name}.yaml").read_text())


def test_python_defaults_equal_the_stem_preset():
    """Catches: a constructor default drifting from configs/inversion/stem.yaml (dead_bases was keep vs
    reseed: seen failing with it restored), a knob missing from the preset or the constructor."""
    preset = load("stem")
    assert preset.pop("_target_") == "stem.inversion.methods.STEMInversion"
    top = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    defaults = {n: p.default for n, p in inspect.signature(STEMInversion).parameters.items()}
    for knob in ("seed", "excess_bases"):  # read from the top-level knobs
        assert preset.pop(knob) == "${" + knob + "}" and defaults.pop(knob) == top[knob]
    assert defaults.pop("auto") is None and preset.pop("auto") == AUTO_DEFAULTS  # None: the defaults
    assert defaults == preset


def test_auto_preset_is_the_paper_preset_with_adaptive_k():
    """Catches: stem_auto differing from the paper preset in anything but num_bases, or its settings (cache key)
    missing the resolved auto block; the fixed-K presets' settings gaining an auto entry (their cache keys)."""
    preset = load("stem_auto")
    assert preset.pop("defaults") == ["stem", "_self_"] and preset == {"num_bases": "auto"}
    method = STEMInversion(num_bases="auto", auto={"target": 0.2})
    assert method.name == "stem_auto"
    assert method.settings()["num_bases"] == "auto"
    assert method.settings()["auto"] == {**AUTO_DEFAULTS, "target": 0.2}
    fixed = STEMInversion(num_bases=128, auto={"target": 0.2})
    assert fixed.name == "stem_k128" and "auto" not in fixed.settings()
    assert fixed.settings() == STEMInversion(num_bases=128).settings()


def test_literal_preset_is_the_paper_preset_with_raw_bases_no_reseeding_and_the_literal_m_step():
    """Catches: stem_literal normalising the bases (Eq. 8 has exp(mu X^T / tau)), reseeding, or dividing by
    sum Z + eps (Eq. 10 is the plain weighted mean), or differing from the paper preset in anything else; the
    paper and released presets leaving the eps M-step (their latents unchanged)."""
    literal = load("stem_literal")
    assert literal.pop("defaults") == ["stem", "_self_"]
    assert literal == {"normalize_bases": False, "dead_bases": "keep", "m_step": "literal"}
    assert load("stem")["normalize_bases"] is True and load("stem")["dead_bases"] == "reseed"
    assert load("stem")["m_step"] == "eps" and "m_step" not in load("stem_official")
    assert STEMInversion(m_step="literal").settings()["m_step"] == "literal"  # in the cache key
    assert STEMInversion().settings()["m_step"] == "eps"
    with pytest.raises(ConfigError, match="m_step"):
        STEMInversion(m_step="exact")


def test_released_preset_settings():
    """Catches: stem_official losing one of the released code's constants."""
    official = load("stem_official")
    assert {k: official[k] for k in ("n_iters", "tau", "space", "group", "init", "normalize_bases", "dead_bases",
                                     "mass_eps", "excess_bases")} == dict(
        n_iters=5, tau=0.01, space="keys", group=8, init="gaussian", normalize_bases=True, dead_bases="keep",
        mass_eps=1e-4, excess_bases="allow")


def test_allow_runs_where_error_refuses_and_needs_gaussian_init(tiny_model):
    # 16 frames of 256x256, groups of 8: 8 x 4x4 = 128 tokens at the tiny UNet's mid block
    with pytest.raises(ConfigError, match="exceeds the 128 tokens"):
        STEMInversion(group=8).check(tiny_model.unet, 16, 32, 32)
    STEMInversion(group=8, excess_bases="allow").check(tiny_model.unet, 16, 32, 32)
    with pytest.raises(ConfigError, match="excess_bases=allow needs init=gaussian"):
        STEMAttnProcessor(4, excess_bases="allow", init="random_tokens")
    with pytest.raises(ConfigError, match="mass_eps"):
        STEMInversion(mass_eps=0)

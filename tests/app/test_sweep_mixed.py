"""Sweeps that mix DDIM and STEM on toy sizes (issue #12, point 4): the K-exceeds-tokens error names a fix,
`excess_bases=clamp`, that works in such a sweep (a top-level knob that the STEM presets read; DDIM's
struct has no `inversion.excess_bases`). The issue's sweep itself, with that fix, runs in
tests/test_newcomer_path.py."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import compose_config
from hydra.utils import instantiate

from stem.core.errors import ConfigError
from stem.inversion.methods import STEMInversion

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "inversion").glob("*.yaml"))
TABLE6 = yaml.safe_load((ROOT / "configs" / "experiment" / "table6_inversion.yaml").read_text())
# the command; 64x64 latents are 8x8, so the tiny UNet's deepest self-attention sees 1 token per frame
COMMAND = ["-m", "experiment=table6_inversion", "model=tiny", "data=synthetic", "data.width=64", "data.height=64",
           "data.n_frames=4"]
FEW_STEPS = ["inversion.num_steps=2", "progress=false"]  # every inversion preset has num_steps
LATENT_FRAMES_HW = (4, 8, 8)   # its frames and latent size


def the_fix(message: str) -> str:
    """The `key=value` the error tells the user to set (its first `set ...`)."""
    match = re.search(r"\bset (\S+=\S+)", message)
    assert match, message
    return match.group(1)


def refusal(unet) -> str:
    """The error the paper preset (K=256) gives on the issue's video, as run.py prints it after `error: `."""
    with pytest.raises(ConfigError) as refused:
        STEMInversion().check(unet, *LATENT_FRAMES_HW)
    return str(refused.value)


def test_error_is_one_line_whose_fix_composes_and_runs_with_every_inversion_preset(tiny_model, tmp_path):
    """The fix the error names, set on the command line of a sweep over every inversion preset: every job
    composes and builds, and every STEM job that refused the video now runs on it (stem_official keeps
    `allow`, as released). Catches: the message naming `inversion.excess_bases=clamp` (DDIM's struct
    rejects it: seen failing), the knob missing from configs/config.yaml (seen failing), a STEM preset not
    reading it (stem.yaml back to `excess_bases: error`: seen failing), a message over several lines."""
    message = refusal(tiny_model.unet)
    assert "\n" not in message and re.match(r"num_bases=256 exceeds the 4 tokens of an EM group at mid_block", message)
    fix = the_fix(message)
    assert fix == "excess_bases=clamp"
    seen = {}
    for preset in PRESETS:
        overrides = ["experiment=table6_inversion", "model=tiny", "data=synthetic", f"inversion={preset}"]
        method = instantiate(compose_config(tmp_path, *overrides, fix).inversion)
        if isinstance(method, STEMInversion):
            unfixed = instantiate(compose_config(tmp_path, *overrides).inversion)
            if preset == "stem_auto":   # auto never refuses: its candidates stop at a layer's tokens
                unfixed.check(tiny_model.unet, *LATENT_FRAMES_HW)
            elif preset != "stem_official":   # without the fix, the paper presets refuse this video
                with pytest.raises(ConfigError, match=re.escape(fix)):
                    unfixed.check(tiny_model.unet, *LATENT_FRAMES_HW)
            method.check(tiny_model.unet, *LATENT_FRAMES_HW)
            seen[preset] = method.settings()["excess_bases"]
        else:
            assert "excess_bases" not in method.settings()
    assert seen == {"stem": "clamp", "stem_auto": "clamp", "stem_k128": "clamp", "stem_k512": "clamp",
                    "stem_literal": "clamp", "stem_official": "allow"}

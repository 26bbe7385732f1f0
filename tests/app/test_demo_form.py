"""The demo's form (stem/app/demo_form.py) and its job's config (stem/app/demo_jobs.py): the form's choices
composed with run.py's configs give the inversion, editor and clip the form names; prompts survive Hydra's
override grammar; the form's fields are refused outside their whitelists and ranges; the command line cannot take
over what the form owns. No model is built here: only configs are composed."""

from __future__ import annotations

import pytest

from stem.app.configs import compose_run
from stem.app.demo_form import K_RANGE, STEPS_RANGE, DemoRequest, FormError, hydra_quote, parse_form
from stem.app.demo_jobs import check_command_line, merged
from stem.core.errors import ConfigError

CLIPS = {"synthetic": True, "car_turn": False}
GOOD = {"clip": "synthetic", "prompt": "a portrait photo of an astronaut", "inversion": "stem", "k": "128",
        "action": "reconstruct", "target": "", "steps": "5", "frames": "4"}


def composed(request: DemoRequest):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_run(request.overrides())
    HydraConfig.instance().set_config(cfg)   # ${hydra:...} in paths, as run.py has it
    return cfg


@pytest.mark.parametrize("text", [
    "a cat", "it's a 'cat'", "a back\\slash", "ends in a backslash\\", "quote after backslashes \\\\'x",
    "a, b=c [d] {e} (f) *g* ~h", "ünïcode ☃ — dash", 'double "quotes"', "  spaced   out  "])
def test_a_quoted_prompt_reaches_the_config_unchanged(text):
    """Each text through `hydra_quote` and Hydra's override parser comes back as typed. Bug caught: a prompt with
    a quote, a comma or a trailing backslash breaking the override (a composition error) or arriving altered."""
    cfg = compose_run([f"data.prompt={hydra_quote(text)}"])
    assert cfg.data.prompt == text


def request(**changes) -> DemoRequest:
    return parse_form({**GOOD, **changes}, CLIPS, max_frames=16)


def test_fatezero_on_stem_is_stem_fatezero_with_the_chosen_k():
    """FateZero edit + STEM K=512: STEM-FateZero's fusion (cross 0.8, self 0.5, configs/editing/stem_fatezero.yaml)
    on a STEM inversion with K=512 and the form's steps; the target prompt is the editor's. Bug caught: the
    preset's own K (256) or FateZero's teaser fusion (0.8/0.8) used instead."""
    cfg = composed(request(action="fatezero", k="512", steps="7", target="a watercolor astronaut"))
    assert cfg.editing._target_ == "stem.editing.FateZeroEditor"
    assert (cfg.editing.cross_replace_steps, cfg.editing.self_replace_steps) == (0.8, 0.5)
    assert cfg.inversion._target_.endswith("STEMInversion") and cfg.inversion.num_bases == 512
    assert cfg.inversion.num_steps == 7 and cfg.editing.num_steps == 7
    assert cfg.editing.prompt == "a watercolor astronaut" and cfg.data.n_frames == 4


@pytest.mark.parametrize("inversion, context", [("ddim_1frame", "1frame"), ("ddim_2frame", "2frame"),
                                                ("ddim_allframe", "allframe")])
def test_fatezero_on_a_ddim_inversion_keeps_that_inversion(inversion, context):
    """FateZero edit + a DDIM inversion: editing=fatezero, whose preset selects inversion=fatezero; the form's
    inversion is the one composed. Bug caught: the preset's inversion silently replacing the user's choice."""
    cfg = composed(request(action="fatezero", inversion=inversion, target="a cat"))
    assert cfg.editing._target_ == "stem.editing.FateZeroEditor" and cfg.editing.cross_replace_steps == 0.8
    assert cfg.editing.self_replace_steps == 0.8   # the fatezero preset's (released teaser), not stem_fatezero's
    assert cfg.inversion._target_.endswith("DDIMInversion") and cfg.inversion.context == context


def test_tokenflow_on_stem_auto_and_a_reconstruction_without_editor():
    cfg = composed(request(action="tokenflow", inversion="stem_auto", target="a cat"))
    assert cfg.editing._target_ == "stem.editing.TokenFlowEditor" and cfg.inversion.num_bases == "auto"
    cfg = composed(request(inversion="ddim_2frame", k="9999"))   # K is read only for "STEM with K bases"
    assert cfg.get("editing") is None and cfg.inversion.context == "2frame" and "num_bases" not in cfg.inversion


def test_a_sample_clip_keeps_its_first_frames():
    from pathlib import Path

    req = parse_form({**GOOD, "clip": "car_turn"}, {**CLIPS, "car_turn": True}, max_frames=16)
    cfg = composed(req)
    assert Path(cfg.data.path).name == "car-turn" and cfg.data.max_frames == 4
    assert cfg.data.max_frames_keep == "first"


@pytest.mark.parametrize("field, value, fragment", [
    ("inversion", "stem_official", "inversion 'stem_official' is not one of"),
    ("inversion", "", "inversion '' is not one of"),
    ("k", str(K_RANGE[1] + 1), f"K (the number of STEM bases) must be a whole number from {K_RANGE[0]} to"),
    ("k", "1", "K (the number of STEM bases) must be a whole number"),
    ("k", "12.5", "K (the number of STEM bases) must be a whole number"),
    ("k", "auto", "K (the number of STEM bases) must be a whole number"),
    ("steps", "0", f"DDIM steps must be a whole number from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}"),
    ("steps", "-5", "DDIM steps must be a whole number"),
    ("frames", "17", "frames must be a whole number from 2 to 16"),
    ("frames", "1", "frames must be a whole number from 2 to 16"),
    ("action", "pix2video", "what to do 'pix2video' is not one of reconstruct, tokenflow, fatezero"),
    ("clip", "car_turn", "clip 'car_turn' cannot run here: choose one of synthetic, upload (its file is not under"),
    ("clip", "../../etc/passwd", "clip '../../etc/passwd' cannot run here"),
    ("prompt", "   ", "the source prompt is empty"),
    ("prompt", "x" * 301, "the source prompt has 301 characters: use at most 300"),
    ("prompt", "a ${seed} cat", "the source prompt holds '${'"),
    ("prompt", "a\x00cat", "the source prompt holds control characters"),
])
def test_each_field_is_refused_outside_its_whitelist_or_range(field, value, fragment):
    """One line naming the field and what it accepts. Bug caught: a value reaching Hydra unchecked (a preset the
    demo does not offer, a path as a clip, an interpolation in a prompt) or a refusal of several lines."""
    with pytest.raises(FormError) as info:
        request(**{field: value})
    assert fragment in str(info.value) and "\n" not in str(info.value) and info.value.status == 400


def test_an_edit_needs_its_target_prompt():
    with pytest.raises(FormError, match="the target prompt is empty"):
        request(action="tokenflow", target="")
    assert request(action="reconstruct", target="").target is None


@pytest.mark.parametrize("override", ["inversion=stem", "data=wolf", "editing=tokenflow", "data.n_frames=3",
                                      "inversion.num_steps=10", "editing.prompt=x", "paths.log_dir=/tmp",
                                      "hydra.run.dir=/tmp/x", "task_name=x", "experiment=table1_time", "-m"])
def test_the_command_line_cannot_set_what_the_form_owns(override):
    with pytest.raises(ConfigError, match="the form chooses"):
        check_command_line([override])


def test_other_command_line_settings_pass_and_the_form_wins_over_earlier_values():
    check_command_line(["model=sd15", "device=cuda", "data.width=64", "inversion.chunk_size=4096", "use_cache=false"])
    assert merged(["a=1", "b=2"], ["a=3"], ["c=4", "+b=5"]) == ["a=3", "c=4", "+b=5"]

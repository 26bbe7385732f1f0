"""Numeric settings with values that mean nothing (NaN, inf, negative, 0) are refused before any model work with
one line naming `key=value`, the allowed range and the fix (issue 23, item 8 and its sweep).

Every case below passed every check before the model on the code before these checks (the model builder was
reached): it then ran to garbage (a black edited video, a degenerate E-step, no mask), failed late (after the
inversion: in the CLIP score, in the attention store's budget, in the latent blend window), or was silently ignored.
The in-process tests replace every model builder with one that fails the test, so "refused before the model" is
pinned, not just "refused"."""

from __future__ import annotations

import math

import pytest
from conftest import assert_one_error_line, compose_config, run_cli

from stem.core.errors import ConfigError, check_number

STEM = ("inversion=stem", "excess_bases=clamp")
TOKENFLOW = ("editing=tokenflow", "editing.prompt=a portrait photo of a robot", "metrics=recon")
FATEZERO = ("editing=fatezero", "editing.prompt=a portrait photo of a robot", "metrics=recon")
BLEND = ("editing.blend_words=[[astronaut],[robot]]",)

# (overrides, what the message must say). Seen before the fix, each case reached the model builder; what it did
# when run through (tiny model, debug=fast) is in the comment.
CASES = [
    # E-step exp(mu x / tau) with tau=inf: every responsibility 1/K, every basis the mean token; the run completed
    ((*STEM, "inversion.tau=inf"), "tau=inf must be a finite number > 0"),
    # M-step sum Z X / (sum Z + inf): every basis the zero vector; the run completed
    ((*STEM, "inversion.mass_eps=inf"), "mass_eps=inf must be a finite number > 0"),
    # classifier-free guidance with NaN or inf: NaN latents, a black edited.mp4; the run completed (metrics=recon)
    # or failed after the whole edit in the CLIP score (metrics=edit)
    ((*TOKENFLOW, "editing.guidance_scale=nan"), "editing.guidance_scale=nan must be a finite number"),
    ((*TOKENFLOW, "editing.guidance_scale=inf"), "editing.guidance_scale=inf must be a finite number"),
    ((*TOKENFLOW, "editing.guidance_scale=-inf"), "editing.guidance_scale=-inf must be a finite number"),
    ((*FATEZERO, "editing.guidance_scale=nan"), "editing.guidance_scale=nan must be a finite number"),
    # FreeU scale NaN: a black edited.mp4, the run completed; a negative scale flips the decoder's features
    ((*TOKENFLOW, "editing.freeu={b1:nan,b2:1.4,s1:0.9,s2:0.2}"), "editing.freeu.b1=nan must be a finite number"),
    ((*TOKENFLOW, "editing.freeu={b1:1.2,b2:inf,s1:0.9,s2:0.2}"), "editing.freeu.b2=inf must be a finite number"),
    ((*TOKENFLOW, "editing.freeu={b1:1.2,b2:1.4,s1:-1,s2:0.2}"), "editing.freeu.s1=-1 must be a finite number of "
                                                                 "at least 0"),
    # blend mask [S / max S > threshold], S / max S in [0, 1]: NaN or above 1 gives an empty mask (as 1 does), < 0 a
    # full one; the run completed
    ((*FATEZERO, *BLEND, "editing.blend_threshold=nan"), "editing.blend_threshold=nan must be a number in [0, 1]"),
    ((*FATEZERO, *BLEND, "editing.blend_threshold=1.5"), "editing.blend_threshold=1.5 must be a number in [0, 1]"),
    ((*FATEZERO, *BLEND, "editing.blend_threshold=-1"), "editing.blend_threshold=-1 must be a number in [0, 1]"),
    ((*FATEZERO, *BLEND, "editing.blend_threshold=inf"), "editing.blend_threshold=inf must be a number in [0, 1]"),
    # the store's budget: 0 or negative refused every store after the model was built; NaN switched it off
    ((*FATEZERO, "editing.store_budget_gib=0"), "editing.store_budget_gib=0 must be a number > 0"),
    ((*FATEZERO, "editing.store_budget_gib=-1"), "editing.store_budget_gib=-1 must be a number > 0"),
    ((*FATEZERO, "editing.store_budget_gib=nan"), "editing.store_budget_gib=nan must be a number > 0"),
    # the latent blend window's end inf: OverflowError traceback after the inversion (int(inf * T))
    ((*FATEZERO, *BLEND, "editing.latent_blend=true", "editing.latent_blend_steps=[0.2,inf]"),
     "editing.latent_blend_steps=[0.2, inf] must be [start, end] finite numbers"),
    # reweight scales multiply a word's attention: NaN gives NaN maps (a black edited.mp4), < 0 negative attention
    ((*FATEZERO, "+editing.reweight.robot=nan"), "editing.reweight.robot=nan must be a finite number of at least 0"),
    ((*FATEZERO, "+editing.reweight.robot=-2"), "editing.reweight.robot=-2 must be a finite number of at least 0"),
    # a channel count below 0: accepted (every layer spatio-temporal, as 0 says)
    ((*FATEZERO, "editing.min_channels=-1"), "editing.min_channels=-1 must be an integer of at least 0"),
    (("inversion=fatezero", "inversion.min_channels=-1"), "min_channels=-1 must be an integer of at least 0"),
    # editing timesteps that the inversion did not save (4 editing steps on debug=fast's 5-step inversion): the
    # ConfigError came after the whole inversion, from the editor
    ((*TOKENFLOW, "editing.num_steps=4"), "editing.num_steps=4 needs timesteps"),
    # PCA steps are 0-based indices: NaN and inf raised a ValueError / OverflowError traceback, 1.5 was read as 1
    (("metrics=features", "metrics.features.pca_steps=[nan]"), "metrics.features.pca_steps=nan must be an integer"),
    (("metrics=features", "metrics.features.pca_steps=[inf]"), "metrics.features.pca_steps=inf must be an integer"),
    (("metrics=features", "metrics.features.pca_steps=[1.5]"), "metrics.features.pca_steps=1.5 must be an integer"),
]


# Item 8 and the sweep. Mutation caught: any one of these checks removed or weakened (`not tau > 0` lets inf pass,
# `float(b1)` lets NaN pass): the case then reaches the model builder and the test fails there.
@pytest.mark.parametrize("overrides, expected", CASES, ids=[o[-1] for o, _ in CASES])
def test_meaningless_value_is_refused_before_the_model(refused, overrides, expected):
    message = refused(*overrides)
    assert expected in message, message


# Values at the edges of the ranges stay accepted. Mutation caught: a bound made strict where the value means
# something (guidance 0 = the unconditional prediction, fraction 0 = no fusion, min_channels 0 = every layer,
# inf budget = none but the host RAM's, reweight 0 = the word removed, latent blend end > 1 = through the last step,
# blend threshold 0 = wherever the word attends, 1 = an empty mask: tests/editing/test_fatezero_fusion.py keeps
# nothing so; 50 editing steps on a 500-step inversion: TokenFlow's release, its timesteps a subset).
@pytest.mark.parametrize("overrides", [
    (*TOKENFLOW, "editing.guidance_scale=0"), (*TOKENFLOW, "editing.guidance_scale=-1"),
    (*TOKENFLOW, "editing.pnp_attn_t=0", "editing.pnp_f_t=1"),
    (*TOKENFLOW, "editing.freeu={b1:0,b2:1.4,s1:0.9,s2:0}"),
    (*FATEZERO, *BLEND, "editing.blend_threshold=0", "editing.store_budget_gib=inf", "editing.min_channels=0",
     "+editing.reweight.robot=0", "editing.latent_blend=true", "editing.latent_blend_steps=[0,2]"),
    (*FATEZERO, *BLEND, "editing.blend_threshold=1"),
    (*STEM, "inversion.tau=1e3", "inversion.mass_eps=1"),
    ("metrics=features", "metrics.features.pca_steps=[0,-1]"),
    (*TOKENFLOW, "inversion.num_steps=500", "editing.num_steps=50"),
], ids=["guidance0", "guidance-1", "pnp-edges", "freeu0", "fatezero-edges", "threshold1", "stem-large", "pca",
        "steps-50-of-500"])
def test_meaningful_edge_values_reach_the_model(tmp_path, no_model, overrides):
    from stem.app.job import run_job

    with pytest.raises(Exception, match="the model was built"):
        run_job(compose_config(tmp_path, *overrides), tmp_path / "run")


# ---- run-level values: warmup_steps and distributed.* (stem.runs.precheck.check_run_settings) ------------------------
# Seen before the fix: warmup_steps=-1, nan and 1.5 ran with no warm-up or a 1.5-step one without a word; inf and
# 5000 failed with diffusers' ValueError traceback after the VAE encoding; distributed.timeout_s=nan is
# datetime.timedelta's ValueError traceback in every rank, 0 or negative fails every collective at once.
@pytest.mark.parametrize("kwargs, expected", [
    (dict(warmup_steps=-1), "warmup_steps=-1 must be an integer in [0, 1000]"),
    (dict(warmup_steps=math.nan), "warmup_steps=nan must be an integer in [0, 1000]"),
    (dict(warmup_steps=math.inf), "warmup_steps=inf must be an integer in [0, 1000]"),
    (dict(warmup_steps=1.5), "warmup_steps=1.5 must be an integer in [0, 1000]"),
    (dict(warmup_steps=5000), "warmup_steps=5000 must be an integer in [0, 1000]"),
    (dict(timeout_s=math.nan), "distributed.timeout_s=nan must be a finite number > 0"),
    (dict(timeout_s=0), "distributed.timeout_s=0 must be a finite number > 0"),
    (dict(timeout_s=-1), "distributed.timeout_s=-1 must be a finite number > 0"),
    (dict(timeout_s=math.inf), "distributed.timeout_s=inf must be a finite number > 0"),
    (dict(master_port=0), "distributed.master_port=0 must be an integer in [1, 65535]"),
    (dict(master_port=70000), "distributed.master_port=70000 must be an integer in [1, 65535]"),
])
def test_bad_run_settings_are_refused(kwargs, expected):
    """Mutation caught: a run-level value not checked, or the warm-up bound not the scheduler's 1000 timesteps."""
    from stem.runs.precheck import check_run_settings

    with pytest.raises(ConfigError) as info:
        check_run_settings(model={"_target_": "stem.diffusion.models.build_tiny"}, **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_good_run_settings_pass():
    """The defaults and the edges: no warm-up, one as long as the scheduler allows, no fixed port."""
    from stem.runs.precheck import check_run_settings

    tiny = {"_target_": "stem.diffusion.models.build_tiny"}
    check_run_settings(warmup_steps=0, timeout_s=600, master_port=None, model=tiny)
    check_run_settings(warmup_steps=1000, timeout_s=0.5, master_port=65535, model=tiny)
    check_run_settings(warmup_steps=10**6)  # an unknown architecture: no upper bound known before the model


# Bug caught: run.py not calling stem.runs.precheck.check_run_settings before building the model (warmup_steps=-1
# reached the model builder and ran as if 0).
def test_negative_warmup_steps_is_refused_before_the_model(refused):
    assert "warmup_steps=-1 must be an integer" in refused("warmup_steps=-1", "reconstruct=false")


# ---- the CLI: one `error:` line and exit status 2 -------------------------------------------------------------------
def test_infinite_tau_on_the_command_line_is_one_error_line_with_status_2(tmp_path):
    """Seen before the fix: `inversion.tau=inf` ran the whole inversion with a degenerate E-step and exit 0.
    Mutation caught: the check missing, or raised as something other than a StemError (a traceback, exit 1)."""
    result = run_cli("progress=false", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run",
                     "device=cpu", "debug=fast", "inversion=stem", "excess_bases=clamp", "inversion.tau=inf",
                     timeout=120)
    assert_one_error_line(result, "tau=inf must be a finite number > 0")
    assert "built tiny" not in result.stdout + result.stderr
    assert not (tmp_path / "cache").exists()


# ---- the shared helper ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, kwargs, ok", [
    (0.05, dict(low=0, low_open=True), True), (math.inf, dict(low=0, low_open=True), False),
    (math.nan, dict(), False), (-math.inf, dict(inf=True), False), (math.inf, dict(low=0, inf=True), True),
    (0, dict(low=0, low_open=True), False), (1, dict(low=0, high=1, high_open=True), False),
    (True, dict(integer=True), False), (2.0, dict(integer=True), False), ("3", dict(), False),
    (3, dict(low=1, high=3, integer=True), True),
])
def test_check_number(value, kwargs, ok):
    """Mutation caught: NaN passing a bound (every comparison with NaN is False), a bool taken for an integer,
    -inf let through with inf=True, an open bound treated as closed."""
    if ok:
        assert check_number("x", value, **kwargs) == value
    else:
        with pytest.raises(ConfigError, match=r"^x=.* must be "):
            check_number("x", value, **kwargs)

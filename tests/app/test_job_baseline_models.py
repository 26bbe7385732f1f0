"""How a job runs an editor that needs weights beyond the model preset's (the Table 2 baselines): the preset's
`baseline_models` entries it names in `needs` are built and attached, and its `base_model` entry replaces the job's
model for the inversion and the edit. A preset without them is refused before any model is built."""

from __future__ import annotations

import json

from conftest import compose_config

from stem.diffusion.models import build_tiny
from stem.editing.tokenflow import TokenFlowEditor

BUILT: list[str] = []


def recording_model(seed: int = 0, device: str = "auto", dtype: str = "auto"):
    BUILT.append("base")
    model = build_tiny(seed=seed + 7, device=device, dtype=dtype)   # weights that differ from model=tiny's
    model.name = "recorded-base"
    return model


def recording_estimator(seed: int = 0, device: str = "auto", dtype: str = "auto"):
    BUILT.append("estimator")
    return {"estimator seed": seed}


class NeedsWeights(TokenFlowEditor):
    needs = ("depth_estimator",)
    base_model = "sd2_depth"
    attached: dict = {}

    def attach(self, models):
        super().attach(models)
        NeedsWeights.attached = dict(models)


EDITOR = ["editing=tokenflow", "editing.prompt=a cat", "editing._target_=test_job_baseline_models.NeedsWeights",
          "metrics=recon"]


def test_a_preset_without_the_weights_is_refused_before_any_model(refused):
    """Catches: the job building the preset's SD 1.5 and failing later (or running the method on the wrong
    weights) when the preset does not say where the method's weights are (a user's own preset without them)."""
    message = refused("~baseline_models.sd2_depth", *EDITOR)
    assert "baseline_models.sd2_depth" in message and "model=tiny" in message


def test_the_base_model_replaces_the_jobs_model_and_the_needed_weights_are_attached(tmp_path):
    """Catches: the inversion or the edit running on the preset's own model instead of the method's base model
    (Pix2Video on a 4-channel UNet), weights built that the method does not need, or none handed to the editor."""
    from stem.app.job import run_job

    BUILT.clear()
    here = "test_job_baseline_models"
    cfg = compose_config(tmp_path, *EDITOR, f"baseline_models.sd2_depth._target_={here}.recording_model",
                         f"baseline_models.depth_estimator._target_={here}.recording_estimator",
                         "report_reconstruction=false")
    run_job(cfg, tmp_path / "run")
    assert BUILT == ["base", "estimator"]   # the preset's own model, the ControlNet: never built
    assert NeedsWeights.attached == {"depth_estimator": {"estimator seed": 0}}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == "recorded-base"
    assert metrics["model_fingerprint"] == recording_model().fingerprint != build_tiny().fingerprint

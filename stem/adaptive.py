"""Adaptive number of STEM bases (`num_bases="auto"`, issue 15): settings, candidates, error, records.

Per self-attention layer the processor (`stem.stem_attention.STEMAttnProcessor`) runs the EM of all
its groups with K = each candidate in increasing order and keeps the first K whose relative token
reconstruction error is at most `target`:

    error(K) = ||X - Z mu||_F / ||X||_F = sqrt(sum error_sq / sum energy)

summed over every EM problem of the layer call (prompt branches, groups, heads in keys space), with
Z the responsibilities of the last E-step and mu the returned bases (`stem.em.em_bases`,
measure_error=True). docs/STEM.md, "Adaptive K", has the details.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

import torch

from stem.errors import ConfigError, check_choice

AUTO_DEFAULTS = {"target": 0.3, "k_min": 32, "k_max": 512, "k_step": None, "when": "first_step"}
WHEN = ("first_step", "every_step")


def _int(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"auto.{name}={value!r} must be an integer of at least {least}")


def resolve_auto(auto: Mapping | None) -> dict:
    """The five auto settings with defaults filled in; ConfigError (one line, naming the fix) for a bad one."""
    given = dict(auto or {})
    unknown = [key for key in given if key not in AUTO_DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), AUTO_DEFAULTS, n=1)
        hint = f"did you mean auto.{close[0]}? " if close else ""
        raise ConfigError(f"auto.{unknown[0]} is not a setting of auto (num_bases=auto): {hint}"
                          f"known: {', '.join(AUTO_DEFAULTS)}")
    out = {**AUTO_DEFAULTS, **given}
    target = out["target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ConfigError(f"auto.target={target!r} must be a number strictly between 0 and 1: the relative "
                          "token reconstruction error the bases may leave (e.g. 0.3)")
    out["target"] = float(target)
    _int("k_min", out["k_min"], 1)
    _int("k_max", out["k_max"], 1)
    if out["k_max"] < out["k_min"]:
        raise ConfigError(f"auto.k_max={out['k_max']} is below auto.k_min={out['k_min']}: "
                          "set k_max >= k_min")
    if out["k_step"] is not None:
        _int("k_step", out["k_step"], 1)
    check_choice("auto.when", out["when"], WHEN)
    return out


def candidates(auto: dict, tokens: int) -> list[int]:
    """The K tried, increasing: k_min, 2 k_min, 4 k_min, ... (k_step None) or k_min, k_min + k_step, ...,
    then k_max if not hit exactly; each capped at `tokens` (the smallest EM group's), duplicates dropped."""
    ks, k = [], auto["k_min"]
    while k < auto["k_max"]:
        ks.append(k)
        k = 2 * k if auto["k_step"] is None else k + auto["k_step"]
    ks.append(auto["k_max"])
    return sorted({min(k, tokens) for k in ks})


def error_totals(results) -> torch.Tensor:
    """(sum error_sq, sum energy) in float64 over the EM results of one layer call."""
    return torch.stack([sum(r.error_sq.double().sum() for r in results),
                        sum(r.energy.double().sum() for r in results)])


def relative_error(totals: torch.Tensor) -> float:
    """sqrt(sum error_sq / sum energy) (0 for tokens without energy)."""
    error_sq, energy = totals.tolist()
    return math.sqrt(error_sq / energy) if energy > 0 else 0.0


def phase_record(layers: dict) -> dict:
    """One phase of `STEMInversion.bases_report()`: the layers' records and the mean K over layers and choices."""
    ks = [k for rec in layers.values() for k in rec["k"]]
    return {"layers": {name: {"k": list(rec["k"]), "error": None if rec["error"] is None else list(rec["error"]),
                              "tried": None if rec["tried"] is None else [dict(t) for t in rec["tried"]]}
                       for name, rec in layers.items()},
            "mean_k": sum(ks) / len(ks) if ks else None}

"""Adaptive number of STEM bases (`num_bases="auto"`): settings, candidates, errors, records.

Per self-attention layer the processor (`stem.inversion.stem_attention.STEMAttnProcessor`) runs the EM of all
its groups with K = each candidate in increasing order and keeps the first K whose error is at most
`target`. Two criteria (`criterion`):

- "attention" (default): the relative error of the STEM attention output on a fixed random sample of
  `queries` query tokens of the layer call, against exact attention of the same queries over every
  token of their EM group (the whole video for global bases):

      error(K) = ||O_stem - O_exact||_F / ||O_exact||_F

  over the sampled queries, heads and prompt branches; O are the heads' outputs softmax(q k^T / sqrt(d)) v
  before the output projection. The exact outputs are computed once per layer call for all candidates, over
  key chunks with a running max-shifted softmax (`attention_pieces`, `merge_pieces`), so memory is
  O(queries x chunk) per head.
- "tokens": the relative token reconstruction error of the EM,

      error(K) = ||X - Z mu||_F / ||X||_F = sqrt(sum error_sq / sum energy)

  summed over every EM problem of the layer call (prompt branches, groups, heads in keys space), with
  Z the responsibilities of the last E-step and mu the returned bases (`stem.inversion.em.em_bases`,
  measure_error=True). It does not predict the attention error (docs/STEM.md "Adaptive K").

docs/STEM.md, "Adaptive K", has the details and how the default target was set.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

import torch

from stem.core.errors import ConfigError, check_choice, check_number

AUTO_DEFAULTS = {"target": 0.2, "k_min": 32, "k_max": 512, "k_step": None, "when": "first_step",
                 "criterion": "attention", "queries": 64}
WHEN = ("first_step", "every_step")
CRITERIA = ("attention", "tokens")


def _int(name: str, value, least: int) -> None:
    check_number(f"auto.{name}", value, low=least, integer=True)


def resolve_auto(auto: Mapping | None) -> dict:
    """The auto settings with defaults filled in; ConfigError (one line, naming the fix) for a bad one."""
    given = dict(auto or {})
    unknown = [key for key in given if key not in AUTO_DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), AUTO_DEFAULTS, n=1)
        hint = f"did you mean auto.{close[0]}? " if close else ""
        raise ConfigError(f"auto.{unknown[0]} is not a setting of auto (num_bases=auto): {hint}"
                          f"known: {', '.join(AUTO_DEFAULTS)}")
    out = {**AUTO_DEFAULTS, **given}
    out["target"] = float(check_number(
        "auto.target", out["target"], low=0, high=1, low_open=True, high_open=True,
        fix="the relative error (of the attention output, or of the tokens with criterion=tokens) the bases may "
            f"leave (default {AUTO_DEFAULTS['target']})"))
    _int("k_min", out["k_min"], 1)
    _int("k_max", out["k_max"], 1)
    if out["k_max"] < out["k_min"]:
        raise ConfigError(f"auto.k_max={out['k_max']} is below auto.k_min={out['k_min']}: "
                          "set k_max >= k_min")
    if out["k_step"] is not None:
        _int("k_step", out["k_step"], 1)
    check_choice("auto.when", out["when"], WHEN)
    check_choice("auto.criterion", out["criterion"], CRITERIA)
    _int("queries", out["queries"], 1)
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


def attention_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Softmax attention of queries q (..., Q, d) over keys k (..., T, d) with values v (..., T, e), in fp32,
    as max-shifted pieces that merge over key chunks and processes: m = max_j s_j, l = sum_j exp(s_j - m),
    o = sum_j exp(s_j - m) v_j, with s = q k^T / sqrt(d); the attention output is o / l."""
    s = (q.float() @ k.float().transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None])
    return m, p.sum(-1), p @ v.float()


def merge_pieces(pieces) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of the union of disjoint key sets from those of each: a common max, rescaled sums."""
    pieces = list(pieces)
    m = torch.stack([p[0] for p in pieces]).amax(0)
    scales = [torch.exp(p[0] - m) for p in pieces]
    return (m, sum(c * p[1] for c, p in zip(scales, pieces, strict=True)),
            sum(c[..., None] * p[2] for c, p in zip(scales, pieces, strict=True)))


def exact_attention(q: torch.Tensor, key_chunks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces (`attention_pieces`) of queries q over all keys, given as an iterable of (k, v) chunks:
    memory O(Q x chunk) per head, never the whole score matrix."""
    out = None
    for k, v in key_chunks:
        piece = attention_pieces(q, k, v)
        out = piece if out is None else merge_pieces([out, piece])
    return out


def output_error_totals(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(sum ||O_approx - O_exact||^2, sum ||O_exact||^2) in float64, for `relative_error`."""
    exact = exact.double()
    return torch.stack([(approx.double() - exact).square().sum(), exact.square().sum()])


def phase_record(layers: dict) -> dict:
    """One phase of `STEMInversion.bases_report()`: the layers' records, the mean K over layers and choices, and
    the mean of the recorded errors (the criterion's, auto only; None without)."""
    ks = [k for rec in layers.values() for k in rec["k"]]
    errors = [e for rec in layers.values() for e in (rec["error"] or [])]
    return {"layers": {name: {"k": list(rec["k"]), "error": None if rec["error"] is None else list(rec["error"]),
                              "tried": None if rec["tried"] is None else [dict(t) for t in rec["tried"]]}
                       for name, rec in layers.items()},
            "mean_k": sum(ks) / len(ks) if ks else None,
            "mean_error": sum(errors) / len(errors) if errors else None}

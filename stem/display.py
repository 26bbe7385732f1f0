"""Names people read in tables, legends and captions: the paper's method names instead of config names.

    display_value("inversion", "stem_k128")                     -> "STEM (K=128)"
    display_value("inversion", "stem", {"inversion": {"method": "stem", "num_bases": 512}})
                                                                -> "STEM (K=512)"   (the K the run used)
    display_value("table2", "stem_tokenflow")                   -> "STEM-TokenFlow"
    display_value("data.n_frames", 120)                         -> "120"

The K of a STEM row comes from the run's own metrics.json (`inversion.num_bases`) when given, so
`inversion=stem inversion.num_bases=128` is never shown as the preset's K=256. Values without a
display name are shown as they are.
"""

from __future__ import annotations

import re

# (column, config name) -> display name; K of STEM rows is filled in by `display_value`.
_STEM_VARIANTS = {"stem": "STEM", "stem_literal": "STEM, Eq. 8-11 literal", "stem_official": "STEM, released code"}
_INVERSIONS = {
    "ddim_1frame": "DDIM 1-frame",
    "ddim_2frame": "DDIM 2-frame",
    "ddim_2frame_fatezero": "DDIM 2-frame",   # the method name of a run (its pairing appended)
    "ddim_2frame_tuneavideo": "DDIM 2-frame, Tune-A-Video pairing",
    "ddim_allframe": "DDIM all-frame",
    "fatezero": "DDIM, FateZero attention",
}
_EDITS = {
    "tokenflow": "TokenFlow",
    "tokenflow_recon": "TokenFlow, source prompt",
    "stem_tokenflow": "STEM-TokenFlow",
    "stem_tokenflow_released": "STEM-TokenFlow, released (FreeU)",
    "fatezero": "FateZero",
    "fatezero_paper": "FateZero",
    "stem_fatezero": "STEM-FateZero",
    "stem_fatezero_smaller": "STEM-FateZero, smaller cross ratio",
    "fatezero_reconstruct": "FateZero reconstruction",
}
_FIG4 = {
    "ddim_i": "DDIM, fashion (i)",
    "stem_i": "STEM, fashion (i)",
    "ddim_ii": "DDIM, fashion (ii)",
    "stem_ii": "STEM, fashion (ii)",
    "ddim_i_pnp": "DDIM, fashion (i) as TokenFlow PnP",
    "stem_i_pnp": "STEM, fashion (i) as TokenFlow PnP",
}
_BY_COLUMN = {"inversion": _INVERSIONS, "editing": _EDITS, "table2": _EDITS, "fig4": _FIG4}
_STEM_K = re.compile(r"^stem_k(\d+)$")
COLUMN_NAMES = {"inversion": "Inversion", "editing": "Editing", "table2": "Method", "fig4": "Method",
                "data": "Video", "data.n_frames": "Frames N", "data.width": "Resolution",
                "inversion.num_bases": "K"}


def _num_bases(metrics: dict | None):
    inversion = (metrics or {}).get("inversion")
    if isinstance(inversion, dict) and inversion.get("method") == "stem":
        return inversion.get("num_bases")
    return None


def display_value(column: str, value, metrics: dict | None = None) -> str:
    """The display name of `value` in `column` (an override key); `metrics` (the run's metrics.json)
    supplies the K of STEM inversions."""
    text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if column == "inversion":
        k = _num_bases(metrics)
        match = _STEM_K.match(text)
        if match:
            return f"STEM (K={k if k is not None else match.group(1)})"
        if text in _STEM_VARIANTS:
            base = _STEM_VARIANTS[text]
            return f"{base} (K={k})" if k is not None else base
    return _BY_COLUMN.get(column, {}).get(text, text)


def display_column(column: str) -> str:
    """The header of an override-key column ("data.n_frames" -> "Frames N"); unknown keys as they are."""
    return COLUMN_NAMES.get(column, column)

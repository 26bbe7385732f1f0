"""Names people read in tables, legends and captions: the paper's method names instead of config names.

    display_value("inversion", "stem_k128")                     -> "STEM (K=128)"
    display_value("inversion", "stem", {"inversion": {"method": "stem", "num_bases": 512}})
                                                                -> "STEM (K=512)"   (the K the run used)
    display_value("table2", "stem_tokenflow")                   -> "STEM-TokenFlow"
    display_value("data.n_frames", 120)                         -> "120"
    display_value("adaptive_k", "auto_tight", {"inversion": {"method": "stem", "num_bases": "auto",
                                                             "auto": {"target": 0.2, ...}}})
                                                                -> "STEM (auto, target 0.2)"
    display_value("ablation_k", "k512", metrics)   # K clamped at 6 layers
                                                        -> "STEM (K=512, clamped at 6 of 16 layers, mean K 404.0)"
    short_layer("down_blocks.0.attentions.1.transformer_blocks.0.attn1") -> "down0.1"

The K of a STEM row comes from the run's own metrics.json (`inversion.num_bases`, or its `auto.target`
for adaptive K) when given, so `inversion=stem inversion.num_bases=128` is never shown as the preset's
K=256. A fixed K that some layer could not hold (excess_bases=clamp: fewer bases where a layer has fewer
tokens, metrics.json's `bases.inversion`) is never shown as plain "K=256": the name says at how many layers
it was clamped and the mean K used (`clamp_note`). Values without a display name are shown as they are.
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
    "tuneavideo": "Tune-A-Video",
    "pix2video": "Pix2Video",
    "text2video_zero": "Text2Video-Zero",
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
# Table 2's rows as the paper's comparison figures (Figs. 5 and 11) and its table name them: STEM rows are "Ours".
PAPER_METHODS = {
    "tuneavideo": "Tune-A-Video",
    "pix2video": "Pix2Video",
    "text2video_zero": "Text2Video-Zero",
    "fatezero": "FateZero",
    "tokenflow": "TokenFlow",
    "stem_fatezero": "Ours (STEM-FateZero)",
    "stem_tokenflow": "Ours (STEM-TokenFlow)",
}
_FIG4 = {
    "ddim_i": "DDIM, fashion (i)",
    "stem_i": "STEM, fashion (i)",
    "ddim_ii": "DDIM, fashion (ii)",
    "stem_ii": "STEM, fashion (ii)",
    "ddim_i_pnp": "DDIM, fashion (i) as TokenFlow PnP",
    "stem_i_pnp": "STEM, fashion (i) as TokenFlow PnP",
}
_ADAPTIVE_K = {  # rows of configs/adaptive_k/ (experiment=ablation_adaptive_k); a finished run names its own K
    "k128": "STEM (K=128)",
    "k256": "STEM (K=256)",
    "k512": "STEM (K=512)",
    "auto_tight": "STEM (auto, tight)",
    "auto_loose": "STEM (auto, loose)",
}
_ABLATION_K = {  # rows of configs/ablation_k/ (experiment=ablation_k, Fig. 3); a finished STEM run names its own K
    "ddim": "DDIM 1-frame",
    "k128": "STEM (K=128)",
    "k256": "STEM (K=256)",
    "k512": "STEM (K=512)",
}
_BY_COLUMN = {"inversion": _INVERSIONS, "editing": _EDITS, "table2": _EDITS, "fig4": _FIG4, "adaptive_k": _ADAPTIVE_K,
              "ablation_k": _ABLATION_K}
_STEM_ROWS = ("adaptive_k", "ablation_k")  # row groups whose STEM rows are named from the run's own K
_STEM_K = re.compile(r"^stem_k(\d+)$")
COLUMN_NAMES = {"inversion": "Inversion", "editing": "Editing", "table2": "Method", "fig4": "Method",
                "adaptive_k": "Inversion", "ablation_k": "Inversion", "data": "Video", "data.n_frames": "Frames N",
                "data.width": "Resolution", "inversion.num_bases": "K"}


def bases_label(settings: dict | None) -> str | None:
    """How a STEM inversion's settings (metrics.json's `inversion`, `method.settings()`) choose K:
    "K=128", or "auto, target 0.2" for adaptive K ("auto, token error 0.3" with auto.criterion=tokens); None for
    other methods."""
    if not isinstance(settings, dict) or settings.get("method") != "stem" or settings.get("num_bases") is None:
        return None
    k = settings["num_bases"]
    if k != "auto":
        return f"K={k}"
    auto = settings.get("auto") or {}
    target = auto.get("target")
    if target is None:
        return "auto"
    return f"auto, token error {target:g}" if auto.get("criterion") == "tokens" else f"auto, target {target:g}"


def clamped(metrics: dict | None) -> dict | None:
    """How a fixed-K STEM run's K was clamped (excess_bases=clamp: as many bases as tokens where a layer has
    fewer than K per EM group), from its metrics.json: {"k": the K asked for, "layers": layers that used fewer,
    "of": layers recorded, "mean_k": mean K used}, or None (not clamped, not a fixed-K STEM run, or no record
    of K per layer, e.g. a cache entry written before it was kept)."""
    settings = (metrics or {}).get("inversion")
    if bases_label(settings) is None or not isinstance(settings["num_bases"], int):
        return None
    record = ((metrics or {}).get("bases") or {}).get("inversion")
    layers = (record or {}).get("layers") if isinstance(record, dict) else None
    if not layers:
        return None
    k = settings["num_bases"]
    fewer = sum(1 for v in layers.values() if any(int(x) < k for x in (v or {}).get("k") or []))
    return {"k": k, "layers": fewer, "of": len(layers), "mean_k": record.get("mean_k")} if fewer else None


def clamp_note(metrics: dict | None) -> str | None:
    """"clamped at 6 of 16 layers, mean K 404.0" for a run whose K was clamped (`clamped`), else None."""
    info = clamped(metrics)
    if info is None:
        return None
    mean = f", mean K {info['mean_k']:.1f}" if isinstance(info["mean_k"], (int, float)) else ""
    return f"clamped at {info['layers']} of {info['of']} layers{mean}"


def display_value(column: str, value, metrics: dict | None = None) -> str:
    """The display name of `value` in `column` (an override key); `metrics` (the run's metrics.json)
    supplies the K (or the adaptive-K target) of STEM inversions, and whether that K was clamped
    (`clamp_note`: "STEM (K=256, clamped at 1 of 16 layers, mean K 244.0)"; a K column: "256 (clamped ...)")."""
    text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    k = bases_label((metrics or {}).get("inversion"))
    note = clamp_note(metrics)
    if k is not None and note is not None:
        k = f"{k}, {note}"
    if column == "inversion.num_bases" and note is not None:
        return f"{text} ({note})"
    if column == "inversion":
        match = _STEM_K.match(text)
        if match:
            return f"STEM ({k or f'K={match.group(1)}'})"
        if text == "stem_auto":
            return f"STEM ({k or 'auto'})"
        if text in _STEM_VARIANTS:
            base = _STEM_VARIANTS[text]
            return f"{base} ({k})" if k is not None else base
    if column in _STEM_ROWS and k is not None:
        return f"STEM ({k})"
    ran = (metrics or {}).get("inversion_method")  # an edit's inversion (a DDIM row run with another context)
    if column in _STEM_ROWS and isinstance(ran, str) and ran:
        return display_value("inversion", ran, metrics)
    return _BY_COLUMN.get(column, {}).get(text, text)


def method_name(metrics: dict | None, note: bool = True) -> str | None:
    """The display name of a finished run's method, from its metrics.json alone: an edit's ("STEM-TokenFlow"),
    else its inversion's ("STEM (K=256)", "DDIM 1-frame"); `note=False` leaves out a clamped K's note. None
    when metrics.json names no method."""
    metrics = metrics or {}
    method = metrics.get("method")
    if not isinstance(method, str) or not method:
        return None
    if metrics.get("editing") is not None:
        return method
    return display_value("inversion", method, metrics if note else {**metrics, "bases": None})


def paper_method(column: str, value, metrics: dict | None = None) -> str:
    """The paper's name of a Table 2 row in its figures ("Ours (STEM-TokenFlow)" for table2=stem_tokenflow),
    else `display_value` (other rows and columns: "STEM-FateZero, smaller cross ratio", "STEM (K=256)")."""
    text = "" if value is None else str(value)
    if column == "table2" and text in PAPER_METHODS:
        return PAPER_METHODS[text]
    return display_value(column, value, metrics)


def display_column(column: str) -> str:
    """The header of an override-key column ("data.n_frames" -> "Frames N"); unknown keys as they are."""
    return COLUMN_NAMES.get(column, column)


# attn1 paths of an SD-style UNet: down_blocks.<i>.attentions.<j>..., mid_block.attentions.<j>..., up_blocks...
_LAYER = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.attentions\.(\d+)"
                    r"\.transformer_blocks\.(\d+)\.attn1$")
_PART = {"down_blocks": (0, "down"), "mid_block": (1, "mid"), "up_blocks": (2, "up")}


def short_layer(path: str) -> str:
    """A UNet self-attention layer's short name: "down0.1" (down block 0, attention 1), "mid", "up3.2";
    a transformer block other than the first gets "/t<n>"; a path of another shape is returned as it is."""
    match = _LAYER.match(path)
    if not match:
        return path
    part, block, attention, transformer = match.groups()
    name = _PART[part][1] + ("" if part == "mid_block" else f"{block}.{attention}")
    if part == "mid_block" and attention != "0":
        name += f".{attention}"
    return name + (f"/t{transformer}" if transformer != "0" else "")


def layer_order(path: str) -> tuple:
    """Sort key of attn1 paths in the UNet's order: down blocks, the mid block, up blocks (numbers by value),
    other names after them, alphabetically."""
    match = _LAYER.match(path)
    if not match:
        return (3, 0, 0, 0, path)
    part, block, attention, transformer = match.groups()
    return (_PART[part][0], int(block or 0), int(attention), int(transformer), path)


def bases_line(phase: str, record: dict, how: str | None = None) -> str:
    """One log line of a STEM bases record (`method.bases_report()[phase]`, metrics.json's `bases.<phase>`):
    "K per layer (inversion, auto, target 0.3): down0.0 64, down0.1 64, ..., mid 32, ..., up3.2 128; mean 72.0",
    layers in the UNet's order; a layer whose K changed between steps (auto.when=every_step) shows its range
    "64-128". `how`: `bases_label` of the run's settings."""
    cells = []
    for path in sorted(record["layers"], key=layer_order):
        ks = record["layers"][path]["k"]
        lo, hi = min(ks), max(ks)
        cells.append(f"{short_layer(path)} {lo}" if lo == hi else f"{short_layer(path)} {lo}-{hi}")
    return f"K per layer ({phase}{', ' + how if how else ''}): {', '.join(cells)}; mean {record['mean_k']:.1f}"


def lookup(metrics: dict, path: str):
    """The value at a dotted `path` of a metrics.json dict (None when absent; "inf"/"-inf"/"nan" as floats)."""
    node = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node in ("inf", "-inf", "nan"):  # metrics.json keeps strict JSON by writing these as strings
        return float(node)
    return node


def sort_key(value):
    """An order of cell values: numbers by value first, then the rest by their text (None as "")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, "" if value is None else str(value))

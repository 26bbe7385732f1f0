"""How a sweep's numbers were made, in one caption line: model and dtype, device, clips, steps, commit.

    runs = collect_runs(sweep_dir)             # stem.reporting.tables
    facts = sweep_provenance(runs)
    facts["caption"]   # "Model tiny (random weights: mechanics only), float32, on AMD EPYC (cpu); clips: ..."

Facts come from the finished jobs' own files: `metrics.json` (model name, dtype, device and its
name, the video's name/frames/size, the inversion's steps) and `git.json` (commit, dirty), plus
`.hydra/config.yaml` for which builder made the model. A fact that differs between jobs is listed
with all its values (in job order), never reduced to one; a fact no job recorded is "unknown"
(runs from before `device_name` was recorded build their table all the same).

Frames scored: each job's `video.frame_numbers` (1-based source frames), per clip as a span ("1-20",
"1-40 every 2", "20 of 1-120" for uneven picks); `same_frames` says whether every job of each clip
scored the same frames (Table 2's rows must). Runs that did not record them leave it out of the caption.

Metric weights: the weights each metric's numbers rest on, from metrics.json: the CLIP model and its
`weights` (tag, file or "random"; older runs: `pretrained`, None = random) and the flow source of warp
error / feature similarity (`backend`, `flow_weights`). A random CLIP, OpenCV DIS flow (no learned
weights) or a custom RAFT module is marked "not comparable to the paper" (`random_metric_weights`),
as random diffusion weights are marked "mechanics only".

Rows (`sweep_provenance(runs, columns)`, the table's row columns, e.g. ["table2"]; tables of edits only): each
row's method (metrics.json's `method` and the inversion it ran on), base model (the weights it ran on: `model` and
`model_fingerprint`, which for Pix2Video is the depth model its editor runs on, plus the editor's extra weights
`weights`, e.g. ControlNet depth) and settings (the editor's; scalars in the caption, all in the sidecar JSON). A
row no job of which finished names the editor its config asked for (`.hydra/config.yaml`) and says so.

Jobs that did not finish are counted by status ("2 of 3 jobs finished (1 failed: ...)"); the table's "Not
finished" column (`stem.reporting.tables.NOT_FINISHED`) says why each did not.

Random weights: `model=tiny` (`stem.diffusion.models.build_tiny`) and `model=sd15_arch` (`build_sd15_arch`)
are randomly initialised; their numbers show the mechanics only. The job's config names the
builder (`model._target_`); without it, the model name `_build_random` gives ("tiny-seed0",
"sd15_arch-seed0") tells. Anything loaded with `load_pretrained` counts as real weights ("sd15").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

UNKNOWN = "unknown"
RANDOM_WEIGHTS = "random weights: mechanics only"
NOT_PAPER = "not comparable to the paper"
# flow backend (metrics.json warp_error.backend) -> (weights when a run did not record them, the paper's?)
_FLOW = {"raft": ("Raft_Large_Weights.C_T_SKHT_V2", True), "raft-custom": ("custom model", False),
         "dis": ("no learned weights: OpenCV DIS", False), "exact": ("exact ground-truth flow", True)}
# builder (last part of model._target_) -> the model option it belongs to
_BUILDERS = {"build_tiny": "tiny", "build_sd15_arch": "sd15_arch", "load_pretrained": "sd15"}
_RANDOM_KINDS = ("tiny", "sd15_arch")
_RANDOM_NAME = re.compile(r"^(tiny|sd15_arch)-seed\d+$")  # the name stem.diffusion.models._build_random gives


def _read(path: Path, parse):
    try:
        return parse(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # a damaged file: the fact is unknown, the table still builds
        return None


def model_kind(run: dict) -> str:
    """tiny | sd15_arch | sd15 (real weights) | unknown, for one finished run."""
    config = _read(Path(run["dir"]) / ".hydra" / "config.yaml", yaml.safe_load) if run.get("dir") else None
    target = ((config or {}).get("model") or {}).get("_target_") if isinstance(config, dict) else None
    if isinstance(target, str) and target.rsplit(".", 1)[-1] in _BUILDERS:
        return _BUILDERS[target.rsplit(".", 1)[-1]]
    name = (run.get("metrics") or {}).get("model")
    if not isinstance(name, str) or not name:
        return UNKNOWN
    match = _RANDOM_NAME.match(name)
    return match.group(1) if match else "sd15"


def _listed(values: list) -> str:
    """Distinct values in order of first appearance, joined by ", " (a missing one listed as "unknown")."""
    return ", ".join(dict.fromkeys(UNKNOWN if v in (None, "") else str(v) for v in values)) or UNKNOWN


def _clip(video: dict) -> tuple[str, str]:
    name = video.get("name") or UNKNOWN
    size = f"{video['width']}x{video['height']}" if video.get("width") and video.get("height") else UNKNOWN
    return name, size


def _clips(metrics: list[dict]) -> str:
    """"car_turn (8 frames, 512x512), wolf (8 frames, 512x512)"; frames and sizes of one clip listed."""
    frames: dict[str, list] = {}
    sizes: dict[str, list] = {}
    for video in (m["video"] for m in metrics if isinstance(m.get("video"), dict)):
        name, size = _clip(video)
        frames.setdefault(name, []).append(video.get("frames"))
        sizes.setdefault(name, []).append(size)
    if not frames:
        return UNKNOWN
    out = []
    for name in frames:
        counts = sorted({f for f in frames[name] if isinstance(f, int)})
        n = "/".join(map(str, counts)) if counts else UNKNOWN
        out.append(f"{name} ({n} frames, {' / '.join(dict.fromkeys(sizes[name]))})")
    return ", ".join(out)


def _span(numbers: tuple[int, ...]) -> str:
    """Frame numbers as a span: "1-20" (consecutive), "1-39 every 2" (an even stride), "20 of 1-120"."""
    if len(numbers) == 1:
        return str(numbers[0])
    steps = {b - a for a, b in zip(numbers, numbers[1:])}
    if len(steps) == 1:
        (step,) = steps
        return f"{numbers[0]}-{numbers[-1]}" + ("" if step == 1 else f" every {step}")
    return f"{len(numbers)} of {numbers[0]}-{numbers[-1]}"


def _frames(metrics: list[dict]) -> tuple[str, bool | None]:
    """("car_turn 1-8, wolf 1-20", True): each clip's scored frames, and whether all its jobs scored
    the same ones; ("unknown", None) when no job recorded `video.frame_numbers`."""
    per_clip: dict[str, list[tuple]] = {}
    for video in (m["video"] for m in metrics if isinstance(m.get("video"), dict)):
        numbers = video.get("frame_numbers")
        if isinstance(numbers, list) and numbers and all(isinstance(n, int) for n in numbers):
            per_clip.setdefault(_clip(video)[0], []).append(tuple(numbers))
    if not per_clip:
        return UNKNOWN, None
    out = []
    for name, picks in per_clip.items():
        distinct = list(dict.fromkeys(picks))
        if len(distinct) == 1:
            out.append(f"{name} {_span(distinct[0])}")
        else:
            out.append(f"{name} " + " / ".join(f"{_span(d)} ({picks.count(d)} job{'s' * (picks.count(d) != 1)})"
                                               for d in distinct))
    return ", ".join(out), all(len(set(p)) == 1 for p in per_clip.values())


def _weights(m: dict) -> list[tuple[str, bool]]:
    """(text, the paper's kind of weights?) for each weighted metric of one job's metrics.json."""
    out = []
    clip = m.get("clip")
    if isinstance(clip, dict) and ("weights" in clip or "pretrained" in clip):
        weights = clip.get("weights", "random" if clip.get("pretrained") is None else clip.get("pretrained"))
        random = weights == "random"
        out.append((f"CLIP {clip.get('model') or UNKNOWN} "
                    f"({'random weights: ' + NOT_PAPER if random else weights})", not random))
    for section in (m[key] for key in ("warp_error", "feature_similarity") if isinstance(m.get(key), dict)):
        backend = section.get("backend", section.get("flow_backend"))
        if not isinstance(backend, str):
            continue
        fallback, paper = _FLOW.get(backend, (UNKNOWN, False))
        weights = section.get("flow_weights") or fallback
        out.append((f"flow {backend} ({weights}" + ("" if paper else f": {NOT_PAPER}") + ")", paper))
    return out


def _commit(revisions: list[dict]) -> tuple[str, bool | None]:
    """Commits listed ("<sha> (dirty)") and whether any job ran from a modified checkout."""
    shown = [f"{r['commit']}{' (dirty)' if r.get('dirty') else ''}" if r.get("commit") else None for r in revisions]
    dirty = [r["dirty"] for r in revisions if r.get("dirty") is not None]
    return _listed(shown), (any(dirty) if dirty else None)


SKIPPED_SETTINGS = ("method", "prompt", "negative_prompt")  # a row's caption settings leave these out (per clip)
SETTING_CHARS = 40  # a setting's value longer than this (a list of layers) is left to the sidecar JSON


def _settings_text(settings: dict) -> str:
    """"guidance_scale 7.5, num_steps 50, ...": the scalar settings of a row, in their order; None values, prompts
    and long values left out."""
    out = []
    for key, value in (settings or {}).items():
        if key in SKIPPED_SETTINGS or value is None or isinstance(value, (dict, list)):
            continue
        text = str(value).lower() if isinstance(value, bool) else \
            f"{value:g}" if isinstance(value, float) else str(value)
        if len(text) <= SETTING_CHARS:
            out.append(f"{key} {text}")
    return ", ".join(out)


def _configured_editor(run: dict) -> str:
    """The editor class a job's config asked for (`.hydra/config.yaml` editing._target_), else "unknown"."""
    config = _read(Path(run["dir"]) / ".hydra" / "config.yaml", yaml.safe_load) if run.get("dir") else None
    editing = config.get("editing") if isinstance(config, dict) else None
    target = editing.get("_target_") if isinstance(editing, dict) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else UNKNOWN


def row_facts(runs: list[dict], columns: list[str]) -> list[dict]:
    """One dict per row of a table (the jobs with the same values of `columns`), in job order: "row" (the column
    values joined by "/", the table's row key), "name" (their display names), "method", "inversion", "model"
    (names of the weights it ran on), "fingerprint", "weights" (the editor's extra weights), "settings" (the
    first finished job's editor settings, else its inversion's), "jobs", "jobs_finished", "editor" (whether the
    row edits: its jobs ran an editor, or its config names one)."""
    from stem.reporting.display import display_value

    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(repr(run["overrides"].get(c)) for c in columns), []).append(run)
    out = []
    for members in groups.values():
        done = [r["metrics"] for r in members if r.get("status") == "ok" and isinstance(r.get("metrics"), dict)]
        values = [members[0]["overrides"].get(c) for c in columns]
        first = done[0] if done else {}
        weights = {}
        for m in done:
            for name, source in (m.get("weights") or {}).items():
                weights.setdefault(name, source)
        settings = first.get("editing") if isinstance(first.get("editing"), dict) else first.get("inversion") or {}
        out.append({
            "row": "/".join("" if v is None else str(v) for v in values),
            "name": " / ".join(display_value(c, v, first or None) for c, v in zip(columns, values)),
            "method": _listed([m.get("method") for m in done]) if done else
            f"{_configured_editor(members[0])} (no job of the row finished)",
            "inversion": _listed([m.get("inversion_method") or (m.get("inversion") or {}).get("method")
                                  for m in done]) if done else UNKNOWN,
            "model": _listed([m.get("model") for m in done]) if done else UNKNOWN,
            "fingerprint": _listed([m.get("model_fingerprint") for m in done]) if done else UNKNOWN,
            "weights": weights,
            "settings": dict(settings),
            "jobs": len(members),
            "jobs_finished": len(done),
            "editor": any(isinstance(m.get("editing"), dict) for m in done) or (
                not done and _configured_editor(members[0]) != UNKNOWN),
        })
    return out


def _row_text(row: dict) -> str:
    fingerprint = "" if row["fingerprint"] == UNKNOWN else f" (fingerprint {row['fingerprint']})"
    extra = "".join(f" + {name} {source}" for name, source in row["weights"].items())
    settings = _settings_text(row["settings"])
    if row["jobs_finished"] == 0:
        return f"{row['name']}: {row['method']}"
    return (f"{row['name']}: {row['method']} on {row['inversion']} inversion, weights {row['model']}{fingerprint}"
            f"{extra}" + (f", settings {{{settings}}}" if settings else ""))


def sweep_provenance(runs: list[dict], columns: list[str] | None = None) -> dict:
    """The facts of a sweep (`stem.reporting.tables.collect_runs` output) as a plain dict of strings, numbers
    and booleans, with "caption" the one-line text of them (see the module docstring). With `columns` (the
    table's row columns) and a row that edits, "rows": each row's method, weights and settings (`row_facts`), in
    the caption too (reconstruction tables' rows differ only by what their columns show)."""
    ok = [r for r in runs if r.get("status") == "ok" and isinstance(r.get("metrics"), dict)]
    metrics = [r["metrics"] for r in ok]
    kinds = [model_kind(r) for r in ok]
    commit, dirty = _commit([(_read(Path(r["dir"]) / "git.json", json.loads) if r.get("dir") else None) or {}
                             for r in ok])
    frames, same_frames = _frames(metrics)
    weights = [w for m in metrics for w in _weights(m)]
    facts = {
        "model": _listed(kinds),
        "model_name": _listed([m.get("model") for m in metrics]),
        "random_weights": any(k in _RANDOM_KINDS for k in kinds),
        "dtype": _listed([str(m["dtype"]).removeprefix("torch.") if m.get("dtype") else None for m in metrics]),
        "device": _listed([m.get("device") for m in metrics]),
        "device_name": _listed([m.get("device_name") for m in metrics]),
        "clips": _clips(metrics),
        "frames": frames,
        "same_frames": same_frames,
        "metric_weights": ", ".join(dict.fromkeys(text for text, _ in weights)) or "none",
        "random_metric_weights": any(not paper for _, paper in weights),
        "steps": _listed([(m.get("inversion") or {}).get("num_steps") for m in metrics]),
        "commit": commit,
        "dirty": dirty,
        "jobs": len(runs),
        "jobs_finished": len(ok),
        "jobs_not_finished": {status: sum(1 for r in runs if r.get("status") == status)
                              for status in dict.fromkeys(r.get("status") for r in runs) if status != "ok"},
    }
    rows = row_facts(runs, list(columns)) if columns else []
    if any(row["editor"] for row in rows):  # edit tables (Table 2): rows differ by more than their columns say
        facts["rows"] = rows
    facts["caption"] = caption(facts)
    return facts


def caption(facts: dict) -> str:
    """One line: model (and the random-weights warning), dtype, device, clips, the frames scored, steps,
    the metrics' weights (marked where not comparable to the paper), commit, jobs."""
    model = ", ".join(f"{k} ({RANDOM_WEIGHTS})" if k in _RANDOM_KINDS else k for k in facts["model"].split(", "))
    device = facts["device"] if facts["device_name"] == UNKNOWN else facts["device_name"]
    if UNKNOWN not in (facts["device"], facts["device_name"]):
        device += f" ({facts['device']})"
    elif facts["device_name"] == UNKNOWN:
        device += " (device name not recorded)"
    commit = facts["commit"] if facts["commit"] == UNKNOWN else ", ".join(
        c[:10] + c[40:] if re.match(r"^[0-9a-f]{40}", c) else c for c in facts["commit"].split(", "))
    frames = ""
    if facts.get("frames", UNKNOWN) != UNKNOWN:
        frames = (f"; frames scored: {facts['frames']}" if facts.get("same_frames") is not False else
                  f"; frames scored (they differ between jobs of a clip): {facts['frames']}")
    weights = "" if facts.get("metric_weights", "none") == "none" else f"; metric weights: {facts['metric_weights']}"
    bad = facts.get("jobs_not_finished") or {}
    unfinished = "" if not bad else " (" + ", ".join(f"{n} {status}" for status, n in bad.items()) + \
        ": the table's Not finished column says why)"
    rows = "" if not facts.get("rows") else " Rows: " + "; ".join(_row_text(r) for r in facts["rows"]) + "."
    return (f"Model {model}, {facts['dtype']}, on {device}; clips: {facts['clips']}{frames}; "
            f"{facts['steps']} DDIM steps{weights}; commit {commit}; "
            f"{facts['jobs_finished']} of {facts['jobs']} jobs finished{unfinished}.{rows}")

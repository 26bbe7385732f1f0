"""The pairs of Table 3's user study, from the run folders of a Table 2 sweep, and the manifest that lists them.

    manifest = write_study(["outputs/table2_editing/multiruns/2024-06-01/12-00-00"], "study")
    # -> study/manifest.json and study/sources/<pair id>.mp4

A pair is one clip (metrics.json `video.name`) edited to one target prompt (`edit_prompt`) by a method and by its
STEM counterpart (`COMPARISONS`: FateZero vs STEM-FateZero, TokenFlow vs STEM-TokenFlow). Only finished jobs
(`stem.reporting.tables.collect_runs` status "ok") with their `edited.mp4` count, and only when both sides are there
and edited the same source frames (`video.frame_numbers`, width, height); every other group is listed in the
manifest's "skipped" with why. A job's method: its Table 2 row (`table2=stem_fatezero` -> STEM-FateZero; the other
rows, e.g. stem_fatezero_smaller, are not the paper's and are left out), else its metrics.json `method` (a run
folder of a single `python run.py`). Two jobs of one method on one clip and prompt are refused: which one a
participant would see would be a guess.

The source a participant sees is the left half of one side's `comparison.mp4` (input | output, written by run.py):
the frames both edits started from, written once per pair to `<out>/sources/<pair id>.mp4`. Pair ids are a hash of
clip, prompt and comparison, so no id or file name a participant sees names a method.

The manifest (JSON, written atomically) is the only list of files a study server may serve: for each pair its id,
clip, source prompt, target prompt, comparison, the two methods, each method's edited video and run folder, the
source video, the source frames (1-based) and size; with the sweep it came from and its provenance caption
(`stem.reporting.provenance`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from stem.core.atomic import atomic_file
from stem.core.errors import StemError, StudyError
from stem.reporting.provenance import sweep_provenance
from stem.reporting.tables import collect_runs

# (method, its STEM counterpart): the two comparisons of Table 3, in the paper's order
COMPARISONS = (("FateZero", "STEM-FateZero"), ("TokenFlow", "STEM-TokenFlow"))
METHODS = tuple(m for pair in COMPARISONS for m in pair)
TABLE2_ROWS = {"fatezero": "FateZero", "stem_fatezero": "STEM-FateZero", "tokenflow": "TokenFlow",
               "stem_tokenflow": "STEM-TokenFlow"}   # the Table 2 rows (config group table2) of the study
EDIT_VIDEO = "edited.mp4"         # a job's edit (stem.runs.rundir.write_run)
SOURCE_VIDEO = "comparison.mp4"   # input | output side by side: its left half is the source
MANIFEST = "manifest.json"
SOURCES = "sources"
MANIFEST_VERSION = 1
PAIR_FIELDS = ("id", "clip", "prompt", "source_prompt", "comparison", "methods", "videos", "runs", "source")


def comparison_name(methods) -> str:
    return f"{methods[0]} vs {methods[1]}"


def pair_id(clip: str, prompt: str, comparison: str) -> str:
    """"p" + 12 hex digits of a hash of clip, target prompt and comparison: stable, and naming no method."""
    digest = hashlib.sha256("\0".join((clip, prompt, comparison)).encode()).hexdigest()
    return f"p{digest[:12]}"


def study_method(run: dict) -> str | None:
    """The study's name of a job's method (`METHODS`), or None when it is not one of the study's."""
    row = run["overrides"].get("table2")
    if row is not None:
        return TABLE2_ROWS.get(str(row))
    method = (run.get("metrics") or {}).get("method")
    return method if method in METHODS else None


def read_runs(sources) -> tuple[list[dict], str]:
    """The jobs of `sources` (sweep folders, each with job folders, or run folders, each with `.hydra/`) as
    `collect_runs` reads them, and a text naming the sources (the manifest's "sweep")."""
    runs, names = [], []
    for source in map(Path, sources):
        if not source.is_dir():
            raise StudyError(f"not a folder: {source}: give a sweep folder (hydra.sweep.dir) or run folders")
        try:
            if (source / ".hydra").is_dir():   # one run folder: read it as its parent reads it
                found = [r for r in collect_runs(source.parent) if r["dir"] is not None
                         and Path(r["dir"]).resolve() == source.resolve()]
            else:
                found = collect_runs(source)
        except StemError as e:
            raise StudyError(str(e)) from e
        if not found:
            raise StudyError(f"no job folders (with .hydra/) in {source}: give a Table 2 sweep folder or run folders")
        runs += found
        names.append(str(source.resolve()))
    return runs, ", ".join(names)


def _frames_key(metrics: dict) -> tuple:
    video = metrics.get("video") or {}
    return tuple(video.get("frame_numbers") or ()), video.get("width"), video.get("height")


def find_pairs(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """(pairs, skipped): the study's pairs of `runs` (`collect_runs` output), in the order of first appearance of
    their clip and prompt, FateZero's comparison before TokenFlow's; `skipped`: one line per clip, prompt and
    comparison that has some but not both sides, or sides on different frames. Paths are not yet checked for a
    source (`write_study` does). StudyError for two jobs of one method on one clip and prompt."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for run in runs:
        method = study_method(run)
        metrics = run.get("metrics")
        if method is None or run["status"] != "ok" or not isinstance(metrics, dict):
            continue
        clip, prompt = (metrics.get("video") or {}).get("name"), metrics.get("edit_prompt")
        if not isinstance(clip, str) or not isinstance(prompt, str) or not (Path(run["dir"]) / EDIT_VIDEO).is_file():
            continue
        group = groups.setdefault((clip, prompt), {})
        if method in group:
            raise StudyError(f"two finished jobs of {method} edit clip {clip!r} to {prompt!r}: {group[method]['dir']} "
                             f"and {run['dir']}; give the run folders of one of them")
        group[method] = run
    pairs, skipped = [], []
    for (clip, prompt), group in groups.items():
        for methods in COMPARISONS:
            comparison = comparison_name(methods)
            present = [m for m in methods if m in group]
            if not present:
                continue
            if len(present) == 1:
                skipped.append(f"{clip!r} -> {prompt!r}: {comparison}: only {present[0]} finished")
                continue
            a, b = (group[m] for m in methods)
            if _frames_key(a["metrics"]) != _frames_key(b["metrics"]):
                skipped.append(f"{clip!r} -> {prompt!r}: {comparison}: the two edits are of different frames or sizes")
                continue
            pairs.append({
                "id": pair_id(clip, prompt, comparison), "clip": clip, "prompt": prompt,
                "source_prompt": (a["metrics"].get("video") or {}).get("prompt"), "comparison": comparison,
                "methods": list(methods),
                "videos": {m: str((Path(group[m]["dir"]) / EDIT_VIDEO).resolve()) for m in methods},
                "runs": {m: str(Path(group[m]["dir"]).resolve()) for m in methods},
                "frame_numbers": list(_frames_key(a["metrics"])[0]), "width": _frames_key(a["metrics"])[1],
                "height": _frames_key(a["metrics"])[2],
            })
    return pairs, skipped


def _write_source(pair: dict, path: Path) -> None:
    """The left half of one side's comparison.mp4 (the source frames both edited) to `path`."""
    import numpy as np

    from stem.data.video import read_frames, write_video

    for method in pair["methods"]:
        comparison = Path(pair["runs"][method]) / SOURCE_VIDEO
        if comparison.is_file():
            frames, fps = read_frames(comparison)
            width, height = pair.get("width"), pair.get("height")
            if isinstance(width, int) and isinstance(height, int) and frames.shape[1:3] != (height, 2 * width):
                raise StudyError(f"{comparison} is {frames.shape[2]}x{frames.shape[1]}, not source | edit at "
                                 f"{width}x{height} each (metrics.json): cannot cut the source of pair {pair['id']}")
            write_video(path, np.ascontiguousarray(frames[:, :, : frames.shape[2] // 2]), fps or 8.0)
            return
    raise StudyError(f"pair {pair['id']} ({pair['clip']!r}): no {SOURCE_VIDEO} in either run folder, so no source "
                     f"video: {', '.join(pair['runs'].values())}")


def write_study(sources, out_dir: str | Path) -> dict:
    """Build the study of `sources` (sweep folders or run folders) into `out_dir`: the source video of each pair
    (`sources/<pair id>.mp4`) and `manifest.json` (atomic; written last, so it never lists a missing file).
    Returns the manifest. StudyError when no pair can be built (the message says what was found)."""
    runs, sweep = read_runs(sources)
    pairs, skipped = find_pairs(runs)
    if not pairs:
        found = sorted({m for r in runs if r["status"] == "ok" and (m := study_method(r))})
        raise StudyError(f"no pairs in {sweep}: the study needs finished jobs of FateZero and STEM-FateZero, or of "
                         f"TokenFlow and STEM-TokenFlow, on the same clip and target prompt (finished: "
                         f"{', '.join(found) or 'none of these methods'}"
                         + (f"; {'; '.join(skipped)}" if skipped else "") + ")")
    out_dir = Path(out_dir)
    for pair in pairs:
        pair["source"] = str((out_dir / SOURCES / f"{pair['id']}.mp4").resolve())
        _write_source(pair, Path(pair["source"]))
    used = {str(Path(d).resolve()) for p in pairs for d in p["runs"].values()}
    provenance = sweep_provenance([r for r in runs if r["dir"] is not None and str(Path(r["dir"]).resolve()) in used])
    manifest = {"version": MANIFEST_VERSION, "sweep": sweep, "provenance": provenance["caption"],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pairs": pairs,
                "skipped": skipped}
    with atomic_file(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(path: str | Path) -> dict:
    """The manifest at `path`, checked: version, pairs with every field, unique ids, two methods of one comparison
    each, each with its video. StudyError (one line) otherwise."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"manifest not found: {path} (scripts/make_study.py builds it from a sweep)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudyError(f"cannot read the manifest {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise StudyError(f"{path} is not a study manifest of version {MANIFEST_VERSION} (scripts/make_study.py)")
    pairs = manifest.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise StudyError(f"the manifest {path} lists no pairs")
    seen = set()
    for i, pair in enumerate(pairs):
        missing = [f for f in PAIR_FIELDS if not isinstance(pair, dict) or f not in pair]
        if missing:
            raise StudyError(f"the manifest {path}: pair {i} lacks {', '.join(missing)}")
        methods = pair["methods"]
        if not isinstance(methods, list) or tuple(methods) not in COMPARISONS or set(pair["videos"]) != set(methods):
            raise StudyError(f"the manifest {path}: pair {pair['id']} has methods {methods!r}, not one of "
                             f"{', '.join(map(comparison_name, COMPARISONS))} with a video each")
        if pair["id"] in seen:
            raise StudyError(f"the manifest {path}: pair id {pair['id']} appears twice")
        seen.add(pair["id"])
    return manifest


def manifest_digest(manifest: dict) -> str:
    """A hash of the pairs (ids and methods; not the paths, so a moved sweep keeps its database): a database answers
    one manifest's pairs (`stem.study.store`)."""
    core = sorted([p["id"], p["methods"]] for p in manifest["pairs"])
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

"""Each experiment file, composed as `python run.py -m experiment=X` composes every job, runs the
settings the paper states for its table or figure (issue 11). The expected values are the paper's,
written out here; each test names the plausible config bug it catches."""

import re

import pytest
from conftest import ROOT, compose_with_hydra
from omegaconf import OmegaConf

CONFIGS = ROOT / "configs"
CLIPS = ["car_turn", "wolf", "taylor", "woman_running"]
CLIP_FRAMES = {"car_turn": 8, "wolf": 40, "taylor": 48, "woman_running": 120}  # the sample clips, whole


compose = compose_with_hydra  # the composed config with Hydra's node (the sweep) kept


def sweep(tmp_path, experiment) -> dict:
    """The experiment's declared sweep {key: [values]} (hydra.sweeper.params; {} for table3_user_study, a single
    job that reads a study's answers)."""
    params = compose(tmp_path, f"experiment={experiment}").hydra.sweeper.params or {}
    return {str(k): [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


def jobs(tmp_path, experiment, **fixed):
    """(overrides, job config) for every job of the declared sweep (cartesian over its keys, as
    Hydra's basic sweeper), `fixed` replacing a swept key by one value."""
    params = {**sweep(tmp_path, experiment), **{k: [v] for k, v in fixed.items()}}
    combos = [{}]
    for key, values in params.items():
        combos = [{**c, key: v} for c in combos for v in values]
    for combo in combos:
        cfg = compose(tmp_path, f"experiment={experiment}", *(f"{k}={v}" for k, v in combo.items()))
        yield combo, cfg


def target(node):
    return None if node is None else node["_target_"].rsplit(".", 1)[1]


# ------------------------------------------------------------------------------------ Fig. 4


FIG4 = {  # paper Fig. 4 rows: DDIM / STEM x fashion (i) plain sampling / (ii) FateZero's fusion
    "ddim_i": ("DDIMInversion", None),
    "stem_i": ("STEMInversion", None),
    "ddim_ii": ("FateZeroInversion", "FateZeroEditor"),   # FateZero with its own inversion
    "stem_ii": ("STEMInversion", "FateZeroEditor"),       # STEM-FateZero
}


def test_fig4_sweeps_the_paired_rows_of_both_fashions(tmp_path):
    """Each job gets its row's inversion AND editing. Mutations caught: the old sweep `inversion:
    ddim_1frame,stem` x `editing: ...` (its inversion overrode fatezero_reconstruct's inversion=fatezero,
    so "FateZero" reconstructed from 1-frame DDIM latents); fashion (i) through TokenFlow's PnP
    pipeline (editing=tokenflow_recon: guidance 7.5, injection, propagation)."""
    assert sweep(tmp_path, "fig4_per_frame") == {"fig4": list(FIG4)}
    for combo, cfg in jobs(tmp_path, "fig4_per_frame"):
        inversion, editor = FIG4[combo["fig4"]]
        assert (target(cfg["inversion"]), target(cfg.get("editing"))) == (inversion, editor), combo
        assert cfg["inversion"]["num_steps"] == 50 and cfg["data"]["name"] == "car_turn"
        assert cfg["data"]["n_frames"] is None and cfg["data"]["max_frames"] is None  # all 8 frames
        if combo["fig4"].endswith("_i"):  # plain DDIM sampling under the source prompt: no editor, no guidance
            assert cfg.get("editing") is None and cfg["metrics"]["reconstruction"] is True
        else:  # FateZero's fusion of every recorded map at every step, source prompt, guidance 1
            e = cfg.get("editing")
            assert e["prompt"] is None and e["guidance_scale"] == 1.0
            assert e["cross_replace_steps"] == e["self_replace_steps"] == 1.0
    stem_i = compose(tmp_path, "experiment=fig4_per_frame", "fig4=stem_i")
    assert stem_i.inversion.stem_in_reconstruction is True  # as the STEM release reconstructs (paper silent)


def test_fig4_pnp_reconstruction_is_a_named_extra_not_in_the_sweep(tmp_path):
    """TokenFlow's PnP reconstruction stays reachable by name only (mutation: back in the sweep)."""
    assert not any(v.endswith("_pnp") for v in sweep(tmp_path, "fig4_per_frame")["fig4"])
    for row, inversion in (("ddim_i_pnp", "DDIMInversion"), ("stem_i_pnp", "STEMInversion")):
        cfg = compose(tmp_path, "experiment=fig4_per_frame", f"fig4={row}")
        assert (target(cfg.inversion), target(cfg.editing), cfg.editing.prompt) == (inversion, "TokenFlowEditor", None)


# ------------------------------------------------------------------------------------ Table 2


BASELINE_ROWS = ["tuneavideo", "pix2video", "text2video_zero"]  # Table 2's first three rows, in its order
TABLE2 = {  # row: (inversion, editor, cross fusion, self fusion, frame cap under table2_frames=paper)
    "fatezero": ("FateZeroInversion", "FateZeroEditor", 0.5, 0.5, 20),       # appendix D [0.5T, T]; B.4 <= 20
    "tokenflow": ("DDIMInversion", "TokenFlowEditor", None, None, None),      # full clips
    "stem_fatezero": ("STEMInversion", "FateZeroEditor", 0.8, 0.5, 20),       # reading A: cross [0.2T, T]
    "stem_tokenflow": ("STEMInversion", "TokenFlowEditor", None, None, None),
}


def test_table2_rows_run_the_paper_settings_on_every_clip(tmp_path):
    """Mutations caught: the FateZero row on editing=fatezero (the teaser's 0.8/0.8) or on another
    inversion; a frame cap dropped (FateZero) or given to TokenFlow; `data.n_frames: 8` (one TokenFlow
    chunk: propagation never exercised); a reweight or FreeU switched on by default; the target prompt
    not each clip's own."""
    # the three baselines first, in the paper's order (their rows: tests/app/test_table2_baselines.py)
    assert sweep(tmp_path, "table2_editing") == {"table2": [*BASELINE_ROWS, *TABLE2], "data": CLIPS}
    for combo, cfg in (job for row in TABLE2 for job in jobs(tmp_path, "table2_editing", table2=row)):
        inversion, editor, cross, self_, cap = TABLE2[combo["table2"]]
        e, data = cfg.get("editing"), cfg["data"]
        assert (target(cfg["inversion"]), target(e)) == (inversion, editor), combo
        assert (e.get("cross_replace_steps"), e.get("self_replace_steps")) == (cross, self_), combo
        assert (data["n_frames"], data["max_frames"], data["max_frames_keep"], data["name"]) == (
            None, 20, "first", combo["data"]), combo   # the shared window (table2_frames=shared)
        assert OmegaConf.to_container(e)["prompt"] == "${data.edit_prompt}" and e.prompt == data.edit_prompt
        assert e.get("reweight") in (None, {}) and e.get("freeu") is None and e.guidance_scale == 7.5
        assert cfg.inversion.num_steps == e.num_steps == 50
    for row, (*_, cap) in TABLE2.items():  # the paper's frames per row, by name
        data = compose(tmp_path, "experiment=table2_editing", f"table2={row}", "table2_frames=paper").data
        assert (data.n_frames, data.max_frames, data.max_frames_keep) == (None, cap, "even"), row
    smaller = compose(tmp_path, "experiment=table2_editing", "table2=stem_fatezero_smaller").editing
    assert (smaller.cross_replace_steps, smaller.self_replace_steps) == (0.2, 0.5)  # reading B, named


def test_table2_paper_values_key_on_the_row_names(tmp_path):
    """Every row option has the paper's numbers beside it (mutation: the paper dict still keyed on
    editing option names, so a renamed row prints no paper column)."""
    spec = compose(tmp_path, "experiment=table2_editing").hydra.callbacks.sweep_table
    rows = sorted(p.stem for p in (CONFIGS / "table2").glob("*.yaml"))
    assert list(spec.columns) == ["table2"] and sorted(spec.paper) == rows
    assert {k: dict(spec.paper[k]) for k in TABLE2} == {
        "fatezero": {"CLIP score": "0.29", "Warp error x1e-3": "7.2"},
        "tokenflow": {"CLIP score": "0.31", "Warp error x1e-3": "4.9"},
        "stem_fatezero": {"CLIP score": "0.30", "Warp error x1e-3": "4.3"},
        "stem_tokenflow": {"CLIP score": "0.31", "Warp error x1e-3": "3.5"}}   # as the paper prints them


def test_table2_released_stem_tokenflow_turns_freeu_on(tmp_path):
    """The STEM release's editing (FreeU b1 1.2, b2 1.4, s1 0.9, s2 0.2) is a named row, off by default
    (needs editing/stem_tokenflow_released.yaml and the `editing.freeu` knob)."""
    cfg = compose(tmp_path, "experiment=table2_editing", "table2=stem_tokenflow_released")
    assert target(cfg.inversion) == "STEMInversion" and cfg.editing.freeu is not None
    assert compose(tmp_path, "experiment=table2_editing", "table2=stem_tokenflow").editing.freeu is None


def test_table2_paper_frames_full_for_tokenflow_and_at_most_20_for_fatezero(tmp_path, monkeypatch, shared_videos):
    """table2_frames=paper, the clips as loaded (frames decoded, resized small to keep the test light):
    TokenFlow edits 8/40/48/120 frames, FateZero min(20, clip) spread evenly (paper B.4). Mutation
    caught: the cap taken as a count (an error, or padding, on the 8-frame car-turn), or applied to
    TokenFlow; the paper option keeping the first 20 instead of spreading them."""
    from hydra.utils import instantiate

    monkeypatch.setenv("STEM_DATA_ROOT", str(shared_videos))
    for row, cap in (("tokenflow", None), ("fatezero", 20)):
        for clip, frames in CLIP_FRAMES.items():
            cfg = compose(tmp_path, "experiment=table2_editing", f"table2={row}", f"data={clip}",
                          "table2_frames=paper", "data.width=64", "data.height=64")
            video = instantiate(cfg.data)
            assert video.num_frames == (frames if cap is None else min(cap, frames)), (row, clip)
            assert video.frame_numbers[-1] == frames, (row, clip)   # the last frame kept: spread, not the first


SHARED_WINDOW = 20  # Table 2's default: the first 20 frames of each clip, every row


def _selected(data, clip_frames: int) -> list[int]:
    """0-based source indices a composed `data` node selects from a clip of `clip_frames` frames: the
    clip's frames from start by stride (n_frames of them), then the cap through the loaders' own
    `stem.data.video.cap_indices`."""
    from stem.data.video import cap_indices

    assert data.stride != "even", "this helper takes integer strides"
    picked = list(range(data.start, clip_frames, data.stride))[: data.n_frames]
    return [picked[i] for i in cap_indices(len(picked), data.max_frames, data.max_frames_keep)]


def test_table2_every_row_of_a_clip_edits_the_same_frames(tmp_path):
    """Every job of the declared sweep (row x clip), resolved to the source frames it edits: all rows of
    a clip the same, the first min(20, clip) frames (written out here). Mutations caught: a FateZero row
    keeping its own spread cap (table2_frames=paper as the default: wolf's rows 0..19 vs 0, 2, 4, ...);
    max_frames_keep=even in the shared window; the frames group listed before the rows (the rows' own
    cap wins)."""
    per_clip: dict[str, dict[str, list[int]]] = {}
    for combo, cfg in (job for row in TABLE2 for job in jobs(tmp_path, "table2_editing", table2=row)):
        per_clip.setdefault(combo["data"], {})[combo["table2"]] = _selected(cfg.data, CLIP_FRAMES[combo["data"]])
    assert sorted(per_clip) == sorted(CLIP_FRAMES)
    for clip, rows in per_clip.items():
        assert sorted(rows) == sorted(TABLE2), clip
        expected = list(range(min(SHARED_WINDOW, CLIP_FRAMES[clip])))
        assert all(frames == expected for frames in rows.values()), (clip, rows)
    # and the paper's protocol is what it says: the rows of a long clip differ there
    paper = {row: _selected(compose(tmp_path, "experiment=table2_editing", f"table2={row}", "data=wolf",
                                    "table2_frames=paper").data, 40) for row in ("fatezero", "tokenflow")}
    assert paper["tokenflow"] == list(range(40)) and paper["fatezero"][:3] == [0, 2, 4]


def test_table2_rows_score_warp_error_over_the_same_frame_pairs(tmp_path):
    """Each row's data config loads the synthetic pan (24 frames, exact flow); the warp error of the
    unedited clip against its own flow, the floor each edit is measured against, is then the same per
    pair in every row, over the same pairs of neighbouring source frames (1, 2), ..., (19, 20).
    Mutation caught: table2_frames=paper as the default (FateZero's pairs ~1.2 frames apart: other
    pairs, other floor); max_frames_keep=even in the shared window."""
    from hydra.utils import instantiate

    from stem.metrics import warp_error

    results = {}
    for row in TABLE2:
        cfg = compose(tmp_path, "experiment=table2_editing", f"table2={row}", "data=synthetic", "data.n_frames=24",
                      "data.width=64", "data.height=64")
        video = instantiate(cfg.data)
        pairs = list(zip(video.frame_numbers[:-1], video.frame_numbers[1:]))
        per_pair = warp_error(video.frames, video.frames, flow=video.flow, device="cpu", progress=False)["per_pair"]
        assert len(per_pair) == len(pairs)
        results[row] = (pairs, per_pair)
    expected_pairs = [(t, t + 1) for t in range(1, SHARED_WINDOW)]
    for row, (pairs, per_pair) in results.items():
        assert pairs == expected_pairs, row
        assert per_pair == results["tokenflow"][1], row


# ------------------------------------------------------------------------------------ reconstruction tables


def test_table1_times_48_frames_of_taylor_at_640x360_with_50_steps(tmp_path):
    """Mutations caught: a shorter clip or a resize, fewer steps, a cached (untimed) inversion, an
    inversion missing from the sweep."""
    assert sweep(tmp_path, "table1_time") == {
        "inversion": ["ddim_1frame", "ddim_2frame", "ddim_allframe", "stem_k128", "stem", "stem_k512"]}
    for combo, cfg in jobs(tmp_path, "table1_time"):
        data = cfg["data"]
        assert (data["name"], data["n_frames"], data["width"], data["height"]) == ("taylor", 48, None, None)
        assert cfg["inversion"]["num_steps"] == 50 and cfg["use_cache"] is False and cfg.get("editing") is None
    k = {i: compose(tmp_path, "experiment=table1_time", f"inversion={i}").inversion.num_bases
         for i in ("stem_k128", "stem", "stem_k512")}
    assert k == {"stem_k128": 128, "stem": 256, "stem_k512": 512}


def test_table1_clip_is_640x360(tmp_path, monkeypatch, shared_videos):
    from hydra.utils import instantiate

    monkeypatch.setenv("STEM_DATA_ROOT", str(shared_videos))
    video = instantiate(compose(tmp_path, "experiment=table1_time").data)
    assert (video.num_frames, video.width, video.height) == (48, 640, 360)


def test_table4_spreads_8_to_120_frames_evenly_over_one_clip(tmp_path):
    """Mutation caught: first-N frames (stride 1) instead of "sampled evenly", or another K."""
    assert sweep(tmp_path, "table4_length") == {"data.n_frames": ["8", "16", "32", "64", "120"]}
    for combo, cfg in jobs(tmp_path, "table4_length"):
        data, inv = cfg["data"], cfg["inversion"]
        assert (data["name"], data["stride"], data["n_frames"], data["width"]) == (
            "woman_running", "even", int(combo["data.n_frames"]), None)
        assert (target(inv), inv["num_bases"], inv["num_steps"], cfg.get("editing")) == ("STEMInversion", 256, 50, None)


def test_table5_24_frames_at_four_square_resolutions(tmp_path):
    """Mutation caught: non-square frames (height not following the swept width), another length or K."""
    assert sweep(tmp_path, "table5_resolution") == {"data.width": ["384", "512", "768", "1024"]}
    for combo, cfg in jobs(tmp_path, "table5_resolution"):
        data, inv = cfg.data, cfg.inversion
        width = int(combo["data.width"])
        assert (data.name, data.n_frames, data.width, data.height) == ("woman_running", 24, width, width)
        assert (target(inv), inv.num_bases, inv.num_steps, cfg.get("editing")) == ("STEMInversion", 256, 50, None)


def test_table6_four_inversions_over_the_sample_clips(tmp_path):
    """Mutation caught: an inversion dropped or replaced (e.g. stem_official for the paper's STEM)."""
    assert sweep(tmp_path, "table6_inversion") == {
        "inversion": ["ddim_1frame", "ddim_2frame", "ddim_allframe", "stem"], "data": CLIPS}
    contexts = {}
    for combo, cfg in jobs(tmp_path, "table6_inversion", data="car_turn"):
        inv = cfg["inversion"]
        contexts[combo["inversion"]] = (target(inv), inv.get("context"), inv.get("num_bases"), inv["num_steps"])
        assert cfg.get("editing") is None and cfg["data"]["n_frames"] == 8
    assert contexts == {"ddim_1frame": ("DDIMInversion", "1frame", None, 50),
                        "ddim_2frame": ("DDIMInversion", "2frame", None, 50),
                        "ddim_allframe": ("DDIMInversion", "allframe", None, 50),
                        "stem": ("STEMInversion", None, 256, 50)}


ABLATION_K = {  # paper Fig. 3 rows: (inversion, its context or K); every row also edited with TokenFlow
    "ddim": ("DDIMInversion", "1frame"),
    "k128": ("STEMInversion", 128),
    "k256": ("STEMInversion", 256),
    "k512": ("STEMInversion", 512),
}


def test_ablation_k_reconstructs_and_edits_120_frames_with_ddim_and_128_256_512_bases(tmp_path):
    """Fig. 3: DDIM and STEM K=128/256/512 reconstructions (left) and TokenFlow edits of each (right), rows in
    that order, on the whole 120-frame woman-running clip at 512x512 with 50 steps, SD 1.5; each job edits to the
    clip's target prompt "Wonder woman is running" with TokenFlow's released settings (guidance 7.5, 50 steps,
    PnP 0.5/0.8, batch 8, no FreeU), samples its latents back for PSNR/SSIM (report_reconstruction) and scores the
    edit (CLIP, warp error). Mutations caught (applied and seen failing: the k512 row's inversion=stem, i.e.
    K=256; report_reconstruction off): a clip cut short or another K list; a row running another K;
    reconstruction-only rows (no editing, or no PSNR beside the edit); the source prompt as target."""
    assert sweep(tmp_path, "ablation_k") == {"ablation_k": list(ABLATION_K)}
    for combo, cfg in jobs(tmp_path, "ablation_k"):
        data, inv, edit = cfg["data"], cfg["inversion"], cfg["editing"]
        assert (data["name"], data["n_frames"], data["stride"], data["width"]) == ("woman_running", None, 1, None)
        assert cfg["model"]["_target_"].rsplit(".", 1)[1] == "load_pretrained"
        kind, setting = ABLATION_K[combo["ablation_k"]]
        assert (target(inv), inv.get("context") if kind == "DDIMInversion" else inv["num_bases"], inv["num_steps"]) == (
            kind, setting, 50)
        assert (target(edit), edit["prompt"], edit["num_steps"], edit["guidance_scale"]) == (
            "TokenFlowEditor", "Wonder woman is running", 50, 7.5)
        assert (edit["pnp_attn_t"], edit["pnp_f_t"], edit["batch_size"], edit["freeu"]) == (0.5, 0.8, 8, None)
        assert cfg["report_reconstruction"] is True
        assert cfg["metrics"]["clip"]["pretrained"] == "openai" and cfg["metrics"]["warp_error"] is True


ADAPTIVE_K = {"k128": 128, "k256": 256, "k512": 512, "auto_tight": 0.1, "auto_loose": 0.3}  # K, or auto's target


def test_ablation_adaptive_k_runs_fixed_and_auto_rows_on_fig3_settings(tmp_path):
    """Fig. 3's setting as ablation_k runs it (SD 1.5, the whole 120-frame woman-running clip at its 512x512,
    50 steps), rows in order fixed K 128/256/512 then auto at 0.1 and 0.3 on the attention criterion (64 sampled
    queries), every inversion timed (no cache), the fixed rows measuring their attention error.
    Mutations caught: a row's inversion left to the command line (an auto row running K=256), the targets
    swapped, the cache on (a second sweep would time 0 s hits), a clip cut short, the fixed rows unmeasured."""
    assert sweep(tmp_path, "ablation_adaptive_k") == {"adaptive_k": list(ADAPTIVE_K)}
    for combo, cfg in jobs(tmp_path, "ablation_adaptive_k"):
        data, inv = cfg["data"], cfg["inversion"]
        assert (data["name"], data["n_frames"], data["stride"], data["width"]) == ("woman_running", None, 1, None)
        assert (target(inv), inv["num_steps"], cfg["model"]["_target_"].rsplit(".", 1)[1]) == (
            "STEMInversion", 50, "load_pretrained")
        assert cfg["use_cache"] is False and cfg["warmup_steps"] == 3 and cfg.get("editing") is None
        value = ADAPTIVE_K[combo["adaptive_k"]]
        if combo["adaptive_k"].startswith("auto"):
            assert inv["num_bases"] == "auto" and dict(inv["auto"]) == {
                "target": value, "k_min": 32, "k_max": 512, "k_step": None, "when": "first_step",
                "criterion": "attention", "queries": 64}
        else:
            assert inv["num_bases"] == value and inv["measure_attention_error"] is True


def test_fig9_feature_similarity_of_the_four_inversions(tmp_path):
    """Mutation caught: the features metric off, or an inversion missing."""
    assert sweep(tmp_path, "fig9_feature_similarity") == {
        "inversion": ["ddim_1frame", "ddim_2frame", "ddim_allframe", "stem"]}
    for combo, cfg in jobs(tmp_path, "fig9_feature_similarity"):
        assert cfg["metrics"]["features"] is not None and cfg.get("editing") is None
        assert cfg["inversion"]["num_steps"] == 50 and cfg["data"]["name"] == "car_turn"


# ------------------------------------------------------------------------------------ documentation


def departures(text: str) -> str:
    """The "Departures from the paper:" list of an experiment header (comment lines after it)."""
    match = re.search(r"^# Departures from the paper:\n((?:#  .*\n)+)", text, flags=re.M)
    return match.group(1) if match else ""


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_lists_its_departures_here_and_in_reproduce_md(experiment):
    """Mutation caught: a header without the list, or docs/REPRODUCE.md silent on an experiment."""
    assert departures((CONFIGS / "experiment" / f"{experiment}.yaml").read_text()), experiment
    docs = (ROOT / "docs" / "REPRODUCE.md").read_text().split("## Departures from the paper", 1)
    assert len(docs) == 2 and f"`{experiment}`" in docs[1].split("\n## ", 1)[0], experiment


def _flat(text: str) -> str:
    """Comment or Markdown text on one line: comment marks dropped, whitespace collapsed."""
    return " ".join(re.sub(r"^#", "", text, flags=re.M).split())


def reproduce_departures() -> list[str]:
    """The items of docs/REPRODUCE.md's "Departures from the paper" list, each on one line."""
    section = (ROOT / "docs" / "REPRODUCE.md").read_text().split("## Departures from the paper", 1)[1]
    return [_flat(item) for item in re.split(r"^- ", section.split("\n## ", 1)[0], flags=re.M)[1:]]


# Behaviours where the code departs from what the paper writes, or picks where it writes nothing: the
# texts their declaration must hold (the behaviour and the named option that changes it), and the
# experiments whose numbers they shape. Each is declared in each such header and in a REPRODUCE.md item
# that names the experiment; test_declared_departures_are_where_the_configs_say pins the experiment lists.
DECLARED = {
    "fatezero_replace": (  # FateZero's spatio-temporal attention: middle frame only (release) vs Eq. 6: own + middle
        ("`mode: replace`", "middle frame only", "Eq. 6", "`inversion.mode=concat`", "`editing.attention_mode=concat`"),
        ("fig4_per_frame", "table2_editing")),
    "stem_in_reconstruction": (  # the reconstruction samples back with STEM self-attention, as the release
        ("`inversion.stem_in_reconstruction: true`", "`inversion.stem_in_reconstruction=false`"),
        ("ablation_adaptive_k", "ablation_k", "fig4_per_frame", "fig9_feature_similarity", "table4_length",
         "table5_resolution", "table6_inversion")),
    "fatezero_clip_groupnorm": (  # paper silent: ResNet/output GroupNorms over the clip, as FateZero's release
        ("`editing.clip_groupnorm: true`", "`editing.clip_groupnorm=false`", "whole clip"),
        ("fig4_per_frame", "table2_editing")),
    "fig4_ii_fusion": (  # fashion (ii): every map fused at every step, guidance 1
        ("fashion (ii)", "`editing.self_replace_steps=1.0`", "`editing.cross_replace_steps=1.0`", "guidance 1",
         "`editing.cross_replace_steps=0.5"),
        ("fig4_per_frame",)),
}


@pytest.mark.parametrize("departure,experiment", [(d, e) for d, (_, exps) in DECLARED.items() for e in exps])
def test_departures_are_declared_in_each_header_and_in_reproduce_md(departure, experiment):
    """Mutations caught: the declaration removed from a header's departures (or moved out of the list),
    or from docs/REPRODUCE.md's item for that experiment; the named option dropped from either."""
    texts, _ = DECLARED[departure]
    declared = _flat(departures((CONFIGS / "experiment" / f"{experiment}.yaml").read_text()))
    assert [t for t in texts if t not in declared] == [], (experiment, departure)
    items = [item for item in reproduce_departures() if f"`{experiment}`" in item]
    assert any(all(t in item for t in texts) for item in items), (experiment, departure)


def rows(tmp_path, experiment):
    """The job configs of an experiment's declared sweep, one clip (the clips share inversion and editing)."""
    params = sweep(tmp_path, experiment)
    clips = params.get("data")
    fixed = {"data": clips[0]} if clips else {}
    return [cfg for row in params.get("table2", [None])
            for _, cfg in jobs(tmp_path, experiment, **fixed, **({"table2": row} if row else {}))]


def scores_reconstruction(experiment: str) -> bool:
    """Whether an experiment's table scores an editing job's plain reconstruction (reconstruction_vs_* columns)."""
    spec = OmegaConf.load(CONFIGS / "experiment" / f"{experiment}.yaml")
    metrics = spec.hydra.callbacks.sweep_table.metrics
    return any(path.startswith("reconstruction_vs_") for _, path, *_ in metrics)


def touches(cfg, experiment: str) -> set[str]:
    """The DECLARED behaviours a job runs, read from its composed config."""
    inv, e, found = cfg["inversion"], cfg.get("editing"), set()
    if (target(inv) == "FateZeroInversion" and inv["mode"] == "replace") or (
            target(e) == "FateZeroEditor" and e["attention_mode"] == "replace"):
        found.add("fatezero_replace")
    if target(e) == "FateZeroEditor" and e["clip_groupnorm"]:
        found.add("fatezero_clip_groupnorm")
    sampled_back = cfg["reconstruct"] and (e is None or (cfg["report_reconstruction"]
                                                         and scores_reconstruction(experiment)))
    if target(inv) == "STEMInversion" and inv["stem_in_reconstruction"] and sampled_back:
        found.add("stem_in_reconstruction")  # the sampled-back video is what the table scores
    if target(e) == "FateZeroEditor" and e["prompt"] is None and (
            e["self_replace_steps"], e["cross_replace_steps"], e["guidance_scale"]) == (1.0, 1.0, 1.0):
        found.add("fig4_ii_fusion")
    return found


def test_declared_departures_are_where_the_configs_say(tmp_path):
    """Each DECLARED behaviour's experiment list is exactly the experiments whose sweep runs it, so a new
    experiment (or row) that runs one must declare it. Mutations caught: an experiment left out of a list
    (and so of the checks above), e.g. fig9's PSNR column sampled back with STEM self-attention undeclared."""
    ran = {d: set() for d in DECLARED}
    for experiment in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        for cfg in rows(tmp_path, experiment):
            for d in touches(cfg, experiment):
                ran[d].add(experiment)
    assert {d: sorted(exps) for d, exps in ran.items()} == {d: sorted(exps) for d, (_, exps) in DECLARED.items()}


def test_the_options_that_undo_each_declared_departure_act(tmp_path):
    """The named options give the paper's behaviour in the composed job. Mutations caught: editing's
    attention mode no longer following FateZero's inversion (`inversion.mode=concat` would edit with
    `replace`), an option the docs name that no config reads."""
    cfg = compose(tmp_path, "experiment=table2_editing", "table2=fatezero", "inversion.mode=concat")
    assert cfg.inversion.mode == cfg.editing.attention_mode == "concat"
    cfg = compose(tmp_path, "experiment=table2_editing", "table2=stem_fatezero", "editing.attention_mode=concat")
    assert cfg.editing.attention_mode == "concat"
    cfg = compose(tmp_path, "experiment=fig4_per_frame", "fig4=ddim_ii", "inversion.mode=concat")
    assert cfg.inversion.mode == cfg.editing.attention_mode == "concat"
    cfg = compose(tmp_path, "experiment=fig4_per_frame", "fig4=stem_ii", "editing.attention_mode=concat",
                  "editing.cross_replace_steps=0.5", "editing.self_replace_steps=0.5")
    assert (cfg.editing.attention_mode, cfg.editing.cross_replace_steps, cfg.editing.self_replace_steps) == (
        "concat", 0.5, 0.5)
    for experiment, row in (("table2_editing", "table2=fatezero"), ("table2_editing", "table2=stem_fatezero"),
                            ("fig4_per_frame", "fig4=ddim_ii"), ("fig4_per_frame", "fig4=stem_ii")):
        assert compose(tmp_path, f"experiment={experiment}", row, "editing.clip_groupnorm=false").editing \
            .clip_groupnorm is False
    cfg = compose(tmp_path, "experiment=table4_length", "inversion.stem_in_reconstruction=false")
    assert cfg.inversion.stem_in_reconstruction is False

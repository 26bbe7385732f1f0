"""One job from a composed config: build model, data, inversion, editing and metrics from their `_target_`,
invert (cached), reconstruct or edit, score, write the run directory, log to the tracker (always closed).

`run_job` is a plain function of the config: `run.py` (Hydra) calls it through `stem.app.launch.task`, tests
call it with a config from Hydra's compose API. Config errors found here (missing values, unknown keys,
interpolations, settings the model cannot run) are one-line `ConfigError`s raised before any model work.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import (
    InterpolationResolutionError,
    InterpolationToMissingValueError,
    UnsupportedInterpolationType,
)

from stem.app.callbacks import sweep_group
from stem.app.loggers import NullLogger
from stem.app.signals import report_failure
from stem.core.errors import ConfigError, StemError
from stem.diffusion.device import device_name, setup_cpu
from stem.distributed.sharding import Distributed, from_env
from stem.inversion.sharded import shard_video
from stem.metrics.evaluation import inversion_reconstruction_sections, summary_scalars
from stem.reporting.display import bases_label, bases_line, display_value
from stem.reporting.plots import BASES_PLOT, plot_bases
from stem.runs.cache import TensorCache
from stem.runs.edit import edit_video
from stem.runs.precheck import check_arguments, check_before_model, check_run_settings
from stem.runs.reconstruction import bases_section, invert_video, reconstruct_video
from stem.runs.rundir import write_run

log = logging.getLogger("run")
# Before any torch op of a job: the flush-to-zero mode is per thread, and torch's CPU worker threads take it from the
# thread that starts them, so setting it only when the model is built (stem.diffusion.device) left the workers that
# building the data had started computing with denormals (an auto-K inversion on the tiny model: 11.5 s instead
# of 1.4 s).
setup_cpu()
HEADLINE = ("psnr", "ssim", "clip_score", "frame_consistency", "warp_error", "mean")  # logged at the end of a job



def _build(group: str, node: DictConfig, **kwargs):
    """instantiate() with the library's StemError surfaced instead of Hydra's wrapper; unknown keys and
    values of the wrong type are refused first (`stem.runs.precheck.check_arguments`)."""
    _check_node(group, node, kwargs)
    literal = {} if kwargs else {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                                 if isinstance(v, str) and "${" in v}
    try:
        if literal:  # an escaped \\${...} (a prompt): instantiate() would resolve it twice, so pass it as is
            trimmed = copy.deepcopy(node)
            trimmed._set_parent(node._get_parent())  # as instantiate() does: interpolations still resolve
            with open_dict(trimmed):
                for key in literal:
                    del trimmed[key]
            return instantiate(trimmed, _partial_=True)(**literal)
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, StemError):
            raise type(cause)(f"{group}: {cause}") from cause
        raise


def _check_node(group: str, node: DictConfig, kwargs: dict) -> None:
    """The group's keys and value types against its `_target_`'s signature (one-line ConfigError)."""
    try:
        target = get_object(node._target_)
    except Exception:  # noqa: BLE001 - a target that does not import: instantiate reports it
        return
    values = OmegaConf.to_container(node, resolve=True)
    check_arguments(group, target, {**{k: v for k, v in values.items() if not k.startswith("_")},
                                    **{k: v for k, v in kwargs.items() if not k.startswith("_")}})


def _check_before_model(cfg: DictConfig, method, editor, video, planned: Distributed | None = None) -> None:
    """Checks that need the model's architecture (steps, K vs tokens, memory), from its config (`stem.runs.precheck`).
    A frame-sharded job checks the memory of one rank: its largest slice of frames."""
    model = OmegaConf.to_container(_model_node(cfg, editor), resolve=True)
    check_memory = cfg.get("check_memory", True)
    if planned is None or not planned.active:
        check_before_model(model, method, video, editor, check_memory=check_memory)
        return
    check_before_model(model, method, video, editor, check_memory=False)
    if check_memory:
        largest = max(shard_video(planned, method, video.num_frames).sizes)
        part = dataclasses.replace(video, frames=video.frames[:largest], flow=None, source_indices=None)
        check_before_model(model, _Checked(method.num_steps), part, None, check_memory=True)


def _model_node(cfg: DictConfig, editor) -> DictConfig:
    """The config of the model the job runs: the model preset's, or the entry of its `baseline_models` that
    the editor runs on instead (`Editor.base_model`, e.g. Pix2Video's depth-conditioned SD 2)."""
    name = getattr(editor, "base_model", None)
    return cfg.model if name is None else _baseline_node(cfg, name, editor)


def _baseline_node(cfg: DictConfig, name: str, editor) -> DictConfig:
    node = OmegaConf.select(cfg, f"baseline_models.{name}")
    if node is None:
        choice = cfg.get("model", {}).get("_target_", "?")
        raise ConfigError(f"editing={editor.name} needs the weights baseline_models.{name}, which the model preset "
                          f"({choice}) does not give; use a preset that does (model=tiny, model=sd15) or add it "
                          "to your preset")
    return node


def _attach_models(cfg: DictConfig, editor) -> None:
    """Build the extra weights the editor names in `needs` from `baseline_models` and hand them to it."""
    if editor is not None and editor.needs:
        editor.attach({name: _build(f"baseline_models.{name}", _baseline_node(cfg, name, editor))
                       for name in editor.needs})


def _weights_facts(cfg: DictConfig, editor) -> dict:
    """metrics.json's `weights`: where each extra model of the editor (`needs`) and its base model (`base_model`)
    came from, {name: Hub id or folder (@revision), or "<builder> seed <n>" for random tiny weights}; {} when the
    editor needs none (a table's provenance names each row's weights from it)."""
    names = [*([editor.base_model] if getattr(editor, "base_model", None) else []), *getattr(editor, "needs", ())]
    out = {}
    for name in dict.fromkeys(names):
        node = OmegaConf.to_container(_baseline_node(cfg, name, editor), resolve=True)
        if node.get("path"):
            out[name] = str(node["path"]) + (f"@{node['revision']}" if node.get("revision") else "")
        else:
            out[name] = f"{str(node.get('_target_', '?')).rsplit('.', 1)[-1]} seed {node.get('seed')}"
    return out


@dataclasses.dataclass
class _Checked:
    """A method whose own check already ran on the whole video (for the memory check of one rank's slice)."""

    num_steps: int

    def check(self, *args) -> None:
        pass


def job_tracking(cfg: DictConfig, hydra_cfg: DictConfig) -> dict:
    """The tracker run's group and name from Hydra's runtime (`HydraConfig.get()`), for `run_job`.

    In a sweep every job is in the group `stem.app.callbacks.sweep_group` (the summary run's too) and is named after
    its swept overrides: those whose key the sweep's command line does not fix to one value (e.g.
    "inversion=stem,data=wolf"; experiment-declared sweeps included). A single run is named after all its
    overrides, or `task_name` without any. paths.* and logger* overrides (where results go) are left out."""
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed: `${x}` in a prompt stays text
    own = [o for o in task if re.split(r"[.=@]", o.lstrip("+~"))[0] not in ("paths", "logger")]
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {"name": ",".join(own) or cfg.task_name}
    sweep_dir = Path(hydra_cfg.sweep.dir)
    multirun = sweep_dir / "multirun.yaml"  # written by the sweeper before any job starts
    parser = OverridesParser.create()
    command_line = (OmegaConf.to_container(OmegaConf.load(multirun).hydra.overrides.task, resolve=False)
                    if multirun.is_file() else [])
    fixed = {o.get_key_element() for o in parser.parse_overrides(command_line) if not o.is_sweep_override()}
    swept = [text for text, o in zip(own, parser.parse_overrides(own)) if o.get_key_element() not in fixed]
    return {"group": sweep_group(cfg.task_name, sweep_dir), "name": ",".join(swept or own) or cfg.task_name}


def run_job(cfg: DictConfig, run_dir: str | Path, tracking: dict | None = None,
            environ: dict | None = None) -> dict | None:
    """Build model, data, inversion, editing (if any) and metrics from `cfg`; reconstruct or edit the
    video; write `run_dir`; return the metrics.json content. `tracking`: the logger's `group` and `name`
    where the config leaves them null (`job_tracking`); an explicit logger.group/logger.name wins.
    `environ`: torchrun's variables of a frame-sharded job (`launch_environ`; None: one process); then
    every rank builds the same objects and runs its slice, rank 0 alone writes `run_dir`, the cache and the
    logger, and the other ranks return None."""
    run_dir = Path(run_dir)
    _check_interpolations(cfg)
    _check_missing(cfg)
    check_run_settings(cfg.seed, cfg.warmup_steps, cfg.distributed.timeout_s, cfg.distributed.master_port,
                       OmegaConf.to_container(cfg.model, resolve=True))
    torch.manual_seed(cfg.seed)
    environ = environ or {}
    planned = Distributed(rank=int(environ.get("RANK", "0")), world_size=int(environ.get("WORLD_SIZE", "1")))
    lead = planned.rank == 0
    progress = cfg.progress and lead
    make_logger = _build("logger", cfg.logger, _partial_=True) if lead else NullLogger  # a partial: no node
    defaults = {k: v for k, v in (tracking or {}).items() if cfg.logger.get(k) is None}
    logger = make_logger(run_config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir), **defaults)
    tag = getattr(logger, "tag", lambda *tags: None)  # a logger of your own may have no tag()
    failed, dist = True, Distributed()
    try:
        method = _build("inversion", cfg.inversion)   # cheap objects first: bad settings fail fast
        editor = _build("editing", cfg.editing) if cfg.get("editing") is not None else None
        tag(method.name, *([editor.name] if editor is not None else []))  # e.g. stem_k256, TokenFlow
        evaluator = _build("metrics", cfg.metrics)
        video = _build("data", cfg.data)
        tag(video.name)
        if editor is not None:
            editor.check(video.num_frames)
        elif not cfg.reconstruct:
            evaluator.check_without_output()   # an inversion-only run has no video to score
        evaluator.prepare(video, method.num_steps)    # bad metric settings and missing CLIP weights, before the model
        if planned.active:
            _check_sharded(planned, method, editor, evaluator, video)
        cache = TensorCache(Path(cfg.paths.cache_dir) / "inversion").check_writable() \
            if cfg.use_cache and lead else None
        _check_before_model(cfg, method, editor, video, planned)   # from the model's config, no weights loaded
        if planned.active:  # the process group, once every check passed (each rank ran the same checks)
            dist = from_env(environ, backend=cfg.distributed.backend, timeout_s=cfg.distributed.timeout_s)
        model = _build("model", _model_node(cfg, editor))
        _attach_models(cfg, editor)
        log.info("video %s: %d frames %dx%d, prompt %r; %s; metrics: %s", video.name, video.num_frames, video.width,
                 video.height, video.prompt, method.name if editor is None else
                 f"{editor.label(method.name)} to {editor.prompt or video.prompt!r}", ", ".join(evaluator.names()))
        recorder = evaluator.feature_recorder(model, video, method.num_steps)
        facts = {"inversion": method.settings(), "model": model.name, "model_fingerprint": model.fingerprint,
                 **({"weights": _weights_facts(cfg, editor)} if editor is not None and
                    (editor.needs or getattr(editor, "base_model", None)) else {}),
                 "device": str(model.device), "device_name": device_name(model.device), "dtype": str(model.dtype)}
        videos = {}
        if editor is None and not cfg.reconstruct:   # inversion only (Table 1 timing jobs): no sampling back
            inverted = invert_video(model, video, method, cache, cfg.prompt_overflow, progress, recorder,
                                    warmup_steps=cfg.warmup_steps, dist=dist)
            frames, output, prompt, label, references = None, "reconstruction", None, method.name, None
            facts["seconds"] = {"inversion": inverted.seconds}
        elif editor is None:
            result = reconstruct_video(model, video, method, cache, cfg.prompt_overflow, progress, recorder,
                                       warmup_steps=cfg.warmup_steps, dist=dist)
            inverted, frames, output, prompt = result.inverted, result.frames, "reconstruction", None
            label = method.name
            references = {"input": video.frames, "vae": result.vae_frames}
            facts["seconds"] = {"inversion": inverted.seconds, "reconstruction": result.seconds}
        else:
            result = edit_video(model, video, method, editor, cache, cfg.prompt_overflow, cfg.progress, recorder,
                                report_reconstruction=cfg.report_reconstruction)
            inverted, frames, output, prompt = result.inverted, result.frames, "edited", result.edit.prompt
            label = editor.label(method.name)
            references = {"input": video.frames, "vae": result.vae_frames} if editor.reconstructs else None
            facts.update(editing=editor.settings(), edit_prompt=prompt, inversion_method=method.name,
                         edit_info=result.edit.info,
                         seconds={"inversion": inverted.seconds, "editing": result.edit.seconds})
            if result.reconstruction is not None:   # how faithful the edited latents are (plain reconstruction)
                facts.update(inversion_reconstruction_sections(
                    result.reconstruction, {"input": video.frames, "vae": result.vae_frames}))
                videos["reconstruction"] = result.reconstruction
        if dist.active:
            facts["distributed"] = _per_rank(dist, inverted, video.num_frames, method)
            if not lead:
                failed = False
                return None
        _report_bases(facts, method, inverted, editor is None, model, video, run_dir)
        facts["seconds"]["vae_encode"] = inverted.encode_seconds
        facts["seconds"]["inversion_per_frame"] = inverted.seconds / video.num_frames
        facts["memory"] = {"inversion_peak_mib": inverted.peak_mib,  # None when the inversion came from the cache
                           "measured_as": "CUDA max_memory_allocated increase" if model.device.type == "cuda"
                           else "process RSS peak increase (sampled every 2 ms)"}
        start = time.perf_counter()
        scores = evaluator.evaluate(frames, video, prompt, label, references=references, recorder=recorder,
                                    run_dir=run_dir, timesteps=inverted.trajectory.timesteps.tolist())
        facts["seconds"]["metrics"] = time.perf_counter() - start
        metrics = write_run(run_dir, video, frames, output, inverted, scores, extra={"method": label, **facts},
                            videos=videos)
        logger.log_run(metrics, run_dir)
        log.info("%s -> %s", ", ".join(f"{k} {v:.4g}" for k, v in summary_scalars(scores).items()
                                       if k.count("/") == 1 and k.split("/")[1] in HEADLINE), run_dir)
        failed = False
        return metrics
    except BaseException as e:
        report_failure(e)  # first: under torchrun this rank may be killed while the logger and the group close
        raise
    finally:
        logger.finish(failed)
        dist.close()


def _report_bases(facts: dict, method, inverted, sampled_back: bool, model, video, run_dir: Path) -> None:
    """STEM runs: the K per layer (`stem.runs.reconstruction.bases_section`) into `facts["bases"]` (metrics.json),
    one log line per phase, and the plot `bases_per_layer.png` in `run_dir`. Other methods: nothing."""
    section = bases_section(method, inverted, sampled_back)
    if section is None:
        return
    facts["bases"] = section
    if section["inversion"] is None:  # a cache entry written before K per layer was kept
        log.info("K per layer (inversion): not recorded in the cache entry %s (use_cache=false inverts again)",
                 inverted.entry)
    records = {phase: section.get(phase) for phase in ("inversion", "reconstruction") if section.get(phase)}
    for phase, record in records.items():
        log.info("%s", bases_line(phase, record, bases_label(method.settings())))
    if not records:
        return
    plot_bases(run_dir / BASES_PLOT, records,
               title=f"{video.name}: bases per layer, {display_value('inversion', method.name, facts)}",
               caption=f"{model.name}, {video.num_frames} frames {video.width}x{video.height}, "
                       f"{method.num_steps} DDIM steps")


def _check_sharded(planned: Distributed, method, editor, evaluator, video) -> None:
    """What a frame-sharded job cannot do, refused on every rank before any process group or model work:
    more ranks than frames, EM groups straddling ranks, FateZero's inversion (`stem.inversion.sharded.shard_video`),
    editing, and feature similarity (it records the UNet of one process)."""
    if editor is not None:
        raise ConfigError(f"editing ({editor.name}) runs on one process: invert with torchrun (editing=null), "
                          "then edit without torchrun; the edit reuses the sharded run's cached latents")
    if evaluator.features:
        raise ConfigError("metrics feature similarity records the UNet of one process: use metrics=recon or "
                          "metrics=edit with torchrun, or run without torchrun")
    shard_video(planned, method, video.num_frames)


def _per_rank(dist: Distributed, inverted, num_frames: int, method) -> dict:
    """metrics.json's `distributed` section (rank 0): world size, backend, every rank's frames, inversion
    seconds and peak memory increase (None on a cache hit); every rank takes part."""
    mine = torch.tensor([inverted.seconds, float("nan") if inverted.peak_mib is None else inverted.peak_mib],
                        dtype=torch.float64, device=dist.device)
    seconds, peaks = zip(*(t.tolist() for t in dist.all_gather(mine)), strict=True)
    return {"world_size": dist.world_size, "backend": dist.backend,
            "frame_slices": [list(s) for s in shard_video(dist, method, num_frames).slices],
            "inversion_seconds_per_rank": list(seconds),
            "inversion_peak_mib_per_rank": [None if p != p else p for p in peaks]}


def _check_missing(cfg: DictConfig) -> None:
    """A mandatory value left as ??? (e.g. editing.prompt) is a one-line error, not a traceback."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        first = missing[0]
        raise ConfigError(f"no value for {', '.join(missing)}: set it on the command line, e.g. {first}='...'")


def _check_interpolations(cfg: DictConfig) -> None:
    """`${...}` that does not resolve (e.g. inside a prompt: OmegaConf reads it as an interpolation) is a one-line
    error saying how to write it literally, `\\${...}`; one that resolves (`${seed}`) is OmegaConf's feature."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationToMissingValueError:
        return  # a ??? value: _check_missing names it
    except (InterpolationResolutionError, UnsupportedInterpolationType) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{e.full_key}: {reason}: OmegaConf reads ${{...}} as an interpolation; to write it "
                          f"literally (e.g. in a prompt) escape it as \\${{...}}, e.g. {e.full_key}='a \\${{x}} cat'"
                          ) from None


# configs/ beside this file (a checkout, an editable install); otherwise the installed copy (a wheel: `stem-run`).

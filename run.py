"""The one Hydra entry point: invert a video, reconstruct it, write the run directory.

    python run.py                                   # tiny random model, synthetic pan, CPU
    python run.py inversion=ddim_allframe data=car_turn model=sd15
    python run.py -m inversion=ddim_1frame,ddim_2frame,ddim_allframe
    python run.py metrics=all                       # + CLIP, warp error, feature similarity (docs/METRICS.md)
    torchrun --standalone --nproc-per-node=2 run.py inversion=stem   # frames sharded over 2 processes

`main` only hands the composed config to `run_job`, a plain function that builds every
object from its `_target_`, runs the job and always closes the logger (failures marked).
Bad input ends with one line `error: ...` on stderr and exit status 2.

Several processes (torchrun, or hydra/launcher=slurm_multigpu: docs/SCALING.md) share one job: each
inverts and reconstructs its slice of the frames; rank 0 alone writes the run folder, the cache
entry, the logs and the W&B run.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
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

from callbacks import sweep_group
from stem.atomic import hidden_name, remove_dead_leftovers
from stem.cache import TensorCache
from stem.device import device_name, setup_cpu
from stem.display import bases_label, bases_line, display_value
from stem.distributed import Distributed, from_env, submitit_environ
from stem.editing.pipeline import edit_video
from stem.errors import ConfigError, StemError
from stem.evaluation import inversion_reconstruction_sections, per_frame_columns, summary_scalars
from stem.plots import BASES_PLOT, plot_bases
from stem.precheck import check_arguments, check_before_model, check_run_settings
from stem.reconstruction import bases_section, invert_video, reconstruct_video
from stem.rundir import write_run
from stem.sharded import shard_video
from stem.tables import mark_job

log = logging.getLogger("run")
# Before any torch op of a job: the flush-to-zero mode is per thread, and torch's CPU worker threads take it from the
# thread that starts them, so setting it only when the model is built (stem.device) left the workers that building
# the data had started computing with denormals (an auto-K inversion on the tiny model: 11.5 s instead of 1.4 s).
setup_cpu()
HEADLINE = ("psnr", "ssim", "clip_score", "frame_consistency", "warp_error", "mean")  # logged at the end of a job


class NullLogger:
    """No tracker: everything is in the run directory already."""

    def __init__(self, **_):
        pass

    def log_run(self, metrics: dict, run_dir: Path) -> None:
        pass

    def tag(self, *tags: str) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass


class WandbLogger:
    """One W&B run per job (offline by default; WANDB_MODE in the environment overrides `mode`), tagged
    with the job's method and data as soon as they are built (`tag`), finished as failed when the job raises.
    `group` and `name` come from configs/logger/wandb.yaml, else from `job_tracking` (run.py's main)."""

    def __init__(self, project: str = "stem", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list | tuple = (), name: str | None = None,
                 run_config: dict | None = None, dir: str | None = None):
        import wandb  # imported only when W&B is on

        self.wandb = wandb
        self.run = None
        try:
            with _sigterm_deferred():  # a SIGTERM meanwhile is raised once the run exists, which is then finished
                self.run = wandb.init(project=project, entity=entity, mode=os.environ.get("WANDB_MODE") or mode,
                                      group=group, tags=list(tags), name=name, config=run_config, dir=dir)
        except Terminated:
            if self.run is not None:
                self.finish(failed=True)
            raise

    def tag(self, *tags: str) -> None:
        """Add tags (kept once each, in order) to the run."""
        self.run.tags = tuple(dict.fromkeys([*self.run.tags, *tags]))

    def log_run(self, metrics: dict, run_dir: Path) -> None:
        """Headline numbers as summary, per-frame values as a table, the run's videos and figures as media."""
        summary = summary_scalars(metrics)
        record = dict(summary)
        columns = per_frame_columns(metrics)
        if columns:
            table = self.wandb.Table(columns=["frame", *columns])
            for i, row in enumerate(zip(*columns.values())):
                table.add_data(i, *row)
            record["per_frame"] = table
        for video in sorted(run_dir.glob("*.mp4")):
            record[video.stem] = self.wandb.Video(str(video), format="mp4")
        for image in sorted(run_dir.glob("*.png")):
            record[image.stem] = self.wandb.Image(str(image))
        self.run.log(record)
        self.run.summary.update(summary)

    def finish(self, failed: bool) -> None:
        with _sigterm_deferred():  # its exit record is written whole; a SIGTERM meanwhile is raised after
            self.run.finish(exit_code=1 if failed else 0)


class Terminated(BaseException):
    """SIGTERM (SLURM's time limit or scancel, kill): raised in the main thread by `_ends_on_sigterm`'s handler,
    so that `finally` blocks run (run_job finishes its logger as failed) and main marks the job failed. Not an
    Exception: nothing that catches errors swallows it."""


class _SigtermState:
    deferred = 0        # depth of `_sigterm_deferred` blocks
    pending = False     # a SIGTERM arrived inside one: raised when the outermost ends
    raised = False      # Terminated raised already: later SIGTERMs leave the cleanup alone


def _on_sigterm(signum, frame) -> None:
    if _SigtermState.raised:
        return
    if _SigtermState.deferred:
        _SigtermState.pending = True
        return
    _SigtermState.raised = True
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


@contextmanager
def _sigterm_deferred():
    """A SIGTERM inside the block is raised as Terminated when it ends (W&B starting or finishing a run:
    an interrupted init or finish leaves a run without exit record)."""
    _SigtermState.deferred += 1
    try:
        yield
    finally:
        _SigtermState.deferred -= 1
        if not _SigtermState.deferred and _SigtermState.pending:
            _SigtermState.pending, _SigtermState.raised = False, True
            raise Terminated("terminated by signal SIGTERM")


def _redeliver_dropped(previous_hook):
    """A `sys.unraisablehook` that sends SIGTERM again (50 ms later) when a finaliser (`__del__`, a weakref
    callback, run during garbage collection) dropped the Terminated its handler raised: the handler then runs
    again outside the finaliser, in the job's own code. Other unraisable exceptions go to `previous_hook`."""

    def hook(unraisable):
        if isinstance(unraisable.exc_value, Terminated):
            _SigtermState.raised = False
            # from another thread, a moment later: sent from here the handler would run inside this hook
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        previous_hook(unraisable)

    return hook


def report_failure(e: BaseException) -> None:
    """The failure's line, written and flushed before any cleanup (a torchrun rank is sent SIGTERM as soon as
    another rank ends: what comes later may never be written), once per exception, a SIGTERM meanwhile deferred:
    bad input (StemError), SIGTERM and Ctrl-C as one line `error: ...` on stderr and in the log (run.log); any
    other error as its type and message in the log, its traceback following on stderr (Hydra). SystemExit (a
    submitit requeue) is not a failure to report."""
    if isinstance(e, SystemExit) or getattr(e, "_stem_reported", False):
        return
    with _sigterm_deferred():
        with suppress(AttributeError):  # an exception class with __slots__: reported again at most
            e._stem_reported = True
        if isinstance(e, Terminated):
            line = f"{e}: the job is marked failed"
        elif isinstance(e, KeyboardInterrupt):
            line = "interrupted (SIGINT): the job is marked failed"
        elif isinstance(e, StemError):
            line = str(e)
        else:
            log.error("the job failed: %s: %s", type(e).__name__, str(e).replace("\n", " "))
            return
        log.error("%s", line)
        print(f"error: {line}", file=sys.stderr, flush=True)


def _ends_on_sigterm(task):
    """`task` (Hydra's task function, main) with SIGTERM raised as `Terminated` in it; the process then exits
    with status 143 (128 + SIGTERM), the previous handler restored. Ctrl-C (KeyboardInterrupt) unwinds the same
    way and exits with status 130 (128 + SIGINT); both end with one line `error: ...` (`report_failure`).

    SLURM sends SIGTERM at the time limit and on scancel, then SIGKILL after KillWait (30 s by default):
    unwinding and finishing an offline W&B run take a second or two. Under submitit (hydra/launcher=slurm or
    local_submitit) this replaces submitit's own SIGTERM handler, which ignored it; submitit's preemption and
    timeout signal (SIGUSR2: requeue then SystemExit, or UncompletedJobError) is left as it is and unwinds the job
    the same way (the SIGTERM that SLURM sends once the job is requeued may raise Terminated in its stead)."""

    @functools.wraps(task)
    def wrapped(cfg):
        if threading.current_thread() is not threading.main_thread():  # handlers are set from the main thread only
            return task(cfg)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_dropped(sys.unraisablehook)
        _SigtermState.pending = _SigtermState.raised = False
        try:
            return task(cfg)
        except Terminated as e:
            report_failure(e)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt as e:  # Ctrl-C: the same unwinding, one line instead of Python's traceback
            report_failure(e)
            sys.exit(128 + signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, previous)
            sys.unraisablehook = previous_hook

    return wrapped


def _build(group: str, node: DictConfig, **kwargs):
    """instantiate() with the library's StemError surfaced instead of Hydra's wrapper; unknown keys and
    values of the wrong type are refused first (`stem.precheck.check_arguments`)."""
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
    """Checks that need the model's architecture (steps, K vs tokens, memory), from its config (`stem.precheck`).
    A frame-sharded job checks the memory of one rank: its largest slice of frames."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    check_memory = cfg.get("check_memory", True)
    if planned is None or not planned.active:
        check_before_model(model, method, video, editor, check_memory=check_memory)
        return
    check_before_model(model, method, video, editor, check_memory=False)
    if check_memory:
        largest = max(shard_video(planned, method, video.num_frames).sizes)
        part = dataclasses.replace(video, frames=video.frames[:largest], flow=None, source_indices=None)
        check_before_model(model, _Checked(method.num_steps), part, None, check_memory=True)


@dataclasses.dataclass
class _Checked:
    """A method whose own check already ran on the whole video (for the memory check of one rank's slice)."""

    num_steps: int

    def check(self, *args) -> None:
        pass


def job_tracking(cfg: DictConfig, hydra_cfg: DictConfig) -> dict:
    """The tracker run's group and name from Hydra's runtime (`HydraConfig.get()`), for `run_job`.

    In a sweep every job is in the group `callbacks.sweep_group` (the summary run's too) and is named after
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
        model = _build("model", cfg.model)
        log.info("video %s: %d frames %dx%d, prompt %r; %s; metrics: %s", video.name, video.num_frames, video.width,
                 video.height, video.prompt, method.name if editor is None else
                 f"{editor.label(method.name)} to {editor.prompt or video.prompt!r}", ", ".join(evaluator.names()))
        recorder = evaluator.feature_recorder(model, video, method.num_steps)
        facts = {"inversion": method.settings(), "model": model.name, "model_fingerprint": model.fingerprint,
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
    """STEM runs: the K per layer (`stem.reconstruction.bases_section`) into `facts["bases"]` (metrics.json),
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
    more ranks than frames, EM groups straddling ranks, FateZero's inversion (`stem.sharded.shard_video`),
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
# An absolute path: Hydra would take a relative one as a package path when run.py is imported as a module.
_REPO_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_PATH = str(_REPO_CONFIGS) if (_REPO_CONFIGS / "config.yaml").is_file() else "pkg://stem_configs"


def launch_environ(settings: dict | None = None, environ: dict | None = None) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of this process's job:
    torchrun's own; under submitit with several tasks (hydra/launcher=slurm_multigpu) those of its
    `JobEnvironment` (`stem.distributed.submitit_environ`; the port `settings["master_port"]`, or one derived
    from the job id when null); else {} (one process)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in env}
    if env.get("SUBMITIT_EXECUTOR"):  # set by submitit in its jobs
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            port = (settings or {}).get("master_port") or 20000 + zlib.crc32(str(job.job_id).encode()) % 20000
            return submitit_environ(job, master_port=port)
    return {}


def _follow() -> None:
    """A rank > 0 logs warnings and errors only, to the console (submitit's tasks share the job folder: rank 0
    alone writes its log file)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@_ends_on_sigterm
def _main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        environ = launch_environ(OmegaConf.to_container(cfg.distributed, resolve=True))
    except (StemError, RuntimeError) as e:  # submitit's environment unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    lead = int(environ.get("RANK", "0")) == 0
    if not lead:
        _follow()
    mark = functools.partial(mark_job, hydra_cfg.runtime.output_dir) if lead else lambda status: None
    mark("running")  # status.json: make_tables tells running from failed
    try:
        run_job(cfg, hydra_cfg.runtime.output_dir, job_tracking(cfg, hydra_cfg), environ)
        mark("done")
    except BaseException as e:
        report_failure(e)  # before anything else (run_job reported it already when it failed inside)
        mark("failed")  # an error, SIGTERM, Ctrl-C, SystemExit; a status that cannot be written is a warning
        if not isinstance(e, StemError) or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # in a sweep: Hydra marks this job failed, runs the others, then exits non-zero
        sys.exit(2)


def rank_overrides(argv: list[str], environ=None) -> list[str]:
    """The command line of one process of a torchrun job (WORLD_SIZE > 1): rank 0 runs it as typed; the other
    ranks must not create a run folder of their own (each process resolves ${now:...} itself: a second,
    empty folder), so their Hydra output goes to a temporary folder removed at exit, without .hydra/, and
    they log warnings and errors to the console only. A sweep (-m) is refused: one job per torchrun."""
    env = os.environ if environ is None else environ
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        return argv
    if any(a in ("-m", "--multirun") or a.lstrip("+").startswith("hydra.mode=") for a in argv):
        raise ConfigError("a sweep (-m) under torchrun: start one torchrun per job, or sweep with "
                          "hydra/launcher=slurm_multigpu (each job then runs on several GPUs)")
    if rank == 0:
        return argv
    # named after this process and host (`stem.atomic.hidden_name`): the folders that ranks killed before their
    # atexit (kill -9, OOM) left are those of this host whose process is gone, removed here; live ranks' are kept
    remove_dead_leftovers(tempfile.gettempdir())
    tmp = Path(tempfile.gettempdir()) / hidden_name(f"stem-rank{rank}", "tmp")
    tmp.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, tmp, True)
    own = [a for a in argv if re.split(r"[=@]", a.lstrip("+~"))[0]
           not in ("hydra.run.dir", "hydra.output_subdir", "hydra/job_logging", "hydra.job_logging.root.level")]
    return [*own, f"hydra.run.dir={tmp}", "hydra.output_subdir=null", "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=WARNING"]


def main() -> None:
    """`python run.py <overrides>` and `stem-run <overrides>` (also one process of `torchrun ... run.py`)."""
    try:
        sys.argv[1:] = rank_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()

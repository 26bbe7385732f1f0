"""The demo's jobs: one at a time, each run by run.py's own task function (`stem.app.launch.task`, which calls
`stem.app.job.run_job`) on a config composed from run.py's configs (`stem.app.configs.compose_run`) with the
demo's, the command line's and the form's overrides: the demo has no pipeline of its own.

Why in this process (a worker thread) and not `python run.py` in a subprocess: the progress of the running loop
is read from its live tqdm bar and the log records of the job's thread, without parsing a terminal's output, and
a job starts without a second interpreter importing torch (seconds on the tiny model's CPU runs). The run
directory is the one run.py writes (`.hydra/`, `run.log`, `status.json`, metrics.json, videos), plus
`source.mp4` (the input clip as the job loaded it) for the result page; the inversion cache is
`paths.cache_dir`, under `--out` unless set.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from stem.app.configs import compose_run
from stem.app.demo_form import DemoRequest, hydra_quote
from stem.app.launch import override_key
from stem.app.launch import task as launch_task
from stem.app.signals import failure_reason
from stem.core.errors import ConfigError, StemError
from stem.diffusion.device import resolve_device

SAMPLE_CLIPS = ("synthetic", "woman_running", "taylor", "wolf", "car_turn")   # configs/data presets shown
RANDOM_MODELS = ("stem.diffusion.models.build_tiny", "stem.diffusion.models.build_sd15_arch")
# what the form and the demo set: config groups, the fields the form writes, the run folder (and Hydra's own)
OWNED = ("data", "inversion", "editing", "experiment", "debug", "task_name", "paths.log_dir", "data.n_frames",
         "data.max_frames", "data.max_frames_keep", "data.prompt", "data.path", "data.name", "inversion.num_steps",
         "inversion.num_bases", "editing.prompt")
LOG_LINES = 200          # log lines kept per job (the page shows the last ones)
TASK_NAME = "demo"       # run directories: <out>/demo/runs/<date>/<time>
SOURCE_VIDEO = "source.mp4"
log = logging.getLogger(__name__)


class Busy(StemError):
    """A job is running: the demo runs one at a time."""


def check_command_line(overrides: list[str]) -> None:
    """ConfigError for a command-line override the form owns (clip, inversion, editor) or the demo sets."""
    for override in overrides:
        key = override_key(override)
        if override.startswith("-") or key in OWNED or key.split("/")[0] in OWNED or key.startswith("hydra"):
            raise ConfigError(f"{override}: the form chooses the clip, inversion, editor, prompts, steps and frames "
                              "(and --out the run folders): give other settings here, e.g. model=sd15 device=cuda")


def merged(*lists: list[str]) -> list[str]:
    """The overrides of every list, a later one replacing an earlier one of the same key (a command line)."""
    out: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            out.pop(override_key(override), None)
            out[override_key(override)] = override
    return list(out.values())


def _resolved(cfg):
    """Set Hydra's runtime (`${hydra:...}` in paths) from the composed `cfg`: what run.py has while its job runs."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


@dataclass(frozen=True)
class Setup:
    """What the demo's configs say before any job: the sample clips ({name: (path or None, prompt, edit
    prompt, file present)}), the form's default steps and frames, and whether the model has random weights."""

    clips: dict
    steps: int
    frames: int
    random_model: bool
    model: str
    device: str


def compose_checked(overrides: list[str]):
    """`compose_run`, a composition error (an unknown key, a bad value) as a one-line ConfigError."""
    try:
        return compose_run(overrides)
    except StemError:
        raise
    except Exception as e:   # noqa: BLE001 - Hydra's and OmegaConf's errors, as one line
        raise ConfigError(f"the config does not compose: {failure_reason(e)}") from None


def read_setup(base: list[str]) -> Setup:
    """Compose each sample clip's config with the demo's overrides `base`: a bad override fails here, at start."""
    clips, first = {}, None
    for name in SAMPLE_CLIPS:
        cfg = _resolved(compose_checked([*base, f"data={name}"]))
        first = first or cfg
        path = cfg.data.get("path")
        present = path is None or Path(path).exists()
        clips[name] = (path, cfg.data.prompt, cfg.data.get("edit_prompt"), present)
    return Setup(clips=clips, steps=int(first.inversion.num_steps), frames=int(first.data.n_frames),
                 random_model=first.model.get("_target_") in RANDOM_MODELS,
                 model=first.hydra.runtime.choices.get("model") or "?", device=str(resolve_device(first.device)))


def demo_overrides(out: Path, random_model: bool, editing: bool) -> list[str]:
    """The demo's own settings, before the command line's: run folders and the cache under `out`, K above a
    layer's tokens clamped (the tiny model's small layers), and on random weights a random CLIP for the edit
    metrics (no download; their CLIP score shows mechanics only)."""
    return [f"paths.log_dir={hydra_quote(str(Path(out).resolve()))}", f"task_name={TASK_NAME}", "excess_bases=clamp",
            *(["metrics.clip.pretrained=null"] if random_model and editing else [])]


@dataclass
class Job:
    id: str
    request: DemoRequest
    overrides: list[str]
    run_dir: Path
    cfg: object = field(repr=False)
    state: str = "queued"            # queued | running | done | failed
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))

    def command(self) -> str:
        """The same job typed by hand (its run folder aside)."""
        return "python run.py " + " ".join(o for o in self.overrides if override_key(o) != "paths.log_dir")


class _JobLog(logging.Handler):
    """The log records of one thread (the job's) into the job's lines."""

    def __init__(self, job: Job, thread: int):
        super().__init__(logging.INFO)
        self.job, self.thread = job, thread
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.job.log.append(" ".join(self.format(record).split())[:500])


class JobRunner:
    """Jobs of the demo, run one at a time in a worker thread. `out`: where run folders and the cache go;
    `command_line`: overrides applied to every job (e.g. model=sd15 device=cuda); `setup`: `read_setup`'s."""

    def __init__(self, out, command_line: list[str], setup: Setup, task=None):
        self.out, self.command_line, self.setup = Path(out), list(command_line), setup
        self.task = task or launch_task
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._running: Job | None = None

    def running(self) -> Job | None:
        job = self._running
        return job if job is not None and job.state in ("queued", "running") else None

    def submit(self, request: DemoRequest) -> Job:
        """Compose the job's config (ConfigError: refused, nothing run) and start it; Busy while one runs."""
        with self._lock:
            if self.running() is not None:
                raise Busy(f"a job is running ({self._running.request.describe()}): wait for it to finish, then "
                           "submit again")
            overrides = merged(demo_overrides(self.out, self.setup.random_model, request.action != "reconstruct"),
                               self.command_line, request.overrides())
            cfg = compose_checked(overrides)
            now = datetime.now()
            run_dir = (self.out / TASK_NAME / "runs" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f"))
            job = Job(id=secrets.token_hex(6), request=request, overrides=overrides, run_dir=run_dir.resolve(), cfg=cfg)
            self.jobs[job.id] = job
            self._running = job
        threading.Thread(target=self._run, args=(job,), name=f"demo-job-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        from omegaconf import OmegaConf, open_dict

        from stem.diffusion.device import setup_cpu

        setup_cpu()   # flush-to-zero is per thread: as run.py's main thread has it (stem.app.job)
        root = logging.getLogger()
        handler = _JobLog(job, threading.get_ident())
        job.run_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(job.run_dir / "run.log")   # Hydra's job log of run.py, for this thread
        to_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        to_file.addFilter(lambda record: record.thread == handler.thread)
        level = root.level
        root.addHandler(handler)
        root.addHandler(to_file)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        job.state, job.started = "running", time.time()
        try:
            cfg = job.cfg
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(job.run_dir)
            _resolved(cfg)
            job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            hydra_dir = job.run_dir / ".hydra"   # as Hydra writes it for run.py
            hydra_dir.mkdir(exist_ok=True)
            OmegaConf.save(job_cfg, hydra_dir / "config.yaml")
            OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), hydra_dir / "hydra.yaml")
            OmegaConf.save(OmegaConf.create(job.overrides), hydra_dir / "overrides.yaml")
            self.task(job_cfg)
            self._write_source(job_cfg, job.run_dir)
            job.state = "done"
        except BaseException as e:  # noqa: BLE001 - a job's failure is the page's to show, not the server's
            job.error = _reason(job.run_dir, e)
            job.state = "failed"
            log.info("demo job %s failed: %s", job.id, job.error)
        finally:
            job.finished = time.time()
            root.removeHandler(handler)
            root.removeHandler(to_file)
            to_file.close()
            root.setLevel(level)

    @staticmethod
    def _write_source(job_cfg, run_dir: Path) -> None:
        """`source.mp4`: the input clip as the job loaded it (the same data config), beside the output."""
        from hydra.utils import instantiate

        from stem.data.video import write_video

        video = instantiate(job_cfg.data)
        write_video(run_dir / SOURCE_VIDEO, video.frames, video.fps)

    def status(self, job: Job) -> dict:
        """The job's state for the page: phase (the live progress bar's name, else the last log line), step
        [i, N] of that bar, seconds elapsed, the last log lines, the one-line error."""
        bar = _live_bar() if job.state == "running" else None
        phase = {"queued": "queued", "done": "done", "failed": "failed"}.get(job.state)
        if phase is None:
            phase = bar[0] if bar else (job.log[-1] if job.log else "starting")
        end = job.finished or time.time()
        return {"state": job.state, "phase": phase, "step": list(bar[1:]) if bar else None,
                "elapsed_s": round(end - (job.started or end), 1), "log": list(job.log)[-12:], "error": job.error}


def _live_bar() -> tuple[str, int, int | None] | None:
    """(name, i, N) of the newest tqdm bar still open (the job's current loop), or None. tqdm keeps its open bars
    in the class attribute `_instances` (every tqdm.auto bar is a tqdm.std.tqdm); disabled bars are not there."""
    from tqdm.std import tqdm

    with tqdm.get_lock():
        bars = [b for b in list(tqdm._instances) if not getattr(b, "disable", False)]
    if not bars:
        return None
    bar = max(bars, key=lambda b: b.start_t)
    return (bar.desc or "working").rstrip(": "), int(bar.n), None if bar.total is None else int(bar.total)


def _reason(run_dir: Path, e: BaseException) -> str:
    """The failure's one line: status.json's reason (what run.py's task recorded, as a table shows it), else the
    exception's (a StemError inside the task ends in SystemExit: its cause is the context)."""
    import json

    try:
        reason = json.loads((run_dir / "status.json").read_text()).get("reason")
    except (OSError, ValueError):
        reason = None
    if reason:
        return reason
    cause = e.__context__ if isinstance(e, SystemExit) and e.__context__ is not None else e
    return failure_reason(cause)

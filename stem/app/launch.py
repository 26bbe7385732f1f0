"""How a process joins its job: torchrun's or submitit's variables (`launch_environ`), the command line of
each rank of a torchrun job (`rank_overrides`), and `task`, the function `run.py` hands Hydra's config to."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stem.app.job import job_tracking, run_job
from stem.app.signals import _ends_on_sigterm, failure_reason, report_failure
from stem.app.study_table import table3_job
from stem.core.atomic import hidden_name, remove_dead_leftovers
from stem.core.errors import ConfigError, StemError
from stem.distributed.sharding import submitit_environ
from stem.reporting.tables import mark_job

log = logging.getLogger("run")


def launch_environ(settings: dict | None = None, environ: dict | None = None) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of this process's job:
    torchrun's own; under submitit with several tasks (hydra/launcher=slurm_multigpu) those of its
    `JobEnvironment` (`stem.distributed.sharding.submitit_environ`; the port `settings["master_port"]`, or one derived
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


@_ends_on_sigterm
def task(cfg: DictConfig) -> None:
    """The job of one process under Hydra (`run.py`'s task function): its place in a frame-sharded job, the
    status in status.json, `run_job` (a config with a `study` node, experiment=table3_user_study: `table3_job`,
    Table 3 from a study's answers, no model); bad input ends with one line `error: ...` on stderr and exit
    status 2."""
    hydra_cfg = HydraConfig.get()
    try:
        environ = launch_environ(OmegaConf.to_container(cfg.distributed, resolve=True))
    except (StemError, RuntimeError) as e:  # submitit's environment unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    lead = int(environ.get("RANK", "0")) == 0
    if not lead:
        _follow()
    mark = functools.partial(mark_job, hydra_cfg.runtime.output_dir) if lead else lambda status, reason=None: None
    mark("running")  # status.json: make_tables tells running from failed
    try:
        if "study" in cfg:
            table3_job(cfg, hydra_cfg.runtime.output_dir)
        else:
            run_job(cfg, hydra_cfg.runtime.output_dir, job_tracking(cfg, hydra_cfg), environ)
        mark("done")
    except BaseException as e:
        report_failure(e)  # before anything else (run_job reported it already when it failed inside)
        # an error, SIGTERM, Ctrl-C, SystemExit, with its one line (the table's row says why); a status that cannot
        # be written is a warning
        mark("failed", None if isinstance(e, SystemExit) else failure_reason(e))
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
    # named after this process and host (`stem.core.atomic.hidden_name`): the folders that ranks killed before their
    # atexit (kill -9, OOM) left are those of this host whose process is gone, removed here; live ranks' are kept
    remove_dead_leftovers(tempfile.gettempdir())
    tmp = Path(tempfile.gettempdir()) / hidden_name(f"stem-rank{rank}", "tmp")
    tmp.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, tmp, True)
    own = [a for a in argv if override_key(a) not in
           ("hydra.run.dir", "hydra.output_subdir", "hydra/job_logging", "hydra.job_logging.root.level")]
    return [*own, f"hydra.run.dir={tmp}", "hydra.output_subdir=null", "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=WARNING"]


def override_key(override: str) -> str:
    """The key a command-line override sets: "data" for `data=wolf`, `+data@x=wolf` or `~data`, "data.path" for
    `data.path=a.mp4`."""
    return re.split(r"[=@]", override.lstrip("+~"))[0]


def set_rank_argv() -> None:
    """Rewrite `sys.argv` to this process's command line (`rank_overrides`); a refused one ends with one line
    `error: ...` on stderr and exit status 2."""
    try:
        sys.argv[1:] = rank_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

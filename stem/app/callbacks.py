"""Hydra callbacks (registered in configs/hydra/default.yaml under `hydra.callbacks`).

`SweepTableCallback` writes the results table of a multirun (`python run.py -m ...`) into the
sweep folder when the sweep ends, and logs it to one W&B "summary" run when `logger=wandb`.
Single runs never call `on_multirun_end`, so they are untouched. Hydra does not call it when a
job of the sweep failed (the sweeper re-raises the failure first): rebuild the table then with
`python scripts/make_tables.py <sweep dir>`, which shows failed jobs as rows of "failed"
(`--wandb` also logs it as the summary run, with `log_sweep_summary` below).

W&B: the jobs of a sweep and its summary run share the group `sweep_group(task_name, sweep dir)`,
"<task_name>/<date>/<time>" for Hydra's default sweep folder; an explicit `logger.group=...` wins.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from stem.core.atomic import unwritable
from stem.core.errors import TableError
from stem.reporting.comparison import COMPARISON_DIR
from stem.reporting.tables import collect_runs, sweep_order, varying_keys, write_sweep_outputs

log = logging.getLogger(__name__)


def _swept_keys(config: DictConfig) -> list[str]:
    """Keys of `hydra.sweeper.params` (the sweep an experiment file declares), "+" dropped."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    return [str(k).lstrip("+") for k in params] if params else []


def _plain(node):
    """A DictConfig/ListConfig from the callback's config as plain Python (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class SweepDirCallback(Callback):
    """Makes `${hydra:...}` resolvable while a sweep starts. The sweep folder (`hydra.sweep.dir`, under
    `paths.log_dir` = `${hydra:runtime.cwd}/outputs`) is resolved by the launcher before any job has set
    Hydra's config, so without this `python run.py -m ...` fails unless hydra.sweep.dir is given."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if HydraConfig.instance().cfg is None:
            HydraConfig.instance().set_config(config)


PROBE_BYTES = 32 * 1024  # written and removed by `OutputDirCheck`: room for .hydra/ (6 KiB), run.log, status.json


class OutputDirCheck(Callback):
    """Refuses with one line `error: ...` and exit status 2, before Hydra creates the run folder (`hydra.run.dir`)
    or the sweep folder (`hydra.sweep.dir`): a `task_name` that is not one folder name (`../../x` would put the
    folder outside `paths.log_dir`), and a folder that cannot be written (under a regular file, a read-only or full
    file system: a probe of `PROBE_BYTES` is written and removed in its nearest existing folder, nothing is left).
    Hydra would otherwise fail with a traceback while it creates the folder or writes `.hydra/`."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        if HydraConfig.instance().cfg is None:  # ${hydra:runtime.cwd} in paths.log_dir
            HydraConfig.instance().set_config(config)
        name = OmegaConf.select(config, "task_name", default=None)
        if name is not None and (str(name) in ("", ".", "..") or any(sep and sep in str(name)
                                                                     for sep in (os.sep, os.altsep))):
            _refuse(f"task_name={name!r} names the run folder (<paths.log_dir>/<task_name>/...) and must be one folder "
                    "name, without '/' or '..': e.g. task_name=my_run; choose the parent folder with paths.log_dir")
        folder = Path(OmegaConf.select(config, key))
        problem = unwritable(folder, PROBE_BYTES)
        if problem:
            _refuse(f"cannot write the output folder {folder} ({problem}): set paths.log_dir=<a writable folder "
                    f"with free space> (or {key}=...)")


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class SweepTableCallback(Callback):
    """Table of a finished sweep: `<sweep dir>/<name>.md` (provenance caption, then the table), `.csv`,
    the sidecar `<name>.json`, `<name>.png` (`plot`), `<name>_frames.png` (`frames`: videos of every job side by
    side, `stem.reporting.plots.sweep_frames`) and a W&B table. Rows follow the order the sweep declares."""

    def __init__(self, name: str = "table", columns: list[str] | None = None, metrics: list | None = None,
                 average_over: list | None = None, paper: dict | None = None, plot: dict | None = None,
                 ratio_to: str | None = None, paper_rows: dict | None = None, frames: dict | None = None,
                 comparison: dict | None = None):
        self.name = name
        self.columns = list(columns) if columns is not None else None
        self.metrics = [tuple(m) for m in metrics] if metrics is not None else None
        self.average_over = list(average_over or [])
        self.paper = _plain(paper)
        self.plot = _plain(plot)
        self.ratio_to = ratio_to
        self.paper_rows = _plain(paper_rows)
        self.frames = _plain(frames)
        self.comparison = _plain(comparison)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if "study" in config:  # experiment=table3_user_study: each job wrote its Table 3; no metrics to tabulate
            log.info("Table 3 jobs (study node): each job folder of %s holds its table3.md; no sweep table", sweep_dir)
            return
        runs = collect_runs(sweep_dir)
        if not runs:
            log.warning("no job folders in %s: no sweep table written", sweep_dir)
            return
        columns = self.columns
        if columns is None:  # the declared sweep first, then whatever else differs (command-line sweeps)
            swept = _swept_keys(config)
            columns = swept + [k for k in varying_keys(runs) if k not in swept]
        order = sweep_order(_plain(OmegaConf.select(config, "hydra.sweeper.params")))  # rows in the declared order
        out = write_sweep_outputs(sweep_dir, self.name, columns, self.metrics, self.average_over, self.paper,
                                  self.plot, self.ratio_to, order, self.paper_rows, frames=self.frames,
                                  comparison=self.comparison)
        log.info("sweep table of %d jobs -> %s\n%s", len(runs), out["files"][0], out["markdown"])
        if _wandb_settings(config):
            log_sweep_summary(sweep_dir, self.name, out, config)


def sweep_group(task_name: str, sweep_dir: str | Path) -> str:
    """W&B group of a sweep's jobs and summary run: "<task_name>/<parent folder>/<sweep folder>" of the
    sweep folder, i.e. "<task_name>/<date>/<time>" for Hydra's outputs/<task_name>/multiruns/<date>/<time>
    (a sweep.dir of your own, e.g. /scratch/k_sweep: "<task_name>/scratch/k_sweep")."""
    path = Path(sweep_dir).resolve()
    return f"{task_name}/{path.parent.name}/{path.name}"


def _wandb_settings(config: DictConfig) -> dict:
    """The sweep's W&B logger settings (logger=wandb), or {} when it logged to no tracker."""
    if not str(OmegaConf.select(config, "logger._target_", default="")).endswith("WandbLogger"):
        return {}
    return _plain(config.logger)


def sweep_config(config: DictConfig) -> dict:
    """The sweep's composed config without Hydra's own node, as plain Python, resolved: `${hydra:...}` (paths.*)
    from the config's own `hydra` node, as in its jobs. A value that still cannot be resolved is kept as written."""
    raw = OmegaConf.to_container(config, resolve=False)
    with _hydra_runtime(config):
        return {key: _resolve_leaves(value, config, str(key)) for key, value in raw.items() if key != "hydra"}


@contextmanager
def _hydra_runtime(config: DictConfig):
    """`${hydra:...}` resolvable from `config.hydra` where Hydra has set no job config: after the jobs of a
    multirun (Hydra resets it to none) and in scripts/make_tables.py (multirun.yaml read back)."""
    if not OmegaConf.has_resolver("hydra"):
        setup_globals()  # registers the `hydra` and `now` resolvers (Hydra does at start; a script has not)
    instance = HydraConfig.instance()
    saved = instance.cfg
    if saved is None and "hydra" in config:
        instance.cfg = OmegaConf.masked_copy(config, "hydra")
    try:
        yield
    finally:
        instance.cfg = saved


def _resolve_leaves(raw, config: DictConfig, path: str):
    if isinstance(raw, dict):
        return {k: _resolve_leaves(v, config, f"{path}.{k}") for k, v in raw.items()}
    if isinstance(raw, list):
        return [_resolve_leaves(v, config, f"{path}[{i}]") for i, v in enumerate(raw)]
    if isinstance(raw, str) and "${" in raw:
        try:
            return _plain(OmegaConf.select(config, path, throw_on_resolution_failure=True))
        except Exception:  # an interpolation only Hydra's runtime can resolve
            return raw
    return raw


def read_sweep_config(sweep_dir: str | Path) -> DictConfig:
    """The config a sweep was launched with: `<sweep dir>/multirun.yaml` (written by `python run.py -m`)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        raise TableError(f"no multirun.yaml in {sweep_dir}: the W&B summary needs the config the sweep was launched "
                         "with; pass the folder `python run.py -m ...` wrote (hydra.sweep.dir)")
    try:
        return OmegaConf.load(path)
    except Exception as e:
        raise TableError(f"cannot read {path}: {type(e).__name__}: {e}".replace("\n", " ")) from e


def log_sweep_summary(sweep_dir: str | Path, name: str, out: dict, config: DictConfig | None = None) -> None:
    """Log a sweep table as one W&B run of job type "summary", named "<name>-summary", in the sweep's group
    (`logger.group` when set, else `sweep_group`), under `<sweep dir>/wandb/`: the table, its figures (PNG files as
    images) and the comparison videos (`<sweep dir>/comparison/*.mp4` as videos), and as
    config the sweep's composed config (`sweep_config`) with `provenance` (`out["provenance"]`, the table's
    facts), `sweep_dir` and `sweep_overrides`.

    The composed config holds the first value of each swept key; `sweep_overrides` is the sweep's command
    line (e.g. "inversion=ddim_1frame,stem") and the table the value of every job.
    `out` is what stem.reporting.tables.write_sweep_outputs returned; `config` the sweep's config (the callback's),
    None to read `<sweep dir>/multirun.yaml` (scripts/make_tables.py --wandb). W&B settings (project, entity,
    mode, tags) are the sweep's `logger=wandb` ones, else project "stem" in offline mode, as
    configs/logger/wandb.yaml; WANDB_MODE in the environment overrides the mode."""
    import wandb  # imported only when W&B is on

    sweep_dir = Path(sweep_dir)
    config = read_sweep_config(sweep_dir) if config is None else config
    settings = _wandb_settings(config)
    task_name = OmegaConf.select(config, "task_name", default=None) or name
    run_config = {**sweep_config(config), "provenance": out.get("provenance", {}), "sweep_dir": str(sweep_dir),
                  "sweep_overrides": _plain(OmegaConf.select(config, "hydra.overrides.task", default=[]))}
    run = wandb.init(project=settings.get("project") or "stem", entity=settings.get("entity"),
                     mode=os.environ.get("WANDB_MODE") or settings.get("mode") or "offline",
                     group=settings.get("group") or sweep_group(task_name, sweep_dir), job_type="summary",
                     name=f"{name}-summary", tags=list(settings.get("tags") or []), config=run_config,
                     dir=str(sweep_dir))
    failed = True
    try:
        table = out["table"]
        record = {name: wandb.Table(columns=table["header"], data=table["rows"], allow_mixed_types=True)}
        # <name>.png as "<name>_plot", others (<name>_frames.png) under their own name; the comparison figures
        # (comparison/<clip>.mp4 and <clip>_strip.png) as "comparison/<clip>" (a video) and "comparison/<clip>_strip"
        for f in map(Path, out["files"]):
            key = f"{f.parent.name}/{f.stem}" if f.parent.name == COMPARISON_DIR else \
                f"{name}_plot" if f.stem == name else f.stem
            if f.suffix == ".png":
                record[key] = wandb.Image(str(f))
            elif f.suffix == ".mp4":
                record[key] = wandb.Video(str(f), format="mp4")
        run.log(record)
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)


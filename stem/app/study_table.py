"""Table 3 of the user study as a job and as a W&B run: `python run.py experiment=table3_user_study` runs
`table3_job` (no model: the table from the study's answers, into the run folder), `scripts/make_table3.py --wandb`
runs `log_table3`. Both write the table with `stem.study.table3.write_table3` first (bad input fails before any
file or W&B run exists), then log it through a logger of configs/logger/ (`record_table3`):

- the W&B table "table3": the paper's layout as numbers (`stem.study.table3.paper_layout`: a row per method, per
  question its percent, Wilson interval, choices, answers, participants and the paper's percent);
- the summary: "caption" and "markdown" (table3.md), "answers", "participants", "pairs", and each cell's numbers
  as "<method>/<question>/<percent|ci_low|ci_high|chosen|answers|participants>" (e.g.
  "STEM-FateZero/fidelity/percent");
- the run config: the database, the manifest, the sweep the videos came from and the study's settings.

The W&B run is in the group of the sweep the videos came from (`sweep_group`, as that sweep's own runs), job type
"table3", named after the task; an explicit logger.group / logger.name wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stem.app.callbacks import sweep_group
from stem.app.job import _build, _check_missing
from stem.app.loggers import WandbLogger
from stem.study.table3 import CELL, paper_layout, write_table3

log = logging.getLogger("run")
TABLE = "table3"   # the table's files (<run dir>/table3.md, .csv) and W&B key
JOB_TYPE = "table3"


def study_group(manifest: dict) -> str | None:
    """The W&B group of the sweep the study's videos came from (the manifest's "sweep", one sweep folder with its
    multirun.yaml): "<its task_name>/<date>/<time>", as its jobs' runs; None for run folders or a sweep moved away."""
    folder = Path(str(manifest.get("sweep", "")))
    if not (folder / "multirun.yaml").is_file():
        return None
    try:
        task_name = OmegaConf.select(OmegaConf.load(folder / "multirun.yaml"), "task_name", default=None)
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml: the run is then ungrouped, the table unchanged
        return None
    return sweep_group(task_name, folder) if task_name else None


def table3_config(out: dict, db, manifest_path) -> dict:
    """The W&B run config of a Table 3: where its answers and pairs came from."""
    return {"study": {"db": str(Path(db).resolve()), "manifest": str(Path(manifest_path).resolve()),
                      "sweep": out["manifest"].get("sweep"), "pairs": len(out["manifest"]["pairs"]),
                      **out["settings"]}}


def table3_summary(out: dict) -> dict:
    """The summary of a Table 3 run (see the module docstring); a cell without answers has None numbers."""
    summary = {"caption": out["caption"], "markdown": out["markdown"], "answers": out["answers"],
               "participants": out["participants"], "pairs": len(out["manifest"]["pairs"])}
    for row in out["rows"]:
        summary.update({f"{row['method']}/{row['question']}/{k}": row[k] for k in CELL if k != "paper_percent"})
    return summary


def record_table3(logger, out: dict) -> None:
    """Log the Table 3 `out` (what `write_table3` returned) with `logger` (configs/logger/: the table and summary
    with W&B, nothing without a tracker; a logger of your own may have no `log_table`), then finish the logger's
    run (as failed when logging raised)."""
    failed = True
    try:
        header, rows = paper_layout(out["rows"])
        getattr(logger, "log_table", lambda *args: None)(TABLE, header, rows, table3_summary(out))
        failed = False
    finally:
        logger.finish(failed)


def log_table3(out: dict, db, manifest_path, out_dir, project: str = "stem", entity: str | None = None,
               group: str | None = None, mode: str = "offline") -> None:
    """`scripts/make_table3.py --wandb`: one W&B run (under `<out_dir>/wandb/`) holding the Table 3 `out`; offline
    unless WANDB_MODE says otherwise; `group` None: the sweep's (`study_group`)."""
    logger = WandbLogger(project=project, entity=entity, mode=mode, name=TABLE, job_type=JOB_TYPE,
                         group=group or study_group(out["manifest"]), run_config=table3_config(out, db, manifest_path),
                         dir=str(out_dir))
    record_table3(logger, out)


def table3_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """`python run.py experiment=table3_user_study study.db=... study.manifest=...`: Table 3 of the answers in
    `study.db` into `<run_dir>/table3.md` and `.csv`, logged with `cfg.logger` (finished as failed when logging
    raises). A missing study.db or study.manifest, a missing or foreign database: one-line StemError, nothing
    written. Returns what `write_table3` returned."""
    _check_missing(cfg)
    study = cfg.study
    out = write_table3(study.db, study.manifest, run_dir, TABLE)
    log.info("Table 3 of %d answers by %d participants -> %s\n%s", out["answers"], out["participants"],
             out["files"][0], out["markdown"])
    make_logger = _build("logger", cfg.logger, _partial_=True)
    tracking = {"group": study_group(out["manifest"]), "name": cfg.task_name}
    logger = make_logger(run_config={**table3_config(out, study.db, study.manifest), "task_name": cfg.task_name},
                         dir=str(run_dir), job_type=JOB_TYPE,
                         **{k: v for k, v in tracking.items() if cfg.logger.get(k) is None})
    record_table3(logger, out)
    return out


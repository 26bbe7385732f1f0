"""Trackers of a job: `NullLogger` (everything is in the run directory already) and `WandbLogger` (one W&B run
per job, offline by default). configs/logger/ builds one of them; `stem.app.job.run_job` always finishes it,
as failed when the job raises."""

from __future__ import annotations

import os
from pathlib import Path

from stem.app.signals import Terminated, _sigterm_deferred
from stem.metrics.evaluation import per_frame_columns, summary_scalars


class NullLogger:
    """No tracker: everything is in the run directory already."""

    def __init__(self, **_):
        pass

    def log_run(self, metrics: dict, run_dir: Path) -> None:
        pass

    def tag(self, *tags: str) -> None:
        pass

    def log_table(self, name: str, header: list, rows: list, summary: dict) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass


class WandbLogger:
    """One W&B run per job (offline by default; WANDB_MODE in the environment overrides `mode`), tagged
    with the job's method and data as soon as they are built (`tag`), finished as failed when the job raises.
    `group` and `name` come from configs/logger/wandb.yaml, else from `stem.app.job.job_tracking` (a table's run:
    from `stem.app.study_table`, with its `job_type`)."""

    def __init__(self, project: str = "stem", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list | tuple = (), name: str | None = None,
                 run_config: dict | None = None, dir: str | None = None, job_type: str | None = None):
        import wandb  # imported only when W&B is on

        self.wandb = wandb
        self.run = None
        try:
            with _sigterm_deferred():  # a SIGTERM meanwhile is raised once the run exists, which is then finished
                self.run = wandb.init(project=project, entity=entity, mode=os.environ.get("WANDB_MODE") or mode,
                                      group=group, tags=list(tags), name=name, config=run_config, dir=dir,
                                      job_type=job_type)
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

    def log_table(self, name: str, header: list, rows: list, summary: dict) -> None:
        """A table built elsewhere (Table 3 of the user study) as the W&B table `name`, and `summary` (numbers,
        its caption and markdown) as the run's summary."""
        self.run.log({name: self.wandb.Table(columns=list(header), data=[list(r) for r in rows],
                                             allow_mixed_types=True)})
        self.run.summary.update(summary)

    def finish(self, failed: bool) -> None:
        with _sigterm_deferred():  # its exit record is written whole; a SIGTERM meanwhile is raised after
            self.run.finish(exit_code=1 if failed else 0)


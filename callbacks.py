"""Hydra callbacks (registered in configs/hydra/default.yaml under `hydra.callbacks`).

`SweepTableCallback` writes the results table of a multirun (`python run.py -m ...`) into the
sweep folder when the sweep ends, and logs it to one W&B "summary" run when `logger=wandb`.
Single runs never call `on_multirun_end`, so they are untouched. Hydra does not call it when a
job of the sweep failed (the sweeper re-raises the failure first): rebuild the table then with
`python scripts/make_tables.py <sweep dir>`, which shows failed jobs as rows of "failed".
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stem.tables import collect_runs, sweep_table, to_markdown, varying_keys, write_tables

log = logging.getLogger(__name__)


def _swept_keys(config: DictConfig) -> list[str]:
    """Keys of `hydra.sweeper.params` (the sweep an experiment file declares), "+" dropped."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    return [str(k).lstrip("+") for k in params] if params else []


class SweepTableCallback(Callback):
    """Table of a finished sweep: `<sweep dir>/<name>.md` and `.csv`, and a W&B table."""

    def __init__(self, name: str = "table", columns: list[str] | None = None, metrics: list | None = None):
        self.name = name
        self.columns = list(columns) if columns is not None else None
        self.metrics = [tuple(m) for m in metrics] if metrics is not None else None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs(sweep_dir)
        if not runs:
            log.warning("no job folders in %s: no sweep table written", sweep_dir)
            return
        columns = self.columns
        if columns is None:  # the declared sweep first, then whatever else differs (command-line sweeps)
            swept = _swept_keys(config)
            columns = swept + [k for k in varying_keys(runs) if k not in swept]
        table = sweep_table(runs, columns, self.metrics)
        md, _ = write_tables(table, sweep_dir, self.name)
        log.info("sweep table of %d jobs -> %s\n%s", len(runs), md, to_markdown(table))
        if str(OmegaConf.select(config, "logger._target_", default="")).endswith("WandbLogger"):
            self._log_wandb(config, sweep_dir, table)

    def _log_wandb(self, config: DictConfig, sweep_dir: Path, table: dict) -> None:
        import wandb  # imported only when W&B is on

        logger = config.logger
        run = wandb.init(project=logger.project, entity=logger.get("entity"), mode=logger.get("mode", "offline"),
                         group=logger.get("group"), job_type="summary", name=f"{self.name}-summary",
                         dir=str(sweep_dir))
        failed = True
        try:
            run.log({self.name: wandb.Table(columns=table["header"], data=table["rows"], allow_mixed_types=True)})
            failed = False
        finally:
            run.finish(exit_code=1 if failed else 0)

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
from omegaconf import DictConfig, ListConfig, OmegaConf

from stem.tables import collect_runs, sweep_order, varying_keys, write_sweep_outputs

log = logging.getLogger(__name__)


def _swept_keys(config: DictConfig) -> list[str]:
    """Keys of `hydra.sweeper.params` (the sweep an experiment file declares), "+" dropped."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    return [str(k).lstrip("+") for k in params] if params else []


def _plain(node):
    """A DictConfig/ListConfig from the callback's config as plain Python (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class SweepTableCallback(Callback):
    """Table of a finished sweep: `<sweep dir>/<name>.md` (provenance caption, then the table), `.csv`,
    the sidecar `<name>.json`, and a W&B table. Rows follow the order the sweep declares."""

    def __init__(self, name: str = "table", columns: list[str] | None = None, metrics: list | None = None,
                 average_over: list | None = None, paper: dict | None = None, plot: dict | None = None,
                 ratio_to: str | None = None, paper_rows: dict | None = None):
        self.name = name
        self.columns = list(columns) if columns is not None else None
        self.metrics = [tuple(m) for m in metrics] if metrics is not None else None
        self.average_over = list(average_over or [])
        self.paper = _plain(paper)
        self.plot = _plain(plot)
        self.ratio_to = ratio_to
        self.paper_rows = _plain(paper_rows)

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
        order = sweep_order(_plain(OmegaConf.select(config, "hydra.sweeper.params")))  # rows in the declared order
        out = write_sweep_outputs(sweep_dir, self.name, columns, self.metrics, self.average_over, self.paper,
                                  self.plot, self.ratio_to, order, self.paper_rows)
        log.info("sweep table of %d jobs -> %s\n%s", len(runs), out["files"][0], out["markdown"])
        if str(OmegaConf.select(config, "logger._target_", default="")).endswith("WandbLogger"):
            self._log_wandb(config, sweep_dir, out)

    def _log_wandb(self, config: DictConfig, sweep_dir: Path, out: dict) -> None:
        import wandb  # imported only when W&B is on

        logger = config.logger
        run = wandb.init(project=logger.project, entity=logger.get("entity"), mode=logger.get("mode", "offline"),
                         group=logger.get("group"), job_type="summary", name=f"{self.name}-summary",
                         dir=str(sweep_dir))
        failed = True
        try:
            table = out["table"]
            record = {self.name: wandb.Table(columns=table["header"], data=table["rows"], allow_mixed_types=True)}
            record.update({f"{self.name}_plot": wandb.Image(str(f)) for f in out["files"] if f.suffix == ".png"})
            run.log(record)
            failed = False
        finally:
            run.finish(exit_code=1 if failed else 0)

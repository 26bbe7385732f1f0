"""Default run folders (configs/hydra/default.yaml): two runs started within one second get their own."""

from datetime import datetime

import hydra.core.utils
from conftest import compose_config
from hydra.core.hydra_config import HydraConfig


def _dirs_at(tmp_path, monkeypatch, moment: datetime) -> tuple[str, str]:
    """(run dir, sweep dir) Hydra resolves for a run started at `moment` (its `now` resolver frozen there)."""
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return moment

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    compose_config(tmp_path)
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.run.dir), str(hydra_cfg.sweep.dir)


def test_runs_started_in_the_same_second_get_different_folders(tmp_path, monkeypatch):
    """Bug caught: a run-dir pattern with only %H-%M-%S, so two runs (or two sweeps) started in the same
    second write into one folder and mix their metrics, videos and .hydra/ records."""
    first = _dirs_at(tmp_path, monkeypatch, datetime(2026, 12, 1, 12, 34, 56, 100_000))
    second = _dirs_at(tmp_path, monkeypatch, datetime(2026, 12, 1, 12, 34, 56, 900_000))
    assert first[0] != second[0] and first[1] != second[1], (first, second)
    for (run_dir, sweep_dir), micro in zip((first, second), ("100000", "900000")):  # .../<date>/<time>
        assert run_dir.endswith(f"/runs/2026-12-01/12-34-56-{micro}"), run_dir
        assert sweep_dir.endswith(f"/multiruns/2026-12-01/12-34-56-{micro}"), sweep_dir

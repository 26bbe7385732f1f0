"""The one Hydra entry point: invert a video, reconstruct or edit it, write the run directory.

    python run.py                                   # tiny random model, synthetic pan, CPU
    python run.py inversion=ddim_allframe data=car_turn model=sd15
    python run.py -m inversion=ddim_1frame,ddim_2frame,ddim_allframe
    python run.py metrics=all                       # + CLIP, warp error, feature similarity (docs/METRICS.md)
    torchrun --standalone --nproc-per-node=2 run.py inversion=stem   # frames sharded over 2 processes

The job itself is `stem.app.job.run_job`, a plain function of the config (docs/ARCHITECTURE.md).
Bad input ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from stem.app.configs import CONFIG_PATH  # configs/ beside this file, else the installed copy (pkg://stem_configs)
from stem.app.launch import set_rank_argv, task


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _main(cfg: DictConfig) -> None:
    task(cfg)


def main() -> None:
    """`python run.py <overrides>` and `stem-run <overrides>` (also one process of `torchrun ... run.py`)."""
    set_rank_argv()
    _main()


if __name__ == "__main__":
    main()

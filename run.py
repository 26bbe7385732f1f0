"""The one Hydra entry point: invert a video, reconstruct it, write the run directory.

    python run.py                                   # tiny random model, synthetic pan, CPU
    python run.py inversion=ddim_allframe data=car_turn model=sd15
    python run.py -m inversion=ddim_1frame,ddim_2frame,ddim_allframe

`main` only hands the composed config to `run_job`, a plain function that builds every
object from its `_target_`, runs the job and always closes the logger (failures marked).
Bad input ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stem.cache import TensorCache
from stem.errors import StemError
from stem.reconstruction import reconstruct_video
from stem.rundir import write_reconstruction_run

log = logging.getLogger("run")


class NullLogger:
    """No tracker: everything is in the run directory already."""

    def __init__(self, **_):
        pass

    def log_reconstruction(self, metrics: dict, run_dir: Path) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass


class WandbLogger:
    """One W&B run per job (offline by default), finished as failed when the job raises."""

    def __init__(self, project: str = "stem", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list | tuple = (), name: str | None = None,
                 run_config: dict | None = None, dir: str | None = None):
        import wandb  # imported only when W&B is on

        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, tags=list(tags),
                              name=name, config=run_config, dir=dir)

    def log_reconstruction(self, metrics: dict, run_dir: Path) -> None:
        summary = {f"{ref}/{m}": metrics[ref][m] for ref in ("vs_input", "vs_vae", "vae_vs_input")
                   for m in ("psnr", "ssim")}
        table = self.wandb.Table(columns=["frame", "psnr_vs_input", "ssim_vs_input", "psnr_vs_vae", "ssim_vs_vae"])
        inp, vae = metrics["vs_input"], metrics["vs_vae"]
        for i, row in enumerate(zip(inp["psnr_per_frame"], inp["ssim_per_frame"],
                                    vae["psnr_per_frame"], vae["ssim_per_frame"])):
            table.add_data(i, *row)
        self.run.log({**summary, "per_frame": table,
                      "comparison": self.wandb.Video(str(run_dir / "comparison.mp4"), format="mp4")})
        self.run.summary.update(summary)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _build(group: str, node: DictConfig, **kwargs):
    """instantiate() with the library's StemError surfaced instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, StemError):
            raise type(cause)(f"{group}: {cause}") from cause
        raise


def run_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Build model, data and inversion from `cfg`, reconstruct, write `run_dir`; return metrics."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    make_logger = _build("logger", cfg.logger, _partial_=True)  # a partial: the config is no node to instantiate
    logger = make_logger(run_config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir))
    failed = True
    try:
        method = _build("inversion", cfg.inversion)   # cheap objects first: bad settings fail fast
        video = _build("data", cfg.data)
        model = _build("model", cfg.model)
        log.info("video %s: %d frames %dx%d, prompt %r", video.name, video.num_frames, video.width,
                 video.height, video.prompt)
        cache = TensorCache(Path(cfg.paths.cache_dir) / "inversion") if cfg.use_cache else None
        result = reconstruct_video(model, video, method, cache, cfg.prompt_overflow, cfg.progress)
        metrics = write_reconstruction_run(run_dir, video, result, extra={
            "method": method.name, "inversion": method.settings(), "model": model.name,
            "model_fingerprint": model.fingerprint, "device": str(model.device), "dtype": str(model.dtype)})
        logger.log_reconstruction(metrics, run_dir)
        log.info("PSNR/SSIM vs input %.2f/%.4f, vs VAE %.2f/%.4f -> %s", metrics["vs_input"]["psnr"],
                 metrics["vs_input"]["ssim"], metrics["vs_vae"]["psnr"], metrics["vs_vae"]["ssim"], run_dir)
        failed = False
        return metrics
    finally:
        logger.finish(failed)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_job(cfg, HydraConfig.get().runtime.output_dir)
    except StemError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # in a sweep: Hydra marks this job failed, runs the others, then exits non-zero
        sys.exit(2)


if __name__ == "__main__":
    main()

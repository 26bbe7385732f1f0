"""The one Hydra entry point: invert a video, reconstruct it, write the run directory.

    python run.py                                   # tiny random model, synthetic pan, CPU
    python run.py inversion=ddim_allframe data=car_turn model=sd15
    python run.py -m inversion=ddim_1frame,ddim_2frame,ddim_allframe
    python run.py metrics=all                       # + CLIP, warp error, feature similarity (docs/METRICS.md)

`main` only hands the composed config to `run_job`, a plain function that builds every
object from its `_target_`, runs the job and always closes the logger (failures marked).
Bad input ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys
import time
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
from stem.evaluation import per_frame_columns, summary_scalars
from stem.reconstruction import reconstruct_video
from stem.rundir import write_reconstruction_run

log = logging.getLogger("run")
HEADLINE = ("psnr", "ssim", "clip_score", "frame_consistency", "warp_error", "mean")  # logged at the end of a job


class NullLogger:
    """No tracker: everything is in the run directory already."""

    def __init__(self, **_):
        pass

    def log_run(self, metrics: dict, run_dir: Path) -> None:
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
    """Build model, data, inversion and metrics from `cfg`, reconstruct, write `run_dir`; return metrics."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    make_logger = _build("logger", cfg.logger, _partial_=True)  # a partial: the config is no node to instantiate
    logger = make_logger(run_config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir))
    failed = True
    try:
        method = _build("inversion", cfg.inversion)   # cheap objects first: bad settings fail fast
        evaluator = _build("metrics", cfg.metrics)
        video = _build("data", cfg.data)
        evaluator.prepare(video, method.num_steps)    # bad metric settings and missing CLIP weights, before the model
        model = _build("model", cfg.model)
        log.info("video %s: %d frames %dx%d, prompt %r; metrics: %s", video.name, video.num_frames, video.width,
                 video.height, video.prompt, ", ".join(evaluator.names()))
        cache = TensorCache(Path(cfg.paths.cache_dir) / "inversion") if cfg.use_cache else None
        recorder = evaluator.feature_recorder(model, video, method.num_steps)
        result = reconstruct_video(model, video, method, cache, cfg.prompt_overflow, cfg.progress, observer=recorder)
        start = time.perf_counter()
        scores = evaluator.evaluate(result.frames, video, video.prompt, method.name,
                                    references={"input": video.frames, "vae": result.vae_frames}, recorder=recorder,
                                    run_dir=run_dir, timesteps=result.inverted.trajectory.timesteps.tolist())
        metrics = write_reconstruction_run(run_dir, video, result, scores, extra={
            "method": method.name, "inversion": method.settings(), "model": model.name,
            "model_fingerprint": model.fingerprint, "device": str(model.device), "dtype": str(model.dtype),
            "metrics_seconds": time.perf_counter() - start})
        logger.log_run(metrics, run_dir)
        log.info("%s -> %s", ", ".join(f"{k} {v:.4g}" for k, v in summary_scalars(scores).items()
                                       if k.count("/") == 1 and k.split("/")[1] in HEADLINE), run_dir)
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

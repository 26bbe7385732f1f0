"""Shared fixtures of every test folder: tiny random models on CPU, the sample clips when present, run.py helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = ROOT.parent / "shared" / "videos"

# The tests mirror stem/'s packages (tests/inversion/ tests stem/inversion/, ...). Test modules share helpers by
# module name (`from test_em import clustered_tokens`) across those folders: every folder is on the path.
for _folder in sorted(p for p in Path(__file__).resolve().parent.iterdir() if (p.is_dir() and p.name.isidentifier())):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

torch.set_flush_denormal(True)  # random weights produce denormals: 2-3x slower without this


@pytest.fixture(scope="session")
def tiny_model():
    from stem.diffusion.models import build_tiny

    return build_tiny(seed=0, device="cpu")


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"sample clips not found at {SHARED_VIDEOS} (../shared/videos is absent in a user's clone)")
    return SHARED_VIDEOS


FAST = ["debug=fast", "progress=false"]  # 5 DDIM steps on 4 frames


def compose_with_hydra(tmp_path: Path, *overrides: str):
    """The composed config with Hydra's node (the sweep) kept: {"hydra": ..., job keys ...}; cache under
    `tmp_path`, the CPU as device, no other overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def compose_config(tmp_path: Path, *overrides: str, fast: bool = True):
    """The job config `python run.py <overrides>` would get (Hydra's runtime set for resolution),
    with the cache under `tmp_path` and the CPU as device."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*(FAST if fast else []), f"paths.cache_dir={tmp_path / 'cache'}",
                                           "device=cpu", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as the job sees it: Hydra's own node is not part of the job config
    return cfg


def run_cli(*overrides: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300):
    """`python run.py <overrides>` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("WANDB_MODE", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_wandb_records(run_dir: Path, timeout: float = 30.0) -> list:
    """Records of the one offline W&B run under `run_dir`, once its exit record is on disk (W&B's
    service writes the file after `run.finish()` returns, so a run finished in this process may
    not be there yet; after `timeout` seconds, whatever is there)."""
    deadline = time.monotonic() + timeout
    while True:
        paths = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
        assert len(paths) <= 1, f"more than one W&B run under {run_dir}: {paths}"
        records = _parse_wandb_log(paths[0]) if paths else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert paths, f"no offline W&B run under {run_dir}"
            return records
        time.sleep(0.1)


def _parse_wandb_log(path: Path) -> list:
    """The records of a .wandb file: W&B's transaction log, a 7-byte header, then LevelDB-log
    framing (32 KiB blocks; records of a 7-byte header: crc32, length, type
    FULL=1/FIRST=2/MIDDLE=3/LAST=4) around protobuf `Record` messages. A file still being written ends
    in a partial record: the records before it are returned (`read_wandb_records` polls again)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record W&B is still writing: read it on the next poll
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_script(name: str, *args, timeout: int = 180) -> subprocess.CompletedProcess:
    """`python scripts/<name> <args>` in a subprocess from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cfg_ddim_reference(model, latents: torch.Tensor, steps: int, negative: str, target: str,
                       guidance: float) -> torch.Tensor:
    """Classifier-free-guided DDIM sampling from `latents` with diffusers' DDIMScheduler and the UNet's
    current processors: the reference editing methods reduce to when they inject nothing."""
    from diffusers import DDIMScheduler

    from stem.diffusion.prompts import encode_prompt

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    neg, tgt = (encode_prompt(model, p).expand(len(latents), -1, -1) for p in (negative, target))
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u = model.unet(x, t, encoder_hidden_states=neg).sample
            eps_c = model.unet(x, t, encoder_hidden_states=tgt).sample
            x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def _no_model(**_):
    raise AssertionError("the model was built before the bad setting was refused")


@pytest.fixture
def no_model(monkeypatch):
    """Every model builder replaced by one that fails the test: "refused before the model" is pinned, not just
    "refused"."""
    import stem.diffusion.models

    for name in ("build_tiny", "build_sd15_arch", "load_pretrained"):
        monkeypatch.setattr(stem.diffusion.models, name, _no_model)


@pytest.fixture
def refused(tmp_path, no_model):
    """refused(*overrides, fast=True) -> the one-line message `stem.app.job.run_job` raises for
    `python run.py <overrides>` (with the suite's debug=fast unless fast=False), without building a model or writing
    a cache entry."""
    from stem.core.errors import StemError

    def run(*overrides: str, fast: bool = True) -> str:
        from stem.app.job import run_job

        with pytest.raises(StemError) as info:
            run_job(compose_config(tmp_path, *overrides, fast=fast), tmp_path / "run")
        message = str(info.value)
        assert "\n" not in message and "Traceback" not in message
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
        return message

    return run


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_error_line(proc, *fragments: str) -> str:
    """The project's bad-input contract on a finished `run_cli`/`run_script` process: exit status 2, exactly one
    `error: ...` line on stderr holding every fragment, no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]

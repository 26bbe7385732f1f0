"""Shared fixtures: tiny random models on CPU, the sample clips when present, run.py helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = ROOT.parent / "shared" / "videos"

torch.set_flush_denormal(True)  # random weights produce denormals: 2-3x slower without this


@pytest.fixture(scope="session")
def tiny_model():
    from stem.models import build_tiny

    return build_tiny(seed=0, device="cpu")


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"sample clips not found at {SHARED_VIDEOS} (../shared/videos is absent in a user's clone)")
    return SHARED_VIDEOS


def run_cli(*overrides: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300):
    """`python run.py <overrides>` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("WANDB_MODE", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)

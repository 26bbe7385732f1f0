"""A cache on a real full file system (issue 23 item 1): a small tmpfs mounted in a user and mount namespace
(`unshare -rm`), so no root is needed where user namespaces are enabled; skipped with the reason where the mount
cannot be made. The tmpfs is sized so that the writability probe (an empty folder) passes and the entry does not
fit: safetensors then really fails with its own error, a `SafetensorError`, not an OSError."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE = "64k"  # the tmpfs: room for the probe folder, not for an entry (the tiny model's are hundreds of KB)


@pytest.fixture(scope="module")
def full_tmpfs(tmp_path_factory):
    """full_tmpfs(folder, *command) -> CompletedProcess of `command` run with a SIZE tmpfs mounted on `folder`
    (only that process sees it); skips the test where the mount cannot be made (tried once per module)."""
    probe = tmp_path_factory.mktemp("mount-probe")
    try:
        ok = shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={SIZE} tmpfs {probe}"],
            capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        pytest.skip("cannot mount a tmpfs in a user namespace here (`unshare -rm` + `mount -t tmpfs`): no full "
                    "file system to test on")

    def run(folder: Path, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
        folder.mkdir(parents=True, exist_ok=True)
        script = f'mount -t tmpfs -o size={SIZE} tmpfs "$0" && "$@"; rc=$?; ls -A "$0" > "$0.left"; exit $rc'
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
        env.pop("WANDB_MODE", None)
        return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder), *command], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


# What safetensors raises on a full disk, and that the cache reports it as a failed write (one of WRITE_ERRORS),
# leaving nothing on the file system. Bug caught: catching only OSError (safetensors' error is not one; before the
# fix WRITE_ERRORS did not exist and the caller caught OSError alone), a half-written entry left behind.
SAVE_ONTO_FULL_DISK = r"""
import sys
import torch
from safetensors import SafetensorError
from stem.runs.cache import WRITE_ERRORS, TensorCache

cache = TensorCache(sys.argv[1] + "/inversion").check_writable()  # the probe fits
try:
    cache.save("k", {"latents": torch.ones(6, 4, 4, 32, 32)}, {"v": 1})
except WRITE_ERRORS as e:
    print(type(e).__name__, isinstance(e, SafetensorError), isinstance(e, OSError), e)
"""


def test_saving_onto_a_full_disk_raises_the_librarys_error_and_leaves_nothing(full_tmpfs, tmp_path):
    folder = tmp_path / "cache"
    out = full_tmpfs(folder, sys.executable, "-c", SAVE_ONTO_FULL_DISK, str(folder))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SafetensorError True False ") and "No space left on device" in out.stdout
    assert Path(f"{folder}.left").read_text() == "inversion\n"  # the cache folder, empty (`ls -A` of the tmpfs)


# End to end: `python run.py` with paths.cache_dir on a full tmpfs. Bug caught (seen before the fix): the run died
# after the whole inversion with a SafetensorError traceback, exit 1, no metrics.json, instead of a warning naming
# the entry and a finished run.
def test_a_run_whose_cache_disk_is_full_warns_naming_the_entry_and_finishes(full_tmpfs, tmp_path):
    folder, logs = tmp_path / "cache", tmp_path / "logs"
    out = full_tmpfs(folder, sys.executable, str(ROOT / "run.py"), "debug=fast", "progress=false", "device=cpu",
                     "logger=none", f"paths.log_dir={logs}", f"paths.cache_dir={folder}")
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    assert "Traceback" not in output
    warning = [line for line in output.splitlines() if "could not write the inversion cache entry" in line]
    assert len(warning) == 1 and f"{folder}/inversion/" in warning[0], output
    assert "SafetensorError" in warning[0] and "No space left on device" in warning[0]
    metrics = list(logs.rglob("metrics.json"))
    assert len(metrics) == 1
    record = json.loads(metrics[0].read_text())
    assert record["vs_vae"]["psnr"] > 20 and record["inversion_cache"]["hit"] is False
    assert record["inversion_cache"]["path"] is None  # the entry named in the warning was not written
    assert not (metrics[0].parent / "inverted_latents").exists()  # no link to an entry that was not written
    assert Path(f"{folder}.left").read_text() == "inversion\n"  # no entry, no temporary folder


# The flow cache of the warp error on a full disk: the flow is computed, the write fails. Bug caught (seen before
# the fix): `estimate_flow` called `cache.save` bare, so a full disk ended the metrics step with a SafetensorError
# traceback after the flow was computed, instead of a warning naming the entry and the flow returned.
FLOW_ONTO_FULL_DISK = r"""
import logging, sys
import torch
from stem.metrics.flow import dis_flow, estimate_flow

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
frames = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # flows: 2 x 4 x 2 x 64 x 64 fp32
fwd, bwd, label = estimate_flow(frames, "dis", cache_dir=sys.argv[1] + "/flow", progress=False)
ref_fwd, ref_bwd = dis_flow(frames, progress=False)
print("RESULT", label, torch.equal(fwd, ref_fwd), torch.equal(bwd, ref_bwd))
"""


def test_a_flow_cache_on_a_full_disk_warns_naming_the_entry_and_returns_the_flow(full_tmpfs, tmp_path):
    folder = tmp_path / "cache"
    out = full_tmpfs(folder, sys.executable, "-c", FLOW_ONTO_FULL_DISK, str(folder))
    assert out.returncode == 0, out.stderr
    assert "RESULT dis True True" in out.stdout
    warning = [line for line in out.stderr.splitlines() if "could not write the flow cache entry" in line]
    assert len(warning) == 1 and f"{folder}/flow/" in warning[0], out.stderr
    assert "No space left on device" in warning[0]
    assert Path(f"{folder}.left").read_text() == "flow\n"  # no entry, no temporary folder

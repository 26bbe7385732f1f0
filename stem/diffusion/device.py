"""Device and dtype choice: fp16 on GPU, fp32 on CPU (spec: never fp16 on CPU)."""

from __future__ import annotations

import torch

from stem.core.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. CPU runs flush denormals (see `setup_cpu`)."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"device='{device}' is not a torch device; use auto, cpu or cuda[:N]") from e
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device='{device}' but CUDA is not available here; use device=auto or cpu")
    if resolved.type == "cpu":
        setup_cpu()
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 elsewhere; also accepts fp32/fp16/bf16 names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype='{dtype}' is not supported; use auto, fp32, fp16 or bf16")
    return _DTYPES[dtype]


def setup_cpu() -> None:
    """Flush denormals: randomly initialised models produce them and run 2-3x slower otherwise. The mode is per
    thread and torch's CPU worker threads take it from the thread that starts them: call this before the first
    parallel torch op (run.py does at import) for it to reach them."""
    torch.set_flush_denormal(True)


def device_name(device: str | torch.device = "cpu") -> str:
    """The hardware behind `device`, as a reader of a table needs it: the GPU's name ("NVIDIA H200")
    for CUDA, the processor's model name (from /proc/cpuinfo, else `platform`) for CPU; the
    device type itself when nothing better is known."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return device.type


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def available_memory(device) -> int | None:
    """Bytes free for this run: CUDA's free memory on the device; on the CPU the cgroup's memory.max when one
    is set (a container or a SLURM job), else the kernel's MemAvailable. None when unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit.isdigit():
            return int(limit)
    except OSError:
        pass
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

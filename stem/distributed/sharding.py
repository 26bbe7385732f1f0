"""Frame-sharded jobs over `torch.distributed`: who holds which frames, and the few collectives they need.

A video of N frames is split into contiguous slices, one per process (rank). Each rank runs the
VAE and the UNet on its own slice; the self-attention processors exchange only what their
context needs (STEM: the EM sums, and the per-basis maxima of the literal M-step, see `stem.inversion.em`;
DDIM 2-frame: one frame's keys/values; all-frame: every frame's keys/values, see `stem.inversion.attention`).

Slicing rule (`frame_slices`): the units are frames, or EM groups of `group` frames (the last
group may be shorter, as in `stem.inversion.stem_attention.group_spans`) so that no group straddles two
ranks; the U units are dealt out contiguously in rank order, the first U mod W ranks getting
one unit more (numpy's `array_split` rule): 7 frames over 3 ranks -> 3, 2, 2 frames.

With one process (`Distributed()`, world size 1, no process group) every collective is the
identity and no processor takes a sharded code path, so results are bitwise those of the
single-process code.

Backends: NCCL on CUDA, gloo on CPU ("auto"); NCCL without CUDA is a ConfigError.
`from_env` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
`submitit_environ` turns submitit's `JobEnvironment` into the same variables (SLURM launches).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from stem.core.errors import ConfigError, check_choice

BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this fails (torch's default is 30 min)
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def choose_backend(backend: str = "auto", cuda: bool | None = None) -> str:
    """"nccl" on CUDA and "gloo" on CPU for "auto"; ConfigError for NCCL without CUDA."""
    check_choice("backend", backend, BACKENDS)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if backend == "nccl" and not cuda:
        raise ConfigError("backend=nccl needs CUDA GPUs, and none is visible: use backend=gloo (or auto) on CPU")
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    return backend


def frame_units(num_frames: int, group: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of the units a slice is made of: single frames, or EM groups of `group` frames."""
    size = min(group or 1, num_frames)
    return [(s, min(s + size, num_frames)) for s in range(0, num_frames, size)]


def frame_slices(num_frames: int, world_size: int, group: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of every rank's contiguous frame slice (rule in the module docstring).

    ConfigError when some rank would get no frame, or when `group` leaves fewer whole groups than ranks.
    """
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be at least 1")
    if world_size > num_frames:
        raise ConfigError(f"world size {world_size} exceeds the {num_frames} frames of the video: every rank needs "
                          f"at least one frame; use at most {num_frames} processes or more frames")
    units = frame_units(num_frames, group)
    if world_size > len(units):
        raise ConfigError(f"EM groups of {group} frames would straddle ranks: {num_frames} frames make only "
                          f"{len(units)} group(s) for {world_size} ranks; use at most {len(units)} processes, a "
                          f"smaller group (at most {num_frames // world_size}) or group=null (global bases)")
    per, extra = divmod(len(units), world_size)
    slices, u = [], 0
    for rank in range(world_size):
        count = per + (rank < extra)
        slices.append((units[u][0], units[u + count - 1][1]))
        u += count
    return slices


@dataclass
class Distributed:
    """This process's place in a frame-sharded job; `Distributed()` is the single-process job.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them.
        backend: "nccl" or "gloo" (None for one process).
        group: the torch.distributed process group (None for one process: every collective is the identity).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    group: object | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """True when several processes take part (collectives communicate)."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """The device of this rank's tensors for the backend (collectives of NCCL need CUDA tensors)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, num_frames: int, group: int | None = None) -> FrameShard:
        """This rank's frames of an N-frame video (ConfigError for impossible splits, before model work)."""
        return FrameShard(self, tuple(frame_slices(num_frames, self.world_size, group)))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over ranks (in place; returned). Identity with one process."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `tensor` over ranks (in place; returned). Identity with one process."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all ranks), in rank order."""
        if not self.active:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`tensor` of rank `src` on every rank (in place; returned). Identity with one process."""
        if self.active:
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def all_gather_slices(self, tensor: torch.Tensor, sizes: list[int], dim: int = 0) -> torch.Tensor:
        """Concatenation along `dim` of every rank's slice, rank r holding sizes[r] entries there.

        Slices may differ in size (gloo's all_gather needs equal ones): each is padded to the largest
        size, gathered, and trimmed back."""
        if not self.active:
            return tensor
        parts = self.all_gather(_pad(tensor, max(sizes), dim))
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)], dim)

    def gather_slices(self, tensor: torch.Tensor, sizes: list[int], dim: int = 0, dst: int = 0) -> torch.Tensor | None:
        """As `all_gather_slices`, but only rank `dst` receives the whole (others get None): memory on one rank."""
        if not self.active:
            return tensor
        padded = _pad(tensor, max(sizes), dim).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(padded, parts, dst=dst, group=self.group)
        if self.rank != dst:
            return None
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)], dim)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Leave the process group (safe to call with one process)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
        self.group = None


def _pad(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


@dataclass(frozen=True)
class FrameShard:
    """The frames of this rank in an N-frame video: slices[r] = (start, stop) of rank r (`frame_slices`)."""

    dist: Distributed
    slices: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.slices[self.dist.rank][0]

    @property
    def stop(self) -> int:
        return self.slices[self.dist.rank][1]

    @property
    def num_frames(self) -> int:
        """Frames of this rank."""
        return self.stop - self.start

    @property
    def total(self) -> int:
        """N, frames of the whole video."""
        return self.slices[-1][1]

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in self.slices]

    def owner(self, frame: int) -> int:
        """The rank holding global frame `frame`."""
        return next(r for r, (a, b) in enumerate(self.slices) if a <= frame < b)

    def local(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's frames of a tensor holding all N frames along `dim`."""
        return tensor.narrow(dim, self.start, self.num_frames)


def init(rank: int, world_size: int, master_addr: str, master_port: int | str, local_rank: int = 0,
         backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed:
    """Join a `world_size`-process job (Distributed() when world_size is 1: nothing to join).

    A collective that waits longer than `timeout_s` (a rank died or hangs) raises instead of waiting
    forever; a rank whose process exits closes its connections, so the others fail at once."""
    if world_size == 1:
        return Distributed()
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
    backend = choose_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(rank, world_size, local_rank, backend, dist.group.WORLD)


def from_env(environ: Mapping[str, str] | None = None, backend: str = "auto",
             timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed:
    """The job torchrun (or `submitit_environ`) describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.

    Without WORLD_SIZE (a plain `python run.py`) or with WORLD_SIZE=1: the single-process job.
    The backend is checked before anything is started."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    choose_backend(backend)
    missing = [name for name in ENV_VARS if name not in env and name != "LOCAL_RANK"]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with torchrun "
                          "(e.g. torchrun --standalone --nproc-per-node=2 run.py ...) or set them")
    return init(int(env["RANK"]), world_size, env["MASTER_ADDR"], env["MASTER_PORT"],
                int(env.get("LOCAL_RANK", "0")), backend, timeout_s)


def submitit_environ(job_env, master_port: int = 29500) -> dict[str, str]:
    """torchrun's variables from a submitit `JobEnvironment` (SLURM: one task per GPU), for `from_env`.

    The master is the job's first host; `master_port` must be free there."""
    return {"RANK": str(job_env.global_rank), "WORLD_SIZE": str(job_env.num_tasks),
            "LOCAL_RANK": str(job_env.local_rank), "MASTER_ADDR": job_env.hostnames[0],
            "MASTER_PORT": str(master_port)}

"""Attention maps recorded during inversion, for FateZero's attention fusion (spec/EDITING.md).

`AttentionRecorder` is entered around an inversion (any `inversion=` method). Forward hooks on
the chosen `attn1`/`attn2` modules observe their inputs and store, for every UNet call (keyed by
its timestep), the attention probabilities

    self  (attn1): softmax(Q K_ctx^T / sqrt(d)), keys of the frames FateZero's editing attention
                   uses (`frame_table(layer)`: the spatio-temporal list, or the frame itself), so
                   the maps have the layout the editing pass fuses them into, whatever attention
                   the inversion itself ran;
    cross (attn2): softmax(Q K_text^T / sqrt(d)) over the 77 prompt tokens,

as (N, heads, queries, keys). The hooks only observe: the inversion's result is unchanged.

Layers: those whose query length is at most `max_tokens` (FateZero: 32x32 at 512^2, i.e. all
but the outermost blocks). `AttentionStore` keeps the maps in host memory (pinned when CUDA is
available, so each step's maps go to the GPU by an asynchronous copy when the edit reads them;
the release keeps its 32x32 maps, 93% of the store, in CPU RAM) or, with `where="disk"`, one
safetensors file per timestep in a temporary folder removed by `close()`. Only the maps of the
step being edited are on the UNet's device. The store's size is computed before anything is
recorded and refused above `budget_gib` or above the host RAM available (memory store), and
one step's maps are refused when they do not fit in the device's free memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stem.core.errors import ConfigError, check_choice, check_number
from stem.inversion.attention import attention_probabilities, gather_frames, project_heads
from stem.inversion.methods import self_attention_tokens

log = logging.getLogger(__name__)

WHERE = ("memory", "disk")


def stored_layers(unet, latent_hw: tuple[int, int], max_tokens: int) -> dict[str, tuple[int, int]]:
    """{attention block path ("...transformer_blocks.0"): token grid} of the blocks whose query length
    is at most `max_tokens`; both its attn1 and attn2 are recorded."""
    grids = self_attention_tokens(unet, *latent_hw)
    return {path.removesuffix(".attn1"): grid for path, grid in grids.items() if grid[0] * grid[1] <= max_tokens}


def available_host_bytes() -> int | None:
    """Host RAM available to new allocations (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_store_budget(budget_gib) -> None:
    """ConfigError unless the store's budget is a number of GiB > 0 (inf: none but the host RAM available)."""
    check_number("editing.store_budget_gib", budget_gib, low=0, low_open=True, inf=True,
                 fix="the largest attention store in GiB (default 48; inf = only the host RAM's limit)")


class AttentionStore:
    """Attention probabilities per (timestep, "<block>.attn1|attn2"), in host memory or on disk.

    Args:
        where: "memory" (CPU tensors, pinned when `pin`) or "disk" (a fresh folder under `folder`).
        budget_gib: the largest store accepted (host RAM for "memory", disk space for "disk").
        pin: page-lock the in-memory maps (default: when CUDA is available; pinning needs CUDA).
    """

    def __init__(self, where: str = "memory", folder: str | Path | None = None, budget_gib: float = 48.0,
                 pin: bool | None = None):
        check_choice("editing.attention_store", where, WHERE)
        check_store_budget(budget_gib)
        self.where, self.budget_gib = where, budget_gib
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._maps: dict[int, dict[str, torch.Tensor]] = {}
        self._folder: Path | None = None
        if where == "disk":
            root = Path(folder if folder is not None else tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(dir=root, prefix="attention-"))
        self._loaded: tuple[int, dict] | None = None

    def check_size(self, nbytes: int, what: str, step_bytes: int = 0, device=None) -> None:
        """Log the size the store will reach; ConfigError above the budget or the host RAM available
        (memory store), or when one step's maps (`step_bytes`, on the UNet's `device` while that step
        is edited) do not fit in the device's free memory. Each error names the ways out."""
        gib = nbytes / 2**30
        log.info("attention store: %.2f GiB (%s) in %s", gib, what,
                 ("pinned " if self.pin else "") + "host memory" if self.where == "memory" else self._folder)
        ways_out = ("use editing.attention_store=disk, lower editing.store_max_tokens, use fewer frames"
                    if self.where == "memory" else "lower editing.store_max_tokens, use fewer frames")
        if gib > self.budget_gib:
            raise ConfigError(f"the attention store would hold {gib:.1f} GiB ({what}), over "
                              f"editing.store_budget_gib={self.budget_gib:g}; {ways_out}, or raise the budget")
        host = available_host_bytes() if self.where == "memory" else None
        if host is not None and nbytes > host:
            raise ConfigError(f"the attention store would hold {gib:.1f} GiB ({what}) in host memory, which "
                              f"has {host / 2**30:.1f} GiB available; {ways_out}")
        device = torch.device(device) if device is not None else None
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if step_bytes > free:
                raise ConfigError(f"one step's attention maps ({step_bytes / 2**30:.1f} GiB) do not fit in the "
                                  f"{free / 2**30:.1f} GiB free on {device}; lower editing.store_max_tokens or "
                                  "use fewer frames")

    def place(self, maps: torch.Tensor) -> torch.Tensor:
        """A host copy of `maps` to keep (pinned when `self.pin`), wherever they were computed."""
        if not self.pin:
            return maps.detach().to("cpu", copy=True)
        out = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
        return out.copy_(maps.detach())

    def put_step(self, t: int, maps: dict[str, torch.Tensor]) -> None:
        """Store the maps of the UNet call at timestep t (all layers at once, host tensors from `place`)."""
        if self.where == "memory":
            self._maps[int(t)] = maps
        else:
            save_file({k: v.contiguous() for k, v in maps.items()}, str(self._folder / f"t{int(t):04d}.safetensors"))

    def step(self, t: int, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All maps of timestep t (looked up by the timestep's value; from disk: the file of that timestep,
        loaded once), moved to `device` and `dtype` when given (the stored host maps stay where they are)."""
        t = int(t)
        if self.where == "memory":
            if t not in self._maps:
                raise KeyError(f"no attention maps recorded at timestep {t}")
            maps = self._maps[t]
        else:
            if self._loaded is None or self._loaded[0] != t:
                path = self._folder / f"t{t:04d}.safetensors"
                if not path.is_file():
                    raise KeyError(f"no attention maps recorded at timestep {t}")
                self._loaded = (t, load_file(str(path)))
            maps = self._loaded[1]
        if device is None and dtype is None:
            return maps
        return {k: v.to(device=device, dtype=dtype, non_blocking=self.pin) for k, v in maps.items()}

    def timesteps(self) -> list[int]:
        if self.where == "memory":
            return sorted(self._maps)
        return sorted(int(p.stem[1:]) for p in self._folder.glob("t*.safetensors"))

    def close(self) -> None:
        """Free the maps; remove the disk folder."""
        self._maps.clear()
        self._loaded = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def attention_probs(attn, x: torch.Tensor, context: torch.Tensor | None = None,
                    frame_table: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of a diffusers Attention module: (B, heads, queries, keys).

    Self-attention (`context` None): keys of the frames in `frame_table` (N, L) (None: the frame itself).
    Cross-attention: keys of `context` (the text embedding).
    """
    q, k = project_heads(attn, x, context, "q", "k")
    if context is None and frame_table is not None:
        k = gather_frames(k, frame_table, frame_table.shape[0])
    return attention_probabilities(q, k)


class AttentionRecorder:
    """Context manager: records the attn1/attn2 maps of `layers` at every UNet call into `store`.

    Args:
        unet: the UNet. store: an `AttentionStore`. layers: {block path: token grid} (`stored_layers`).
        frame_table: function of a block path -> the (N, L) frame table of its editing self-attention.
        dtype: dtype of the stored maps (fp16 halves the store; the fusion computes in fp32).
    """

    def __init__(self, unet, store: AttentionStore, layers: dict, frame_table: Callable[[str], torch.Tensor | None],
                 dtype: torch.dtype = torch.float16):
        self.unet, self.store, self.layers, self.frame_table, self.dtype = unet, store, layers, frame_table, dtype
        self._handles: list = []
        self._current: dict[str, torch.Tensor] = {}
        self._t: int | None = None

    def size_bytes(self, num_frames: int, num_steps: int, text_tokens: int = 77) -> int:
        """Bytes the store will hold after `num_steps` UNet calls on `num_frames` frames."""
        return self.step_bytes(num_frames, text_tokens) * num_steps

    def step_bytes(self, num_frames: int, text_tokens: int = 77) -> int:
        """Bytes of the maps of one UNet call on `num_frames` frames (what the edit holds on the device)."""
        per_step = 0
        item = torch.tensor([], dtype=self.dtype).element_size()
        for block, (h, w) in self.layers.items():
            heads = self.unet.get_submodule(f"{block}.attn1").heads
            table = self.frame_table(block)
            context_frames = 1 if table is None else table.shape[1]
            per_step += num_frames * heads * h * w * (h * w * context_frames)  # attn1
            per_step += num_frames * self.unet.get_submodule(f"{block}.attn2").heads * h * w * text_tokens
        return per_step * item

    def _pre_unet(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._t = int(torch.as_tensor(t).reshape(-1)[0])
        self._current = {}

    def _post_unet(self, module, args, output):
        self.store.put_step(self._t, self._current)
        self._current = {}

    def _hook(self, block: str, kind: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            if kind == "attn1":
                probs = attention_probs(module, x, frame_table=self.frame_table(block))
            else:
                context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                probs = attention_probs(module, x, context=context)
            self._current[f"{block}.{kind}"] = self.store.place(probs.to(self.dtype))
        return hook

    def __enter__(self) -> AttentionRecorder:
        self._handles.append(self.unet.register_forward_pre_hook(self._pre_unet, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._post_unet))
        for block in self.layers:
            for kind in ("attn1", "attn2"):
                module = self.unet.get_submodule(f"{block}.{kind}")
                self._handles.append(module.register_forward_hook(self._hook(block, kind), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def close(self) -> None:
        """Free (or remove from disk) everything recorded."""
        self.store.close()

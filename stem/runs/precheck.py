"""Checks that run before any model work (`stem.app.job.run_job`): bad settings fail in a second
with one line, not after minutes of loading weights or inverting.

- `check_arguments`: the keys of a config group against the signature of its `_target_`
  (an unknown key names the closest known one; a value of the wrong type names the type).
- `check_run_settings`: the job's own numbers (warmup_steps, distributed.timeout_s and master_port) in range.
- `check_before_model`: from the model's config alone (`stem.diffusion.models.architecture`): DDIM steps
  within the scheduler's training timesteps, editing timesteps among the inversion's, the method's
  `check` (STEM: K vs tokens) and a lower-bound memory estimate against the free memory (`memory_need`,
  `available_memory`; top-level `check_memory=false` skips it).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing

from stem.core.errors import ConfigError, check_number
from stem.diffusion.device import available_memory


def _accepts(annotation, value) -> bool:
    """Whether `value` (plain config data: None, bool, int, float, str, list, dict) fits `annotation`.
    Types this cannot judge (classes, callables, typing constructs) accept anything: the target decides."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _type_name(annotation) -> str:
    """How a type reads in a message: `int or 'auto'` for int | Literal["auto"]."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_arguments(group: str, target, kwargs: dict) -> None:
    """ConfigError if `target(**kwargs)` would fail on a key it does not take or a value of the wrong type.

    `kwargs` are the config group's values (resolved, `_`-keys left out). The message names the key, the
    closest known key (difflib) and all known keys, or the expected type. Targets taking **kwargs accept
    any key."""
    try:
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (TypeError, ValueError, NameError):
        return  # no introspectable signature: instantiate reports what goes wrong
    params = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in kwargs.items():
        if key not in params:
            if open_ended:
                continue
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"did you mean {group}.{close[0]}? " if close else ""
            raise ConfigError(f"{group}.{key} is not a setting of {group} ({_target_name(target)}): {hint}"
                              f"known: {', '.join(params)}")
        annotation = hints.get(key, inspect.Parameter.empty)
        if not _accepts(annotation, value):
            raise ConfigError(f"{group}.{key}={value!r} must be of type {_type_name(annotation)}, "
                              f"got {type(value).__name__}")


def _target_name(target) -> str:
    return f"{target.__module__}.{target.__qualname__}"


SEED_MAX = 2**64 - 1  # torch.manual_seed's largest seed; it maps a negative seed s to 2**64 + s (the same weights)


def check_run_settings(seed: int = 0, warmup_steps: int = 0, timeout_s: float = 600, master_port: int | None = None,
                       model: dict | None = None) -> None:
    """ConfigError (one line) for a top-level setting out of range: `seed` an integer in torch's range [0, 2**64 - 1]
    (torch.manual_seed raises a multi-line error on nan, inf or larger integers, and takes a negative seed as an
    alias of a large one); `warmup_steps` an integer >= 0, and at most the
    scheduler's training timesteps when `model` (the resolved model group) names a known architecture;
    `distributed.timeout_s` a finite number of seconds > 0; `distributed.master_port` null or a TCP port."""
    from stem.diffusion.models import architecture

    check_number("seed", seed, low=0, high=SEED_MAX, integer=True,
                 fix="torch's range (a negative seed is torch's alias of a large one), e.g. seed=0")
    arch = architecture(model.get("_target_", ""), model) if model is not None else None
    check_number("warmup_steps", warmup_steps, low=0, high=arch["num_train_timesteps"] if arch else None,
                 integer=True, fix="untimed inversion steps before the timed one (0 = none)")
    check_number("distributed.timeout_s", timeout_s, low=0, low_open=True,
                 fix="seconds a collective may wait before the job fails (default 600)")
    if master_port is not None:
        check_number("distributed.master_port", master_port, low=1, high=65535, integer=True,
                     fix="a free TCP port on the job's first node, or null to derive one from the job id")


def check_before_model(model: dict, method, video, editor=None, check_memory: bool = True) -> None:
    """Settings that need the model's architecture, checked from its config (`stem.diffusion.models.architecture`)
    before any weights load: DDIM steps within the scheduler's training timesteps, the editor's timesteps among
    the inversion's (`stem.editing.base.check_steps`), and the method's own `check` (STEM: K at most the tokens
    of an EM group) on the video's latent size. `model`: the resolved model group (with `_target_`); an unknown
    architecture skips these (they run after loading then)."""
    from stem.diffusion.models import architecture

    arch = architecture(model.get("_target_", ""), model)
    if arch is None:
        return
    limit = arch["num_train_timesteps"]
    for group, steps in (("inversion", method.num_steps), ("editing", getattr(editor, "num_steps", None))):
        if steps is not None and steps > limit:
            raise ConfigError(f"{group}.num_steps={steps} exceeds the scheduler's {limit} training timesteps: "
                              f"use at most {limit} (the paper: 50)")
    if getattr(editor, "num_steps", None) is not None:  # every editing timestep must be an inversion timestep
        from stem.diffusion.models import ddim_scheduler
        from stem.editing.base import check_steps

        check_steps(ddim_scheduler(), method.num_steps, editor.num_steps)
    scale = arch["vae_scale"]
    method.check(arch["unet"], video.num_frames, video.height // scale, video.width // scale)
    if check_memory:
        from stem.diffusion.device import resolve_device, resolve_dtype

        device = resolve_device(model.get("device", "auto"))
        dtype = resolve_dtype(model.get("dtype", "auto"), device)
        need, what = memory_need(arch, video, dtype.itemsize)
        free = available_memory(device)
        if free is not None and need > free:
            raise ConfigError(f"{video.num_frames} frames of {video.width}x{video.height} need at least "
                              f"{need / 2**30:.2f} GiB on {device} ({what}), {free / 2**30:.2f} GiB is available: "
                              "use fewer frames (data.n_frames) or a lower resolution, or check_memory=false "
                              "to run anyway")


def memory_need(arch: dict, video, dtype_bytes: int) -> tuple[int, str]:
    """(bytes, how counted): a lower bound of the memory one UNet call on the whole video needs (every method
    runs all N frames through the UNet in one batch), so that refusing when it exceeds the available memory
    refuses only what cannot run. Counted: at the self-attention layer with the most tokens x channels, its
    input, queries, keys and values for all N frames, 4 x N x tokens x channels x bytes. Left out: weights, the
    VAE, every other activation, and attention scores: PyTorch's fused attention (CUDA, and the CPU's
    flash kernel) does not hold them (measured on the CPU: 3 MiB peak for a 2 x 2048 x 65536 score matrix,
    1 GiB if held), so `ddim_allframe`'s N x tokens keys cost what its keys and values cost."""
    from stem.inversion.methods import self_attention_tokens

    config = arch["unet"]
    h, w = video.height // arch["vae_scale"], video.width // arch["vae_scale"]
    widths = list(config["block_out_channels"])
    sizes = [(h, w)]
    for _ in widths[1:]:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))  # as self_attention_tokens: halving rounds up
    layers = {(gh * gw, min(c for c, size in zip(widths, sizes) if size == (gh, gw)))
              for gh, gw in self_attention_tokens(config, h, w).values()}
    tokens, channels = max(layers, key=lambda tc: tc[0] * tc[1])
    n = video.num_frames
    return 4 * n * tokens * channels * dtype_bytes, f"4 x {n} frames x {tokens} tokens x {channels} channels x " \
                                                    f"{dtype_bytes} bytes at the largest self-attention layer"

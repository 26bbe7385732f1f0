"""Checks that run before any model work (run.py's `run_job`): bad settings fail in a second
with one line, not after minutes of loading weights or inverting.

- `check_arguments`: the keys of a config group against the signature of its `_target_`
  (an unknown key names the closest known one; a value of the wrong type names the type).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing

from stem.errors import ConfigError


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


def check_before_model(model: dict, method, video, editor=None) -> None:
    """Settings that need the model's architecture, checked from its config (`stem.models.architecture`)
    before any weights load: DDIM steps within the scheduler's training timesteps, and the method's own
    `check` (STEM: K at most the tokens of an EM group) on the video's latent size. `model`: the resolved
    model group (with `_target_`); an unknown architecture skips these (they run after loading then)."""
    from stem.models import architecture

    arch = architecture(model.get("_target_", ""), model)
    if arch is None:
        return
    limit = arch["num_train_timesteps"]
    for group, steps in (("inversion", method.num_steps), ("editing", getattr(editor, "num_steps", None))):
        if steps is not None and steps > limit:
            raise ConfigError(f"{group}.num_steps={steps} exceeds the scheduler's {limit} training timesteps: "
                              f"use at most {limit} (the paper: 50)")
    scale = arch["vae_scale"]
    method.check(arch["unet"], video.num_frames, video.height // scale, video.width // scale)

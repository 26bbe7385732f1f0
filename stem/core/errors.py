"""User-facing errors: one line that names the problem and the fix."""

import math
import numbers


class StemError(Exception):
    """Bad input or settings. `run.py` prints the message on one line and exits non-zero."""


class VideoError(StemError):
    """A video (file or frame folder) is missing, unreadable or too short."""


class PromptError(StemError):
    """A prompt the text encoder cannot take as it is."""


class ConfigError(StemError):
    """A setting with a value the code does not support."""


class TableError(StemError):
    """A sweep folder that cannot be turned into a results table."""


class StudyError(StemError):
    """A user study (stem.study) refused: no pairs in a sweep, a bad manifest or database, an answer refused."""


def check_choice(name: str, value, choices) -> None:
    """ConfigError unless `value` is one of `choices` (the message lists them)."""
    if value not in choices:
        raise ConfigError(f"{name}='{value}' is not one of {', '.join(choices)}")


def check_number(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, inf: bool = False, fix: str = ""):
    """`value` if it is a number within the bounds, else ConfigError `name=value must be <range>: fix` (one line).

    A number: an int or float, never a bool, never NaN; an integer when `integer`. Bounds: `low <= value <= high`
    (`low_open` / `high_open`: strict), either may be None. Infinite values are refused unless `inf` (then +inf
    passes where `high` is None: "no limit")."""
    bounded = low is not None and high is not None
    kind = "an integer" if integer else "a number" if inf or bounded else "a finite number"
    if bounded:
        what = (f"{kind} strictly between {low} and {high}" if low_open and high_open else
                f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
    elif low is not None:
        what = f"{kind} > {low}" if low_open else f"{kind} of at least {low}"
    elif high is not None:
        what = f"{kind} < {high}" if high_open else f"{kind} of at most {high}"
    else:
        what = kind
    number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    ok = number and not math.isnan(value) and (inf or math.isfinite(value)) and value != -math.inf
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"{name}={value!r} must be {what}" + (f": {fix}" if fix else ""))
    return value


def check_token_count(name: str, value: int | None) -> None:
    """ConfigError unless `value` is a positive token count or None (no limit)."""
    if value is not None:
        check_number(name, value, low=1, integer=True, fix="a token count, or null for no limit")


class MetricError(StemError, ValueError):
    """Input a metric cannot score (shapes, NaNs, too few or too small frames, missing weights).

    Also a ValueError, so library callers can catch it as the bad value it is."""


def is_safetensors(path) -> bool:
    """Whether the file at `path` is in the safetensors format (an 8-byte little-endian header length, then a
    JSON header), read without deserialising anything; a pickle (.bin/.pt/.pth/.ckpt) is not."""
    with open(path, "rb") as f:
        head = f.read(9)
        f.seek(0, 2)
        size = f.tell()
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


PICKLE_RISK = "only for weights you trust: a pickle can run code when loaded"

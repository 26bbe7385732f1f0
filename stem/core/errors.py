"""User-facing errors: one line that names the problem and the fix."""


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


def check_choice(name: str, value, choices) -> None:
    """ConfigError unless `value` is one of `choices` (the message lists them)."""
    if value not in choices:
        raise ConfigError(f"{name}='{value}' is not one of {', '.join(choices)}")


def check_token_count(name: str, value: int | None) -> None:
    """ConfigError unless `value` is a positive token count or None (no limit)."""
    if value is not None and value < 1:
        raise ConfigError(f"{name}={value} must be a positive token count or null")


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

"""Version of the inversion cache's keys, and a digest of the code that produces the cached latents.

`stem.runs.reconstruction.invert_video` keys its cache entries by their inputs (frames, weights, prompt,
settings) and by `INVERSION_CACHE_VERSION`, so bumping the version makes every older entry miss.
The inputs do not cover the code: a change of the EM, DDIM, attention, VAE or prompt code would
silently reuse latents computed by the old code. `INVERSION_SOURCES_DIGEST` is the SHA-256 of that
code (`INVERSION_SOURCES`) as it was when the version was last set; tests/runs/test_cache_version.py
fails when the code no longer matches it. After changing any of those sources run

    python -m stem.runs.cache_version --update                 # bump the version, record the new digest
    python -m stem.runs.cache_version --update --keep-version  # record the digest only: for changes that
                                                          # cannot alter a latent (comments, docstrings)

and commit this file with the change. `python -m stem.runs.cache_version` alone checks (exit 1 on a mismatch).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import re
import sys
from pathlib import Path

INVERSION_CACHE_VERSION = 2  # bump when the inverted latents may change (module docstring)
# sources_digest() when INVERSION_CACHE_VERSION was last set (rewritten by --update):
INVERSION_SOURCES_DIGEST = "eb9be905ce742f074b2833c0df312d09a1b86fcfce995906dd661be714cfac73"

# What the cached trajectory depends on besides the key's inputs: "module" is the whole file,
# "module:name" one function (its module holds unrelated code).
INVERSION_SOURCES = (
    "stem.inversion.methods",           # the methods: settings, frame grouping, the inversion loop per method
    "stem.diffusion.ddim",                # DDIM inversion steps (Eq. 2-3) and the trajectory
    "stem.inversion.em",                  # EM bases of STEM (Eq. 5-7)
    "stem.inversion.stem_attention",      # STEM self-attention over the bases
    "stem.inversion.adaptive",            # the choice of K per layer with num_bases=auto
    "stem.inversion.attention",           # attention processors and their maths
    "stem.inversion.fatezero_attention",  # spatio-temporal attention of the FateZero-style inversion
    "stem.diffusion.prompts",             # the source prompt embedding the inversion is conditioned on
    "stem.diffusion.vae",                 # z_0 = E(x) * scaling factor
    "stem.runs.reconstruction:invert_video",  # what is inverted and stored
    "stem.runs.reconstruction:_trajectory",   # dtype and memory format of the stored trajectory
    "stem.runs.reconstruction:_invert_sharded",  # a frame-sharded inversion: slices, gather on rank 0
    "stem.inversion.sharded",             # the sharded processors and inversion loop
    "stem.distributed.sharding",         # how frames are sliced and gathered
    "stem.editing.fatezero:groupnorms",  # FateZero's clip-wide GroupNorm, active during its inversion
    "stem.editing.fatezero:clip_groupnorm",
)


def source_text(name: str) -> str:
    """The source of a module ("pkg.mod", read from its `__file__`) or of one function ("pkg.mod:function"),
    with line endings normalised to "\\n" (a CRLF checkout gives the same digest)."""
    module_name, _, attr = name.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        text = inspect.getsource(getattr(module, attr))
    else:
        with open(module.__file__, encoding="utf-8", newline="") as f:
            text = f.read()
    return text.replace("\r\n", "\n").replace("\r", "\n")


def sources_digest(texts: dict[str, str] | None = None) -> str:
    """SHA-256 (hex) of the named sources (`source_text` of each of `INVERSION_SOURCES` when `texts` is None)."""
    if texts is None:
        texts = {name: source_text(name) for name in INVERSION_SOURCES}
    h = hashlib.sha256()
    for name in sorted(texts):
        text = texts[name].replace("\r\n", "\n").replace("\r", "\n")
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def update(path: str | Path = __file__, bump: bool = True) -> str:
    """Record the current `sources_digest()` in the module file `path` (this file by default) and, with `bump`,
    increase its `INVERSION_CACHE_VERSION` by one. Returns the digest."""
    path = Path(path)
    text, digest = path.read_text(), sources_digest()
    text, n = re.subn(r'^INVERSION_SOURCES_DIGEST = "[^"]*"', f'INVERSION_SOURCES_DIGEST = "{digest}"', text,
                      flags=re.M)
    if bump:
        text, m = re.subn(r"^INVERSION_CACHE_VERSION = (\d+)",
                          lambda v: f"INVERSION_CACHE_VERSION = {int(v.group(1)) + 1}", text, flags=re.M)
        n = min(n, m)
    if n != 1:
        raise RuntimeError(f"{path}: could not find the INVERSION_CACHE_VERSION / INVERSION_SOURCES_DIGEST lines")
    path.write_text(text)
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stem.runs.cache_version", description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="bump the version and record the current digest")
    parser.add_argument("--keep-version", action="store_true",
                        help="with --update: record the digest without a bump (the change cannot alter latents)")
    args = parser.parse_args(argv)
    digest = sources_digest()
    if args.update:
        update(bump=not args.keep_version)
        print(f"recorded digest {digest}" + ("" if args.keep_version else " and bumped INVERSION_CACHE_VERSION"))
        return 0
    ok = digest == INVERSION_SOURCES_DIGEST
    print(f"inversion cache version {INVERSION_CACHE_VERSION}, sources digest {digest} "
          + ("(matches)" if ok else f"(recorded {INVERSION_SOURCES_DIGEST}: run with --update)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

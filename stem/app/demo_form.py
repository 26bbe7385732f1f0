"""The demo's form (docs/DEMO.md): each field checked against a whitelist or a range (`parse_form`, a one-line
`FormError` otherwise) and turned into the overrides of one `python run.py` job (`DemoRequest.overrides`).

How the form's choices map to run.py's presets:

- inversion: `inversion=<choice>` (ddim_1frame, ddim_2frame, ddim_allframe, fatezero, stem with
  `inversion.num_bases=K`, stem_auto), `inversion.num_steps=<steps>`.
- reconstruct: no editor (`editing` stays null): invert, sample back, PSNR/SSIM.
- TokenFlow edit: `editing=tokenflow` on the chosen inversion (on STEM that is STEM-TokenFlow).
- FateZero edit: `editing=stem_fatezero` on the STEM inversions (STEM-FateZero, paper Table 2), `editing=fatezero`
  on the others (FateZero's fusion of the maps recorded during that inversion; with inversion=fatezero it is the
  FateZero row). Both presets select an inversion of their own (`fatezero`, `stem`): the demo always passes the
  chosen `inversion=` after them, and a command-line group override wins over a preset's, so the inversion run is
  the one chosen in the form.
- clip: `data=synthetic` with `data.n_frames=<frames>`; a sample clip `data=<name>` or an upload `data=video
  data.path=<file>` with `data.max_frames=<frames> data.max_frames_keep=first` (the first frames, consecutive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stem.core.errors import ConfigError

INVERSIONS = {   # form value -> label; the value is the configs/inversion preset
    "ddim_1frame": "DDIM, 1-frame attention",
    "ddim_2frame": "DDIM, 2-frame attention",
    "ddim_allframe": "DDIM, all-frame attention",
    "fatezero": "FateZero's inversion (spatio-temporal, middle frame)",
    "stem": "STEM with K bases",
    "stem_auto": "STEM, K chosen per layer (auto)",
}
STEM_INVERSIONS = ("stem", "stem_auto")
ACTIONS = {
    "reconstruct": "Reconstruct (invert, then sample back)",
    "tokenflow": "TokenFlow edit",
    "fatezero": "FateZero edit",
}
K_CHOICES = (128, 256, 512)      # paper Fig. 3; another number in K_RANGE is accepted
K_RANGE = (2, 2048)
STEPS_RANGE = (2, 100)            # DDIM steps (paper: 50)
MIN_FRAMES = 2                    # one frame has no temporal attention to show
PROMPT_CHARS = 300                # far above CLIP's 77 tokens: longer is a pasted text, not a prompt
UPLOAD = "upload"                 # the clip choice of an uploaded file
_INTEGER = re.compile(r"\d{1,6}")


class FormError(ConfigError):
    """A form field refused: one line naming the field, the problem and the fix (HTTP `status`)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DemoRequest:
    """One job as the form asked for it (checked). `upload`: the stored file when `clip` is "upload"."""

    clip: str
    prompt: str
    inversion: str
    k: int | None
    action: str
    target: str | None
    steps: int
    frames: int
    upload: Path | None = None

    def overrides(self) -> list[str]:
        """The job's overrides of run.py's config (the order is the command line's)."""
        if self.clip == "synthetic":
            data = ["data=synthetic", f"data.n_frames={self.frames}"]
        else:
            clip = ([f"data={self.clip}"] if self.clip != UPLOAD else
                    ["data=video", f"data.path={hydra_quote(str(self.upload))}",
                     f"data.name=upload_{self.upload.stem[:8]}"])
            data = [*clip, f"data.max_frames={self.frames}", "data.max_frames_keep=first"]
        editing = {"reconstruct": [], "tokenflow": ["editing=tokenflow"],
                   "fatezero": ["editing=stem_fatezero" if self.inversion in STEM_INVERSIONS else "editing=fatezero"]}
        edit = editing[self.action]
        return [*data, f"data.prompt={hydra_quote(self.prompt)}", *edit, f"inversion={self.inversion}",
                f"inversion.num_steps={self.steps}", *([f"inversion.num_bases={self.k}"] if self.k else []),
                *([f"editing.prompt={hydra_quote(self.target)}"] if edit else [])]

    def describe(self) -> str:
        """e.g. "STEM (K=256), TokenFlow edit of synthetic, 8 frames, 50 DDIM steps"."""
        inversion = f"STEM (K={self.k})" if self.k else INVERSIONS[self.inversion]
        clip = "the uploaded clip" if self.clip == UPLOAD else self.clip
        what = "reconstruction" if self.action == "reconstruct" else ACTIONS[self.action]
        return f"{inversion}, {what} of {clip}, {self.frames} frames, {self.steps} DDIM steps"


def hydra_quote(text: str) -> str:
    """`text` as a quoted value of a Hydra override (`key='...'`): quotes escaped, and the backslashes before a
    quote or at the end doubled (Hydra's rule for quoted values); every other character stays as it is."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{escaped}'"


def _choice(form, field: str, choices, label: str) -> str:
    value = form.get(field, "")
    if value not in choices:
        raise FormError(f"{label} {value[:40]!r} is not one of {', '.join(choices)}")
    return value


def _integer(form, field: str, label: str, low: int, high: int) -> int:
    value = form.get(field, "").strip()
    if not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
        raise FormError(f"{label} must be a whole number from {low} to {high}, got {value[:20]!r}")
    return int(value)


def _prompt(form, field: str, label: str) -> str:
    value = " ".join(form.get(field, "").split())
    if not value:
        raise FormError(f"{label} is empty: describe the clip in a few words")
    if len(value) > PROMPT_CHARS:
        raise FormError(f"{label} has {len(value)} characters: use at most {PROMPT_CHARS}")
    if not value.isprintable():
        raise FormError(f"{label} holds control characters: type plain text")
    if "${" in value:
        raise FormError(f"{label} holds '${{': the config would read it as an interpolation; leave it out")
    return value


def parse_form(form, clips, max_frames: int) -> DemoRequest:
    """The checked request of a submitted `form` (a mapping of field -> text): `clips` are the clip choices
    that can run ({name: available}; "upload" is always one), frames from MIN_FRAMES to `max_frames`.
    FormError (one line) for the first field refused."""
    clip = form.get("clip", "")
    if clip != UPLOAD and not clips.get(clip):
        known = ", ".join([*(c for c, ok in clips.items() if ok), UPLOAD])
        raise FormError(f"clip {clip[:40]!r} cannot run here: choose one of {known}"
                        + (" (its file is not under paths.data_root: python scripts/download_clips.py)"
                           if clip in clips else ""))
    inversion = _choice(form, "inversion", INVERSIONS, "inversion")
    k = _integer(form, "k", "K (the number of STEM bases)", *K_RANGE) if inversion == "stem" else None
    action = _choice(form, "action", ACTIONS, "what to do")
    return DemoRequest(clip=clip, prompt=_prompt(form, "prompt", "the source prompt"), inversion=inversion, k=k,
                       action=action,
                       target=None if action == "reconstruct" else _prompt(form, "target", "the target prompt"),
                       steps=_integer(form, "steps", "DDIM steps", *STEPS_RANGE),
                       frames=_integer(form, "frames", "frames", MIN_FRAMES, max_frames))

"""Read and write videos and frame folders; resize to multiples of 8.

Frames live in memory as a float32 tensor `(N, 3, H, W)` in `[0, 1]` on the CPU. Decoding:
imageio-ffmpeg (mp4, webm, mov, avi, mkv) and Pillow (gif, frame folders). Encoding: ffmpeg
(mp4; gif too, because Pillow merges identical consecutive frames; the binary imageio-ffmpeg finds)
and Pillow (PNG folders). Every write goes to a temporary name in the same folder, then `os.replace`;
an ffmpeg write is renamed into place only once ffmpeg exited 0 and the file decodes to every frame sent.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence

from stem.core.atomic import atomic_dir, atomic_file
from stem.core.errors import ConfigError, StemError, VideoError
from stem.diffusion.device import available_memory

logger = logging.getLogger(__name__)

FFMPEG_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FLOW_FILE = "flow.npy"  # ground-truth forward flow stored beside a frame folder
DEFAULT_FOLDER_FPS = 10.0  # frame folders carry no frame rate
MP4_CRF = 17  # libx264 constant rate factor: visually lossless
ALPHA_BACKGROUND = (255, 255, 255)  # white: transparent pixels of frame images show it (the paper is silent)
GIF_FILTER = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=none"  # one palette for the clip


@dataclass
class Video:
    """A clip in memory.

    Attributes:
        frames: `(N, 3, H, W)` float32 in `[0, 1]`, CPU.
        fps: frames per second.
        prompt: source prompt describing the video.
        name: short name, used in run directories.
        source: where it came from (path or generator description).
        flow: `(N-1, 2, H, W)` forward flow `F_{t->t+1}` in pixels (channel 0 = x, 1 = y), such
            that `frame_{t+1}(p + F(p)) = frame_t(p)`; exact ground truth when known, else None.
        edit_prompt: a target prompt that goes with the clip (paper experiments), or None.
        source_indices: 0-based position of each frame in the source (decode order of a file,
            natural order of a folder) when frames were picked (start, stride, max_frames);
            None: the frames are the source's 0..N-1. `frame_numbers` gives them 1-based.
    """

    frames: torch.Tensor
    fps: float
    prompt: str
    name: str
    source: str = ""
    flow: torch.Tensor | None = None
    edit_prompt: str | None = None
    source_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.fps = check_fps(self.fps)
        if self.frames.ndim != 4 or self.frames.shape[1] != 3:
            raise ValueError(f"Video.frames must be (N, 3, H, W), got {tuple(self.frames.shape)}")
        if self.source_indices is not None:
            self.source_indices = tuple(int(i) for i in self.source_indices)
            if len(self.source_indices) != self.num_frames:
                raise ValueError(f"Video.source_indices has {len(self.source_indices)} entries for "
                                 f"{self.num_frames} frames")
        expected = (self.num_frames - 1, 2, self.height, self.width)
        if self.flow is not None and tuple(self.flow.shape) != expected:
            raise ValueError(f"Video.flow must be {expected}, got {tuple(self.flow.shape)}")

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def frame_numbers(self) -> list[int]:
        """Each frame's number in the source video, 1-based as the paper numbers frames (frame 1 is
        the source's first frame, e.g. 00000.png of a folder); metrics.json's `video.frame_numbers`."""
        indices = self.source_indices if self.source_indices is not None else range(self.num_frames)
        return [i + 1 for i in indices]

    @property
    def height(self) -> int:
        return self.frames.shape[2]

    @property
    def width(self) -> int:
        return self.frames.shape[3]


def check_multiple_of_8(value, *, name: str) -> int:
    """Return `value` as an int if it is a positive multiple of 8 (the VAE downsamples by 8);
    otherwise raise ConfigError naming the two nearest valid values."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a number: use a positive multiple of 8, e.g. 512")
    if value > 0 and value == int(value) and int(value) % 8 == 0:
        return int(value)
    lower = int(value) // 8 * 8
    lower, upper = (lower, lower + 8) if lower >= 8 else (8, 16)
    raise ConfigError(
        f"{name}={value} is not a positive multiple of 8 (the VAE downsamples by 8): use {lower} or {upper}"
    )


def check_fps(fps, *, name: str = "fps") -> float:
    """Return `fps` as a float if it is a frame rate ffmpeg takes: a finite number > 0 whose rational
    `Fraction(fps).limit_denominator()` (what ffmpeg is given, so 24000/1001 stays exact) is not 0/1, i.e.
    `fps >= 5e-7`; otherwise raise ConfigError (ffmpeg would refuse it only after the whole run)."""
    real = isinstance(fps, numbers.Real) and not isinstance(fps, bool)
    if not real or not math.isfinite(fps) or Fraction(fps).limit_denominator() <= 0:
        raise ConfigError(f"{name}={fps!r} is not a frame rate: use a positive number of frames per second, "
                          "e.g. data.fps=10 (null = the file's rate)")
    return float(fps)


def _check_int(value, *, name: str, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}: {fix}")


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """`(N, 3, H, W)` float in `[0, 1]` -> `(N, H, W, 3)` uint8, rounding to nearest."""
    return (frames.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """`(N, H, W, 3)` uint8 -> `(N, 3, H, W)` float32 in `[0, 1]`."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255)


def resize_frames(frames: torch.Tensor, *, width: int, height: int) -> torch.Tensor:
    """Antialiased bicubic resize of whole `(N, 3, H, W)` frames (never a crop), clamped to [0, 1]."""
    return F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def side_by_side(*frame_tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate `(N, 3, H, W)` clips along the width (for comparison videos)."""
    shapes = [tuple(f.shape) for f in frame_tensors]
    if not shapes or any(len(s) != 4 or s[:3] != shapes[0][:3] for s in shapes):
        raise ValueError(f"side_by_side needs (N, C, H, W) tensors with equal N, C and H, got shapes {shapes}")
    return torch.cat(frame_tensors, dim=3)


# ----------------------------------------------------------------------------------------- reading


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise VideoError(f"no frames in folder {folder}: put {'/'.join(IMAGE_SUFFIXES)} images in it")
    return files


def _one_line(exc: BaseException | str) -> str:
    """The decoder's reason on one line: the first and last lines of its message (or of a text)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"


@dataclass
class _Source:
    """An opened video before its first frame is decoded: the frames (decoded on iteration), the frame rate,
    the frame size and the number of frames the file declares (None when unknown; for ffmpeg files an
    estimate from the header's duration x fps)."""

    frames: Iterator[np.ndarray]
    fps: float | None
    width: int
    height: int
    count: int | None
    close: Callable[[], None]  # releases the decoder when no frame is read (closing `frames` does once started)


def _iter_ffmpeg(path: Path) -> _Source:
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    fps, duration = meta.get("fps"), meta.get("duration")
    declared = fps * duration if fps and duration else None

    def frames() -> Iterator[np.ndarray]:
        decoded = 0
        try:
            for raw in reader:
                decoded += 1
                yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
        finally:
            reader.close()  # stops ffmpeg when the caller stops early
        _warn_short(path, decoded, declared, fps=fps, duration=duration)  # only reached at the end of the file

    return _Source(frames(), fps, width, height, None if declared is None else round(declared), reader.close)


def _warn_short(path: Path, decoded: int, declared: float | None, *, fps, duration) -> None:
    """Warn when the decoder ran out of frames before the header's duration x fps: a truncated file (a cut-off
    download or copy) decodes to its first frames without any error. ffmpeg prints the duration to 0.01 s and
    the rate to 0.01 fps, so up to 0.005 x (fps + duration) frames of the estimate are rounding; half a frame
    more counts as missing."""
    if declared is not None and decoded < declared - 0.5 - 0.005 * (fps + duration):
        logger.warning("%s: only %d frames decoded, but its header declares %d (%.2f s at %.2f fps): the file is "
                       "probably truncated (a cut-off download or copy); get it again, or set n_frames to use "
                       "fewer frames knowingly", path, decoded, round(declared), duration, fps)  # fmt: skip


def _iter_gif(path: Path) -> _Source:
    image = Image.open(path)
    duration_ms = image.info.get("duration")

    def frames() -> Iterator[np.ndarray]:
        counts = [0, 0]  # frames read, frames transparent
        try:
            with image:
                for frame in ImageSequence.Iterator(image):
                    array, had_alpha = _rgb(frame)
                    counts[0] += 1
                    counts[1] += had_alpha
                    yield array
        finally:  # also when the caller stops early
            _warn_transparent(*counts, source=path)

    return _Source(frames(), 1000.0 / duration_ms if duration_ms else None, *image.size,
                   getattr(image, "n_frames", 1), image.close)


def _rgb(image: Image.Image) -> tuple[np.ndarray, bool]:
    """A frame image as uint8 `(H, W, 3)`, and whether it was transparent anywhere. Transparent frames
    (RGBA, LA, PA, palette transparency) are composited over `ALPHA_BACKGROUND` with straight alpha,
    `round(rgb * a + background * (1 - a))`, a = alpha / 255, in integers (255 is odd: no ties)."""
    if not image.has_transparency_data:
        return np.asarray(image.convert("RGB")), False
    rgba = np.asarray(image.convert("RGBA")).astype(np.int32)
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return rgba[..., :3].astype(np.uint8), False
    background = np.asarray(ALPHA_BACKGROUND, dtype=np.int32)
    return ((rgba[..., :3] * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8), True


def _read_images(files: list[Path], *, source: Path) -> list[np.ndarray]:
    """Frame images as uint8 RGB; one warning for the folder when any frame had transparency."""
    frames, transparent = [], 0
    for file in files:
        with Image.open(file) as image:
            frame, had_alpha = _rgb(image)
        frames.append(frame)
        transparent += had_alpha
    _warn_transparent(len(files), transparent, source=source)
    return frames


def _warn_transparent(total: int, transparent: int, *, source: Path) -> None:
    if transparent:
        logger.warning("%d of %d frames of %s are transparent: composited on white %s (the model takes RGB)",
                       transparent, total, source, ALPHA_BACKGROUND)  # fmt: skip


def read_frames(
    path, *, start: int = 0, stride: int = 1, n_frames: int | None = None, before_decode=None
) -> tuple[np.ndarray, float | None]:
    """Decode frames `start, start + stride, ...` (`n_frames` of them; None = all) of a video file
    or frame folder (natural sort order), stopping as soon as enough frames are read.

    Returns `(frames, fps)`: uint8 `(N, H, W, 3)` and the file's frame rate (None for folders).
    Transparent frame images and GIF frames are composited on white (`ALPHA_BACKGROUND`), with one warning.
    A video file that decodes to fewer frames than its header declares (truncated) is read with a warning.
    `before_decode(width, height, count)`, when given, is called once the source is opened and before any
    frame is decoded, with the frame size and the number of frames the source declares (None if unknown);
    it may raise to refuse.
    Raises VideoError for a missing/corrupt/too short input, ConfigError for bad arguments.
    """
    path = Path(path)
    _check_int(start, name="start", minimum=0, fix="use 0 to begin at the first frame")
    _check_int(stride, name="stride", minimum=1, fix="use 1 to keep every frame")
    if n_frames is not None:
        _check_int(n_frames, name="n_frames", minimum=1, fix="or set it to null for all frames")
    if not path.exists():
        raise VideoError(
            f"video not found: {path} (fix the path, or set the data folder with config `data.path` "
            "or env STEM_DATA_ROOT)"
        )

    suffix = path.suffix.lower()
    selected: list[np.ndarray] = []
    try:
        if path.is_dir():
            files = _frame_files(path)
            total = len(files)
            if before_decode is not None:
                with Image.open(files[0]) as first:  # reads the header only
                    before_decode(*first.size, total)
            selected = _read_images(files[start::stride][:n_frames], source=path)
            fps = None
        else:
            if suffix in FFMPEG_SUFFIXES:
                source = _iter_ffmpeg(path)
            elif suffix == ".gif":
                source = _iter_gif(path)
            else:
                formats = ", ".join(FFMPEG_SUFFIXES)
                raise VideoError(f"unsupported video format {path}: use {formats}, .gif or a frame folder")
            iterator, fps = source.frames, source.fps
            if before_decode is not None:
                try:
                    before_decode(source.width, source.height, source.count)
                except BaseException:
                    source.close()
                    raise
            total = 0  # frames decoded; the clip's length once the iterator is exhausted
            for frame in iterator:
                if total >= start and (total - start) % stride == 0:
                    selected.append(frame)
                total += 1
                if len(selected) == n_frames:
                    iterator.close()
                    break
    except StemError:  # ours, with its own message (a corrupt file's, or before_decode's refusal)
        raise
    except Exception as exc:  # decoder errors: corrupt or unreadable file
        raise VideoError(f"cannot read video {path}: {_one_line(exc)}") from exc

    available = len(range(start, total, stride))
    if not selected or (n_frames is not None and len(selected) < n_frames):
        raise VideoError(
            f"{path} has {total} frames, {available} available from start={start} with stride={stride}, "
            f"but n_frames={n_frames if n_frames is not None else 'null'}: "
            "lower n_frames or start, or set n_frames to null"
        )
    sizes = {frame.shape for frame in selected}
    if len(sizes) > 1:
        raise VideoError(f"frames of {path} differ in size {sorted(sizes)}: make all frames one size")
    return np.stack(selected), fps


MAX_FRAMES_KEEP = ("even", "first")  # how `max_frames` picks from a longer selection


def cap_indices(count: int, max_frames: int | None, keep: str = "even") -> np.ndarray:
    """Positions, into `count` selected frames, of those that a cap of `max_frames` keeps: all of them
    when `max_frames` is None or >= count; else `keep="even"` spreads `max_frames` over them, first and
    last included (`evenly_spaced`), and `keep="first"` keeps the first `max_frames`, consecutive (so
    that frame-to-frame metrics such as warp error compare neighbours). `load_video` and
    `stem.data.synthetic.camera_pan` pick their frames with it. Raises ConfigError for a bad `max_frames`/`keep`."""
    if keep not in MAX_FRAMES_KEEP:
        raise ConfigError(f"max_frames_keep={keep!r}: use one of {', '.join(MAX_FRAMES_KEEP)} "
                          "(even: spread over the clip; first: the first max_frames, consecutive)")
    if max_frames is not None:
        _check_int(max_frames, name="max_frames", minimum=1, fix="or set it to null to keep every selected frame")
    if max_frames is None or max_frames >= count:
        return np.arange(count)
    return np.arange(max_frames) if keep == "first" else evenly_spaced(count, max_frames)


def read_frames_at(path, indices) -> np.ndarray:
    """The frames at 0-based `indices` (in the order given) of a video file or frame folder, decoding no
    further than the last one (`read_frames`): uint8 `(len(indices), H, W, 3)`. VideoError when the video
    is missing, unreadable or shorter than the last index."""
    wanted = [int(i) for i in indices]
    if not wanted or min(wanted) < 0:
        raise ConfigError(f"read_frames_at: indices must be >= 0, got {wanted}")
    frames, _ = read_frames(path, n_frames=max(wanted) + 1)
    return frames[wanted]


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """`count` indices into `range(total)` spread evenly, the first and the last included:
    `round(linspace(0, total - 1, count))` (count <= total)."""
    return np.linspace(0, total - 1, count).round().astype(int)


def _target_size(native_width: int, native_height: int, width: int | None, height: int | None) -> tuple[int, int]:
    if width is None and height is None:
        width, height = native_width // 8 * 8, native_height // 8 * 8
        if min(width, height) < 8:
            raise VideoError(f"frames are {native_width}x{native_height}, smaller than 8 px: use a larger video")
        return width, height
    if width is not None:
        width = check_multiple_of_8(width, name="width")
    if height is not None:
        height = check_multiple_of_8(height, name="height")
    if height is None:
        height = max(8, round(width * native_height / native_width / 8) * 8)
    if width is None:
        width = max(8, round(height * native_width / native_height / 8) * 8)
    return width, height


def load_memory_need(native: tuple[int, int], target: tuple[int, int], decoded: int, kept: int) -> int:
    """A lower bound of the bytes `load_video` holds at once: `decoded` frames of `native` (width, height) as
    uint8 while they are stacked (list and array: twice), or `kept` frames at once as uint8, as float32 and,
    when `target` differs, resized to it as float32 (the resize's own intermediates left out)."""
    frame = native[0] * native[1] * 3
    resized = target[0] * target[1] * 3 * 4 if target != native else 0
    return max(2 * decoded * frame, kept * (frame + 4 * frame + resized))


def _check_load_memory(path: Path, native: tuple[int, int], target: tuple[int, int], decoded: int,
                       kept: int) -> None:
    """ConfigError (one line) when `load_memory_need` exceeds the memory available to this process."""
    need = load_memory_need(native, target, decoded, kept)
    free = available_memory(torch.device("cpu"))
    if free is not None and need > free:
        size = f"{native[0]}x{native[1]}" + (f" resized to {target[0]}x{target[1]}" if target != native else "")
        raise ConfigError(f"{path}: {kept} frames of {size} need at least {need / 2**30:.2f} GiB of memory to "
                          f"load, {free / 2**30:.2f} GiB is available: use a lower data.width/data.height or "
                          "fewer frames (data.n_frames, data.max_frames), or check_memory=false to try anyway")


def _load_flow(
    folder: Path, *, start: int, stride: int, n_frames: int, resized: bool, size: tuple[int, int]
) -> torch.Tensor | None:
    """Ground-truth flow stored beside a frame folder, sliced to the selected frames."""
    flow_path = folder / FLOW_FILE
    if not flow_path.is_file():
        return None
    if stride != 1 or resized:
        logger.info("ignoring %s: frames were subsampled (stride=%d) or resized, so it no longer applies",
                    flow_path, stride)  # fmt: skip
        return None
    flow = np.load(flow_path)
    expected = (len(_frame_files(folder)) - 1, 2, size[1], size[0])
    if flow.shape != expected:
        raise VideoError(f"{flow_path} has shape {flow.shape} but the frames need {expected}: regenerate or delete it")
    return torch.from_numpy(flow[start : start + n_frames - 1].astype(np.float32))


def load_video(
    path,
    prompt: str,
    n_frames: int | None = None,
    stride: int = 1,
    start: int = 0,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    name: str | None = None,
    edit_prompt: str | None = None,
    max_frames: int | None = None,
    max_frames_keep: str = "even",
    check_memory: bool = True,
) -> Video:
    """Load a video file (.mp4/.webm/.mov/.avi/.gif) or a folder of frames as a `Video`.

    Args:
        path: the file or frame folder (png/jpg/jpeg/bmp/webp, natural sort order). Frame images and GIF
            frames with transparency (RGBA PNGs, ...) are composited on white (`ALPHA_BACKGROUND`); the log warns once.
        prompt: source prompt describing the video.
        n_frames: number of frames to keep (None = all available); never silently fewer.
        stride: keep every `stride`-th frame; "even": `n_frames` frames spread evenly from `start`
            to the last frame (paper Table 4's "sampled evenly").
        start: index of the first frame kept.
        width, height: output size, positive multiples of 8. Both None: native size rounded
            down to multiples of 8; one None: follows the aspect ratio (nearest multiple of 8).
        fps: frame rate to use (default: the file's; 10 for frame folders).
        name: short name for run directories (default: the file or folder name).
        edit_prompt: a target prompt that goes with the clip (kept in `Video.edit_prompt`).
        max_frames: at most this many of the selected frames, picked as `max_frames_keep` says; a
            selection of at most `max_frames` frames is kept whole, never an error.
            None = no cap. Paper appendix B.4: FateZero edits at most 20 frames.
        max_frames_keep: which frames a cap keeps (`cap_indices`): "even" spreads them over the selection
            (first and last kept); "first" keeps the first `max_frames`, consecutive (Table 2's shared
            window: warp error between neighbours, and a stored flow still applies).
        check_memory: before decoding, refuse (ConfigError) a load whose lower-bound memory need
            (`load_memory_need`, from the size and frame count the file declares) exceeds the available
            memory (`stem.diffusion.device.available_memory`); False: decode anyway.

    A folder holding `flow.npy` (see `save_video_with_flow`) gives `Video.flow` when the frames
    are neither subsampled nor resized.
    """
    path = Path(path)
    if fps is not None:
        check_fps(fps)  # before decoding anything
    cap_indices(1, max_frames, max_frames_keep)  # bad max_frames / max_frames_keep: before decoding anything
    if stride == "even" and n_frames is None:
        raise ConfigError("stride='even' spreads n_frames frames over the clip: set n_frames too")

    def before_decode(native_width: int, native_height: int, count: int | None) -> None:
        target = _target_size(native_width, native_height, width, height)  # a bad width/height: before decoding
        if not check_memory:
            return
        even = stride == "even"
        known = None if count is None else max(0, len(range(start, count, 1 if even else stride)))
        selected = n_frames if known is None else known if n_frames is None else min(n_frames, known)
        selected = 1 if selected is None else selected  # unknown length: at least one frame
        decoded = known if even and known is not None else selected
        kept = min(selected, max_frames) if max_frames is not None else selected
        _check_load_memory(path, (native_width, native_height), target, decoded, kept)

    if stride == "even":
        array, file_fps = read_frames(path, start=start, before_decode=before_decode)
        if n_frames > len(array):
            raise VideoError(f"{path} has {len(array)} frames from frame {start}; cannot spread {n_frames} evenly "
                             f"(use n_frames <= {len(array)})")
        picked = evenly_spaced(len(array), n_frames)
        stride = int(picked[1] - picked[0]) if n_frames > 1 and len(set(np.diff(picked))) == 1 else None
        array, indices = array[picked], start + picked
    else:
        array, file_fps = read_frames(path, start=start, stride=stride, n_frames=n_frames, before_decode=before_decode)
        indices = start + stride * np.arange(len(array))
    kept = cap_indices(len(array), max_frames, max_frames_keep)
    if len(kept) < len(array):
        how = "the first ones" if max_frames_keep == "first" else "spread evenly"
        logger.info("keeping %d of %d frames, %s (max_frames=%d): %s", max_frames, len(array), how, max_frames, path)
        array, indices = array[kept], indices[kept]
        if max_frames_keep != "first":
            stride = None  # uneven picks: no stored flow
    frames = from_uint8(array)
    native_height, native_width = array.shape[1:3]
    target = _target_size(native_width, native_height, width, height)
    resized = target != (native_width, native_height)
    if resized:
        log = logger.warning if width is None and height is None else logger.info
        why = "the VAE needs multiples of 8" if width is None and height is None else "as requested"
        log("resizing %dx%d -> %dx%d: %s (%s)", native_width, native_height, *target, why, path)
        frames = resize_frames(frames, width=target[0], height=target[1])
    if fps is None:
        fps = file_fps
        if fps is None:
            fps = DEFAULT_FOLDER_FPS
            logger.info("%s has no frame rate: using fps=%g (set fps to change it)", path, fps)
    flow = None
    if path.is_dir() and stride is not None:  # uneven picks have no stored flow
        native = (native_width, native_height)
        flow = _load_flow(path, start=start, stride=stride, n_frames=len(frames), resized=resized, size=native)
    name = name or (path.name if path.is_dir() else path.stem)
    return Video(frames=frames, fps=float(fps), prompt=prompt, name=name, source=str(path), flow=flow,
                 edit_prompt=edit_prompt, source_indices=tuple(indices.tolist()))


# ----------------------------------------------------------------------------------------- writing


def _as_uint8(frames) -> np.ndarray:
    array = frames if isinstance(frames, np.ndarray) else to_uint8(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
        raise ValueError(
            "frames must be a (N, 3, H, W) float tensor in [0, 1] or a (N, H, W, 3) uint8 array, "
            f"got {array.dtype} {array.shape}"
        )
    return array


def _ffmpeg_write(
    path: Path, array: np.ndarray, *, fps: float, codec: str, pix_fmt: str, params: list[str], final: Path
) -> None:
    """Encode `array` to `path` with ffmpeg (rgb24 frames on stdin); VideoError naming `final` (the name
    the file will get) unless ffmpeg exits 0 and the file decodes to `len(array)` frames."""
    height, width = array.shape[1:3]
    rate = Fraction(fps).limit_denominator()  # as imageio-ffmpeg passes it: 24000/1001 stays exact
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
        "-pix_fmt", "rgb24", "-r", str(rate), "-i", "-", "-an", "-vcodec", codec, "-pix_fmt", pix_fmt,
        "-v", "error", *params, str(path),
    ]  # fmt: skip
    done = subprocess.run(cmd, input=np.ascontiguousarray(array).tobytes(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)  # fmt: skip
    stderr = done.stderr.decode(errors="replace").strip()
    if done.returncode != 0:
        raise VideoError(f"ffmpeg failed to write {final} (exit {done.returncode}): "
                         f"{_one_line(stderr or 'no message')}; check free disk space and write access")
    if stderr:
        logger.warning("ffmpeg writing %s: %s", final, _one_line(stderr))
    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as exc:  # ffmpeg cannot decode what it wrote
        raise VideoError(f"ffmpeg wrote {final} but it cannot be read back: {_one_line(exc)}") from exc
    if count != len(array):
        raise VideoError(f"ffmpeg wrote {final} with {count} frames but {len(array)} were sent: "
                         "check free disk space and the ffmpeg binary (IMAGEIO_FFMPEG_EXE)")


def _write_folder(folder: Path, array: np.ndarray, *, flow: np.ndarray | None = None) -> None:
    """Write PNG frames (and `flow.npy`) to a temporary folder, then swap it into place."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"cannot write frames to {folder}: it is a file; give a folder name without suffix")
    if folder.is_dir():
        others = [p.name for p in folder.iterdir() if p.suffix.lower() not in IMAGE_SUFFIXES and p.name != FLOW_FILE]
        if others:
            raise ConfigError(
                f"refusing to replace folder {folder}: it holds files other than frames ({others[0]}); use a new folder"
            )
    with atomic_dir(folder) as tmp:
        digits = max(5, len(str(len(array) - 1)))
        for index, frame in enumerate(array):
            Image.fromarray(frame).save(tmp / f"{index:0{digits}d}.png")
        if flow is not None:
            np.save(tmp / FLOW_FILE, flow)


def write_video(path, frames, fps: float) -> Path:
    """Write frames atomically and return the path.

    Args:
        path: `.mp4` (libx264, yuv420p, crf 17, size unchanged), `.gif` (one palette for the
            clip), or a name without suffix / an existing folder of frames (zero-padded PNGs
            `00000.png`, ...). Parent folders are created.
        frames: `(N, 3, H, W)` float tensor in `[0, 1]` or `(N, H, W, 3)` uint8 array.
        fps: frames per second, checked by `check_fps` (ignored for PNG folders).

    ffmpeg writes (mp4, gif) raise VideoError, leaving nothing under `path`, when ffmpeg exits non-zero or
    the file does not decode to every frame sent.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    array = _as_uint8(frames)
    if suffix in (".mp4", ".gif"):
        check_fps(fps)  # before any file exists
    if path.is_dir() or suffix == "":
        _write_folder(path, array)
    elif suffix == ".mp4":
        height, width = array.shape[1:3]
        if width % 2 or height % 2:
            raise ConfigError(
                f"cannot write {path}: mp4 (yuv420p) needs even sizes, got {width}x{height}; "
                "resize, or write a .gif or a folder"
            )
        params = ["-crf", str(MP4_CRF), "-movflags", "+faststart"]
        with atomic_file(path) as tmp:
            _ffmpeg_write(tmp, array, fps=fps, codec="libx264", pix_fmt="yuv420p", params=params, final=path)
    elif suffix == ".gif":
        params = ["-vf", GIF_FILTER, "-loop", "0"]
        with atomic_file(path) as tmp:
            _ffmpeg_write(tmp, array, fps=fps, codec="gif", pix_fmt="pal8", params=params, final=path)
    else:
        raise ConfigError(
            f"cannot write {path}: unsupported suffix {suffix}; use .mp4, .gif or a folder name without suffix"
        )
    return path


def save_video_with_flow(video: Video, folder) -> Path:
    """Write `video` as a PNG frame folder with its ground-truth flow beside it as `flow.npy`
    (float32 `(N-1, 2, H, W)`), atomically; `load_video(folder)` reads both back."""
    folder = Path(folder)
    if folder.suffix:
        raise ConfigError(f"cannot write frames to {folder}: give a folder name without suffix")
    flow = None if video.flow is None else video.flow.detach().cpu().numpy().astype(np.float32)
    _write_folder(folder, to_uint8(video.frames), flow=flow)
    return folder

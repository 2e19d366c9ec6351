"""Video I/O with PyAV: decode to the model grid, codec motion vectors, atomic writes.

Reading rules (:func:`read_video`), in order; docs/video.md has the long form:

1. Decode the first video stream with FFmpeg (any container/codec it reads). A packet
   that fails to decode is skipped; if any were skipped, or fewer frames came out than
   the container announced, a :class:`VideoWarning` says so and the valid frames are kept.
2. ``fps``: resample by presentation timestamps (so variable frame rate is handled):
   output frame k shows the source frame on screen at ``k / fps`` (the last one whose
   timestamp is <= k / fps). Frames are dropped or repeated, never blended.
3. ``size=(H, W)``: scale by the smallest factor that covers H x W (aspect preserved),
   then center-crop. ``fit="wan"`` without ``size`` crops to the largest multiples of 16
   that fit inside the source.
4. ``max_frames`` keeps the first frames; ``fit="wan"`` then drops trailing frames down
   to 4k+1 (what Wan's causal VAE takes), and requires sides that are multiples of 16.

Motion vectors (``motion=True``) are pooled per 16x16 block of the *output* frames into a
:class:`~lipcodec.planners.MotionField`; see :func:`pool_motion_vectors`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import attrs
import av
import numpy as np
import torch
from einops import rearrange, reduce

from .atomic import publish
from .gop import TEMPORAL_FACTOR
from .planners.registry import MotionField

BLOCK = 16  # H.264 macroblock = one Wan token footprint (8x VAE x 2x patch)
_PICTURE_LETTERS = {1: "I", 2: "P", 3: "B"}
_CODECS = {"h264": ".mp4", "ffv1": ".mkv", "png": ""}
_H264_DEFAULTS = {"crf": "18", "preset": "medium"}


class VideoError(ValueError):
    """A video that cannot be read or written as asked; the message says what to do."""


class VideoWarning(UserWarning):
    """Something was off with the input, but usable frames were decoded."""


@attrs.frozen(eq=False)
class Video:
    """Decoded frames plus what the decoder said about them.

    Attributes:
        frames: (T, H, W, 3) uint8 RGB.
        fps: frame rate of ``frames`` (after resampling).
        source_size: (height, width) of the frames in the file.
        motion: pooled codec motion vectors, when read with ``motion=True``.
        picture_types: codec frame type per output frame (``I``, ``P``, ``B``; ``?`` unknown).
        path: the file the frames came from (writers refuse to overwrite it).
    """

    frames: np.ndarray
    fps: float
    source_size: tuple[int, int]
    motion: MotionField | None = None
    picture_types: str = ""
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.frames.shape[1:3])


# ---------------------------------------------------------------------------------------
# reading
def read_video(
    path,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    fit: str | None = "wan",
    motion: bool = False,
    progress: bool = True,
) -> Video:
    """Decode ``path`` into a :class:`Video` following the rules in the module docstring.

    Important:
        fps: output frame rate; None keeps every decoded frame at the stream's average rate.
        size: output (height, width); None keeps the source size (``fit="wan"`` crops it).
        max_frames: keep at most this many output frames (decoding stops early).
        fit: "wan" (4k+1 frames, sides multiple of 16) or None (as is).
        motion: also export codec motion vectors (H.264 / MPEG-1/2/4 software decoders).

    >>> from lipcodec import fixtures
    >>> v = read_video(fixtures.bundled_clip(), progress=False)
    >>> v.frames.shape
    (33, 240, 416, 3)
    """
    path = _existing_file(path)
    if fit not in ("wan", None):
        raise VideoError(f"fit={fit!r} is not supported: use fit='wan' (model grid) or fit=None (as is)")
    if fps is not None and not fps > 0:
        raise VideoError(f"fps={fps!r} must be positive (or None to keep the source rate)")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames={max_frames!r} must be >= 1 (or None for all frames)")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise VideoError(f"size={size} must be two positive ints (height, width)")
        if fit == "wan" and (size[0] % BLOCK or size[1] % BLOCK):
            fix = (size[0] // BLOCK * BLOCK or BLOCK, size[1] // BLOCK * BLOCK or BLOCK)
            raise VideoError(f"size={size} is not a multiple of {BLOCK} on both sides as fit='wan' needs: use {fix}")

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise VideoError(
            f"{path} is not a video FFmpeg can read ({getattr(error, 'strerror', None) or error}); it may be "
            "another kind of file, or truncated (an MP4 cut short loses its index): check it, or re-encode "
            "what plays with `ffmpeg -i IN -c:v libx264 OUT.mp4`"
        ) from None
    with container, _ffmpeg_log() as log:
        if container.format.name == "tty":  # FFmpeg plays any text file as ANSI art
            raise VideoError(f"{path} is a text file, not a video: pass a video file (mp4, mkv, mov, ...)")
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise VideoError(f"{path} has no video stream (streams: {kinds}); pass a file with video in it")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if motion:
            stream.codec_context.options = {"flags2": "+export_mvs"}
        codec = stream.codec_context.name
        announced = stream.frames or 0
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        time_base = stream.time_base
        src_h, src_w = stream.codec_context.height, stream.codec_context.width
        decoded = _decode(container, stream, path, fps, max_frames, rate, time_base, size, fit, motion, progress)
    times, frames, letters, vectors, errors, geometry, early = decoded
    errors += sum(1 for level, _, _ in log if level <= av.logging.ERROR)
    first_error = next((f"{name}: {text.strip()}" for level, name, text in log if level <= av.logging.ERROR), "")

    if not frames:
        why = f" ({errors} packets failed to decode)" if errors else ""
        raise VideoError(f"{path} has a video stream but no decodable frames{why}; the file is empty or corrupt")
    if errors or (announced and len(frames) < announced and not early):
        warnings.warn(
            f"{path}: decoded {len(frames)} frames"
            + (f" of the {announced} the container announces" if announced else "")
            + (f", FFmpeg reported {errors} decode errors (first: {first_error})" if errors else "")
            + "; the file looks truncated or corrupt, keeping the valid frames",
            VideoWarning,
            stacklevel=2,
        )
    src_h, src_w = geometry["source_size"]

    # 2. resample by timestamps
    rate = rate or _rate_from_times(times)
    if fps is None:
        index = np.arange(len(frames))
        out_fps = rate
    else:
        index = resample_indices(times, fps, 1.0 / rate, tolerance=float(time_base or 0) + 1e-6)
        out_fps = float(fps)
    if max_frames is not None:
        index = index[:max_frames]
    # 4. frame count
    if fit == "wan":
        keep = (len(index) - 1) // 4 * 4 + 1
        index = index[:keep]
    stacked = np.stack([frames[i] for i in index])

    field = None
    if motion:
        if all(v is None for v in vectors):
            raise VideoError(
                f"{path} ({codec}) exported no motion vectors: only FFmpeg's software H.264 and MPEG-1/2/4 "
                "decoders export them, and all-intra video has none; re-encode it with "
                "lipcodec.video.transcode_h264(path, out) (libx264) and read that"
            )
        field = MotionField(
            vectors=_compose_motion(vectors, index, geometry["grid"]),
            block=BLOCK,
            frame_size=tuple(stacked.shape[1:3]),
            picture_types="".join(letters[i] for i in index),
        )
    return Video(
        frames=stacked,
        fps=out_fps,
        source_size=(src_h, src_w),
        motion=field,
        picture_types="".join(letters[i] for i in index),
        path=path,
    )


@contextlib.contextmanager
def _ffmpeg_log():
    """Collect FFmpeg's error log lines (decoders conceal most corruption and only log it)."""
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=False) as log:
            yield log
    finally:
        av.logging.set_level(previous)


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no video at {path}: check the path (lipcodec.fixtures.bundled_clip() is a sample)")
    if path.is_dir():
        raise VideoError(f"{path} is a folder, not a video file: pass the path of one video file")
    return path


def _decode(container, stream, path, fps, max_frames, rate, time_base, size, fit, motion, progress):
    """Decode frames (resized/cropped on the fly), their times, picture types and pooled MVs."""
    from tqdm.auto import tqdm

    times: list[float] = []
    frames: list[np.ndarray] = []
    letters: list[str] = []
    vectors: list[np.ndarray | None] = []
    geometry: dict = {}
    errors = 0
    early = False
    stop_after = None  # seconds: past this no later frame can be selected
    if max_frames is not None and fps is not None:
        stop_after = max_frames / fps
    bar = tqdm(total=stream.frames or None, desc=f"decode {path.name}", unit="frame", disable=not progress, leave=False)

    def packets():
        nonlocal errors
        demux = container.demux(stream)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                return
            except av.error.FFmpegError:
                errors += 1
                return  # the container itself is broken past here
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                errors += 1

    with bar:
        for frame in packets():
            if not geometry:
                geometry = _geometry(frame.height, frame.width, size, fit, path)
            t = frame.time
            if t is None:
                t = len(times) / (rate or 25.0)
            times.append(float(t))
            frames.append(_resize_crop(frame, geometry))
            letters.append(_PICTURE_LETTERS.get(int(frame.pict_type), "?"))
            if motion:
                side = frame.side_data.get("MOTION_VECTORS")
                vectors.append(None if side is None else pool_motion_vectors(side.to_ndarray(), **geometry["mv"]))
            bar.update()
            if (max_frames is not None and fps is None and len(frames) >= max_frames) or (
                stop_after is not None and times[-1] - times[0] > stop_after
            ):
                early = True
                break
    if times:
        t0 = min(times)
        times = [t - t0 for t in times]
    return np.asarray(times, np.float64), frames, letters, vectors, errors, geometry, early


def _geometry(src_h: int, src_w: int, size, fit, path) -> dict:
    """Resize + crop from the source frame to the output frame, and the matching MV mapping."""
    size_given = size
    if size is None:
        if fit == "wan":
            size = (src_h // BLOCK * BLOCK, src_w // BLOCK * BLOCK)
            if min(size) == 0:
                raise VideoError(
                    f"{path} is {src_w}x{src_h} px, smaller than one {BLOCK}x{BLOCK} token block; "
                    "upscale it with size=(H, W) or read it with fit=None"
                )
        else:
            size = (src_h, src_w)
    out_h, out_w = size
    if out_h <= src_h and out_w <= src_w and size_given is None:
        rh, rw = src_h, src_w  # fit="wan" alone only crops
    else:
        scale = max(out_h / src_h, out_w / src_w)  # smallest scale that covers the target
        rh, rw = max(out_h, round(src_h * scale)), max(out_w, round(src_w * scale))
    top, left = (rh - out_h) // 2, (rw - out_w) // 2
    return {
        "source_size": (src_h, src_w),
        "resize": (rh, rw),
        "crop": (top, left, out_h, out_w),
        "grid": (math.ceil(out_h / BLOCK), math.ceil(out_w / BLOCK)),
        "mv": {"scale": (rh / src_h, rw / src_w), "offset": (top, left), "size": (out_h, out_w)},
    }


def _resize_crop(frame, geometry) -> np.ndarray:
    rh, rw = geometry["resize"]
    top, left, h, w = geometry["crop"]
    if (frame.height, frame.width) != (rh, rw):
        shrink = rh < frame.height
        frame = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA" if shrink else "BICUBIC")
    array = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(array[top : top + h, left : left + w])


def resample_indices(times: np.ndarray, fps: float, last_duration: float, tolerance: float = 1e-6) -> np.ndarray:
    """Source frame index for each output frame at ``fps``: the frame on screen at ``k / fps``.

    ``times`` are presentation times in seconds (starting at 0); a frame stays on screen
    until the next one starts (so variable frame rate holds are respected), the last one
    for ``last_duration``. The output covers the same duration, rounded down. A frame
    starting up to ``tolerance`` seconds late counts as on time (containers round
    timestamps to their time base, e.g. 1 ms in Matroska).

    >>> resample_indices(np.array([0, .04, .08, .12]), 12.5, .04).tolist()
    [0, 2]
    """
    order = np.argsort(times, kind="stable")
    sorted_times = np.asarray(times, np.float64)[order]
    duration = sorted_times[-1] + last_duration
    count = max(1, int(math.floor(duration * fps + 1e-6)))
    targets = np.arange(count) / fps
    on_screen = np.searchsorted(sorted_times, targets + tolerance, side="right") - 1
    return order[np.clip(on_screen, 0, len(order) - 1)]


def _rate_from_times(times: np.ndarray) -> float:
    steps = np.diff(np.sort(times))
    steps = steps[steps > 0]
    return float(1.0 / np.median(steps)) if len(steps) else 25.0


# ---------------------------------------------------------------------------------------
# motion vectors
def pool_motion_vectors(
    mvs: np.ndarray,
    *,
    scale: tuple[float, float] = (1.0, 1.0),
    offset: tuple[int, int] = (0, 0),
    size: tuple[int, int],
    block: int = BLOCK,
) -> np.ndarray:
    """Pool one frame's codec motion vectors to a ``block`` grid: (Hb, Wb, 2) float32 (dy, dx).

    ``mvs`` is ``MotionVectors.to_ndarray()``. Only past-referencing vectors
    (``source == -1``) are used, each read as pointing at the previous frame (codecs may
    reference an older anchor; the distance is not exported, see docs/video.md). A vector
    ``(motion_x, motion_y) / motion_scale`` says the block at ``dst`` came from
    ``dst + motion`` - that is the (dx, dy) stored. Rectangles and vectors are first mapped
    into the output frame (``scale`` = resize factors (y, x), then minus the crop
    ``offset``), then averaged per block weighted by overlap area. Blocks no vector
    covers (intra blocks, future-only B blocks) are NaN.
    """
    h, w = size
    hb, wb = math.ceil(h / block), math.ceil(w / block)
    acc = np.zeros((hb, wb, 3), np.float64)  # area, area*dy, area*dx
    mvs = mvs[mvs["source"] < 0]
    if len(mvs):
        sy, sx = scale
        oy, ox = offset
        unit = np.maximum(mvs["motion_scale"].astype(np.float64), 1.0)
        dy = mvs["motion_y"] / unit * sy
        dx = mvs["motion_x"] / unit * sx
        y0 = np.clip((mvs["dst_y"] - mvs["h"] / 2) * sy - oy, 0, h)
        y1 = np.clip((mvs["dst_y"] + mvs["h"] / 2) * sy - oy, 0, h)
        x0 = np.clip((mvs["dst_x"] - mvs["w"] / 2) * sx - ox, 0, w)
        x1 = np.clip((mvs["dst_x"] + mvs["w"] / 2) * sx - ox, 0, w)
        by0, bx0 = (y0 // block).astype(int), (x0 // block).astype(int)
        span_y = int(math.ceil(mvs["h"].max() * sy / block)) + 1
        span_x = int(math.ceil(mvs["w"].max() * sx / block)) + 1
        for a in range(span_y):
            by = by0 + a
            over_y = np.clip(np.minimum(y1, (by + 1) * block) - np.maximum(y0, by * block), 0, None)
            for b in range(span_x):
                bx = bx0 + b
                over_x = np.clip(np.minimum(x1, (bx + 1) * block) - np.maximum(x0, bx * block), 0, None)
                area = over_y * over_x
                m = (area > 0) & (by < hb) & (bx < wb)
                np.add.at(acc, (by[m], bx[m]), np.stack([area[m], area[m] * dy[m], area[m] * dx[m]], 1))
    out = np.full((hb, wb, 2), np.nan, np.float32)
    covered = acc[..., 0] > 0
    out[covered] = acc[covered, 1:] / acc[covered, :1]
    return out


def _compose_motion(vectors: list, index: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Motion of each output frame from the previous output frame.

    Output frame k shows source frame ``index[k]``; its motion is the sum of the source
    motion of frames ``index[k-1]+1 .. index[k]`` at the same block (a repeated frame has
    zero motion, a skipped I-frame or intra block makes the block NaN). Frame 0 is NaN.
    """
    nan = np.full((*grid, 2), np.nan, np.float32)
    out = [nan]
    for prev, cur in zip(index[:-1], index[1:]):
        if cur == prev:
            out.append(np.zeros_like(nan))
            continue
        total = np.zeros_like(nan)
        for i in range(prev + 1, cur + 1):
            total = total + (nan if vectors[i] is None else vectors[i])
        out.append(total)
    return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------
# writing
def write_video(
    path,
    frames,
    fps: float = 16.0,
    *,
    codec: str = "h264",
    options: dict | None = None,
    protect: Iterable = (),
    progress: bool = False,
) -> Path:
    """Write frames atomically: a temp file next to ``path``, renamed once complete.

    Important:
        frames: (T, H, W, 3) uint8 array, a :class:`Video`, or any iterable of (H, W, 3) uint8.
        codec: "h264" (libx264 yuv420p MP4, even sides), "ffv1" (lossless MKV) or "png"
            (a folder of ``000000.png`` ...).
        protect: paths that must not be overwritten (a :class:`Video`'s own path is added).

    To tinker with:
        options: encoder options, e.g. ``{"crf": "23", "bf": "0", "g": "16"}`` for libx264.
    """
    if codec not in _CODECS:
        raise VideoError(f"codec={codec!r} is not supported: use one of {', '.join(_CODECS)}")
    path = Path(path)
    if isinstance(frames, Video):
        protect = (*protect, *([frames.path] if frames.path else []))
        frames = frames.frames
    for other in protect:
        if other is not None and _same_path(path, Path(other)):
            raise VideoError(f"refusing to overwrite the input {other}: write to a different path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    if path.is_dir() and codec != "png":
        raise VideoError(f"{path} is a folder; pass a file name such as {path / ('out' + _CODECS[codec])}")

    if codec == "png":
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            _write_png(tmp, frames)
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + _CODECS[codec])
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _encode(tmp, frames, fps, codec, options, progress)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _checked_frames(frames):
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoError(
                f"frame {i} has shape {frame.shape} and dtype {frame.dtype}; frames must be (H, W, 3) uint8 RGB"
            )
        yield i, np.ascontiguousarray(frame)


def _encode(tmp: Path, frames, fps, codec, options, progress) -> None:
    from tqdm.auto import tqdm

    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with av.open(str(tmp), mode="w", format="mp4" if codec == "h264" else "matroska") as out:
        stream = None
        for i, frame in tqdm(_checked_frames(frames), desc=f"write {tmp.name}", disable=not progress, leave=False):
            h, w = frame.shape[:2]
            if stream is None:
                if codec == "h264" and (h % 2 or w % 2):
                    raise VideoError(
                        f"H.264 (yuv420p) needs even sides, frames are {w}x{h}; crop to "
                        f"{w // 2 * 2}x{h // 2 * 2} or use codec='ffv1'"
                    )
                if codec == "h264":
                    stream = out.add_stream("libx264", rate=rate, options={**_H264_DEFAULTS, **(options or {})})
                    stream.pix_fmt = "yuv420p"
                else:
                    stream = out.add_stream("ffv1", rate=rate, options=dict(options or {}))
                    stream.pix_fmt = "bgr0"
                stream.width, stream.height = w, h
                size = (h, w)
            elif (h, w) != size:
                raise VideoError(f"frame {i} is {w}x{h} but frame 0 is {size[1]}x{size[0]}; all frames must match")
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
            count += 1
        if stream is None:
            raise VideoError("no frames to write: pass at least one (H, W, 3) uint8 frame")
        for packet in stream.encode():
            out.mux(packet)


def _write_png(folder: Path, frames) -> None:
    for i, frame in _checked_frames(frames):
        av.VideoFrame.from_ndarray(frame, format="rgb24").to_image().save(folder / f"{i:06d}.png")
    if not any(folder.iterdir()):
        raise VideoError("no frames to write: pass at least one (H, W, 3) uint8 frame")


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise VideoError(f"{path} exists and is a file; PNG output goes to a folder: pass a new folder name")
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
    publish(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def transcode_h264(path, out, *, bframes: int = 0, refs: int = 1, crf: int = 18, progress: bool = False) -> Path:
    """Re-encode any video FFmpeg reads to H.264 (libx264) so its motion vectors can be exported.

    The defaults (no B-frames, one reference frame) make every exported vector point at
    the previous frame, which is what :class:`MotionField` assumes. Frames keep their
    size (cropped to even sides) and rate; audio is dropped.
    """
    video = read_video(path, fit=None, progress=progress)
    h, w = video.size
    frames = video.frames[:, : h // 2 * 2, : w // 2 * 2]
    return write_video(out, frames, video.fps, codec="h264", options={"crf": str(crf), "bf": str(bframes), "refs": str(refs)}, protect=[path])


# ---------------------------------------------------------------------------------------
# pixel proxy latents
_PROXY_CHANNELS = 16


def pixel_proxy_latents(
    frames,
    temporal_factor: int = TEMPORAL_FACTOR,
    spatial_factor: int = 8,
    channels: int = 16,
    *,
    standardize: bool = True,
) -> torch.Tensor:
    """A **pixel proxy** for VAE latents: (C, F, H/8, W/8) float32 with Wan's geometry.

    Not a VAE: use it to plan when no VAE is at hand. Geometry matches Wan 2.1's causal
    VAE: latent frame 0 = pixel frame 0; latent frame k = mean of pixel frames 4k-3 .. 4k;
    one latent = one 8x8 pixel block. Channels are YCbCr (BT.601, 0..1) statistics per
    block, in this order (the first ``channels`` are kept):

    ==========  =============================================================
    0-3         luma means of the 2x2 sub-blocks (4x4 px each)
    4, 5        Cb, Cr block means
    6-9         luma standard deviation inside each sub-block (texture)
    10, 11      mean horizontal / vertical luma gradient
    12, 13      Cb, Cr standard deviation
    14, 15      luma block min and max
    ==========  =============================================================

    With ``standardize`` each channel is shifted and scaled to mean 0, std 1 over the
    whole video (like Wan's latents_mean/std normalisation), so LIPAR-style thresholds on
    unit-scale latents (tau1 = 0.15 mean abs difference) land in a sensible range. That
    per-video step couples frames; ``standardize=False`` is strictly causal.
    """
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {tuple(x.shape)}")
    t, h, w, _ = x.shape
    if (t - 1) % temporal_factor:
        fix = (t - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(f"{t} frames is not {temporal_factor}k+1: keep the first {fix} (read_video(fit='wan') does)")
    if h % spatial_factor or w % spatial_factor or spatial_factor % 2:
        raise ValueError(f"frames are {w}x{h}; both sides must be multiples of {spatial_factor} (fit='wan' gives 16)")
    if not 1 <= channels <= _PROXY_CHANNELS:
        raise ValueError(f"channels={channels}: the pixel proxy has 1..{_PROXY_CHANNELS} channels")
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    # causal temporal grouping: [0], [1..4], [5..8], ...
    first, rest = x[:1], rearrange(x[1:], "(f k) h w c -> f k h w c", k=temporal_factor).mean(1)
    x = torch.cat([first, rest])  # (F, H, W, 3)
    r, g, b = x.unbind(-1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.5 + (b - y) * 0.564
    cr = 0.5 + (r - y) * 0.713
    s, half = spatial_factor, spatial_factor // 2
    sub = rearrange(y, "f (hb sy py) (wb sx px) -> f hb wb (sy sx) (py px)", sy=2, sx=2, py=half, px=half)
    blocks = rearrange(y, "f (hb py) (wb px) -> f hb wb py px", py=s, px=s)
    gx = (blocks[..., :, 1:] - blocks[..., :, :-1]).abs().mean((-1, -2))
    gy = (blocks[..., 1:, :] - blocks[..., :-1, :]).abs().mean((-1, -2))
    cb_b = rearrange(cb, "f (hb py) (wb px) -> f hb wb (py px)", py=s, px=s)
    cr_b = rearrange(cr, "f (hb py) (wb px) -> f hb wb (py px)", py=s, px=s)
    flat = rearrange(blocks, "f hb wb py px -> f hb wb (py px)")
    features = torch.cat(
        [
            sub.mean(-1),  # (F, Hb, Wb, 4)
            cb_b.mean(-1, keepdim=True),
            cr_b.mean(-1, keepdim=True),
            sub.std(-1, unbiased=False),
            gx[..., None],
            gy[..., None],
            cb_b.std(-1, unbiased=False, keepdim=True),
            cr_b.std(-1, unbiased=False, keepdim=True),
            flat.amin(-1, keepdim=True),
            flat.amax(-1, keepdim=True),
        ],
        -1,
    )[..., :channels]
    latents = rearrange(features, "f hb wb c -> c f hb wb").contiguous()
    if standardize:
        mean = reduce(latents, "c f h w -> c 1 1 1", "mean")
        std = latents.std(dim=(1, 2, 3), unbiased=False, keepdim=True)
        latents = (latents - mean) / std.clamp_min(1e-3)
    return latents


def wan_vae_codec(vae_dir, *, device: str = "cpu", dtype=torch.float32):
    """``(encode, decode)`` with a local diffusers ``AutoencoderKLWan`` folder, normalised as
    ``WanVideoToVideoPipeline`` does: encode (T, H, W, 3) uint8 frames to
    ``(mode - latents_mean) / latents_std`` of shape (1, C, F, H/8, W/8); decode back to uint8."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype).to(device).eval()
    mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=dtype, device=device).view(1, -1, 1, 1, 1)

    def encode(frames) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames)).to(device=device, dtype=dtype) / 127.5 - 1.0
        with torch.no_grad():
            return (vae.encode(rearrange(x, "t h w c -> 1 c t h w")).latent_dist.mode() - mean) / std

    def decode(latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            x = vae.decode(latents.to(device, dtype) * std + mean).sample[0]  # (3, T, H, W)
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()

    return encode, decode


def vae_latents(frames, vae_dir, *, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Encode frames with a local diffusers ``AutoencoderKLWan`` folder (see :func:`wan_vae_codec`): (C, F, H/8, W/8)."""
    encode, _ = wan_vae_codec(vae_dir, device=device, dtype=dtype)
    return encode(frames)[0].float().cpu()

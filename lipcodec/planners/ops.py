"""Pure tensor algorithms the planners share: token distances and causal 3D filters.

Volumes are (F, H, W) over the token grid; "causal" windows cover frames t-2, t-1, t, so a
decision at frame t never depends on later frames (streaming-safe).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def trimmed_l1(a: torch.Tensor, b: torch.Tensor, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    """LIPAR's token distance: mean |a - b| over the 20th-80th percentile of the sorted values.

    a, b: (..., D) token vectors -> (...). Trimming ignores the few largest differences
    (noise, one flickering channel) and the many near-zero ones.
    """
    d = (a - b).abs()  # (..., D)
    n = d.shape[-1]
    lo, hi = int(low * n), max(int(high * n), int(low * n) + 1)
    # sum of ranks lo..hi-1 = total - (n - hi) largest - lo smallest; two top-k beat a full sort
    trimmed = d.sum(-1)
    if n - hi:
        trimmed = trimmed - d.topk(n - hi, dim=-1, sorted=False).values.sum(-1)
    if lo:
        trimmed = trimmed - d.topk(lo, dim=-1, largest=False, sorted=False).values.sum(-1)
    return trimmed / (hi - lo)


def _causal_windows(volume: torch.Tensor, size: tuple[int, int, int], causal: bool = True) -> torch.Tensor:
    """All values of the causal (t-k+1..t) or centred window, spatially centred: (K, F, H, W)."""
    kt, kh, kw = size
    before, after = (kt - 1, 0) if causal else (kt // 2, kt - 1 - kt // 2)
    x = volume[None, None].float()  # (1, 1, F, H, W)
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, before, after), mode="replicate")[0, 0]
    f, h, w = volume.shape
    return torch.stack(
        [x[dt : dt + f, dy : dy + h, dx : dx + w] for dt in range(kt) for dy in range(kh) for dx in range(kw)]
    )


def causal_median(volume: torch.Tensor, size=(3, 3, 3)) -> torch.Tensor:
    """Median over a causal 3D window (replicate padding)."""
    return _causal_windows(volume, size).median(dim=0).values


def causal_gaussian(volume: torch.Tensor, sigma: float = 1.5, size=(3, 3, 3)) -> torch.Tensor:
    """Gaussian average over a causal 3D window: spatially centred, in time a half-kernel at t."""
    kt, kh, kw = size
    weights = torch.tensor(
        [
            math.exp(-((kt - 1 - dt) ** 2 + (dy - kh // 2) ** 2 + (dx - kw // 2) ** 2) / (2 * sigma**2))
            for dt in range(kt)
            for dy in range(kh)
            for dx in range(kw)
        ],
        device=volume.device,
    )
    weights = weights / weights.sum()
    return torch.einsum("k,kfhw->fhw", weights, _causal_windows(volume, size))


def causal_dilate(mask: torch.Tensor, size=(3, 5, 5)) -> torch.Tensor:
    """Grow True regions: a token is True if any token of its causal window is."""
    return _causal_windows(mask, size).amax(dim=0) > 0.5


def majority(mask: torch.Tensor, size=(3, 3, 3), causal: bool = False) -> torch.Tensor:
    """3D median of a boolean mask (majority vote), centred in time unless ``causal``.

    A causal median of a mask lags every onset of change by a frame, so the centred
    window is the default; ``causal=True`` is for planning frames as they arrive.
    """
    return _causal_windows(mask, size, causal).mean(dim=0) > 0.5


def _dilate2d(mask: torch.Tensor, k: int) -> torch.Tensor:
    x = F.pad(mask[:, None].float(), (k // 2,) * 4, mode="replicate")
    return F.max_pool2d(x, k, stride=1)[:, 0] > 0.5


def _erode2d(mask: torch.Tensor, k: int) -> torch.Tensor:
    return ~_dilate2d(~mask, k)


def open_close(mask: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Per-frame 2D opening then closing: drop specks, then fill pin holes. mask: (F, H, W) bool."""
    opened = _dilate2d(_erode2d(mask, k), k)
    return _erode2d(_dilate2d(opened, k), k)

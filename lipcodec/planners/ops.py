"""Pure tensor algorithms the planners share: token distances and causal 3D filters.

Volumes are (F, H, W) over the token grid; "causal" windows cover frames t-2, t-1, t, so a
decision at frame t never depends on later frames (streaming-safe).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def trimmed_l1(a: torch.Tensor, b: torch.Tensor, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    """LIPAR's token distance: mean |a - b| over the 20th-80th percentile of the sorted values.

    a, b: (..., D) token vectors -> (...). Trimming ignores the few largest differences
    (noise, one flickering channel) and the many near-zero ones.
    """
    lo, hi = _trim_ranks(a.shape[-1], low, high)
    if a.is_cuda and _trimmed_kernel is not None:
        return _trimmed_l1_cuda(a, b, lo, hi)
    d = (a - b).abs_()  # (..., D)
    trimmed = _sorted_rank_sum(d, lo, hi) if d.is_cuda else _topk_rank_sum(d, lo, hi)
    return trimmed / (hi - lo)


def _topk_rank_sum(d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Sum of ranks lo..hi-1 of the last axis = total - (n - hi) largest - lo smallest: on a
    CPU two partial top-k beat a full sort."""
    n, trimmed = d.shape[-1], d.sum(-1)
    if n - hi:
        trimmed = trimmed - d.topk(n - hi, dim=-1, sorted=False).values.sum(-1)
    if lo:
        trimmed = trimmed - d.topk(lo, dim=-1, largest=False, sorted=False).values.sum(-1)
    return trimmed


def _sorted_rank_sum(d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The same sum from one sort (a GPU without Triton)."""
    return d.sort(-1).values[..., lo:hi].sum(-1)


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of PyTorch come without Triton
    _trimmed_kernel = None
else:
    @triton.jit
    def _trimmed_kernel(a, b, out, rows_total, N: tl.constexpr, NP: tl.constexpr, LO: tl.constexpr,
                        HI: tl.constexpr, BLOCK: tl.constexpr):
        """Rows of N values: |a - b| sorted in registers, mean of ranks LO..HI-1."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, NP)
        valid = rows < rows_total
        inside = valid[:, None] & (cols[None, :] < N)
        at = rows[:, None] * N + cols[None, :]
        d = tl.abs(tl.load(a + at, mask=inside, other=0.0).to(tl.float32) - tl.load(b + at, mask=inside, other=0.0).to(tl.float32))
        d = tl.sort(tl.where(inside, d, float("inf")), 1)  # padding sorts last
        kept = (cols >= LO) & (cols < HI)
        tl.store(out + rows, tl.sum(tl.where(kept[None, :], d, 0.0), 1) / (HI - LO), mask=valid)


def _trimmed_l1_cuda(a: torch.Tensor, b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """:func:`trimmed_l1` in one Triton pass: the planners' guard and matching call it on
    ~33k tokens x 64 values, where PyTorch's top-k took ~100 us per call and its sort ~135 us
    on an H200 (the top-k were 62% of a streamed chunk's planning kernels)."""
    shape, n = torch.broadcast_shapes(a.shape, b.shape), a.shape[-1]
    a, b = (t.expand(shape).reshape(-1, n).contiguous() for t in (a, b))
    out = torch.empty(a.shape[0], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    if not len(out):
        return out.reshape(shape[:-1])
    block = 32
    with torch.cuda.device(a.device):  # Triton launches on the current device
        _trimmed_kernel[(triton.cdiv(a.shape[0], block),)](a, b, out, a.shape[0], N=n, NP=triton.next_power_of_2(n),
                                                          LO=lo, HI=hi, BLOCK=block)
    return out.reshape(shape[:-1])


def _trim_ranks(n: int, low: float, high: float) -> tuple[int, int]:
    """The sorted ranks [lo, hi) the trimmed mean of n values keeps (at least one)."""
    lo = int(low * n)
    return lo, max(int(high * n), lo + 1)


def trimmed_l1_within(a: torch.Tensor, b: torch.Tensor, tau: float, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    """``trimmed_l1(a, b) <= tau``, exactly, sorting only where cheap bounds cannot tell.

    With n values, the lo smallest and n - hi largest dropped: the kept mean is at most the
    mean of the n - lo largest, so at most sum / (n - lo); and at least the mean of the hi
    smallest, so at least (sum - (n - hi) max) / hi. Most guard checks are far from tau.
    """
    d = (a - b).abs_()
    n = d.shape[-1]
    lo, hi = _trim_ranks(n, low, high)
    total = d.sum(-1)
    verdict = total <= tau * (n - lo)  # upper bound within tau
    unsure = ~verdict & (total - (n - hi) * d.amax(-1) <= tau * hi)  # lower bound not above tau
    if unsure.any():
        verdict[unsure] = trimmed_l1(a[unsure], b[unsure], low, high) <= tau
    return verdict


def _pad(volume: torch.Tensor, size: tuple[int, int, int], causal: bool = True) -> torch.Tensor:
    """(1, 1, F+kt-1, H+kh-1, W+kw-1) float, replicate-padded for a causal (t-k+1..t) or
    centred window in time, spatially centred."""
    kt, kh, kw = size
    before, after = (kt - 1, 0) if causal else (kt // 2, kt - 1 - kt // 2)
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2, before, after)
    return F.pad(volume[None, None].float(), pad, mode="replicate")


def _windows(volume: torch.Tensor, size: tuple[int, int, int], causal: bool = True) -> torch.Tensor:
    """Every value of each token's window on the last, contiguous axis: (F, H, W, K)."""
    kt, kh, kw = size
    x = _pad(volume, size, causal)[0, 0]
    f, h, w = volume.shape
    return torch.stack(
        [x[dt : dt + f, dy : dy + h, dx : dx + w] for dt in range(kt) for dy in range(kh) for dx in range(kw)], -1
    )


def causal_median(volume: torch.Tensor, size=(3, 3, 3)) -> torch.Tensor:
    """Median over a causal 3D window (replicate padding); for an even window the lower of
    the two middle values, as ``torch.median``.

    A selection network instead of a per-token sort: Batcher's odd-even merge sort over the
    window's shifted views, padded to a power of two with -inf/+inf, keeping only the
    compare-exchanges that reach the median (157 of 191 for 3x3x3) - elementwise min/max
    over whole volumes, about 3x faster on a CPU than ``median`` over stacked windows. On a
    GPU, where 157 small kernels cost more than one, ``median`` over the windows.
    """
    if volume.is_cuda:
        return _windows(volume, size).median(dim=-1).values
    kt, kh, kw = size
    f, h, w = volume.shape
    x = _pad(volume, size)[0, 0]
    values = [x[dt : dt + f, dy : dy + h, dx : dx + w] for dt in range(kt) for dy in range(kh) for dx in range(kw)]
    k = len(values)
    n = 1 << (k - 1).bit_length()
    low = (n - k) // 2
    values = [-math.inf] * low + values + [math.inf] * (n - k - low)  # constants need no work
    for a, b in _median_network(n, low + (k - 1) // 2):
        x, y = values[a], values[b]
        if isinstance(x, float) or isinstance(y, float):  # +-inf against anything: known order
            ordered = (isinstance(x, float) and x < 0) or (isinstance(y, float) and y > 0)
            values[a], values[b] = (x, y) if ordered else (y, x)
        else:
            values[a], values[b] = torch.minimum(x, y), torch.maximum(x, y)
    return values[low + (k - 1) // 2].contiguous()


@functools.cache
def _median_network(n: int, rank: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchanges (a < b: a gets the min) of Batcher's odd-even merge sort of n (a power
    of two) values, pruned to those that decide what ends at position ``rank``."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {rank}, []
    for a, b in reversed(pairs):
        if a in needed or b in needed:
            kept.append((a, b))
            needed |= {a, b}
    return tuple(reversed(kept))


def causal_gaussian(volume: torch.Tensor, sigma: float = 1.5, size=(3, 3, 3)) -> torch.Tensor:
    """Gaussian average over a causal 3D window: spatially centred, in time a half-kernel at t."""
    kt, kh, kw = size
    t = torch.arange(kt, device=volume.device) - (kt - 1)  # -(kt-1) .. 0: the past up to t
    y = torch.arange(kh, device=volume.device) - kh // 2
    x = torch.arange(kw, device=volume.device) - kw // 2
    d2 = t[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2  # (kt, kh, kw)
    weights = torch.exp(-d2.float() / (2 * sigma**2))
    weights = (weights / weights.sum())[None, None]  # (1, 1, kt, kh, kw)
    return F.conv3d(_pad(volume, size), weights)[0, 0]


def causal_dilate(mask: torch.Tensor, size=(3, 5, 5)) -> torch.Tensor:
    """Grow True regions: a token is True if any token of its causal window is."""
    return F.max_pool3d(_pad(mask, size), size, stride=1)[0, 0] > 0.5


def majority(mask: torch.Tensor, size=(3, 3, 3), causal: bool = False) -> torch.Tensor:
    """3D median of a boolean mask (majority vote), centred in time unless ``causal``.

    A causal median of a mask lags every onset of change by a frame, so the centred
    window is the default; ``causal=True`` is for planning frames as they arrive.
    """
    return F.avg_pool3d(_pad(mask, size, causal), size, stride=1)[0, 0] > 0.5


def _dilate2d(mask: torch.Tensor, k: int) -> torch.Tensor:
    x = F.pad(mask[:, None].float(), (k // 2,) * 4, mode="replicate")
    return F.max_pool2d(x, k, stride=1)[:, 0] > 0.5


def _erode2d(mask: torch.Tensor, k: int) -> torch.Tensor:
    return ~_dilate2d(~mask, k)


def open_close(mask: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Per-frame 2D opening then closing: drop specks, then fill pin holes. mask: (F, H, W) bool."""
    opened = _dilate2d(_erode2d(mask, k), k)
    return _erode2d(_dilate2d(opened, k), k)

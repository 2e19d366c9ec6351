"""The reference model's vocabulary: pixel-space edits it was trained to imitate.

Each edit maps RGB video in [0, 1], shape (B, 3, T, H, W), to RGB in [0, 1]. The denoiser
never calls these at run time: they made its training targets, and the tests and the model
card use them to check that an edit "does what the word says".
"""

from __future__ import annotations

import torch

LUMA = (0.299, 0.587, 0.114)  # BT.601
SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, ...) RGB -> (B, 1, ...) BT.601 luma."""
    w = x.new_tensor(LUMA).view(1, 3, *([1] * (x.ndim - 2)))
    return (x * w).sum(1, keepdim=True)


def _mix(x: torch.Tensor, matrix) -> torch.Tensor:
    m = x.new_tensor(matrix)  # (3 out, 3 in)
    return torch.einsum("oi,bi...->bo...", m, x)


def identity(x):
    return x


def grayscale(x):
    return luma(x).expand_as(x)


def sepia(x):
    return _mix(x, SEPIA).clamp(0, 1)


def negative(x):
    return 1.0 - x


def warm(x):
    gain = x.new_tensor((1.12, 1.0, 0.80)).view(1, 3, *([1] * (x.ndim - 2)))
    return (x * gain + x.new_tensor((0.04, 0.01, 0.0)).view_as(gain)).clamp(0, 1)


def cool(x):
    gain = x.new_tensor((0.80, 0.97, 1.12)).view(1, 3, *([1] * (x.ndim - 2)))
    return (x * gain + x.new_tensor((0.0, 0.01, 0.04)).view_as(gain)).clamp(0, 1)


def posterize(x, levels: int = 4):
    return torch.round(x * (levels - 1)) / (levels - 1)


EDITS = {
    "identity": identity,
    "grayscale": grayscale,
    "sepia": sepia,
    "negative": negative,
    "warm": warm,
    "cool": cool,
    "posterize": posterize,
}
VOCABULARY = tuple(EDITS)


def apply_edits(x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Apply edit ``VOCABULARY[words[b]]`` to sample b of ``x`` (B, 3, T, H, W) in [0, 1]."""
    out = torch.empty_like(x)
    for index, name in enumerate(VOCABULARY):
        rows = (words == index).nonzero().flatten()
        if rows.numel():
            out[rows] = EDITS[name](x[rows]).to(out.dtype)
    return out


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute chroma (distance of RGB from its luma), for the grayscale check."""
    return (x - luma(x)).abs().mean()

"""``lipar``: LIPAR's static P-frame rule (METHOD.md section 3), every step a parameter.

Per token, on clean source latents: the trimmed L1 to the same place in its reference
frame, smoothed by a causal 3D median then a causal 3D Gaussian, is compared with
``tau1``; the long-term guard keeps a token farther than ``tau2`` from the computed token
it would finally copy; the keep mask is cleaned by a 3D majority (median), 2D
opening + closing, and a causal 3D dilation that leaves a margin around motion. The GOP
adds keyframes, scene cuts and B-frames (a B-frame token takes its past or future anchor,
whichever is closer). Defaults are the published ones (tau1 0.15 and tau2 0.3 on TAEHV
latents): thresholds depend on the latent scale, so tune them per VAE or use target_kept.
"""

from __future__ import annotations

import attrs
import torch

from ..graphs import graph_safe
from .ops import causal_dilate, causal_gaussian, causal_median, majority, open_close, trimmed_l1
from .reference import Match, ReferencePlanner
from .registry import PlanContext, register_planner


def _triple(value) -> tuple[int, int, int]:
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, int):
        value = (value,) * 3
    triple = tuple(int(v) for v in value)
    if len(triple) != 3 or any(v < 1 for v in triple):
        raise ValueError(f"window size {value!r} must be three positive ints (frames, rows, cols), e.g. 3,5,5")
    return triple


def _frames_of_pairs(tokens: torch.Tensor, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens[t] and tokens[r] for every pair, stacked; views without a copy when the pairs
    are runs of consecutive frames at a fixed gap (the usual (t, t - 1) P-frame chain)."""
    here, there = [t for t, _ in pairs], [r for _, r in pairs]
    if all(b - a == 1 for a, b in zip(here, here[1:])) and len({t - r for t, r in pairs}) == 1:
        return tokens[here[0] : here[-1] + 1], tokens[there[0] : there[-1] + 1]
    return tokens[torch.tensor(here, device=tokens.device)], tokens[torch.tensor(there, device=tokens.device)]


@register_planner("lipar")
@attrs.frozen(kw_only=True)
class Lipar(ReferencePlanner):
    """Same-place references with LIPAR's smoothing, guard and mask clean-up.

    Args (beyond :class:`ReferencePlanner`'s tau1, tau2, target_kept, trim):
        median_size: causal median window on the distance volume (frames, rows, cols).
        gaussian_sigma, gaussian_size: causal Gaussian on the median-filtered distances.
        mask_median_size: 3D median (majority) window on the keep mask.
        mask_median_causal: the mask median looks at frames t-2..t instead of t-1..t+1
            (a causal median lags every onset of motion by a frame; off by default).
        morph_size: 2D opening + closing kernel on the keep mask (0 disables).
        dilation: causal 3D dilation of the keep mask (frames, rows, cols).
        reverify: on by default: the guard is checked again after the clean-up, so no
            reused token ends farther than ``tau2`` from what it copies. The published code
            guards only before the clean-up (``reverify=False``), which lets the mask median
            drop guard-kept tokens - with B-frames on both sides of a changed P-frame it
            drops the whole anchor.
    """

    median_size: tuple[int, int, int] = attrs.field(default=(3, 3, 3), converter=_triple)
    gaussian_sigma: float = attrs.field(default=1.5, converter=float)
    gaussian_size: tuple[int, int, int] = attrs.field(default=(3, 3, 3), converter=_triple)
    mask_median_size: tuple[int, int, int] = attrs.field(default=(3, 3, 3), converter=_triple)
    mask_median_causal: bool = False
    morph_size: int = attrs.field(default=3, converter=int)
    dilation: tuple[int, int, int] = attrs.field(default=(3, 5, 5), converter=_triple)
    name: str = "lipar"

    def match_pairs(self, ctx: PlanContext, tokens: torch.Tensor, pairs) -> list[Match]:
        f, h, w, _ = tokens.shape
        distance = trimmed_l1(*_frames_of_pairs(tokens, pairs), *self.trim).reshape(len(pairs), h * w)
        place = torch.arange(h * w, device=tokens.device)
        return [Match(distance[k], r * h * w + place) for k, (_, r) in enumerate(pairs)]

    def score(self, ctx, short_term):
        return causal_gaussian(causal_median(short_term, self.median_size), self.gaussian_sigma, self.gaussian_size)

    @graph_safe
    def postprocess(self, reuse):
        keep = majority(~reuse, self.mask_median_size, self.mask_median_causal)
        if self.morph_size > 1:
            keep = open_close(keep, self.morph_size)
        return ~causal_dilate(keep, self.dilation)

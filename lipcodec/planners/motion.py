"""``motion``: motion-compensated references found by block search on the token grid.

For each token and each allowed reference frame, the candidate is the token within
+-``radius`` tokens that has the smallest mean absolute difference (ties go to the
smallest displacement); it is accepted under the same rule as every reference planner
(trimmed L1 <= tau1, long-term guard tau2). Vectorised in torch: it runs where the
latents are, GPU included. One Wan token is 16x16 pixels, so camera motion that is not a
whole number of tokens per latent frame only matches approximately; see docs/planners.md.
"""

from __future__ import annotations

import attrs
import torch

from .ops import trimmed_l1
from .reference import Match, ReferencePlanner
from .registry import PlanContext, register_planner


def _radius(value) -> int:
    value = int(value)
    if not 0 <= value <= 32:
        raise ValueError(f"radius={value} is out of range: use 0..32 tokens")
    return value


@register_planner("motion")
@attrs.frozen(kw_only=True)
class Motion(ReferencePlanner):
    """Block search in up to ``GOP.ref`` earlier anchors (and the future anchor of B-frames).

    Args (beyond :class:`ReferencePlanner`'s): radius: search window, +-tokens per axis.
    """

    radius: int = attrs.field(default=4, converter=_radius)
    name: str = "motion"

    def match_pairs(self, ctx: PlanContext, tokens: torch.Tensor, pairs) -> list[Match]:
        f, h, w, _ = tokens.shape
        r = self.radius
        here = tokens[[t for t, _ in pairs]].permute(0, 3, 1, 2).contiguous()  # (P, D, H, W)
        there = tokens[[q for _, q in pairs]].permute(0, 3, 1, 2)  # (P, D, H, W)
        there = torch.nn.functional.pad(there, (r, r, r, r), value=float("nan"))  # (P, D, H+2r, W+2r)
        best = torch.full((len(pairs), h, w), float("inf"), device=tokens.device)  # (P, H, W)
        best_dy = torch.zeros((len(pairs), h, w), dtype=torch.long, device=tokens.device)
        best_dx = torch.zeros_like(best_dy)
        diff = torch.empty_like(here)
        sad = torch.empty_like(best)
        span = range(-r, r + 1)
        for dy, dx in sorted(((dy, dx) for dy in span for dx in span), key=lambda d: (abs(d[0]) + abs(d[1]), d)):
            torch.sub(here, there[:, :, r + dy : r + dy + h, r + dx : r + dx + w], out=diff)
            torch.sum(diff.abs_(), dim=1, out=sad)  # NaN outside the grid never wins
            better = sad < best
            best = torch.where(better, sad, best)
            best_dy.masked_fill_(better, dy)
            best_dx.masked_fill_(better, dx)
        rows = torch.arange(h, device=tokens.device)[:, None] + best_dy  # (P, H, W)
        cols = torch.arange(w, device=tokens.device)[None, :] + best_dx
        frames = torch.tensor([q for _, q in pairs], device=tokens.device)[:, None, None]
        source = (frames * h + rows) * w + cols  # (P, H, W)
        candidates = tokens.reshape(f * h * w, -1)[source]  # (P, H, W, D)
        distance = trimmed_l1(tokens[[t for t, _ in pairs]], candidates, *self.trim)  # (P, H, W)
        return [Match(distance[k].flatten(), source[k].flatten()) for k in range(len(pairs))]

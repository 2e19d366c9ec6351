"""``bitstream``: references from the source video's own codec motion vectors.

An H.264 macroblock is 16x16 pixels, exactly one Wan token (8x VAE x 2x patch), so the
encoder has already done the block search. The pixel-frame motion field (decoded with
PyAV's ``flags2=+export_mvs``, pooled per block: :class:`~lipcodec.planners.MotionField`)
is followed along each token's trajectory from the reference's pixel frame to the
current one (latent frame t stands for pixel frame 4t), rounded to whole tokens, and the
candidate it points at competes with the same-place token. As with every reference
planner, a candidate is accepted only in latent space: trimmed L1 <= tau1 and the
long-term guard tau2. Codec vectors are a hint, never trusted blindly.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from .ops import trimmed_l1
from .reference import Match, ReferencePlanner
from .registry import MotionField, PlanContext, register_planner


def token_motion(motion: MotionField, grid_hw: tuple[int, int], token_px: int) -> np.ndarray:
    """Per pixel frame motion at the token grid, in tokens: (T, H, W, 2) as (dy, dx).

    The field's frames may have another size than the latents' source pixels
    (``H * token_px`` x ``W * token_px``): positions and vectors are scaled to match.
    """
    h, w = grid_hw
    fh, fw = motion.frame_size
    sy, sx = fh / (h * token_px), fw / (w * token_px)  # field pixels per latent-source pixel
    hb, wb = motion.vectors.shape[1:3]
    by = np.clip(((np.arange(h) + 0.5) * token_px * sy / motion.block).astype(int), 0, hb - 1)
    bx = np.clip(((np.arange(w) + 0.5) * token_px * sx / motion.block).astype(int), 0, wb - 1)
    field = motion.vectors[:, by][:, :, bx].astype(np.float64)  # (T, H, W, 2) field pixels
    field = np.nan_to_num(field, nan=0.0)  # no vector (intra block, frame 0): no hint, stay in place
    field[..., 0] /= sy * token_px
    field[..., 1] /= sx * token_px
    return field


@register_planner("bitstream")
@attrs.frozen(kw_only=True)
class Bitstream(ReferencePlanner):
    """Codec motion vectors as reference hints, verified against the latents."""

    name: str = "bitstream"

    def match_pairs(self, ctx: PlanContext, tokens: torch.Tensor, pairs) -> list[Match]:
        if ctx.motion is None:
            raise ValueError(
                "the bitstream planner needs the source video's motion vectors: read it with "
                "lipcodec.video.read_video(path, motion=True) and pass motion=video.motion to lipcodec.plan "
                "(or run `lipcodec analyze VIDEO --planner bitstream`)"
            )
        f, h, w, _ = tokens.shape
        token_px = 8 * ctx.patch_size[1]  # VAE 8x times the spatial patch
        field = token_motion(ctx.motion, (h, w), token_px)  # (T, H, W, 2)
        flat = tokens.reshape(f * h * w, -1)
        place = torch.arange(h * w, device=tokens.device)
        out = []
        for t, r in pairs:
            dy, dx = _trajectory(field, self._pixel(ctx, t, len(field)), self._pixel(ctx, r, len(field)))
            rows = np.arange(h)[:, None] + np.rint(dy).astype(int)
            cols = np.arange(w)[None, :] + np.rint(dx).astype(int)
            inside = torch.from_numpy(((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).ravel()).to(tokens.device)
            moved = torch.from_numpy((np.clip(rows, 0, h - 1) * w + np.clip(cols, 0, w - 1)).ravel()).to(tokens.device)
            here = flat[t * h * w + place]
            d_moved = trimmed_l1(here, flat[r * h * w + moved], *self.trim).masked_fill(~inside, float("inf"))
            d_still = trimmed_l1(here, flat[r * h * w + place], *self.trim)
            use_moved = d_moved < d_still
            out.append(
                Match(torch.where(use_moved, d_moved, d_still), r * h * w + torch.where(use_moved, moved, place))
            )
        return out

    @staticmethod
    def _pixel(ctx: PlanContext, latent_frame: int, frames: int) -> int:
        return min(latent_frame * ctx.temporal_factor, frames - 1)


def _trajectory(field: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Displacement (in tokens) from each token of pixel frame ``start`` to its content in ``end``.

    ``field[k]`` says where content of frame k came from in frame k-1. Backwards we follow
    it; forwards we step against the field met on the way (a first-order inverse).
    """
    _, h, w, _ = field.shape
    origin = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(np.float64)  # (H, W, 2)
    pos = origin.copy()

    def at(k):
        iy = np.clip(np.rint(pos[..., 0]).astype(int), 0, h - 1)
        ix = np.clip(np.rint(pos[..., 1]).astype(int), 0, w - 1)
        return field[k, iy, ix]

    for k in range(start, end, -1):  # backwards: start, start-1, ..., end+1
        pos = pos + at(k)
    for k in range(start + 1, end + 1):  # forwards: start+1, ..., end
        pos = pos - at(k)
    return pos[..., 0] - origin[..., 0], pos[..., 1] - origin[..., 1]

"""Draw a plan over its video: reused tokens dimmed, frame types labelled, references as lines."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .gop import TEMPORAL_FACTOR, latent_frame_of_pixel
from .plan import Plan

DIM = 0.35  # brightness of reused tokens
LINE = (255, 220, 0)  # motion reference lines: token centre -> source token centre
SOURCE_DOT = (255, 80, 0)


def draw_plan(frames: np.ndarray, plan: Plan, *, temporal_factor: int = TEMPORAL_FACTOR, label: str = "") -> np.ndarray:
    """Return a copy of ``frames`` (T, H, W, 3) uint8 with ``plan`` drawn on it.

    Pixel frame t shows latent frame ``latent_frame_of_pixel(t)``: its reused tokens are
    dimmed, its type and kept share are written top-left (plus ``label``), and every
    reused token whose source sits at another position gets a line from its centre to
    the source's centre (a dot marks the source end).
    """
    frames = np.asarray(frames)
    t_count, h, w, _ = frames.shape
    grid = plan.grid
    if latent_frame_of_pixel(t_count - 1, temporal_factor) >= grid.frames:
        raise ValueError(
            f"{t_count} pixel frames need {latent_frame_of_pixel(t_count - 1, temporal_factor) + 1} latent frames, "
            f"the plan has {grid.frames}: draw the frames the plan was made from"
        )
    th, tw = h / grid.height, w / grid.width  # pixels per token
    computed = plan.computed.reshape(grid.frames, grid.height, grid.width).cpu().numpy()
    offsets = plan.offsets.reshape(grid.frames, grid.height, grid.width, 3).cpu().numpy()
    rows = np.minimum((np.arange(h) / th).astype(int), grid.height - 1)
    cols = np.minimum((np.arange(w) / tw).astype(int), grid.width - 1)
    font = ImageFont.load_default()
    out = np.empty_like(frames)
    for t in range(t_count):
        k = latent_frame_of_pixel(t, temporal_factor)
        shade = np.where(computed[k][rows][:, cols], 1.0, DIM)[..., None]
        image = Image.fromarray((frames[t] * shade).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        moved = ~computed[k] & (offsets[k, ..., 1:] != 0).any(-1)
        for r, c in zip(*np.nonzero(moved)):
            y0, x0 = (r + 0.5) * th, (c + 0.5) * tw
            y1, x1 = y0 + offsets[k, r, c, 1] * th, x0 + offsets[k, r, c, 2] * tw
            draw.line([(x0, y0), (x1, y1)], fill=LINE, width=1)
            draw.rectangle([x1 - 1, y1 - 1, x1 + 1, y1 + 1], fill=SOURCE_DOT)
        text = f"{k} {plan.frame_types[k]} {plan.frame_kept[k]:.0%}" + (f" {label}" if label else "")
        box = draw.textbbox((3, 2), text, font=font)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
        draw.text((3, 2), text, fill=(255, 255, 255), font=font)
        out[t] = np.asarray(image)
    return out

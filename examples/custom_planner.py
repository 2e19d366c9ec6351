"""A custom planner: reuse the best-matching token near the same place in the nearest past reference.

LIPAR's rule only looks at the same place, so a camera pan defeats it; a one-token search
window (a codec's motion search, in miniature) follows the pan. Run it:

    python examples/custom_planner.py
"""

from itertools import product

import attrs
import torch

import lipcodec
from lipcodec import Plan, PlanContext, register_planner
from lipcodec.testing import check_planner, standard_clips


@register_planner("block-match", replace=True)
@attrs.frozen
class BlockMatch:
    """Reuse the token within ``search`` tokens of the same place that differs least, if it
    differs by less than ``threshold`` (mean absolute difference over the token's values)."""

    threshold: float = 0.05
    search: int = 1
    name: str = "block-match"

    def __call__(self, ctx: PlanContext) -> Plan:
        schedule = ctx.schedule  # the GOP laid out on this clip: letters, refs, coding order
        tokens = ctx.tokens()  # (F, H, W, D) float32, one vector per token
        f, h, w, _ = tokens.shape
        ids = torch.arange(ctx.grid.size).reshape(f, h, w)  # flat token ids, frame-major
        source = ids.clone()  # source[i] == i: computed
        # candidate displacements, nearest first, so the same place wins ties
        offsets = sorted(product(range(-self.search, self.search + 1), repeat=2), key=lambda d: abs(d[0]) + abs(d[1]))
        for t, refs in enumerate(schedule.refs):
            if not refs:  # keyframes reference nothing: computed in full
                continue
            r = refs[0]  # the nearest past reference frame
            best = torch.full((h, w), float("inf"))  # (H, W) smallest difference so far
            match = ids[t].clone()  # (H, W) token id it belongs to
            for dy, dx in offsets:
                y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
                here = tokens[t, y0:y1, x0:x1]  # tokens of frame t ...
                there = tokens[r, y0 + dy : y1 + dy, x0 + dx : x1 + dx]  # ... and their candidates in frame r
                error = (here - there).abs().mean(-1)
                better = error < best[y0:y1, x0:x1]
                best[y0:y1, x0:x1] = torch.where(better, error, best[y0:y1, x0:x1])
                match[y0:y1, x0:x1] = torch.where(better, ids[r, y0 + dy : y1 + dy, x0 + dx : x1 + dx], match[y0:y1, x0:x1])
            reuse = best < self.threshold
            source[t][reuse] = match[reuse]
        # Plan resolves chains and checks every reference against the schedule
        return Plan(ctx.grid, source, schedule, meta={"planner": self.name, "threshold": self.threshold, "search": self.search})


if __name__ == "__main__":
    plans = check_planner("block-match")  # the contract every planner, built-in or custom, passes
    print(f"block-match passes lipcodec.testing.check_planner ({len(plans)} clip x GOP runs)")
    gop = "keyint=8:bframes=2:b-pyramid=normal"
    for name, latents in standard_clips().items():
        plan = lipcodec.plan(latents[None], "block-match", gop=gop)  # (B, C, F, H, W), as diffusers holds it
        print(f"{name:>5}: {plan.summary()}")
    same_place = lipcodec.plan(standard_clips()["pan"], "block-match", search=0)
    with_search = lipcodec.plan(standard_clips()["pan"], "block-match", search=1)
    print(f"pan, same place only: kept {same_place.kept_ratio:.1%}; with a one-token search: kept {with_search.kept_ratio:.1%}")

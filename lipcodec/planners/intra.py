"""``intra``: every token computed - the reference every other planner is measured against."""

from __future__ import annotations

import attrs

from ..gop import Schedule
from ..plan import Plan
from .registry import PlanContext, register_planner


@register_planner("intra")
@attrs.frozen
class Intra:
    """Compute everything; the plan reproduces the unpatched model bit for bit."""

    name: str = "intra"

    def __call__(self, ctx: PlanContext) -> Plan:
        return Plan.identity(ctx.grid, Schedule.intra(ctx.grid.frames))

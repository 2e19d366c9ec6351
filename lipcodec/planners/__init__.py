"""Frame-type planners: a :class:`PlanContext` in, a :class:`~lipcodec.Plan` out.

Built-ins register themselves on import; ``available()`` lists every registered name.
"""

from .registry import MotionField, PlanContext, Planner, available, get, plan, register_planner
from . import intra  # noqa: F401  (registers "intra")

__all__ = ["MotionField", "PlanContext", "Planner", "available", "get", "plan", "register_planner"]

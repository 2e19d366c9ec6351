"""Frame-type planners: a :class:`PlanContext` in, a :class:`~lipcodec.Plan` out.

Built-ins register themselves on import; ``available()`` lists every registered name.
"""

from .registry import MotionField, PlanContext, Planner, available, get, plan, register_planner, share_params
from . import bitstream, intra, lipar, motion  # noqa: F401  (built-ins register themselves)

__all__ = ["MotionField", "PlanContext", "Planner", "available", "get", "plan", "register_planner", "share_params"]

"""lipcodec: video codecs never re-send what did not change; lipcodec never re-computes it.

Plan which latent tokens of a video DiT are computed and which reuse a reference token
(:func:`plan`), then run any plan inside the model (:func:`apply`).
"""

from . import planners
from .gop import GOP, Schedule
from .plan import Grid, Plan, PlanError
from .planners import PlanContext, plan, register_planner

__version__ = "0.1.0"

_LAZY = {
    "apply": "executor", "remove": "executor", "Codec": "executor", "edit": "editing",
    "StreamRunner": "streaming", "StreamConfig": "streaming",
}


def __getattr__(name):  # executor, editing and streaming import diffusers: load on first use only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lipcodec' has no attribute {name!r}")


__all__ = [
    "GOP", "Schedule", "Grid", "Plan", "PlanError", "PlanContext",
    "plan", "register_planner", "planners", "apply", "remove", "Codec", "edit", "StreamRunner", "StreamConfig",
]

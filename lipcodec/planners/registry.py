"""Planner protocol, the name -> constructor table, and the one-call ``plan()`` entry point."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np
import torch

from ..gop import GOP, TEMPORAL_FACTOR, Schedule
from ..plan import Grid, Plan, check_kept_multiple


@attrs.frozen
class MotionField:
    """Codec motion per pixel frame, pooled to a block grid (see :mod:`lipcodec.video`).

    ``vectors[k, y, x] = (dy, dx)`` in source pixels: the content of block (y, x) in pixel
    frame k came from ``(y*block + dy, x*block + dx)`` in pixel frame k-1; NaN where the codec gave no vector (intra blocks, frame 0). ``picture_types``
    holds the codec's letters per pixel frame (``I``, ``P``, ``B``).
    """

    vectors: np.ndarray  # (T, Hb, Wb, 2) float32
    block: int
    frame_size: tuple[int, int]  # (height, width) in pixels of the decoded frames
    picture_types: str = ""


@attrs.frozen
class ExecutedFrames:
    """The leading frames of a planning context whose plan already ran (a stream's past):
    a planner that honours it keeps their decisions and plans only the frames after them.

    ``source[i]``: the context token that token i took its output from - itself when it was
    computed, -1 when it copied a token from before the context. ``anchors[i]``: the token
    vector (:meth:`PlanContext.tokens` layout) of the computed token it finally copies (its
    own when computed): what a long-term guard measures a new token against when it reuses
    token i. ``lipcodec.streaming.StreamRunner`` keeps both for its stream.
    """

    frames: int
    source: torch.Tensor  # (frames * H' * W',) long
    anchors: torch.Tensor  # (frames * H' * W', D) float32

    def check(self, grid: Grid, dim: int):
        """Raise ValueError unless this fits a context of ``grid`` with ``dim``-long token vectors."""
        n = self.frames * grid.tokens_per_frame
        if not 0 <= self.frames < grid.frames:
            raise ValueError(f"ExecutedFrames.frames={self.frames}: use 0..{grid.frames - 1} for a context of "
                             f"{grid.frames} frames (at least one frame is left to plan)")
        if tuple(self.source.shape) != (n,) or self.source.dtype != torch.long:
            raise ValueError(f"ExecutedFrames.source must be a long tensor of shape ({n},) (frames x tokens per frame), "
                             f"got {self.source.dtype} {tuple(self.source.shape)}")
        if tuple(self.anchors.shape) != (n, dim):
            raise ValueError(f"ExecutedFrames.anchors must be shaped ({n}, {dim}) (a token vector per token), "
                             f"got {tuple(self.anchors.shape)}")
        src = self.source
        roots = torch.where(src < 0, torch.arange(n, device=src.device), src)
        if n and not bool(((src >= -1) & (src < n) & (roots[roots] == roots)).all()):  # one sync
            raise ValueError("ExecutedFrames.source must hold, per token, itself (computed), a computed context "
                             "token before the new frames, or -1 (a token before the context)")


@attrs.frozen
class PlanContext:
    """Everything a planner may look at. Planners must not modify it.

    Attributes:
        latents: clean source latents of one video, (C, F, H, W), on CPU or GPU.
        patch_size: the DiT's (t, h, w) patch; one token = one patch of latents.
        gop: the GOP the user asked for.
        frames: decoded source pixels (T, H, W, 3) uint8, if the caller has them.
        motion: codec motion vectors of the source video, if decoded with side data.
        temporal_factor: pixel frames per latent frame after the first (4 for Wan).
        seed: planners that draw random numbers fork a private generator from this.
        since_keyframe: the video continues a stream whose last keyframe was this many
            frames before its first (a streamed planning context): the GOP's ``keyint``
            counts from there (``Schedule.from_gop``). 0: the first frame starts the GOP.
        executed: the leading frames already planned and run (a stream's past): planners
            that honour it (every threshold planner) keep their decisions, chain new tokens
            onto them and guard against what they really copy; None: plan every frame.
    """

    latents: torch.Tensor
    patch_size: tuple[int, int, int] = (1, 2, 2)
    gop: GOP = attrs.field(factory=GOP)
    frames: np.ndarray | None = None
    motion: MotionField | None = None
    temporal_factor: int = TEMPORAL_FACTOR
    seed: int = 0
    since_keyframe: int = 0
    executed: ExecutedFrames | None = None

    def __attrs_post_init__(self):
        if self.latents.ndim != 4:
            raise ValueError(
                f"PlanContext.latents must be (C, F, H, W), got shape {tuple(self.latents.shape)}; "
                "use lipcodec.plan() for (B, C, F, H, W) batches"
            )
        grid = Grid.from_latents(self.latents.shape, self.patch_size)  # validates divisibility
        if self.executed is not None:
            self.executed.check(grid, self.latents.shape[0] * math.prod(self.patch_size))

    @property
    def grid(self) -> Grid:
        return Grid.from_latents(self.latents.shape, self.patch_size)

    @property
    def schedule(self) -> Schedule:
        """The GOP laid out on this video without scene cuts (planners add cuts themselves)."""
        return Schedule.from_gop(self.gop, self.grid.frames, since_keyframe=self.since_keyframe)

    def tokens(self) -> torch.Tensor:
        """Latents cut into tokens: (F', H', W', pt*ph*pw*C) float32, one vector per token.

        Values are ordered (pt, ph, pw, C) - the order Wan's ``proj_out`` gives each token."""
        return token_vectors(self.latents, self.patch_size)


def token_vectors(latents: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """:meth:`PlanContext.tokens` of latents (C, F, H, W): (F', H', W', pt*ph*pw*C) float32."""
    c, f, h, w = latents.shape
    pt, ph, pw = patch_size
    x = latents.float().view(c, f // pt, pt, h // ph, ph, w // pw, pw).permute(1, 3, 5, 2, 4, 6, 0)
    return x.reshape(f // pt, h // ph, w // pw, pt * ph * pw * c)


@runtime_checkable
class Planner(Protocol):
    """A pure function of a :class:`PlanContext`: no model access, no global state."""

    name: str

    def __call__(self, ctx: PlanContext) -> Plan: ...


_REGISTRY: dict[str, Callable[..., Planner]] = {}


def register_planner(name: str, *, replace: bool = False):
    """Class or factory decorator: ``lipcodec.planners.get(name, **params)`` builds it.

    >>> @register_planner("every-other", replace=True)
    ... def every_other(**params): ...
    """

    def decorate(factory):
        if not replace and name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a planner named {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available() -> list[str]:
    """Names of every registered planner, built-in and custom."""
    return sorted(_REGISTRY)


def _parameters(factory) -> tuple[str, ...] | None:
    """The keyword parameters a planner factory or class takes (None: any, it has ``**kwargs``)."""
    takes = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in takes):
        return None
    return tuple(p.name for p in takes if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "name")


def share_params(planners, params: dict) -> list[dict]:
    """Each planner's share of ``params``, for commands that run several planners with one
    set of parameters (``compare``, ``bench``): the keys its constructor takes (every key for
    a factory with ``**kwargs``, none for a planner object), so ``target_kept`` reaches
    ``lipar`` and ``motion`` and skips ``intra``. A key that no planner takes is an error."""
    shares = []
    for planner in planners:
        factory = _REGISTRY.get(planner) if isinstance(planner, str) else None
        if factory is None:  # an object, or an unknown name (get() says so when it is built)
            shares.append({} if not isinstance(planner, str) else dict(params))
            continue
        takes = _parameters(factory)
        shares.append({k: v for k, v in params.items() if takes is None or k in takes})
    unused = [key for key in params if not any(key in share for share in shares)]
    if unused:
        names = ", ".join(p if isinstance(p, str) else type(p).__name__ for p in planners)
        raise ValueError(f"planner parameter {', '.join(unused)}: none of the planners ({names}) takes it; "
                         "check the spelling, or add a planner that does")
    return shares


def get(name: str | Planner, **params: Any) -> Planner:
    """Build the planner registered as ``name`` with ``params`` (a planner object passes through)."""
    if not isinstance(name, str):
        if params:
            raise TypeError("parameters go to the planner's constructor; pass a name, not an instance, with them")
        return name
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; available: {', '.join(available())}") from None
    try:
        planner = factory(**params)
    except TypeError as error:
        takes = _parameters(factory)
        hint = "" if takes is None else f" ({name!r} takes {', '.join(takes) if takes else 'no parameters'})"
        raise TypeError(f"planner {name!r}: {error}{hint}") from None
    if getattr(planner, "name", None) is None:
        try:
            planner.name = name
        except AttributeError:
            pass
    return planner


def plan(
    latents: torch.Tensor,
    planner: str | Planner = "lipar",
    *,
    gop: GOP | str | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    frames: np.ndarray | None = None,
    motion: MotionField | None = None,
    temporal_factor: int = TEMPORAL_FACTOR,
    seed: int = 0,
    since_keyframe: int = 0,
    executed: ExecutedFrames | None = None,
    kept_multiple: int | None = None,
    **params: Any,
) -> Plan:
    """Plan one video from its clean latents, shaped (B, C, F, H, W) as diffusers' Wan takes them.

    ``gop`` is a :class:`GOP` or an x264 params string (``"keyint=8:bframes=2"``);
    ``params`` go to the planner (e.g. ``tau1=0.1`` or ``target_kept=0.68``). All videos of
    the batch must be the same (CFG or several samples of one source): a plan is per video.
    ``kept_multiple``: round the kept count up to a multiple of this (:meth:`Plan.padded`),
    so compiled models see a few sequence lengths. ``since_keyframe``: the latents continue
    a stream whose last keyframe was that many frames before them, ``executed`` says which
    of their leading frames already ran and how (:class:`PlanContext`).
    """
    if kept_multiple is not None:
        check_kept_multiple(kept_multiple)
    latents = torch.as_tensor(latents)
    if not torch.isfinite(latents.sum()) and not torch.isfinite(latents).all():  # a finite sum: all finite
        bad = (~torch.isfinite(latents)).nonzero()[0].tolist()
        dims = ("B", "C", "F", "H", "W")[-latents.ndim :] if latents.ndim <= 5 else ()
        where = f"({', '.join(dims)}) = {tuple(bad)}" if dims else str(tuple(bad))
        raise ValueError(f"latents contain NaN or Inf (first at index {where}); check the encoder")
    if latents.ndim == 5:
        if latents.shape[0] > 1 and not all(torch.equal(latents[0], x) for x in latents[1:]):
            raise ValueError(
                f"latents hold {latents.shape[0]} different videos; a plan is per video: "
                "call lipcodec.plan(latents[i:i+1]) for each"
            )
        latents = latents[0]
    elif latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, F, H, W) or (C, F, H, W), got shape {tuple(latents.shape)}")
    if isinstance(gop, str):
        gop = GOP.from_x264_params(gop)
    ctx = PlanContext(
        latents,
        tuple(patch_size),
        gop or GOP(),
        frames=frames,
        motion=motion,
        temporal_factor=temporal_factor,
        seed=seed,
        since_keyframe=since_keyframe,
        executed=executed,
    )
    result = get(planner, **params)(ctx)
    return result if kept_multiple is None else result.padded(kept_multiple)

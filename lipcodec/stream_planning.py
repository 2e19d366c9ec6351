"""The planning half of a stream: each chunk's plan, made on the frames that ran before it.

:class:`~lipcodec.streaming.StreamRunner` plans through a :class:`StreamPlanning`; without
a model it replays a stream's plans alone (``benchmarks/budget_search.py``)::

    planning = StreamPlanning("lipar", target_kept=0.68)
    for a in range(0, latents.shape[2], 3):
        chunk = planning.push(latents[:, :, a : a + 3])   # a ChunkPlan

Each chunk is planned with ``lipcodec.plan`` on the last ``plan_context`` frames of source
latents, the frames before the chunk given as they ran (:class:`ExecutedFrames`: what each
of their tokens copied and the vector of that computed token), the GOP's ``keyint`` counted
along the stream (``since_keyframe``) and a ``target_kept`` budget on the new frames only,
its search starting at the previous chunk's threshold scale (docs/streaming.md).
"""

from __future__ import annotations

import functools
import inspect
import time

import attrs
import torch

from .gop import GOP, TEMPORAL_FACTOR
from .planners import MotionField
from .planners import get as get_planner
from .planners import plan as make_plan
from .planners.reference import ReferencePlanner
from .planners.registry import ExecutedFrames, token_vectors


def causal_gop(gop: GOP | str | None) -> GOP | None:
    """``gop`` (x264 params or a GOP) if a stream can follow it; B-frames raise ValueError."""
    if isinstance(gop, str):
        gop = GOP.from_x264_params(gop)
    if gop is not None and gop.bframes:
        raise ValueError(
            f"GOP bframes={gop.bframes}: streaming is causal and B-frames reference frames that have not "
            "arrived yet; use bframes=0 (P-frames only)"
        )
    return gop


@attrs.frozen
class ChunkPlan:
    """One chunk's plan, per token of its frames (stream token ids: frame * tokens per frame + place)."""

    start: int  # the chunk's first stream frame
    frames: int
    rows: torch.Tensor  # (N,) the planning-context token each takes its output from (itself: computed)
    source: torch.Tensor  # (N,) the computed token it finally copies (may lie before the context)
    anchors: torch.Tensor | None  # (N, D) that token's vector (what later chunks' guards compare with); None: intra
    scale: float | None  # the target_kept search's threshold scale (the next search starts there)
    seconds: float  # host time of the planning
    keyframes: tuple[int, ...] = ()  # the chunk's frames its plan made keyframes

    @property
    def computed(self) -> torch.Tensor:
        """(N,) bool: the tokens this chunk computes."""
        n = len(self.source)
        return self.source == self.start * (n // self.frames) + torch.arange(n, device=self.source.device)

    @property
    def kept_ratio(self) -> float:
        return int(self.computed.sum()) / len(self.source)


@attrs.frozen
class _Inputs:
    """What planning the chunk at ``first``.. reads of the stream's state, taken when it starts
    (a worker thread may plan while the stream moves on)."""

    context: torch.Tensor  # (B, C, f, H, W) source latents of the planning context
    first: int  # its first stream frame
    search_from: float | None  # the last chunk's threshold scale
    since_keyframe: int  # frames from the stream's last keyframe at or before `first` to it
    executed: ExecutedFrames | None  # the context's frames before the chunk, as they ran
    sources: torch.Tensor  # (executed tokens,) the stream token each of them finally copies


class StreamPlanning:
    """Plans a stream chunk by chunk, as :class:`~lipcodec.streaming.StreamRunner` does.

    Args:
        planner: a planner name or object (``intra``: every token computed, nothing kept).
        chunk, plan_context, first_chunk: as in :class:`~lipcodec.streaming.StreamConfig`.
        gop: a GOP or x264 params; B-frames are refused (they reference the future).
        patch_size: the DiT's patch (t, h, w); t must be 1.
        motion: the source's codec motion vectors (pixel frame 0 = the stream's first).
        compile: a threshold planner (:class:`ReferencePlanner`) compiles its decisions on a
            GPU (its ``compile``; ``StreamRunner(compile=True)`` sets this).
        plan_kwargs: passed to :func:`lipcodec.plan`; ``target_kept`` is each new chunk's budget.
    """

    def __init__(self, planner="intra", *, chunk: int = 3, plan_context: int | None = 8, first_chunk: str = "full",
                 gop: GOP | str | None = None, patch_size=(1, 2, 2), motion: MotionField | None = None,
                 compile: bool = False, **plan_kwargs):
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r}: use an int >= 1 (latent frames per chunk)")
        if plan_context is not None and plan_context < chunk:
            raise ValueError(f"plan_context={plan_context} is shorter than chunk={chunk}")
        if first_chunk not in ("full", "prune"):
            raise ValueError(f"first_chunk={first_chunk!r}: use 'full' or 'prune'")
        self.planner, self.gop, self.motion, self.plan_kwargs = planner, causal_gop(gop), motion, plan_kwargs
        self.chunk, self.plan_context, self.first_chunk, self.compile = chunk, plan_context, first_chunk, compile
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.patch) != 3 or self.patch[0] != 1:
            raise ValueError(f"patch_size={patch_size!r}: a stream needs (1, h, w) - a temporal patch of 1")
        self.reset()

    def reset(self):
        """Forget the stream."""
        self.history: torch.Tensor | None = None  # (B, C, f, H, W) source latents from frame `first` on
        self.tokens_per_frame = 0  # known from the first chunk
        self.device = None
        self.first = 0  # first frame of the history (and of the anchors)
        self.frames = 0  # frames pushed to the history
        self.sources: dict[int, torch.Tensor] = {}  # frame -> (tpf,) the computed stream token each token copies
        self.anchors: torch.Tensor | None = None  # (f*tpf, D) from `first` on: the vectors of those tokens
        self.threshold_scale: float | None = None  # the last target_kept plan's: the next search starts there
        self.keyframes = [0]  # stream frames planned as keyframes (the GOP's keyint counts from the last)

    # -- the whole step ------------------------------------------------------------------------
    def push(self, source: torch.Tensor) -> ChunkPlan:
        """Plan the next chunk, source latents (B, C, S, H, W), and record it as run."""
        if source.ndim != 5:
            raise ValueError(f"source latents must be (B, C, S, H, W), got shape {tuple(source.shape)}")
        a, s = self.frames, source.shape[2]
        self.add(source)
        planned = self.plan(a, s)
        self.record(planned)
        self.trim(a + s)
        return planned

    # -- the parts (the runner interleaves them with its chunks) -------------------------------
    @property
    def intra(self) -> bool:
        return isinstance(self.planner, str) and self.planner == "intra"

    def add(self, source: torch.Tensor):
        """Add a chunk's source latents (B, C, S, H, W) to the history."""
        _, _, s, h, w = source.shape
        self.tokens_per_frame = (h // self.patch[1]) * (w // self.patch[2])
        self.device = source.device
        self.frames += s
        if not self.intra:
            self.history = source if self.history is None else torch.cat([self.history, source], 2)

    def inputs(self, a: int, s: int) -> _Inputs:
        """What planning the chunk at frame ``a`` reads, taken now: the planning context
        (frames [first, a + s)), its frames that already ran, where the budget search starts."""
        first, tpf = self.first, self.tokens_per_frame
        if self.plan_context is not None:
            first = max(first, a + self.chunk - self.plan_context)
        context = self.history[:, :, first - self.first : a + s - self.first]
        last_keyframe = max(k for k in self.keyframes if k <= first)
        done = a - first
        sources = torch.cat([self.sources[f] for f in range(first, a)]) if done else torch.zeros(
            0, dtype=torch.long, device=context.device)
        executed = None
        if done:
            local = sources - first * tpf
            anchors = self.anchors[(first - self.first) * tpf : (a - self.first) * tpf]
            executed = ExecutedFrames(done, torch.where(local < 0, -1, local), anchors)
        return _Inputs(context, first, self.threshold_scale, first - last_keyframe, executed, sources)

    def plan(self, a: int, s: int, inputs: _Inputs | None = None) -> ChunkPlan:
        """The chunk at frame ``a`` (``s`` frames, already added). Reads only ``inputs`` of the
        stream's state, so a worker thread may run it."""
        begin = time.perf_counter()
        tpf = self.tokens_per_frame
        n = s * tpf
        if self.intra:
            ids = torch.arange(a * tpf, (a + s) * tpf, device=self.device)
            return ChunkPlan(a, s, ids, ids, None, None, time.perf_counter() - begin)
        inputs = inputs or self.inputs(a, s)
        device = inputs.context.device
        ids = torch.arange(a * tpf, (a + s) * tpf, device=device)
        own = token_vectors(inputs.context[0, :, -s:], self.patch).reshape(n, -1)  # (N, D)
        if a == 0 and self.first_chunk == "full":
            return ChunkPlan(a, s, ids, ids, own, None, time.perf_counter() - begin)
        planner, kwargs = self._planner, self._plan_params[0]  # its parameters are in the object
        if isinstance(planner, ReferencePlanner) and planner.target_kept is not None:
            # the budget is the new chunk's, not the context's; its search starts at the last chunk's scale
            planner = attrs.evolve(
                planner, budget_frames=s if planner.budget_frames is None else planner.budget_frames,
                search_from=inputs.search_from if planner.search_from is None else planner.search_from)
        if self.motion is not None:  # the field from the context's first frame: latent frame f = pixel frame 4f
            first = inputs.first * kwargs.get("temporal_factor", TEMPORAL_FACTOR)
            kwargs = {**kwargs, "motion": attrs.evolve(self.motion, vectors=self.motion.vectors[first:],
                                                       picture_types=self.motion.picture_types[first:])}
        plan = make_plan(inputs.context, planner, gop=self.gop, patch_size=self.patch,
                         **{**kwargs, "since_keyframe": inputs.since_keyframe, "executed": inputs.executed})
        local = plan.source[-n:].to(device)  # (N,) context token ids
        rows = local + inputs.first * tpf
        types = plan.schedule.types
        keyframes = tuple(inputs.first + t for t in range(len(types) - s, len(types)) if types[t] in "Ii")
        ahead = rows // tpf > ids // tpf
        if ahead.any():
            i = int(ahead.nonzero()[0, 0])
            raise ValueError(
                f"planner {self.planner!r} made token {int(ids[i])} (frame {int(ids[i]) // tpf}) reuse token "
                f"{int(rows[i])} of a later frame: streaming plans may only reference the past (no B-frames)"
            )
        # what each token finally copies: a token that ran before copies what it copied (its
        # anchor), a token of this chunk itself
        source = torch.cat([inputs.sources.to(device), ids])[local]
        past = inputs.executed.anchors.to(own) if inputs.executed is not None else own[:0]
        anchors = torch.cat([past, own])[local]
        return ChunkPlan(a, s, rows, source, anchors, plan.meta.get("threshold_scale"), time.perf_counter() - begin,
                         keyframes)

    def record(self, planned: ChunkPlan):
        """Record the chunk's plan as what ran (before the next chunk is planned)."""
        self.threshold_scale = planned.scale if planned.scale is not None else self.threshold_scale
        self.keyframes += planned.keyframes
        if self.intra:
            return
        tpf = self.tokens_per_frame
        for f in range(planned.frames):
            self.sources[planned.start + f] = planned.source[f * tpf : (f + 1) * tpf]
        self.anchors = planned.anchors if self.anchors is None else torch.cat([self.anchors, planned.anchors])

    def trim(self, end: int, keep: set[int] = frozenset()) -> int:
        """After the chunk ending at frame ``end``: drop what no later planning context can
        reach (sources of frames in ``keep`` stay: the runner's cached frames). Returns how
        many frames left the history."""
        cut = 0
        if self.plan_context is not None and not self.intra:
            first = max(0, end + self.chunk - self.plan_context)
            if first > self.first:
                cut = first - self.first
                self.history = self.history[:, :, cut:]
                self.anchors = self.anchors[cut * self.tokens_per_frame :]
                self.first = first
        # the keyframe keyint counts from for any later context (they start at `first` or after)
        last_keyframe = max(k for k in self.keyframes if k <= self.first)
        self.keyframes = [k for k in self.keyframes if k >= last_keyframe]
        keep = set(keep) | set(range(self.first, end))
        self.sources = {f: v for f, v in self.sources.items() if f in keep}
        return cut

    # -- the planner -----------------------------------------------------------------------------
    @functools.cached_property
    def _plan_params(self) -> tuple[dict, dict]:
        """``plan_kwargs`` split into :func:`lipcodec.plan`'s own keywords and the planner's parameters."""
        own = inspect.signature(make_plan).parameters
        kwargs = self.plan_kwargs
        return {k: v for k, v in kwargs.items() if k in own}, {k: v for k, v in kwargs.items() if k not in own}

    @functools.cached_property
    def _planner(self):
        """The planner object, built once from its name and parameters; with ``compile`` a
        threshold planner compiles its decisions."""
        planner = get_planner(self.planner, **self._plan_params[1])  # an object passes through
        if self.compile and isinstance(planner, ReferencePlanner) and not planner.compile:
            planner = attrs.evolve(planner, compile=True)
        return planner

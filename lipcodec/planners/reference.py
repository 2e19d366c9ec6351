"""The engine behind every threshold planner: search references, decide, resolve chains.

A reference planner only says, for a frame t and a candidate reference frame r, which
token of r best predicts each token of t and how far apart they are (:meth:`match`).
The engine does the rest, the same way for every planner:

1. scene cuts: a frame where more than ``100 - scenecut`` percent of tokens changed
   against the previous frame becomes a keyframe (``GOP.scenecut``, ``min_keyint``);
2. the schedule: frame types and references from the GOP (B-frames, pyramid, ref);
3. per token, the best match over the frame's allowed references (a B-frame token takes
   its past or its future anchor, whichever matches better);
4. the decision: reuse when the distance is at most ``tau1`` (planners may smooth it first);
5. chains resolved in coding order, with the long-term guard: a token is only reused if
   it is within ``tau2`` of the computed token it finally copies;
6. ``target_kept``: the thresholds scaled together until the kept ratio meets a budget.

A context with :class:`~lipcodec.planners.registry.ExecutedFrames` (a stream's past) keeps
those frames' decisions: new tokens chain onto what really ran, and the guard measures
them against the token they finally copy, even one from before the context.
"""

from __future__ import annotations

import functools
import itertools
import math

import attrs
import torch

from ..gop import Schedule
from ..graphs import Graphs
from ..plan import Plan
from .ops import trimmed_l1, trimmed_l1_within
from .registry import PlanContext


def _unit_interval_or_none(instance, attribute, value):
    if value is not None and not (0.0 < value <= 1.0):
        raise ValueError(f"{attribute.name}={value} is out of range: use a kept ratio in (0, 1], or None")


def _non_negative_or_none(instance, attribute, value):
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name}={value} is out of range: use a finite threshold >= 0, or None to disable")


def _positive_or_none(instance, attribute, value):
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name}={value} is out of range: use a finite threshold scale > 0, or None")


def _float_or_none(value):
    return None if value is None or value == "none" else float(value)


@attrs.frozen
class Match:
    """Best candidate in one reference frame for every token of one frame."""

    distance: torch.Tensor  # (H*W,) trimmed L1 to the candidate; inf where there is none
    source: torch.Tensor  # (H*W,) flat token id of the candidate in the reference frame


@attrs.frozen(kw_only=True)
class ReferencePlanner:
    """Base for threshold planners. Subclasses implement :meth:`match_pairs`.

    Args:
        tau1: reuse a token when its best reference is at most this far (trimmed L1).
        tau2: long-term guard: never reuse a token farther than this from the computed
            token it finally copies (stops slow drift through chains); None disables.
        target_kept: instead of ``tau1``/``tau2`` as given, scale both until this share
            of tokens is kept (compare planners at equal budget); None = thresholds as given.
        reverify: after :meth:`postprocess`, check the guard again on the final sources, so
            that no reused token is farther than ``tau2`` from what it copies.
        budget_frames: ``target_kept`` counts only the last this many latent frames (the
            streaming runner sets it to the new chunk: the budget is the chunk's, not its
            planning context's); None = the whole video.
        search_from: ``target_kept`` starts its search at this threshold scale (a plan's
            ``meta["threshold_scale"]``; the streaming runner passes the previous chunk's)
            and steps out from it until the budget is bracketed: a few decisions instead of
            a search over 2^-12..2^12. None = the search over 2^-12..2^12.
        compile: on a GPU, ``torch.compile`` each decision before its CUDA graph is captured
            (:class:`~lipcodec.graphs.Graphs`): fewer, fused kernels per decision, the same
            plans; the first capture of each context length and grid compiles for seconds. Pays
            when decisions repeat many times - a stream (``StreamRunner(compile=True)``
            sets it).
    """

    tau1: float = attrs.field(default=0.15, converter=float, validator=_non_negative_or_none)
    tau2: float | None = attrs.field(default=0.3, converter=_float_or_none, validator=_non_negative_or_none)
    target_kept: float | None = attrs.field(default=None, converter=_float_or_none, validator=_unit_interval_or_none)
    reverify: bool = True
    trim: tuple[float, float] = attrs.field(default=(0.2, 0.8), converter=lambda v: tuple(float(x) for x in v))
    budget_frames: int | None = attrs.field(default=None, converter=lambda v: None if v in (None, "none") else int(v))
    search_from: float | None = attrs.field(default=None, converter=_float_or_none, validator=_positive_or_none)
    compile: bool = False
    name: str = "reference"

    # -- what a planner provides -------------------------------------------------------------
    def match_pairs(self, ctx: PlanContext, tokens: torch.Tensor, pairs: list[tuple[int, int]]) -> list[Match]:
        """For each (t, r): the best token of frame r for every token of frame t."""
        raise NotImplementedError

    def score(self, ctx: PlanContext, short_term: torch.Tensor) -> torch.Tensor:
        """Change score per token from the best-match distance volume (F, H, W); a token is
        reused where ``score <= tau1``. Default: the distance itself."""
        return short_term

    def postprocess(self, reuse: torch.Tensor) -> torch.Tensor:
        """Final clean-up of the reuse mask (F, H, W) after the guard; default: none."""
        return reuse

    # -- the engine --------------------------------------------------------------------------
    def __call__(self, ctx: PlanContext) -> Plan:
        tokens = ctx.tokens()  # (F, H, W, D)
        cache: dict = {}  # (t, r) -> Match; ("references", schedule letters) -> _References; ("change",) -> (F - 1, HW)

        def matches(pairs):
            todo = [p for p in dict.fromkeys(pairs) if p not in cache]
            if todo:
                cache.update(zip(todo, self.match_pairs(ctx, tokens, todo)))
            return [cache[p] for p in pairs]

        if self.target_kept is None:
            decision = self._decide(ctx, tokens, matches, cache, 1.0)
        else:
            decision = self._search_budget(ctx, tokens, matches, cache)
        meta = {"planner": self.name, "params": _params(self), "gop": str(ctx.gop), "threshold_scale": decision.scale}
        if self.target_kept is not None:
            meta["target_kept"] = self.target_kept
        return Plan(ctx.grid, decision.source, decision.schedule, meta=meta)  # validated once, not per decision

    def _decide(self, ctx, tokens, matches, cache, scale: float) -> Decision:
        grid, gop = ctx.grid, ctx.gop
        f, hw = grid.frames, grid.tokens_per_frame
        done = 0 if ctx.executed is None else ctx.executed.frames  # leading frames already decided
        tau = self.tau1 * scale
        tau2 = None if self.tau2 is None else self.tau2 * scale
        device = tokens.device

        # 1. scene cuts and B-frame adaptation look at frame-to-frame change
        change = None
        if f > 1 and (gop.scenecut or gop.b_adapt):
            if ("change",) not in cache:
                cache["change",] = torch.stack([m.distance for m in matches([(t, t - 1) for t in range(1, f)])])
            changed = cache["change",] > tau  # (F - 1, HW)
            change = [0.0] + changed.float().mean(1).tolist()  # one device sync
        cuts = [t for t in range(max(1, done), f) if gop.scenecut and change[t] * 100 > 100 - gop.scenecut]
        schedule = Schedule.from_gop(gop, f, cuts=cuts, change=change, since_keyframe=ctx.since_keyframe)

        # 2. best reference per token and the change score: they depend on the schedule, not
        # on the thresholds, so a budget search makes them once per schedule
        key = ("references", schedule.types)
        if key not in cache:
            cache[key] = self._references(ctx, matches, schedule, device)
        refs = cache[key]

        # 3. decide, guard, clean up, resolve: a fixed-shape tensor function of the thresholds,
        # captured in a CUDA graph once a key repeats (a budget search, the chunks of a stream)
        if ("guarded",) not in cache:  # what the guard compares with: executed tokens' anchors
            flat = tokens.reshape(f * hw, -1)
            cache["guarded",] = flat if not done else torch.cat([ctx.executed.anchors.to(flat), flat[done * hw :]])
        thresholds = [torch.full((), v, dtype=torch.float32, device=device) for v in (tau, tau2 or 0.0)]
        inputs = (cache["guarded",], refs.distance, refs.source, refs.keyframe, refs.score, refs.eligible, refs.ids,
                  refs.executed, refs.direct, *thresholds)
        shape = (grid.height, grid.width)
        # a chain holds at most one token per frame left to decide, and each round settles one
        # more failure on it: one round more than those frames always settles
        rounds = min(_GRAPH_ROUNDS, f - done + 1)
        graph_key = self._graph_key(schedule, shape, rounds)
        settle = functools.partial(self._settle, schedule, shape)
        eager = functools.partial(settle, None)  # as many rounds as the chains need
        source, settled = eager(*inputs) if graph_key is None else DECISION_GRAPHS(
            graph_key, functools.partial(settle, rounds), *inputs, first=eager, compile=self.compile)
        if not bool(settled):  # chains that needed more rounds than the graph holds
            source, _ = eager(*inputs)
        return Decision(source, schedule, scale)

    def _graph_key(self, schedule, shape, rounds):
        """What a captured decision depends on besides its inputs; None: run it eagerly (the
        planner's ``postprocess`` is not marked :func:`~lipcodec.graphs.graph_safe`, or a
        parameter cannot be hashed). Of the schedule only its length: on a GPU the decision
        resolves chains by pointer jumping (:func:`_resolve_rounds`), the frame types are
        its inputs (``keyframe``), so schedules of one length share a graph (a scene cut or
        a keyframe moving through a stream's context makes no new one)."""
        post = type(self).postprocess
        if post is not ReferencePlanner.postprocess and not getattr(post, "graph_safe", False):
            return None
        key = (type(self), _params(self, search=False), len(schedule), shape, rounds)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _settle(self, schedule, shape, rounds, flat, distance, best_source, keyframe, score, eligible, ids, executed,
                direct, tau, tau2):
        """The decision at thresholds ``tau``, ``tau2`` (0-d tensors; ``tau2`` unused without
        a guard) on a grid of ``shape`` (H, W) per frame: every token's final source, and
        whether the chains settled in ``rounds`` rounds on a GPU (None: as many as it takes).
        ``flat``: the token vectors the guard compares (executed tokens: their anchors).
        No host syncs with ``rounds`` set."""
        f, hw = best_source.shape
        guard = tau2 if self.tau2 is not None else None
        short_reuse = score <= tau
        reuse = (short_reuse | executed) & eligible  # executed tokens: eligible = they were reused
        memo = _GuardMemo(f * hw, flat.device)  # the second resolve re-checks mostly the same pairs
        if guard is not None:  # a chain that ends at the direct reference: its match distance; executed tokens ran
            memo.final, memo.ok = direct.clone(), executed.flatten() | (distance <= guard).flatten()
        source, settled = _resolve(schedule, flat, best_source, reuse, guard, self.trim, memo, rounds)
        if type(self).postprocess is ReferencePlanner.postprocess:  # no clean-up: nothing to resolve again
            return source, settled
        # keyframes are computed by type, not by change: in the clean-up they vote with their
        # own change against the previous frame, and so do executed frames (a stream's first
        # chunk ran in full, or they were keyframes there); both are forced back below. When
        # the clean-up changes nothing, resolving again gives the same sources (every verdict
        # is known), so it runs unconditionally: no host sync to ask
        by_change = keyframe[:, None] | executed
        reused = torch.where(by_change, short_reuse, (source != ids).reshape(f, hw))
        final = self.postprocess(reused.reshape(f, *shape))
        final = (final.reshape(f, hw) | executed) & eligible
        source, again = _resolve(schedule, flat, best_source, final, guard if self.reverify else None, self.trim, memo,
                                 rounds)
        return source, settled & again

    def _references(self, ctx, matches, schedule: Schedule, device) -> _References:
        """Best reference per token over the allowed references (keyframes: none), and the
        change score the decision thresholds."""
        grid = ctx.grid
        f, hw = grid.frames, grid.tokens_per_frame
        best_distance = torch.full((f, hw), math.inf, device=device)
        best_source = torch.arange(f * hw, device=device).reshape(f, hw)
        pairs = [(t, r) for t in range(f) for r in schedule.refs[t]]
        if pairs:  # (frame, rank) slots, inf where a frame has fewer references; argmin over rank
            found = matches(pairs)
            rank = [schedule.refs[t].index(r) for t, r in pairs]
            slots = torch.full((f, max(rank) + 1, hw), math.inf, device=device)  # (F, R, HW)
            where = (torch.tensor([t for t, _ in pairs]), torch.tensor(rank))
            slots[where] = torch.stack([m.distance for m in found])
            ids = torch.zeros((f, max(rank) + 1, hw), dtype=torch.long, device=device)
            ids[where] = torch.stack([m.source for m in found])
            pick = slots.argmin(1, keepdim=True)  # first (nearest) reference wins ties
            has_ref = torch.tensor([bool(refs) for refs in schedule.refs], device=device)[:, None]
            best_distance = torch.where(has_ref, slots.gather(1, pick)[:, 0], best_distance)
            best_source = torch.where(has_ref, ids.gather(1, pick)[:, 0], best_source)
        # keyframes have no reference; for filters that look back, use the change to t-1
        short_term = best_distance.clone()
        for t in range(f):
            if not schedule.refs[t]:
                short_term[t] = matches([(t, t - 1)])[0].distance if t > 0 else 0.0
        short_term = short_term.nan_to_num(posinf=1e6).reshape(grid.frames, grid.height, grid.width)
        keyframe = torch.tensor([not refs for refs in schedule.refs], device=device)
        eligible = torch.isfinite(best_distance) & ~keyframe[:, None]
        ids = torch.arange(f * hw, device=device)
        executed = torch.zeros((f, hw), dtype=torch.bool, device=device)
        direct = best_source.flatten()  # the final source a token's match distance gives the guard verdict for
        if ctx.executed is not None and ctx.executed.frames:  # their decisions as they ran
            done = ctx.executed.frames
            ran = ctx.executed.source.to(device)
            before = ran < 0  # copied a token from before the context: a root here, anchored
            parent = torch.where(before, ids[: done * hw], ran)
            best_source, eligible = best_source.clone(), eligible.clone()
            best_source[:done] = parent.reshape(done, hw)
            eligible[:done] = (before | (parent != ids[: done * hw])).reshape(done, hw)
            executed[:done] = True
            anchored = torch.zeros(f * hw, dtype=torch.bool, device=device)
            anchored[: done * hw] = before
            direct = torch.where(anchored[direct], -1, direct)  # their anchor is not the match
            direct[: done * hw] = parent  # executed tokens: the root they copy, a known pass (_settle)
        return _References(best_distance, best_source, keyframe, self.score(ctx, short_term).reshape(f, hw),
                           eligible, ids, executed, direct)

    def _search_budget(self, ctx, tokens, matches, cache) -> Decision:
        """Search a common scale of the thresholds (log2 space) for ``target_kept``: bracket
        it (2^-12..2^12, or step out from ``search_from`` until the budget is crossed), then
        narrow the bracket - by halves while it is wide or an end is unmeasured, then where
        the line between the ends' kept ratios crosses the budget (regula falsi, Illinois
        variant: an end that stays twice counts half, so the steps keep closing in)."""
        grid, target = ctx.grid, self.target_kept
        frames = grid.frames if self.budget_frames is None else max(1, min(self.budget_frames, grid.frames))
        found: list = [None, None]  # the decision nearest the budget and its kept ratio
        excess: dict[float, float] = {}  # log2 scale -> kept ratio - target, as measured

        def kept_at(log_scale: float) -> float:  # kept ratio over the budgeted (last) frames
            decision = self._decide(ctx, tokens, matches, cache, 2.0**log_scale)
            ratio = float(decision.computed[-frames * grid.tokens_per_frame :].float().mean())
            excess[log_scale] = ratio - target
            if found[0] is None or abs(ratio - target) < abs(found[1] - target):
                found[:] = decision, ratio
            return ratio

        def done() -> bool:  # within an eighth of a frame's tokens of the budget: good enough
            return abs(found[1] - target) * frames < 0.5 / 8

        lo, hi = -12.0, 12.0  # kept ratio falls as the scale grows
        if self.search_from is not None:
            start = min(max(math.log2(self.search_from), lo), hi)
            up = kept_at(start) > target  # too many kept: the scale must grow
            step, edge = 0.25, start
            while not done() and lo < edge < hi:
                if up:
                    lo, edge = edge, min(edge + step, hi)
                else:
                    hi, edge = edge, max(edge - step, lo)
                if (kept_at(edge) > target) != up:  # bracketed between the last two scales
                    lo, hi = (lo, edge) if up else (edge, hi)
                    break
                step *= 2
        e_lo, e_hi, moved = excess.get(lo), excess.get(hi), None  # e_lo > 0 >= e_hi once measured
        for _ in range(24):
            if found[0] is not None and done():
                break
            mid = (lo + hi) / 2
            if e_lo is not None and e_hi is not None and e_lo > e_hi and hi - lo <= 2.0:
                margin = (hi - lo) / 32  # a step that barely moves an end would waste a decision
                mid = min(max(lo + (hi - lo) * e_lo / (e_lo - e_hi), lo + margin), hi - margin)
            if kept_at(mid) > target:
                lo, e_lo = mid, excess[mid]
                e_hi = e_hi / 2 if e_hi is not None and moved == "lo" else e_hi
                moved = "lo"
            else:
                hi, e_hi = mid, excess[mid]
                e_lo = e_lo / 2 if e_lo is not None and moved == "hi" else e_lo
                moved = "hi"
        return found[0]


@attrs.frozen
class _References:
    """What a decision needs that does not depend on the thresholds, per schedule."""

    distance: torch.Tensor  # (F, HW) distance to the best reference; inf for keyframes
    source: torch.Tensor  # (F, HW) token id of the best reference (itself for keyframes)
    keyframe: torch.Tensor  # (F,) bool
    score: torch.Tensor  # (F, HW) the planner's change score (reuse where <= tau1)
    eligible: torch.Tensor  # (F, HW) has a reference and is not in a keyframe; executed: was reused
    ids: torch.Tensor  # (F * HW,) arange: token ids
    executed: torch.Tensor  # (F, HW) bool: decided before (ExecutedFrames), kept as it ran
    direct: torch.Tensor  # (F * HW,) the final source whose guard verdict is known up front (-1: none)


@attrs.frozen
class Decision:
    """One decision at one threshold scale: every token's final source (chains resolved,
    the guard applied), not yet validated as a :class:`Plan` - a budget search makes
    several and keeps one."""

    source: torch.Tensor  # (F * H * W,) token ids
    schedule: Schedule
    scale: float

    @property
    def computed(self) -> torch.Tensor:
        return self.source == torch.arange(len(self.source), device=self.source.device)


class _GuardMemo:
    """Guard verdicts already computed: ``final[i]`` is the source token i was checked
    against (-1: never), ``ok[i]`` the verdict. Same thresholds within one decision."""

    def __init__(self, n: int, device):
        self.final = torch.full((n,), -1, dtype=torch.long, device=device)
        self.ok = torch.zeros(n, dtype=torch.bool, device=device)

    def check(self, flat, ids, final, tau2, trim) -> torch.Tensor:
        """Guard verdict for tokens ``ids`` (None: all) copying ``final``; computes only the new pairs."""
        if ids is None:  # every token: no gathers
            fresh = trimmed_l1(flat, flat[final], *trim) <= tau2
            verdict = torch.where(self.final == final, self.ok, fresh)
            self.final, self.ok = final, verdict
            return verdict
        verdict = self.ok[ids].clone()  # the CPU's loop: only the tokens not checked before
        new = (self.final[ids] != final).nonzero().flatten()
        if len(new):
            verdict[new] = trimmed_l1_within(flat[ids[new]], flat[final[new]], tau2, *trim)
        self.final[ids], self.ok[ids] = final, verdict
        return verdict


def _resolve(schedule, flat, best_source, reuse, tau2, trim, memo: _GuardMemo, rounds: int | None = None):
    """Point reused tokens at the computed token their reference finally copies (coding order).

    With ``tau2``, a token whose final source is farther than ``tau2`` is computed instead
    (verdicts the ``memo`` holds are not checked again: executed frames' tokens pass).
    The definition is the loop over frames in coding order (the CPU runs it, checking only
    the candidates); a GPU gets the same result from :func:`_resolve_rounds`. Returns the
    sources and whether they settled (a 0-d bool tensor; False only on a GPU given too few
    ``rounds``).
    """
    if flat.is_cuda:
        return _resolve_rounds(len(schedule), flat, best_source, reuse, tau2, trim, memo, rounds)
    f, hw = best_source.shape
    source = torch.arange(f * hw, device=flat.device)
    for t in schedule.coding_order:
        if not schedule.refs[t]:
            continue
        ids = torch.arange(t * hw, (t + 1) * hw, device=flat.device)
        final = source[best_source[t]]  # references are coded earlier: already resolved
        use = reuse[t].nonzero().flatten()
        if tau2 is not None:
            use = use[memo.check(flat, ids[use], final[use], tau2, trim)]
        source[ids[use]] = final[use]
    return source, torch.ones((), dtype=torch.bool)


def _resolve_rounds(frames: int, flat, best_source, reuse, tau2, trim, memo: _GuardMemo, rounds: int | None = None):
    """:func:`_resolve` for the whole video at once, in rounds of pointer jumping.

    Each round follows every candidate's chain to its end (log2(frames) jumps), guards all
    tokens in one batch, and makes computed the *first* failures on each chain - those have
    no failing token before them, so their verdict is the loop's. Later tokens of a chain
    are judged again next round against their new end. Rounds = 1 + the most guard failures
    on one chain (1-15 on 21-frame contexts of real footage, most 4-7; at most 1 + the frames
    left to decide) instead of one step per frame in coding order. ``rounds=None``: until no chain fails, one host sync per round;
    ``rounds=k``: exactly k rounds and no sync (a CUDA graph can hold them), settled if the
    last round found no failure - once settled, a round changes nothing.
    """
    n = best_source.numel()
    ids = torch.arange(n, device=flat.device)
    parent = torch.where(reuse.flatten(), best_source.flatten(), ids)
    jumps = max(frames - 1, 1).bit_length()  # chains are at most `frames` long
    settled = torch.ones((), dtype=torch.bool, device=flat.device)  # what the returns inside the loop report
    for _ in itertools.count() if rounds is None else range(rounds):
        hops = [parent]  # hops[k][i]: the token 2^k steps up i's chain
        for _ in range(jumps):
            hops.append(hops[-1][hops[-1]])
        final = hops[-1]
        if tau2 is None:
            return final, settled
        # linked tokens are candidates (others point at themselves), and a chain's root is
        # never bad: neither needs masking again
        bad = (parent != ids) & ~memo.check(flat, None, final, tau2, trim)
        before = bad[parent]  # some token before it on its chain fails
        for hop in hops[:-1]:
            before = before | before[hop]
        first = bad & ~before
        if rounds is None and not bool(first.any()):
            return final, settled
        parent = torch.where(first, ids, parent)
    return final, ~first.any()  # the last round found no failure: settled (a round after changes nothing)


def _params(planner, search: bool = True):
    """The planner's parameters as a dict; ``search=False``: as a hashable tuple without the
    budget search's, which only change the thresholds a decision is given (a decision's
    graph is keyed on it; the scaled thresholds are the graph's inputs)."""
    if search:
        return {a.name: getattr(planner, a.name) for a in attrs.fields(type(planner)) if a.name != "name"}
    return tuple((a.name, getattr(planner, a.name)) for a in attrs.fields(type(planner)) if a.name not in _SEARCH)


_SEARCH = {"name", "target_kept", "budget_frames", "search_from"}
_GRAPH_ROUNDS = 10  # the most chain-resolution rounds a captured decision runs: 94-98% of 21-frame contexts' resolves
DECISION_GRAPHS = Graphs()  # captured decisions, keyed by planner, schedule length and grid (docs/planners.md)

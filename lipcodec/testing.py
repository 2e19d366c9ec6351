"""The public contract every planner, built-in or custom, must pass: :func:`check_planner`.

A planner is a pure function of a :class:`~lipcodec.PlanContext`. ``check_planner`` runs it
on :func:`standard_clips` under :data:`STANDARD_GOPS` and checks each rule below; a broken
rule raises :class:`ContractError` naming the rule, the clip and the GOP.

==========================  ===============================================================
rule                        what it asks
==========================  ===============================================================
runs                        the planner returns without raising
returns a Plan              the result is a :class:`~lipcodec.Plan` on the context's grid
valid plan                  rebuilding it from ``plan.source``/``plan.schedule`` raises nothing
keyframes intact            frame 0 is a keyframe; every token of ``I``/``i`` frames is computed
schedule respected          every reused token copies from a frame in ``schedule.reachable``
schedule follows the GOP    keyframes at most ``keyint`` apart; no B-frames when
                            ``bframes=0``; B runs at most ``bframes`` long; no referenced
                            ``B`` without ``b_pyramid``; no ``i`` without ``open_gop``;
                            ``schedule.ref <= gop.ref``
context unchanged           ``ctx.latents`` is not modified
determinism                 the same context twice gives the same plan
purity                      the plan does not depend on the global torch/numpy/random RNGs
==========================  ===============================================================
"""

from __future__ import annotations

import importlib.util
import random
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import numpy as np
import torch

from .gop import GOP, Schedule
from .plan import Grid, Plan, PlanError
from .planners import MotionField, PlanContext, Planner, get

#: GOP labels and settings every planner is checked under ("default" is ``GOP()``).
STANDARD_GOPS: tuple[str, ...] = (
    "default",
    "keyint=4",
    "keyint=8:bframes=2:b-pyramid=normal",
    "bframes=3:b-pyramid=strict:open-gop=1",
    "scenecut=40",
)

_GLOBAL_SEEDS = (0, 0, 12345)  # runs 1 and 2: determinism; runs 1 and 3: purity


class ContractError(AssertionError):
    """A planner broke a rule of the planner contract (see :mod:`lipcodec.testing`)."""


def standard_clips(
    *, channels: int = 16, frames: int = 9, height: int = 8, width: int = 12, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Small synthetic latent clips, (C, F, H, W) float32, ready for a :class:`PlanContext`.

    - ``still``: one random image repeated on every frame (every token equals its predecessor);
    - ``pan``: a random texture sliding left by exactly one token (2 latent columns, patch
      (1, 2, 2)) per frame: token (t, r, c) equals token (t-1, r, c+1);
    - ``cut``: one still image up to frame ``frames // 2``, another one from ``frames // 2 + 1``;
    - ``noise``: independent standard normal values everywhere.

    >>> {name: tuple(x.shape) for name, x in standard_clips().items()}["pan"]
    (16, 9, 8, 12)
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    still = randn(channels, 1, height, width).expand(-1, frames, -1, -1)
    texture = randn(channels, height, width + 2 * (frames - 1))
    pan = torch.stack([texture[:, :, 2 * t : 2 * t + width] for t in range(frames)], 1)  # (C, F, H, W)
    cut_at = frames // 2 + 1
    scene_a, scene_b = randn(channels, 1, height, width), randn(channels, 1, height, width)
    cut = torch.cat([scene_a.expand(-1, cut_at, -1, -1), scene_b.expand(-1, frames - cut_at, -1, -1)], 1)
    noise = randn(channels, frames, height, width)
    return {name: x.contiguous() for name, x in {"still": still, "pan": pan, "cut": cut, "noise": noise}.items()}


# Transformer configs (diffusers WanTransformer3DModel kwargs) for tests and benchmarks
WAN_1_3B = dict(  # Wan2.1-T2V-1.3B: 12 heads x 128, 30 blocks (random weights in benchmarks)
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # Wan2.1-T2V-14B: 40 x 128, 40 blocks
TINY_WAN = dict(  # diffusers' own tiny Wan test config, with Wan's 16 latent channels
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)


def load_script(path) -> types.ModuleType:
    """A script of the repository (``benchmarks/``, ``scripts/``: not a package) as a module -
    for the tests and for the benchmarks that reuse one another."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_place_plan(grid, reuse: float, seed: int = 0) -> Plan:
    """Frame 0 computed; a seeded share ``reuse`` of the other tokens reuses the same-place
    token of the previous frame (schedule ``IPP...P``). For executor tests and benchmarks."""
    grid = Grid.of(grid)
    g = torch.Generator().manual_seed(seed)
    source = torch.arange(grid.size)
    ids = torch.arange(grid.tokens_per_frame, grid.size)
    reused = ids[torch.rand(ids.numel(), generator=g) < reuse]
    source[reused] = reused - grid.tokens_per_frame
    return Plan(grid, source, Schedule.parse("I" + "P" * (grid.frames - 1)), meta={"planner": "same-place"})


def standard_motion(name: str, frames: int = 9, height: int = 8, width: int = 12) -> MotionField:
    """The codec motion field an encoder would report for a standard clip (patch (1, 2, 2),
    Wan's 4x/8x VAE: one 16 px block per token, 4 pixel frames per latent frame).

    ``pan`` moves one token (16 px) per latent frame: its content came from 4 px to the
    right in the previous pixel frame. ``still`` and ``cut`` have zero motion (the cut's
    first frame is intra-coded: no vectors); ``noise`` has no usable vectors at all.
    """
    t, hb, wb = 4 * (frames - 1) + 1, height // 2, width // 2
    vectors = np.zeros((t, hb, wb, 2), np.float32)
    vectors[0] = np.nan  # frame 0 is an I-frame
    if name == "pan":
        vectors[1:, :, :, 1] = 4.0
    elif name == "cut":
        vectors[4 * (frames // 2 + 1) - 3] = np.nan
    elif name == "noise":
        vectors[:] = np.nan
    return MotionField(vectors, 16, (16 * hb, 16 * wb))


def check_planner(
    planner: str | Planner | Callable,
    *,
    clips: Mapping[str, torch.Tensor | PlanContext] | None = None,
    gops: Sequence[str | GOP] = STANDARD_GOPS,
) -> dict[tuple[str, str], Plan]:
    """Run ``planner`` on every clip under every GOP and check the planner contract.

    Important:
        planner: a planner object or a registered name (built with default parameters).
        clips: name -> latents (C, F, H, W) or a :class:`PlanContext` (its ``gop`` is
            replaced by each GOP); default :func:`standard_clips` with patch (1, 2, 2) and
            their :func:`standard_motion`, so planners that read codec vectors run too.

    To tinker with:
        gops: x264 params strings, ``"default"`` or :class:`GOP` objects.

    Returns the plans, keyed by (clip name, GOP label). Raises :class:`ContractError`
    (an ``AssertionError``) at the first broken rule. Global RNG states are restored.

    >>> import torch
    >>> from lipcodec import Plan, register_planner
    >>> @register_planner("doc-nearest-ref", replace=True)
    ... def nearest_ref(threshold: float = 0.05):
    ...     def planner(ctx):
    ...         schedule = ctx.schedule
    ...         tokens = ctx.tokens()  # (F, H, W, D)
    ...         ids = torch.arange(ctx.grid.size).reshape(tokens.shape[:3])
    ...         source = ids.clone()
    ...         for t, refs in enumerate(schedule.refs):
    ...             if refs:  # the nearest past reference, same place
    ...                 same = (tokens[t] - tokens[refs[0]]).abs().mean(-1) < threshold
    ...                 source[t][same] = ids[refs[0]][same]
    ...         return Plan(ctx.grid, source, schedule, meta={"planner": "doc-nearest-ref"})
    ...     planner.name = "doc-nearest-ref"
    ...     return planner
    >>> plans = check_planner("doc-nearest-ref")
    >>> round(plans["still", "default"].kept_ratio, 3)  # only frame 0 computed
    0.111
    >>> from lipcodec import Schedule
    >>> def one_keyframe(ctx):  # ignores the GOP: a single keyframe whatever keyint says
    ...     return Plan.identity(ctx.grid, Schedule.parse("I" + "P" * (ctx.grid.frames - 1)))
    >>> check_planner(one_keyframe, gops=["keyint=4"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lipcodec.testing.ContractError: planner one_keyframe broke [schedule follows the GOP] on clip 'still' under GOP 'keyint=4': ...
    """
    planner = get(planner)
    label = getattr(planner, "name", None) or getattr(planner, "__name__", None) or repr(planner)
    if clips is None:  # the standard clips come with the motion vectors a codec would report
        clips = {name: PlanContext(x, (1, 2, 2), motion=standard_motion(name, *x.shape[1:])) for name, x in standard_clips().items()}
    plans: dict[tuple[str, str], Plan] = {}
    rng_states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        for gop_spec in gops:
            gop_label, gop = _gop(gop_spec)
            for clip_name, clip in clips.items():
                ctx = _context(clip, gop)

                def fail(rule: str, detail: str) -> ContractError:
                    return ContractError(
                        f"planner {label} broke [{rule}] on clip {clip_name!r} under GOP {gop_label!r}: {detail}"
                    )

                plans[clip_name, gop_label] = _check_one(planner, ctx, fail)
    finally:
        torch.random.set_rng_state(rng_states[0])
        np.random.set_state(rng_states[1])
        random.setstate(rng_states[2])
    return plans


# ---------------------------------------------------------------------------------------
def _gop(spec: str | GOP) -> tuple[str, GOP]:
    if isinstance(spec, GOP):
        return str(spec), spec
    return spec, GOP() if spec == "default" else GOP.from_x264_params(spec)


def _context(clip: torch.Tensor | PlanContext, gop: GOP) -> PlanContext:
    if isinstance(clip, PlanContext):
        return attrs.evolve(clip, gop=gop)
    return PlanContext(clip, (1, 2, 2), gop)


def _seed_globals(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # CPU only: a CUDA RNG user is caught by determinism
    np.random.seed(seed)
    random.seed(seed)


def _run(planner, ctx: PlanContext, seed: int, original: torch.Tensor, fail) -> Plan:
    _seed_globals(seed)
    try:
        plan = planner(ctx)
    except PlanError as error:
        raise fail("valid plan", f"building the plan raised PlanError: {error}") from error
    except Exception as error:
        raise fail("runs", f"the planner raised {type(error).__name__}: {error}") from error
    if not torch.equal(ctx.latents, original):
        changed = int((ctx.latents != original).sum())
        raise fail("context unchanged", f"the planner modified ctx.latents in place ({changed} values changed)")
    if not isinstance(plan, Plan):
        raise fail("returns a Plan", f"the planner returned {type(plan).__name__}, not a lipcodec.Plan")
    return plan


def _check_one(planner, ctx: PlanContext, fail) -> Plan:
    original = ctx.latents.clone()
    first = _run(planner, ctx, _GLOBAL_SEEDS[0], original, fail)
    _check_plan(first, ctx, fail)
    again = _run(planner, ctx, _GLOBAL_SEEDS[1], original, fail)
    if not _same(first, again):
        raise fail("determinism", f"the same context gave two different plans ({_diff(first, again)})")
    reseeded = _run(planner, ctx, _GLOBAL_SEEDS[2], original, fail)
    if not _same(first, reseeded):
        raise fail(
            "purity",
            "the plan changed when only the global torch/numpy/random seeds changed "
            f"({_diff(first, reseeded)}): fork a private generator from ctx.seed",
        )
    return first


def _check_plan(plan: Plan, ctx: PlanContext, fail) -> None:
    grid = plan.grid
    if tuple(grid) != tuple(ctx.grid):
        raise fail("returns a Plan", f"the plan's grid {tuple(grid)} is not the context's {tuple(ctx.grid)}")
    source = plan.source.cpu()
    if source.shape != (grid.size,) or len(plan.schedule) != grid.frames:
        raise fail("valid plan", f"{source.numel()} sources and schedule {plan.schedule.types!r} for grid {tuple(grid)}")

    # the two rules a plan exists for, checked on plan.source itself (Plan validates only on construction)
    types = plan.schedule.types
    token_ids = torch.arange(grid.size)
    frame_of, src_frame = token_ids // grid.tokens_per_frame, source // grid.tokens_per_frame
    if types[0] not in "Ii":
        raise fail("keyframes intact", f"frame 0 is {types[0]!r}, not a keyframe (schedule {types!r})")
    for i in (source != token_ids).nonzero().flatten().tolist():
        t, s = int(frame_of[i]), int(src_frame[i])
        if types[t] in "Ii":
            raise fail("keyframes intact", f"token {i} of keyframe {t} ({types[t]}) reuses token {int(source[i])}")
        if s not in plan.schedule.reachable[t]:
            raise fail(
                "schedule respected",
                f"token {i} in frame {t} ({types[t]}) copies from frame {s}, outside its reachable frames "
                f"{sorted(plan.schedule.reachable[t])} (schedule {types!r})",
            )

    try:
        rebuilt = Plan(grid, plan.source, plan.schedule, shift=plan.shift)
    except (PlanError, TypeError) as error:
        raise fail("valid plan", f"rebuilding the plan raised {type(error).__name__}: {error}") from error
    if not torch.equal(rebuilt.source.cpu(), source):
        raise fail("valid plan", "plan.source holds unresolved chains: some source is itself a reused token")

    problem = _gop_problem(plan.schedule, ctx.gop)
    if problem:
        raise fail("schedule follows the GOP", f"schedule {types!r}: {problem}")


def _gop_problem(schedule, gop: GOP) -> str | None:
    """What in ``schedule`` the GOP does not allow, or None."""
    types = schedule.types
    if gop.keyint is not None:
        last = 0
        for t, kind in enumerate(types):
            if kind in "Ii":
                last = t
            elif t - last >= gop.keyint:
                return f"frame {t} is {t - last} frames after keyframe {last}, but keyint={gop.keyint}"
    runs = [len(run) for run in "".join(c if c in "Bb" else " " for c in types).split()]
    if gop.bframes == 0 and runs:
        return "it has B-frames but bframes=0"
    if runs and max(runs) > gop.bframes:
        return f"it has a run of {max(runs)} B-frames but bframes={gop.bframes}"
    if gop.b_pyramid == "none" and "B" in types:
        return "it has referenced B-frames (B) but b_pyramid='none'"
    if not gop.open_gop and "i" in types:
        return "it has open-GOP keyframes (i) but open_gop=False"
    if schedule.ref > gop.ref:
        return f"it allows ref={schedule.ref} references but the GOP's ref={gop.ref}"
    return None


def _same(a: Plan, b: Plan) -> bool:
    same_shift = (a.shift is None and b.shift is None) or (
        a.shift is not None and b.shift is not None and torch.equal(a.shift.cpu(), b.shift.cpu())
    )
    return (
        tuple(a.grid) == tuple(b.grid)
        and a.schedule == b.schedule
        and torch.equal(a.source.cpu(), b.source.cpu())
        and same_shift
    )


def _diff(a: Plan, b: Plan) -> str:
    if a.schedule != b.schedule:
        return f"schedules {a.schedule.types!r} vs {b.schedule.types!r}"
    if a.source.shape == b.source.shape and not torch.equal(a.source.cpu(), b.source.cpu()):
        return f"{int((a.source.cpu() != b.source.cpu()).sum())} sources differ"
    return "shift differs"

"""Built-in planners on clips with known motion: synthetic latents and real pixels."""

import math
import re

import numpy as np
import pytest
import torch

import lipcodec
import lipcodec.testing
from lipcodec import fixtures
from lipcodec.planners import MotionField
from lipcodec.video import pixel_proxy_latents, read_video

FRAMES, ROWS, COLS = 9, 8, 12  # token grid of the synthetic latents


def panning_latents(step_tokens=1, frames=FRAMES, seed=0):
    """Latents whose content moves ``step_tokens`` tokens left per latent frame, exactly."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(16, 2 * ROWS, 2 * (COLS + step_tokens * frames), generator=g)
    return torch.stack([wide[:, :, 2 * step_tokens * t : 2 * step_tokens * t + 2 * COLS] for t in range(frames)], 1)


def still_latents(frames=FRAMES, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 1, 2 * ROWS, 2 * COLS, generator=g)
    return base.repeat(1, frames, 1, 1) + noise * torch.randn(16, frames, 2 * ROWS, 2 * COLS, generator=g)


def reused_share(plan, frames=slice(1, None)):
    return 1 - float(plan.computed.reshape(plan.grid.frames, -1)[frames].float().mean())


# -- synthetic latents ---------------------------------------------------------------------
def test_motion_finds_exact_references_on_a_one_token_pan():
    plan = lipcodec.plan(panning_latents()[None], "motion")
    grid = plan.grid
    t, _, cols = (torch.arange(grid.size) // grid.tokens_per_frame, *grid.position(torch.arange(grid.size))[1:])
    # every reused token points at the same content: `frames back` tokens to the right
    reused = ~plan.computed
    assert reused.float().mean() > 0.7
    off = plan.offsets[reused]
    assert torch.equal(off[:, 1], torch.zeros_like(off[:, 1]))
    assert torch.equal(off[:, 2], off[:, 0])
    # what stays computed is the new content entering on the right edge
    assert not plan.computed[(t > 0) & (cols < grid.width - 1)].any()


def test_lipar_reuses_little_on_a_pan():
    plan = lipcodec.plan(panning_latents()[None], "lipar")
    assert reused_share(plan) < 0.05


@pytest.mark.parametrize("planner", ["lipar", "motion"])
def test_still_clip_reuses_nearly_everything_after_frame_0(planner):
    plan = lipcodec.plan(still_latents()[None], planner)
    assert plan.frame_kept[0] == 1.0
    assert reused_share(plan) > 0.95
    assert set(plan.source.tolist()) <= set(range(plan.grid.tokens_per_frame))  # all copy frame 0


@pytest.mark.parametrize("planner", ["lipar", "motion"])
def test_scene_cut_becomes_a_keyframe(planner):
    other = still_latents(seed=1)
    clip = torch.cat([still_latents()[:, :5], other[:, 5:]], 1)
    assert lipcodec.plan(clip[None], planner, gop="scenecut=40").frame_types == "IPPPPIPPP"
    assert lipcodec.plan(clip[None], planner).frame_types == "IPPPPPPPP"  # scenecut=0 disables
    # min_keyint forbids a keyframe too close to the last one
    assert lipcodec.plan(clip[None], planner, gop="scenecut=40:min-keyint=6").frame_types == "IPPPPPPPP"


@pytest.mark.parametrize("planner", ["lipar", "motion"])
def test_b_frame_takes_its_future_anchor_when_that_matches(planner):
    a, b = still_latents(seed=1), still_latents(seed=2)
    clip = torch.cat([a[:, :1], b[:, 1:]], 1)  # frame 1 (a b-frame) looks like its future anchor, not its past
    plan = lipcodec.plan(clip[None], planner, gop="bframes=1")
    assert plan.frame_types.startswith("IbP")
    frame1 = slice(plan.grid.tokens_per_frame, 2 * plan.grid.tokens_per_frame)
    source_frames = plan.source[frame1] // plan.grid.tokens_per_frame
    assert (source_frames == 2).float().mean() > 0.9
    assert plan.frame_kept[2] == 1.0  # the P anchor could not copy frame 0


def test_b_pyramid_references_follow_the_schedule():
    plan = lipcodec.plan(still_latents()[None], "lipar", gop="keyint=8:bframes=3:b-pyramid=normal")
    assert plan.frame_types == "IbBbPBbPI"  # a closed GOP ends its last run on a P
    reach = plan.schedule.reachable
    frame = torch.arange(plan.grid.size) // plan.grid.tokens_per_frame
    for t in range(plan.grid.frames):
        sources = set((plan.source[frame == t] // plan.grid.tokens_per_frame).tolist()) - {t}
        assert sources <= reach[t]


def test_long_term_guard_stops_slow_drift():
    # each frame moves a little: under tau1 frame to frame, far from frame 0 after a while
    g = torch.Generator().manual_seed(0)
    drift = torch.randn(16, 1, 2 * ROWS, 2 * COLS, generator=g) * 0.06
    clip = still_latents(noise=0.0) + drift * torch.arange(FRAMES).float()[None, :, None, None]
    guarded = lipcodec.plan(clip[None], "lipar", reverify=True)
    unguarded = lipcodec.plan(clip[None], "lipar", tau2=None)
    assert guarded.kept_ratio > unguarded.kept_ratio
    tokens = lipcodec.PlanContext(clip).tokens().reshape(guarded.grid.size, -1)
    reused = ~guarded.computed
    dist = lipcodec.planners.ops.trimmed_l1(tokens[reused], tokens[guarded.source[reused]])
    assert float(dist.max()) <= 0.3


def moving_square_latents(frames=FRAMES):
    """A still background with a 4x4-token square of fresh content moving one token per frame.

    (LIPAR's 3x3x3 mask median erases changed regions much smaller than its window.)"""
    clip = still_latents(frames)
    g = torch.Generator().manual_seed(3)
    for t in range(frames):
        y, x = 4, 2 * (t % 4)
        clip[:, t, y : y + 8, x : x + 8] = torch.randn(16, 8, 8, generator=g)
    return clip


def test_lipar_dilation_only_adds_kept_tokens():
    clip = moving_square_latents()
    small = lipcodec.plan(clip[None], "lipar", dilation=(1, 1, 1))
    large = lipcodec.plan(clip[None], "lipar")
    assert bool((small.computed <= large.computed).all())
    assert large.num_kept > small.num_kept


def test_planners_are_deterministic_and_leave_latents_alone():
    clip = torch.cat([still_latents()[:, :4], panning_latents()[:, 4:]], 1)
    before = clip.clone()
    for name in ("lipar", "motion"):
        a, b = lipcodec.plan(clip[None], name), lipcodec.plan(clip[None], name)
        assert torch.equal(a.source, b.source)
    assert torch.equal(clip, before)


# -- real pixels ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_pan():
    # 4 px per pixel frame = 16 px per latent frame = exactly one Wan token
    return fixtures.pan(frames=17, size=(128, 192), step=(0, 4))


def search_steps(planner, latents, motion=None):
    """Displacement (rows, cols) each token's best match in the previous frame sits at,
    for latent frames 2.. (from latent frame 1 on the pan moves exactly one token per frame;
    latent frame 0 is one pixel frame, 0.6 token from latent frame 1's 4-frame average)."""
    ctx = lipcodec.PlanContext(latents, motion=motion)
    grid = ctx.grid
    pairs = [(t, t - 1) for t in range(2, grid.frames)]
    here = torch.arange(grid.tokens_per_frame)
    steps = []
    for (t, r), m in zip(pairs, planner.match_pairs(ctx, ctx.tokens(), pairs)):
        _, row, col = grid.position(m.source)
        steps.append(torch.stack([row - here // grid.width, col - here % grid.width], 1))
    return torch.cat(steps)


def obeys_the_guard(plan, latents, tau2):
    tokens = lipcodec.PlanContext(latents).tokens().reshape(plan.grid.size, -1)
    reused = ~plan.computed
    return bool((lipcodec.planners.ops.trimmed_l1(tokens[reused], tokens[plan.source[reused]]) <= tau2).all())


def test_motion_tracks_a_real_photo_pan_through_the_pixel_proxy(real_pan):
    latents = pixel_proxy_latents(real_pan)
    planner = lipcodec.planners.get("motion", tau1=0.3, tau2=0.6)
    steps = search_steps(planner, latents)
    assert ((steps[:, 0] == 0) & (steps[:, 1] == 1)).float().mean() > 0.9
    plan = planner(lipcodec.PlanContext(latents))
    assert (~plan.computed).float().mean() > 0.5
    assert obeys_the_guard(plan, latents, 0.6)


def test_bitstream_follows_libx264_motion_vectors(real_pan, tmp_path):
    video = read_video(fixtures.h264(real_pan, tmp_path / "pan.mp4"), motion=True, progress=False)
    assert np.nanmedian(video.motion.vectors[1:, ..., 1]) == pytest.approx(4.0)  # 4 px per pixel frame
    latents = pixel_proxy_latents(video.frames)
    planner = lipcodec.planners.get("bitstream", tau1=0.3, tau2=0.6)
    steps = search_steps(planner, latents, video.motion)
    interior = torch.arange(len(steps)) % 96 % 12 < 11  # the right edge has no source
    assert ((steps[interior, 0] == 0) & (steps[interior, 1] == 1)).float().mean() > 0.8
    plan = planner(lipcodec.PlanContext(latents, motion=video.motion))
    assert (~plan.computed).float().mean() > 0.5
    assert obeys_the_guard(plan, latents, 0.6)


def test_bitstream_with_an_exact_synthetic_field():
    clip = panning_latents()
    t = 4 * (FRAMES - 1) + 1
    vectors = np.zeros((t, ROWS, COLS, 2), np.float32)
    vectors[1:, :, :, 1] = 4.0  # content came from 4 px to the right in the previous pixel frame
    motion = MotionField(vectors, 16, (16 * ROWS, 16 * COLS))
    plan = lipcodec.plan(clip[None], "bitstream", motion=motion)
    off = plan.offsets[~plan.computed]
    assert (~plan.computed).float().mean() > 0.7
    assert torch.equal(off[:, 2], off[:, 0])


def test_bitstream_without_motion_vectors_says_how_to_get_them():
    with pytest.raises(ValueError, match="read_video\\(path, motion=True\\)"):
        lipcodec.plan(still_latents()[None], "bitstream")


@pytest.mark.parametrize("planner", ["lipar", "motion"])
def test_target_kept_meets_the_budget_on_the_bundled_clip(planner):
    video = read_video(fixtures.bundled_clip(), progress=False)
    latents = pixel_proxy_latents(video.frames)[None]
    for target in (0.5, 0.8):
        plan = lipcodec.plan(latents, planner, target_kept=target)
        assert abs(plan.kept_ratio - target) < 0.05
        assert plan.meta["target_kept"] == target
        last = lipcodec.plan(latents, planner, target_kept=target, budget_frames=3)  # the budget of 3 frames only
        assert abs(last.computed[-3 * latents.shape[-1] * latents.shape[-2] // 4 :].float().mean() - target) < 0.05
        assert abs(last.kept_ratio - target) > 0.02  # the test can tell: the whole video is off budget


def test_target_kept_search_from_a_scale(monkeypatch):
    """search_from starts the budget search at a known scale (the streaming runner passes the
    last chunk's): near the answer it needs a few decisions, far from it it still lands."""
    from lipcodec.planners.reference import ReferencePlanner

    video = read_video(fixtures.bundled_clip(), progress=False)
    latents = pixel_proxy_latents(video.frames)[None]
    decisions = []
    decide = ReferencePlanner._decide
    monkeypatch.setattr(ReferencePlanner, "_decide", lambda self, *a: decisions.append(a[-1]) or decide(self, *a))
    cold = lipcodec.plan(latents, "lipar", target_kept=0.6)
    cold_decisions = len(decisions)
    for start in (cold.meta["threshold_scale"], 2.0**8, 2.0**-8):
        decisions.clear()
        warm = lipcodec.plan(latents, "lipar", target_kept=0.6, search_from=start)
        assert abs(warm.kept_ratio - 0.6) <= abs(cold.kept_ratio - 0.6) + 0.01
        assert decisions[0] == start  # the search starts where it was told
        if start == cold.meta["threshold_scale"]:
            assert len(decisions) <= 2 < cold_decisions
            assert torch.equal(warm.source, cold.source)


# -- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "planner, params, message",
    [
        ("lipar", {"tau1": -0.1}, "tau1=-0.1 is out of range"),
        ("lipar", {"tau2": float("inf")}, "tau2=inf is out of range"),
        ("lipar", {"target_kept": 1.5}, "target_kept=1.5 is out of range"),
        ("lipar", {"search_from": 0}, "search_from=0.0 is out of range"),
        ("lipar", {"dilation": "3,5"}, "three positive ints"),
        ("motion", {"radius": 40}, "radius=40 is out of range"),
        ("lipar", {"radius": 2}, "planner 'lipar'.*radius"),
    ],
)
def test_bad_parameters_name_the_problem(planner, params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        lipcodec.planners.get(planner, **params)


def test_parameters_given_as_strings_are_converted():
    planner = lipcodec.planners.get("lipar", tau1="0.1", tau2="none", dilation="1,3,3")
    assert planner.tau1 == 0.1 and planner.tau2 is None and planner.dilation == (1, 3, 3)


@pytest.mark.parametrize("planner", ["intra", "lipar", "motion", "bitstream"])
def test_every_built_in_planner_passes_the_public_contract(planner):
    plans = lipcodec.testing.check_planner(planner)
    assert len(plans) == 4 * len(lipcodec.testing.STANDARD_GOPS)


def test_pooled_filters_equal_their_window_definitions():
    """Dilation, majority and the Gaussian run as pooling/convolution; they must equal the
    plain definitions over each token's causal (or centred) window."""
    from lipcodec.planners import ops

    g = torch.Generator().manual_seed(0)
    volume = torch.rand(7, 9, 11, generator=g)
    mask = volume > 0.6
    windows = ops._windows
    assert torch.equal(ops.causal_dilate(mask, (3, 5, 5)), windows(mask, (3, 5, 5)).amax(-1) > 0.5)
    assert torch.equal(ops.majority(mask), windows(mask, (3, 3, 3), False).mean(-1) > 0.5)
    assert torch.equal(ops.majority(mask, causal=True), windows(mask, (3, 3, 3), True).mean(-1) > 0.5)
    offsets = [(dt, dy, dx) for dt in (-2, -1, 0) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    weights = torch.tensor([np.exp(-(dt * dt + dy * dy + dx * dx) / (2 * 1.5**2)) for dt, dy, dx in offsets]).float()
    expected = windows(volume, (3, 3, 3)) @ (weights / weights.sum())
    assert torch.allclose(ops.causal_gaussian(volume), expected, atol=1e-6)
    assert torch.equal(ops.causal_median(volume), windows(volume, (3, 3, 3)).median(-1).values)


@pytest.mark.parametrize("size", [(3, 3, 3), (2, 2, 2), (1, 3, 5), (3, 1, 1), (1, 1, 1), (3, 5, 5)])
def test_median_network_equals_torch_median_over_windows(size):
    """The selection network gives exactly torch.median's value (the lower middle for even
    windows), ties and infinities included."""
    from lipcodec.planners import ops

    g = torch.Generator().manual_seed(1)
    volume = (torch.rand(6, 7, 9, generator=g) * 4).round()  # many ties
    volume[2, 3, 4], volume[4, 0, 0] = 1e6, -1e6
    assert torch.equal(ops.causal_median(volume, size), ops._windows(volume, size).median(-1).values)


@pytest.mark.parametrize("trim", [(0.2, 0.8), (0.0, 1.0), (0.1, 0.5)])
def test_guard_bounds_decide_exactly_as_the_trimmed_distance(trim):
    from lipcodec.planners import ops

    g = torch.Generator().manual_seed(2)
    for scale in (0.05, 1.0, 20.0):
        a, b = torch.rand(4000, 64, generator=g) * scale, torch.rand(4000, 64, generator=g) * scale
        for tau in (0.0, 0.05, 0.3, 1.0, 5.0):
            exact = ops.trimmed_l1(a, b, *trim) <= tau
            assert torch.equal(ops.trimmed_l1_within(a, b, tau, *trim), exact), (scale, tau)


@pytest.mark.parametrize("trim", [(0.2, 0.8), (0.0, 1.0), (0.1, 0.5), (0.0, 0.5), (0.5, 1.0)])
def test_trimmed_distance_is_the_mean_of_the_middle_ranks(trim):
    """Both ways to sum the kept ranks (two top-k on a CPU, one sort on a GPU) equal the
    definition: sort |a - b| per token, average ranks lo..hi-1."""
    from lipcodec.planners import ops

    g = torch.Generator().manual_seed(3)
    d = torch.rand(500, 64, generator=g).double() * 3
    d[:, :10] = d[:, :1]  # ties
    lo, hi = ops._trim_ranks(64, *trim)
    definition = torch.stack([row.sort().values[lo:hi].sum() for row in d])
    for rank_sum in (ops._topk_rank_sum, ops._sorted_rank_sum):
        assert torch.allclose(rank_sum(d, lo, hi), definition, rtol=1e-12, atol=1e-12), rank_sum
    assert torch.allclose(ops.trimmed_l1(d, torch.zeros_like(d), *trim), definition / (hi - lo), rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel)")
@pytest.mark.parametrize("n, trim", [(64, (0.2, 0.8)), (48, (0.2, 0.8)), (5, (0.0, 1.0)), (64, (0.5, 1.0))])
def test_trimmed_distance_on_a_gpu_is_the_definition(n, trim):
    """The GPU's one-pass kernel: any width (padding must sort last), broadcast and
    non-contiguous inputs, batch dimensions, no rows."""
    from lipcodec.planners import ops

    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(3, 700, n, generator=g) * 2, torch.rand(700, n, generator=g)
    a[:, :, : n // 2] = a[:, :, :1]  # ties
    lo, hi = ops._trim_ranks(n, *trim)
    definition = ((a.double() - b.double()).abs().sort(-1).values[..., lo:hi].mean(-1)).float()
    on_gpu = ops.trimmed_l1(a.cuda(), b.cuda(), *trim)
    assert on_gpu.shape == (3, 700) and on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), definition, rtol=1e-5, atol=1e-6)
    strided = ops.trimmed_l1(a.cuda().transpose(0, 1), b.cuda()[:, None], *trim)  # (700, 3)
    torch.testing.assert_close(strided.cpu(), definition.T, rtol=1e-5, atol=1e-6)
    assert ops.trimmed_l1(a.cuda()[:, :0], b.cuda()[:0], *trim).shape == (3, 0)


@pytest.mark.parametrize("gop", ["keyint=250", "keyint=8:bframes=2:b-pyramid=normal:ref=2", "bframes=3:ref=3:keyint=12"])
@pytest.mark.parametrize("tau2", [None, 0.08, 0.12, 0.3])
@pytest.mark.parametrize("done", [0, 5])
def test_resolve_in_rounds_equals_the_coding_order_loop(gop, tau2, done):
    """The GPU's whole-video resolve (pointer-jumping rounds) gives exactly the loop's
    sources: random references over the schedule's allowed frames, drifting tokens, so
    that chains break at the guard several times."""
    from lipcodec.gop import GOP, Schedule
    from lipcodec.planners import ops
    from lipcodec.planners.reference import _GuardMemo, _resolve, _resolve_rounds

    g = torch.Generator().manual_seed(3)
    f, hw, d = 17, 40, 16
    schedule = Schedule.from_gop(GOP.from_x264_params(gop), f)
    tokens = (torch.randn(1, hw, d, generator=g) + torch.randn(f, hw, d, generator=g).mul(0.04).cumsum(0)).reshape(-1, d)
    best_source = torch.arange(f * hw).reshape(f, hw)
    for t in range(f):
        if schedule.refs[t]:
            ref = torch.tensor(schedule.refs[t])[torch.randint(len(schedule.refs[t]), (hw,), generator=g)]
            place = (torch.arange(hw) + torch.randint(-1, 2, (hw,), generator=g)).clamp(0, hw - 1)
            best_source[t] = ref * hw + place
    reuse = torch.rand(f, hw, generator=g) < 0.8
    reuse &= torch.tensor([bool(r) for r in schedule.refs])[:, None]
    best_distance = ops.trimmed_l1(tokens, tokens[best_source.flatten()]).reshape(f, hw)

    executed = torch.zeros(f, hw, dtype=torch.bool)

    def memo():  # the verdicts known up front: the direct reference's match, and executed tokens (they ran)
        m = _GuardMemo(f * hw, "cpu")
        if tau2 is not None:
            m.final, m.ok = best_source.flatten().clone(), executed.flatten() | (best_distance <= tau2).flatten()
        return m

    if done:  # the first frames ran already, as some other decision (no guard) made them: kept as they are
        ran, _ = _resolve(schedule, tokens, best_source, reuse, None, (0.2, 0.8), memo())
        ran = ran[: done * hw]
        ran = torch.where((ran < done * hw) & (torch.arange(done * hw) % 3 > 0), ran, torch.arange(done * hw))
        best_source, reuse = best_source.clone(), reuse.clone()
        best_source[:done] = ran.reshape(done, hw)
        reuse[:done] = (ran != torch.arange(done * hw)).reshape(done, hw)
        executed[:done] = True
    loop, settled = _resolve(schedule, tokens, best_source, reuse, tau2, (0.2, 0.8), memo())
    assert settled
    if done:
        assert torch.equal(loop[: done * hw], ran)
    rounds, settled = _resolve_rounds(f, tokens, best_source, reuse, tau2, (0.2, 0.8), memo())
    assert settled and torch.equal(rounds, loop)
    # a fixed number of rounds (what a CUDA graph holds) settles exactly from the number the
    # chains need on, with the loop's sources; fewer rounds say they have not settled. A
    # chain has at most one token per frame left to decide: f - done + 1 rounds always settle
    fixed = [_resolve_rounds(f, tokens, best_source, reuse, tau2, (0.2, 0.8), memo(), k)
             for k in range(1, f - done + 2)]
    need = next(k for k, (_, ok) in enumerate(fixed, 1) if ok)
    assert all(ok and torch.equal(out, loop) for out, ok in fixed[need - 1 :])
    assert not any(ok for _, ok in fixed[: need - 1])
    if tau2 is not None and tau2 < 0.3:
        assert need >= 3  # the guard broke some chain more than once
    reused = loop != torch.arange(f * hw)
    assert reused.sum() > 0.15 * f * hw  # the test can tell: plenty reused ...
    if tau2 is not None and tau2 < 0.3:
        assert (reuse.flatten() & ~reused).sum() > 20  # ... and plenty broken by the guard


@pytest.mark.parametrize("curve", ["smooth", "kinked"])
def test_target_kept_search_interpolates_near_the_budget(curve, monkeypatch):
    """Once the budget is bracketed, the search steps to where the line between the ends'
    kept ratios crosses it (regula falsi, Illinois variant) instead of halving: on a smooth
    kept curve it lands in fewer decisions than bisection would; on a curve that flattens
    near the budget (the line between the ends misleads) it still lands."""
    from types import SimpleNamespace

    from lipcodec.planners import get as get_planner

    tokens, frames, target = 1000, 9, 0.6

    def kept(log_scale):  # the kept ratio falls as the thresholds grow
        if curve == "smooth":
            return 1 / (1 + 2.0 ** (log_scale - 1))
        return 0.62 - 0.04 * log_scale if log_scale < 1 else max(0.0, 0.58 - 0.3 * (log_scale - 1))  # 0.6 at 0.5

    scales = []

    def decide(ctx, tokens_, matches, cache, scale):
        scales.append(math.log2(scale))
        computed = torch.zeros(frames * tokens, dtype=torch.bool)
        computed[: round(kept(math.log2(scale)) * frames * tokens)] = True
        return SimpleNamespace(computed=computed, scale=scale)

    planner = get_planner("lipar", target_kept=target, search_from=2.0**4)
    monkeypatch.setattr(type(planner), "_decide", lambda self, *args: decide(*args))
    ctx = SimpleNamespace(grid=SimpleNamespace(frames=frames, tokens_per_frame=tokens))
    decision = planner._search_budget(ctx, None, None, None)
    assert abs(decision.computed.float().mean() - target) * frames < 0.5 / 8, scales
    assert decision.scale == 2.0 ** scales[-1]  # the last step landed
    bracket = 5  # stepped out 4 -> 3.75 -> 3.25 -> 2.25 -> 0.25: crossed
    assert scales[:bracket] == pytest.approx([4.0, 3.75, 3.25, 2.25, 0.25])
    lo, hi, halving = 0.25, 2.25, 0  # what bisection of the same bracket needs
    while abs(kept((lo + hi) / 2) - target) * frames >= 0.5 / 8:
        lo, hi = ((lo + hi) / 2, hi) if kept((lo + hi) / 2) > target else (lo, (lo + hi) / 2)
        halving += 1
    halving += 1
    if curve == "smooth":
        assert len(scales) - bracket < halving, (scales, halving)
    else:
        assert len(scales) - bracket <= 24
        assert abs(scales[-1] - 0.5) * 0.04 * frames < 0.5 / 8  # landed on the gentle side


def test_budget_search_benchmark_smoke(tmp_path, repo_script):
    """benchmarks/budget_search.py replays streaming's per-chunk search: every chunk after the
    first meets its budget, starts from the previous chunk's scale and needs few decisions,
    and the script restores the planner it counts."""
    import json

    from lipcodec.planners.reference import ReferencePlanner

    decide = ReferencePlanner._decide
    bench = repo_script("benchmarks/budget_search.py")
    out = tmp_path / "budget.json"
    bench.main(["--clips", "bundled", "--budgets", "0.6", "--size", "128", "224", "--frames", "12",
                "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert [c["start"] for c in row["chunks"]] == [3, 6, 9]
    # within an eighth of a frame's tokens; chunk 1 cannot be: its kept share jumps from 0.661
    # to 0.548 at one threshold scale (the mask clean-up flips a region at once) and the
    # search returns the nearest decision
    assert all(abs(c["kept"] - 0.6) * 3 < 0.5 / 8 + 1e-9 for c in row["chunks"][1:])
    assert abs(row["chunks"][0]["kept"] - 0.548) < 1e-3
    assert 1 <= row["decisions_mean"] < row["chunks"][0]["decisions"]  # warm starts beat the cold one
    assert ReferencePlanner._decide is decide
    with pytest.raises(SystemExit):
        bench.main(["--frames", "5", "--out", str(out)])


def test_plan_profile_benchmark_smoke(repo_script, capsys):
    """benchmarks/plan_profile.py on the CPU: both profiles cover the same chunks and print
    their operator tables (kernel counts are a GPU's, zero here)."""
    result = repo_script("benchmarks/plan_profile.py").main(
        ["--device", "cpu", "--clip", "bundled", "--size", "128", "224", "--frames", "12", "--rows", "3"])
    assert [r["chunks"] for r in result.values()] == [3, 3]
    assert all(r["kernels_per_chunk"] == 0 for r in result.values())
    assert capsys.readouterr().out.count("Self CPU time total") == 2


# -- executed frames: a stream's past, kept as it ran ------------------------------------------
def executed_as(plan, latents, frames):
    """The first ``frames`` of ``plan`` as executed frames, anchored at the tokens they copy."""
    from lipcodec.planners.registry import ExecutedFrames

    n = frames * plan.grid.tokens_per_frame
    tokens = lipcodec.PlanContext(latents).tokens().reshape(plan.grid.size, -1)
    return ExecutedFrames(frames, plan.source[:n].clone(), tokens[plan.source[:n]])


@pytest.mark.parametrize("planner", ["lipar", "motion"])
def test_executed_frames_keep_the_decisions_they_ran_with(planner):
    clip = moving_square_latents()
    # what ran: a plan with other thresholds (here much more reuse), not this planner's own
    ran = lipcodec.plan(clip[None], planner, tau1=1.0, tau2=None)
    executed = executed_as(ran, clip, 4)
    n = 4 * ran.grid.tokens_per_frame
    plan = lipcodec.plan(clip[None], planner, executed=executed)
    assert torch.equal(plan.source[:n], ran.source[:n])
    assert not torch.equal(lipcodec.plan(clip[None], planner).source[:n], ran.source[:n])  # the test can tell
    # new tokens chain onto them: every reused token copies a computed one, within the guard
    assert bool(plan.computed[plan.source].all())
    tokens = lipcodec.PlanContext(clip).tokens().reshape(plan.grid.size, -1)
    new = (~plan.computed).nonzero().flatten()
    new = new[new >= n]
    assert len(new) > 0.3 * (plan.grid.size - n)
    assert float(lipcodec.planners.ops.trimmed_l1(tokens[new], tokens[plan.source[new]]).max()) <= 0.3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (chain resolution in rounds)"))])
def test_the_guard_measures_new_tokens_against_what_executed_tokens_copy(device):
    from lipcodec.planners.registry import ExecutedFrames

    clip = still_latents().to(device)  # every token matches its reference closely
    ctx = lipcodec.PlanContext(clip)
    hw, f = ctx.grid.tokens_per_frame, ctx.grid.frames
    tokens = ctx.tokens().reshape(ctx.grid.size, -1)
    n = 3 * hw
    before = torch.full((n,), -1, dtype=torch.long, device=device)  # all copied tokens from before the context
    far = torch.arange(n, device=device) % hw < hw // 2  # half the places copied something far away
    anchors = tokens[:n] + far[:, None] * 5.0
    plan = lipcodec.plan(clip[None], "lipar", executed=ExecutedFrames(3, before, anchors))
    computed = plan.computed.reshape(f, hw)
    assert computed[:3].all()  # in this plan's terms: roots (what they copy is not in the context)
    near = lipcodec.plan(clip[None], "lipar", executed=ExecutedFrames(3, before, tokens[:n].clone()))
    assert not near.computed.reshape(f, hw)[3:].any()  # anchored where they are: all reused
    # the first new frame computes exactly where the copies are far (the match distance is small there)
    assert torch.equal(computed[3], far[:hw])


@pytest.mark.parametrize("frames, source, anchors, message", [
    (5, None, None, "ExecutedFrames.frames=5: use 0..4 for a context of 5 frames"),
    (2, "short", None, "ExecutedFrames.source must be a long tensor of shape (12,)"),
    (2, None, "narrow", "ExecutedFrames.anchors must be shaped (12, 64) (a token vector per token), got (12, 3)"),
    (2, "chain", None, "ExecutedFrames.source must hold, per token, itself (computed), a computed context"),
])
def test_executed_frames_that_do_not_fit_say_so(frames, source, anchors, message):
    from lipcodec.planners.registry import ExecutedFrames

    clip = still_latents(frames=5)
    hw = lipcodec.PlanContext(clip).grid.tokens_per_frame
    n = frames * hw
    src = torch.arange(n)
    if source == "short":
        src = src[:-1]
    if source == "chain":  # token 2 copies token 1, which copies token 0: not a computed token
        src[1], src[2] = 0, 1
    vectors = torch.zeros(n, 3 if anchors == "narrow" else 64)
    message = message.replace("(12,)", f"({n},)").replace("(12, ", f"({n}, ")
    with pytest.raises(ValueError, match=re.escape(message)):
        lipcodec.plan(clip[None], "lipar", executed=ExecutedFrames(frames, src, vectors))

"""Planner registry, PlanContext, lipcodec.plan(), and the public planner contract check."""

from __future__ import annotations

import doctest
import random
import re

import attrs
import numpy as np
import pytest
import torch

import lipcodec
import lipcodec.testing
from lipcodec import GOP, Plan, PlanContext, Schedule, register_planner
from lipcodec.planners import available, get, registry
from lipcodec.testing import STANDARD_GOPS, ContractError, check_planner, standard_clips


@pytest.fixture(autouse=True)
def restore_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def nearest_ref_plan(ctx: PlanContext, threshold: float = 0.05) -> Plan:
    """Reuse the same-place token of the nearest past reference when it barely changed."""
    schedule = ctx.schedule
    tokens = ctx.tokens()  # (F, H, W, D)
    ids = torch.arange(ctx.grid.size).reshape(tokens.shape[:3])
    source = ids.clone()
    for t, refs in enumerate(schedule.refs):
        if refs:
            same = (tokens[t] - tokens[refs[0]]).abs().mean(-1) < threshold
            source[t][same] = ids[refs[0]][same]
    return Plan(ctx.grid, source, schedule, meta={"planner": "nearest-ref", "threshold": threshold})


@attrs.frozen
class NearestRef:
    threshold: float = 0.05
    name: str = "test-nearest-ref"

    def __call__(self, ctx: PlanContext) -> Plan:
        return nearest_ref_plan(ctx, self.threshold)


def clip(frames=5, height=4, width=6, channels=2, seed=0):
    return torch.randn(channels, frames, height, width, generator=torch.Generator().manual_seed(seed))


# -- registry --------------------------------------------------------------------------------
def test_register_a_class_and_build_it_with_params():
    register_planner("test-nearest-ref")(NearestRef)
    planner = get("test-nearest-ref", threshold=0.5)
    assert isinstance(planner, NearestRef) and planner.threshold == 0.5
    assert isinstance(planner, lipcodec.planners.Planner)
    assert get("test-nearest-ref").threshold == 0.05


def test_register_a_factory_function():
    @register_planner("test-factory")
    def factory(threshold: float = 0.05):
        def planner(ctx):
            return nearest_ref_plan(ctx, threshold)

        return planner

    planner = get("test-factory", threshold=1e9)
    assert planner.name == "test-factory"  # get() names a nameless planner after its key
    plan = lipcodec.plan(clip()[None], "test-factory", threshold=1e9)
    assert plan.num_kept == plan.grid.tokens_per_frame  # everything after frame 0 reused


def test_duplicate_registration():
    with pytest.raises(ValueError, match=re.escape(
        "a planner named 'intra' is already registered; pass replace=True to override it"
    )):
        register_planner("intra")(NearestRef)
    register_planner("intra", replace=True)(NearestRef)
    assert isinstance(get("intra"), NearestRef)


def test_registering_the_same_factory_twice_is_harmless():
    register_planner("test-nearest-ref")(NearestRef)
    register_planner("test-nearest-ref")(NearestRef)
    assert available().count("test-nearest-ref") == 1


def test_one_set_of_params_is_shared_by_what_each_planner_takes():
    """compare/bench run several planners with one -p: each gets the keys its constructor
    takes, a **kwargs factory all of them, a planner object none; a key nobody takes is an
    error naming the planners."""
    @register_planner("test-anything")
    def anything(**params):
        return lambda ctx: nearest_ref_plan(ctx, 0.05)

    params = {"target_kept": 0.5, "radius": 2}
    shares = registry.share_params(["intra", "lipar", "motion", "test-anything", get("lipar")], params)
    assert shares == [{}, {"target_kept": 0.5}, {"target_kept": 0.5, "radius": 2}, params, {}]
    with pytest.raises(ValueError, match=re.escape("planner parameter radius, typo: none of the planners (intra, lipar)")):
        registry.share_params(["intra", "lipar"], {"radius": 2, "target_kept": 0.5, "typo": 1})
    assert registry.share_params(["intra"], {}) == [{}]


def test_available_lists_builtins_and_customs():
    assert "intra" in available()
    register_planner("test-nearest-ref")(NearestRef)
    names = available()
    assert "intra" in names and "test-nearest-ref" in names
    assert names == sorted(names)


def test_get_unknown_name_lists_available():
    register_planner("test-nearest-ref")(NearestRef)
    with pytest.raises(ValueError) as info:
        get("no-such-planner")
    message = str(info.value)
    assert "unknown planner 'no-such-planner'" in message
    assert f"available: {', '.join(available())}" in message
    assert "intra" in message and "test-nearest-ref" in message


def test_get_with_bad_params_names_the_planner():
    with pytest.raises(TypeError, match=r"planner 'intra': .*'tau1' \('intra' takes no parameters\)"):
        get("intra", tau1=0.1)
    with pytest.raises(TypeError, match=r"'radius' \('lipar' takes tau1, tau2, target_kept, "):
        get("lipar", radius=3)
    with pytest.raises(TypeError, match="pass a name, not an instance"):
        get(NearestRef(), threshold=1.0)
    instance = NearestRef()
    assert get(instance) is instance


# -- PlanContext -----------------------------------------------------------------------------
def test_plan_context_validation():
    with pytest.raises(ValueError, match=re.escape(
        "PlanContext.latents must be (C, F, H, W), got shape (1, 2, 5, 4, 6); "
        "use lipcodec.plan() for (B, C, F, H, W) batches"
    )):
        PlanContext(clip()[None])
    with pytest.raises(ValueError, match=re.escape("got shape (5, 4, 6)")):
        PlanContext(clip()[0])
    with pytest.raises(ValueError, match=re.escape(
        "latent size F,H,W = 5,4,6 is not divisible by the patch size (1, 4, 4)"
    )):
        PlanContext(clip(), (1, 4, 4))
    with pytest.raises(ValueError, match=re.escape("latent size F,H,W = 5,4,6 is not divisible by the patch size (2, 2, 2)")):
        PlanContext(clip(), (2, 2, 2))


def test_plan_context_tokens_and_schedule():
    latents = clip(frames=4, height=4, width=6, channels=3)
    ctx = PlanContext(latents, (1, 2, 2), GOP(keyint=2))
    assert tuple(ctx.grid) == (4, 2, 3)
    tokens = ctx.tokens()
    assert tokens.shape == (4, 2, 3, 12) and tokens.dtype == torch.float32
    # token (t, r, c) holds the patch at frame t, rows 2r.., cols 2c.., ordered (pt, ph, pw, C)
    assert torch.equal(tokens[3, 1, 2], latents[:, 3:4, 2:4, 4:6].permute(1, 2, 3, 0).reshape(-1))
    assert ctx.schedule == Schedule.from_gop(GOP(keyint=2), 4)
    assert ctx.schedule.types == "IPIP"
    assert tuple(PlanContext(latents, (2, 2, 3)).grid) == (2, 2, 2)


# -- lipcodec.plan() -------------------------------------------------------------------------
def test_plan_with_batches():
    x = clip()
    single = lipcodec.plan(x, "intra")
    batch = lipcodec.plan(torch.stack([x, x, x]), "intra")
    assert tuple(batch.grid) == tuple(single.grid) == (5, 2, 3)
    assert torch.equal(batch.source, single.source)
    with pytest.raises(ValueError, match=re.escape(
        "latents hold 2 different videos; a plan is per video: call lipcodec.plan(latents[i:i+1]) for each"
    )):
        lipcodec.plan(torch.stack([x, x + 1]), "intra")
    with pytest.raises(ValueError, match=re.escape("latents must be (B, C, F, H, W) or (C, F, H, W), got shape (4, 6)")):
        lipcodec.plan(x[0, 0], "intra")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_plan_rejects_non_finite_latents(bad):
    x = clip()
    x[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=re.escape(
        "latents contain NaN or Inf (first at index (B, C, F, H, W) = (0, 1, 2, 3, 4)); check the encoder"
    )):
        lipcodec.plan(x[None], "intra")


def test_plan_rejects_nan_in_a_batch_of_identical_videos():
    # two copies of one video holding a NaN are the same video: the error must be about the NaN
    x = clip()
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=re.escape("latents contain NaN or Inf (first at index (B, C, F, H, W) = (0, 0, 1, 2, 3))")):
        lipcodec.plan(torch.stack([x, x.clone()]), "intra")


def test_plan_takes_gop_string_and_passes_context():
    seen = []

    @register_planner("test-recorder")
    def recorder(**params):
        def planner(ctx):
            seen.append((ctx, params))
            return Plan.identity(ctx.grid, ctx.schedule)

        return planner

    x = clip(frames=9)
    plan = lipcodec.plan(x[None], "test-recorder", gop="keyint=4:bframes=1", patch_size=(1, 2, 3), seed=7, alpha=2)
    ctx, params = seen[-1]
    assert ctx.gop == GOP(keyint=4, bframes=1) and ctx.seed == 7 and ctx.patch_size == (1, 2, 3)
    assert params == {"alpha": 2}
    assert torch.equal(ctx.latents, x)
    assert plan.frame_types == "IbPPIbPPI" and tuple(plan.grid) == (9, 2, 2)
    lipcodec.plan(x, "test-recorder", gop=GOP(bframes=2))
    assert seen[-1][0].gop == GOP(bframes=2)
    lipcodec.plan(x, "test-recorder")
    assert seen[-1][0].gop == GOP()
    with pytest.raises(ValueError, match="unknown GOP key 'keyframes'"):
        lipcodec.plan(x, "test-recorder", gop="keyframes=4")


# -- standard clips --------------------------------------------------------------------------
def test_standard_clips():
    clips = standard_clips()
    assert list(clips) == ["still", "pan", "cut", "noise"]
    for x in clips.values():
        assert x.shape == (16, 9, 8, 12) and x.dtype == torch.float32 and torch.isfinite(x).all()
    still, pan, cut, noise = clips.values()
    assert all(torch.equal(still[:, t], still[:, 0]) for t in range(9))
    tokens = PlanContext(pan).tokens()  # (F, H, W, D): content moves one token left per frame
    assert torch.equal(tokens[1:, :, :-1], tokens[:-1, :, 1:])
    assert not torch.equal(tokens[1], tokens[0])
    assert all(torch.equal(cut[:, t], cut[:, 0]) for t in range(5))
    assert all(torch.equal(cut[:, t], cut[:, 5]) for t in range(5, 9))
    assert (cut[:, 5] - cut[:, 4]).abs().mean() > 0.5
    assert all((noise[:, t] - noise[:, t - 1]).abs().mean() > 0.5 for t in range(1, 9))
    again = standard_clips()
    assert all(torch.equal(clips[k], again[k]) for k in clips)
    assert not torch.equal(standard_clips(seed=1)["noise"], noise)
    assert standard_clips(channels=4, frames=3, height=2, width=4)["pan"].shape == (4, 3, 2, 4)


# -- check_planner: passing planners ---------------------------------------------------------
def test_check_planner_passes_on_intra():
    plans = check_planner("intra")
    assert set(plans) == {(c, g) for c in standard_clips() for g in STANDARD_GOPS}
    assert all(p.kept_ratio == 1.0 for p in plans.values())


def test_check_planner_passes_on_a_custom_planner():
    register_planner("test-nearest-ref")(NearestRef)
    plans = check_planner("test-nearest-ref")
    assert plans["still", "default"].kept_ratio == pytest.approx(1 / 9)  # only frame 0 computed
    assert plans["noise", "default"].kept_ratio == 1.0
    cut = plans["cut", "default"].frame_kept
    assert cut.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0]  # the cut frame is recomputed
    assert plans["still", "keyint=8:bframes=2:b-pyramid=normal"].frame_types == "IBbPBbPPI"
    # an instance works too, and so does a plain function
    check_planner(NearestRef(threshold=0.2))
    check_planner(nearest_ref_plan, gops=["keyint=4", GOP(bframes=2, ref=2)])


def test_check_planner_with_custom_clips_and_contexts():
    clips = {"tiny": clip(frames=3, height=2, width=2), "ctx": PlanContext(clip(frames=4), (1, 1, 1))}
    plans = check_planner(NearestRef(), clips=clips, gops=["keyint=2"])
    assert set(plans) == {("tiny", "keyint=2"), ("ctx", "keyint=2")}
    assert tuple(plans["ctx", "keyint=2"].grid) == (4, 4, 6)
    assert plans["ctx", "keyint=2"].frame_types == "IPIP"


def test_check_planner_restores_global_rngs():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    check_planner("intra", gops=["default"])
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]


def test_testing_module_doctests():
    result = doctest.testmod(lipcodec.testing, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# -- check_planner: broken planners ----------------------------------------------------------
def contract_failure(planner, **kwargs) -> str:
    with pytest.raises(ContractError) as info:
        check_planner(planner, **kwargs)
    assert isinstance(info.value, AssertionError)
    return str(info.value)


def test_check_planner_catches_keyframe_reuse():
    def reuse_in_keyframe(ctx):
        source = torch.arange(ctx.grid.size)
        source[1] = 0  # token 1 of frame 0 (an I-frame) copies token 0
        return Plan(ctx.grid, source, ctx.schedule)

    message = contract_failure(reuse_in_keyframe)
    assert message.startswith("planner reuse_in_keyframe broke [valid plan] on clip 'still' under GOP 'default'")
    assert "PlanError: frame 0 is a keyframe (I) but token 1 reuses token 0" in message


def test_check_planner_catches_plans_that_bypass_validation():
    def sneaky_keyframe(ctx):
        plan = Plan.identity(ctx.grid, ctx.schedule)
        source = plan.source.clone()
        source[3] = 2
        object.__setattr__(plan, "source", source)
        return plan

    message = contract_failure(sneaky_keyframe)
    assert "broke [keyframes intact] on clip 'still' under GOP 'default'" in message
    assert "token 3 of keyframe 0 (I) reuses token 2" in message

    def sneaky_future(ctx):
        plan = Plan.identity(ctx.grid, ctx.schedule)
        source = plan.source.clone()
        n = ctx.grid.tokens_per_frame
        source[n] = 2 * n  # frame 1 (P) copies from frame 2
        object.__setattr__(plan, "source", source)
        return plan

    message = contract_failure(sneaky_future)
    assert "broke [schedule respected]" in message
    assert f"token {24} in frame 1 (P) copies from frame 2, outside its reachable frames [0]" in message


def test_check_planner_catches_global_rng_use():
    def uses_torch_rng(ctx):
        source = torch.arange(ctx.grid.size)
        n = ctx.grid.tokens_per_frame
        reuse = torch.rand(ctx.grid.size) < 0.5  # global RNG: the plan follows the user's seed
        reuse[:n] = False
        source[reuse] = source[reuse] - n
        return Plan(ctx.grid, source, Schedule.parse("I" + "P" * (ctx.grid.frames - 1)))

    message = contract_failure(uses_torch_rng, gops=["default"])
    assert "broke [purity] on clip 'still' under GOP 'default'" in message
    assert "fork a private generator from ctx.seed" in message

    def uses_numpy_rng(ctx):
        n = ctx.grid.tokens_per_frame
        source = np.arange(ctx.grid.size)
        reuse = np.random.rand(ctx.grid.size) < 0.5
        reuse[:n] = False
        source[reuse] -= n
        return Plan(ctx.grid, source, ctx.schedule)

    message = contract_failure(uses_numpy_rng, gops=["default"])
    assert "broke [purity]" in message


def test_check_planner_catches_nondeterminism():
    calls = []

    def stateful(ctx):  # alternates between two plans from call to call
        calls.append(1)
        letters = ("I" if len(calls) % 2 else "P") * (ctx.grid.frames - 1)
        return Plan.identity(ctx.grid, Schedule.parse("I" + letters))

    message = contract_failure(stateful)
    assert "broke [determinism] on clip 'still' under GOP 'default'" in message
    assert "the same context gave two different plans (schedules 'IIIIIIIII' vs 'IPPPPPPPP')" in message


def test_check_planner_catches_in_place_changes():
    def normalizes_in_place(ctx):
        ctx.latents.sub_(ctx.latents.mean())
        return Plan.identity(ctx.grid)

    message = contract_failure(normalizes_in_place)
    assert "broke [context unchanged] on clip 'still' under GOP 'default'" in message
    assert "modified ctx.latents in place" in message


def test_check_planner_catches_ignored_keyint():
    def one_keyframe(ctx):
        return Plan.identity(ctx.grid, Schedule.from_gop(GOP(), ctx.grid.frames))

    message = contract_failure(one_keyframe)
    assert message.startswith("planner one_keyframe broke [schedule follows the GOP] on clip 'still' under GOP 'keyint=4'")
    assert "schedule 'IPPPPPPPP': frame 4 is 4 frames after keyframe 0, but keyint=4" in message


@pytest.mark.parametrize(
    "letters, gop, problem",
    [
        ("IbPPP", "default", "it has B-frames but bframes=0"),
        ("IbbbP", "bframes=2", "it has a run of 3 B-frames but bframes=2"),
        ("IbBbP", "bframes=3", "it has referenced B-frames (B) but b_pyramid='none'"),
        ("IPPiP", "default", "it has open-GOP keyframes (i) but open_gop=False"),
    ],
)
def test_check_planner_catches_schedules_the_gop_forbids(letters, gop, problem):
    def fixed(ctx):
        return Plan.identity(ctx.grid, Schedule.parse(letters))

    clips = {"five": clip(frames=5)}
    message = contract_failure(fixed, clips=clips, gops=[gop])
    assert f"broke [schedule follows the GOP] on clip 'five' under GOP {gop!r}: schedule {letters!r}: {problem}" in message


def test_check_planner_catches_ref_beyond_the_gop():
    def three_refs(ctx):
        return Plan.identity(ctx.grid, Schedule.parse("I" + "P" * (ctx.grid.frames - 1), ref=3))

    message = contract_failure(three_refs, gops=["default"])
    assert "it allows ref=3 references but the GOP's ref=1" in message


def test_check_planner_catches_wrong_results_and_crashes():
    message = contract_failure(lambda ctx: ctx.schedule, gops=["default"])
    assert "broke [returns a Plan] on clip 'still' under GOP 'default': the planner returned Schedule, not a lipcodec.Plan" in message

    def per_latent_pixel(ctx):  # forgets the patch size
        c, f, h, w = ctx.latents.shape
        return Plan.identity((f, h, w), ctx.schedule)

    message = contract_failure(per_latent_pixel)
    assert "broke [returns a Plan]" in message and "the plan's grid (9, 8, 12) is not the context's (9, 4, 6)" in message

    def crashes(ctx):
        raise RuntimeError("boom")

    message = contract_failure(crashes)
    assert "broke [runs] on clip 'still' under GOP 'default': the planner raised RuntimeError: boom" in message


def test_check_planner_names_the_clip_and_gop_where_it_breaks():
    def breaks_on_noise(ctx):
        if ctx.latents[:, 1].equal(ctx.latents[:, 0]) or ctx.gop.bframes == 0:
            return Plan.identity(ctx.grid, ctx.schedule)
        raise ValueError("cannot plan B-frames on moving content")

    message = contract_failure(breaks_on_noise)
    assert "on clip 'pan' under GOP 'keyint=8:bframes=2:b-pyramid=normal'" in message
    assert "ValueError: cannot plan B-frames on moving content" in message

"""Plan: one source per token; derived indices, validation messages, persistence."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipcodec import GOP, Grid, Plan, PlanError, Schedule


@st.composite
def random_plans(draw):
    """(raw source, plan) for a random GOP layout and random reference choices, chains included.

    Every reused token points at any token of one of its frame's references, which may
    itself be reused: the chains follow the coding order, so they always end.
    """
    gop = GOP(
        keyint=draw(st.none() | st.integers(1, 6)),
        bframes=draw(st.integers(0, 3)),
        b_pyramid=draw(st.sampled_from(["none", "strict", "normal"])),
        ref=draw(st.integers(1, 3)),
        open_gop=draw(st.booleans()),
    )
    grid = Grid(draw(st.integers(1, 7)), draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    schedule = Schedule.from_gop(gop, grid.frames)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    reuse = draw(st.floats(0, 1))
    raw = np.arange(grid.size)
    n = grid.tokens_per_frame
    for t, refs in enumerate(schedule.refs):
        for i in range(t * n, (t + 1) * n):
            if refs and rng.random() < reuse:
                r = refs[rng.integers(len(refs))]
                raw[i] = r * n + rng.integers(n)
    shift = draw(st.booleans())
    shift = torch.from_numpy(rng.normal(size=(grid.size, 2)).astype(np.float32)) if shift else None
    return raw, Plan(grid, torch.from_numpy(raw), schedule, shift=shift, meta={"planner": "random", "reuse": reuse})


def follow(raw: np.ndarray, i: int) -> int:
    while raw[i] != i:
        i = raw[i]
    return i


# -- invariants ------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(random_plans())
def test_plan_invariants(case):
    raw, plan = case
    n, grid = plan.grid.size, plan.grid
    source = plan.source
    assert source.dtype == torch.int64 and source.shape == (n,)
    # chains resolved to computed tokens, the ends the raw chains lead to
    assert torch.equal(source[source], source)
    assert source.tolist() == [follow(raw, i) for i in range(n)]
    assert torch.equal(plan.computed, torch.from_numpy(raw == np.arange(n)))
    # keep: sorted computed ids, the distinct sources
    keep = plan.keep
    assert torch.all(keep[1:] > keep[:-1])
    assert torch.equal(keep, plan.computed.nonzero().flatten())
    assert torch.equal(keep, torch.unique(source))
    assert plan.num_kept == keep.numel()
    # slot: the restore gather
    assert torch.equal(keep[plan.slot], source)
    # multiplicity: how many tokens each kept token stands for
    mult = plan.multiplicity
    assert mult.shape == keep.shape and int(mult.sum()) == n and bool((mult >= 1).all())
    assert mult.tolist() == [int((source == k).sum()) for k in keep]
    # ratios
    assert plan.kept_ratio == pytest.approx(plan.num_kept / n)
    frame_kept = plan.frame_kept
    assert frame_kept.dtype == np.float64 and frame_kept.shape == (grid.frames,)
    per_frame = plan.computed.reshape(grid.frames, -1).sum(1).numpy() / grid.tokens_per_frame
    np.testing.assert_allclose(frame_kept, per_frame)
    assert frame_kept.mean() == pytest.approx(plan.kept_ratio)
    # keyframes in full; every reused token ends in a reachable frame
    for t, kind in enumerate(plan.frame_types):
        if kind in "Ii":
            assert frame_kept[t] == 1.0
    frames_of = torch.arange(n) // grid.tokens_per_frame
    for i in (~plan.computed).nonzero().flatten().tolist():
        assert int(source[i]) // grid.tokens_per_frame in plan.schedule.reachable[int(frames_of[i])]
    # offsets: (frames back, rows, cols) to the source; zero for computed tokens
    offsets = plan.offsets
    assert offsets.shape == (n, 3)
    assert not offsets[plan.computed].any()
    for i in range(n):
        t, r, c = grid.position(i)
        back, dr, dc = offsets[i].tolist()
        assert grid.token(t - back, r + dr, c + dc) == int(source[i])
    assert plan.frame_types == plan.schedule.types


@settings(max_examples=40, deadline=None)
@given(case=random_plans())
def test_save_load_round_trip(tmp_path_factory, case):
    _, plan = case
    folder = tmp_path_factory.mktemp("plans")
    path = plan.save(folder / "plan.npz")
    assert path == folder / "plan.npz"
    assert os.listdir(folder) == ["plan.npz"]  # the temp file was renamed, nothing left behind
    loaded = Plan.load(path)
    assert loaded.grid == plan.grid
    assert torch.equal(loaded.source, plan.source)
    assert loaded.schedule == plan.schedule  # letters and ref
    assert loaded.meta == plan.meta
    if plan.shift is None:
        assert loaded.shift is None
    else:
        assert loaded.shift.dtype == torch.float32 and torch.equal(loaded.shift, plan.shift)


def test_constructing_again_from_source_is_a_no_op():
    schedule = Schedule.parse("IPP")
    plan = Plan((3, 1, 2), [0, 1, 0, 2, 3, 2], schedule)
    assert plan.source.tolist() == [0, 1, 0, 0, 0, 0]  # chains 4 -> 3 -> 2 -> 0 and 5 -> 2 -> 0 resolved
    again = Plan(plan.grid, plan.source, plan.schedule)
    assert torch.equal(again.source, plan.source)


# -- persistence -----------------------------------------------------------------------------
def test_save_overwrites_and_keeps_meta_types(tmp_path):
    grid = Grid(2, 1, 2)
    first = Plan(grid, [0, 1, 0, 1], Schedule.parse("IP"), meta={"tau": 0.15, "name": "x", "list": [1, 2]})
    path = tmp_path / "p.npz"
    first.save(path)
    Plan.identity(grid).save(path)
    loaded = Plan.load(path)
    assert loaded.num_kept == 4 and loaded.meta == {"planner": "intra"}
    first.save(path)
    assert Plan.load(path).meta == {"tau": 0.15, "name": "x", "list": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["p.npz"]


def test_save_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "p.npz"
    Plan.identity((2, 1, 2)).save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        Plan((2, 1, 2), [0, 1, 0, 1], Schedule.parse("IP")).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.npz"]


def test_save_into_missing_folder(tmp_path):
    missing = tmp_path / "nope" / "deeper"
    with pytest.raises(FileNotFoundError, match=re.escape(f"folder {missing} does not exist")):
        Plan.identity((1, 1, 1)).save(missing / "plan.npz")
    assert not missing.exists()


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan file at .*missing.npz"):
        Plan.load(tmp_path / "missing.npz")


def _write_text(path):
    path.write_text("hello, not a plan")


def _write_other_npz(path):
    with open(path, "wb") as f:
        np.savez(f, a=np.arange(3))


def _write_bad_meta(path):
    with open(path, "wb") as f:
        np.savez(f, grid=np.array([1, 1, 1]), source=np.array([0]), types=np.array("I"), ref=np.array(1),
                 meta=np.array("{not json"))


def _write_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.arange(3))


def _write_empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("write", [_write_text, _write_other_npz, _write_bad_meta, _write_npy, _write_empty])
def test_load_of_non_plan_file_raises_plan_error(tmp_path, write):
    path = tmp_path / "thing.npz"
    write(path)
    with pytest.raises(PlanError, match=re.escape(f"{path} is not a lipcodec plan file")):
        Plan.load(path)


def test_load_of_plan_file_with_broken_rules_raises_plan_error(tmp_path):
    path = tmp_path / "p.npz"
    with open(path, "wb") as f:  # a keyframe that reuses a token
        np.savez(f, grid=np.array([2, 1, 1]), source=np.array([1, 1]), types=np.array("IP"), ref=np.array(1),
                 meta=np.array("{}"))
    with pytest.raises(PlanError, match="frame 0 is a keyframe"):
        Plan.load(path)


# -- validation messages ---------------------------------------------------------------------
def ip_grid():
    return Grid(2, 1, 3), Schedule.parse("IP")


@pytest.mark.parametrize(
    "source, message",
    [
        ([0, 1, 2, 3, 4, 6], "token 5 has source 6, outside 0..5"),
        ([0, 1, 2, -1, 4, 5], "token 3 has source -1, outside 0..5"),
        ([0, 1, 2, 3, 4], "source has 5 entries but the grid (2, 1, 3) has 6 tokens"),
        ([0, 1, 2, 3, 4, 5, 6], "source has 7 entries but the grid (2, 1, 3) has 6 tokens"),
    ],
)
def test_source_range_and_length(source, message):
    grid, schedule = ip_grid()
    with pytest.raises(PlanError, match=re.escape(message)):
        Plan(grid, source, schedule)


@pytest.mark.parametrize(
    "source, token, points_at",
    [
        ([0, 1, 2, 4, 3, 5], 3, 4),  # 2-cycle 3 <-> 4
        ([0, 1, 2, 4, 5, 3], 3, 4),  # 3-cycle 3 -> 4 -> 5 -> 3
        ([0, 1, 2, 3, 5, 4], 4, 5),  # 2-cycle 4 <-> 5
    ],
)
def test_cycles(source, token, points_at):
    grid, schedule = ip_grid()
    with pytest.raises(PlanError) as info:
        Plan(grid, source, schedule)
    message = str(info.value)
    assert f"token {token} is on a reference cycle" in message
    assert f"(it points at {points_at})" in message
    assert "every chain must end at a token that points at itself" in message


def test_chain_into_a_cycle_is_rejected():
    grid = Grid(3, 1, 2)
    # 2 -> 4 <-> 5: token 2 never reaches a computed token
    with pytest.raises(PlanError, match="reference cycle"):
        Plan(grid, [0, 1, 4, 3, 5, 4], Schedule.parse("IPP"))


def test_keyframe_with_reused_token():
    with pytest.raises(PlanError, match=re.escape(
        "frame 0 is a keyframe (I) but token 1 reuses token 0: keyframes are computed in full"
    )):
        Plan((2, 1, 2), [0, 0, 2, 3], Schedule.parse("IP"))
    # the message names the resolved source: 2 -> 1 -> 0
    with pytest.raises(PlanError, match=re.escape("frame 2 is a keyframe (i) but token 2 reuses token 0")):
        Plan((3, 1, 1), [0, 0, 1], Schedule.parse("IPi"))


def test_p_frame_reusing_a_future_frame():
    with pytest.raises(PlanError, match=re.escape(
        "token 1 in frame 1 (P) reuses a token of frame 2, which the schedule 'IPP' does not let "
        "frame 1 reference (reachable: [0])"
    )):
        Plan((3, 1, 1), [0, 2, 2], Schedule.parse("IPP"))


def test_reaching_across_an_idr():
    with pytest.raises(PlanError, match=re.escape(
        "token 3 in frame 3 (P) reuses a token of frame 1, which the schedule 'IPIP' does not let "
        "frame 3 reference (reachable: [2])"
    )):
        Plan((4, 1, 1), [0, 1, 2, 1], Schedule.parse("IPIP"))
    with pytest.raises(PlanError, match=re.escape("token 3 in frame 3 (P) reuses a token of frame 0")):
        Plan((4, 1, 1), [0, 0, 2, 1], Schedule.parse("IPIP"))  # 3 -> 1 -> 0: judged by where it ends
    # the chain 3 -> 2 -> ... is fine when it ends after the IDR
    assert Plan((4, 1, 1), [0, 0, 2, 2], Schedule.parse("IPIP")).source.tolist() == [0, 0, 2, 2]


def test_b_frames_and_reachable_frames():
    # a B-frame may use past and future anchors; chains resolve through them
    plan = Plan((5, 1, 1), [0, 4, 0, 2, 0], Schedule.parse("IbBbP"))
    assert plan.source.tolist() == [0, 0, 0, 0, 0]  # 1 -> 4 -> 0, 3 -> 2 -> 0
    assert plan.offsets.tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0]]
    # a token may copy directly from any frame its references reach (ref=1 P chain 3 -> 2 -> 1 -> 0)
    assert Plan((4, 1, 1), [0, 1, 2, 0], Schedule.parse("IPPP")).num_kept == 3
    # but a b-frame is referenced by nothing
    with pytest.raises(PlanError, match=re.escape(
        "token 4 in frame 4 (P) reuses a token of frame 3, which the schedule 'IbBbP' does not let "
        "frame 4 reference (reachable: [0])"
    )):
        Plan((5, 1, 1), [0, 1, 2, 3, 3], Schedule.parse("IbBbP"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_source(dtype):
    with pytest.raises(TypeError, match=re.escape(f"a plan's source must hold integer token ids, got dtype {dtype}")):
        Plan((1, 1, 2), torch.tensor([0, 1]).to(dtype), Schedule.parse("I"))
    with pytest.raises(TypeError, match="integer token ids"):
        Plan((1, 1, 2), [0.0, 1.0], Schedule.parse("I"))


def test_schedule_length_mismatch():
    with pytest.raises(PlanError, match=re.escape("schedule 'IP' has 2 frames but the grid has 3")):
        Plan((3, 1, 1), [0, 1, 2], Schedule.parse("IP"))


@pytest.mark.parametrize("shape", [(6, 3), (6,), (5, 2), (2, 6)])
def test_bad_shift_shape(shape):
    grid, schedule = ip_grid()
    with pytest.raises(PlanError, match=re.escape(f"shift must have shape (6, 2), got {shape}")):
        Plan(grid, range(6), schedule, shift=torch.zeros(shape))


def test_bad_grid():
    with pytest.raises(ValueError, match=re.escape("Grid.height must be a positive int, got 0")):
        Plan((2, 0, 3), [], Schedule.parse("IP"))


# -- constructors and helpers ----------------------------------------------------------------
def test_identity():
    plan = Plan.identity((3, 2, 2))
    assert plan.source.tolist() == list(range(12))
    assert plan.frame_types == "III" and plan.num_kept == 12 and plan.kept_ratio == 1.0
    assert plan.meta == {"planner": "intra"} and plan.shift is None
    assert plan.multiplicity.tolist() == [1] * 12
    assert plan.summary() == "Plan 3x2x2 tokens, III, kept 12/12 (100.0%)"
    ip = Plan.identity(Grid(3, 1, 1), Schedule.parse("IPP"))
    assert ip.frame_types == "IPP" and ip.computed.all()


def test_to_cpu_keeps_everything():
    plan = Plan((2, 1, 2), [0, 1, 0, 0], Schedule.parse("IP"), shift=torch.ones(4, 2), meta={"a": 1})
    moved = plan.to("cpu")
    assert moved is not plan
    assert torch.equal(moved.source, plan.source) and torch.equal(moved.shift, plan.shift)
    assert moved.schedule == plan.schedule and moved.meta == plan.meta and moved.grid == plan.grid
    assert moved.source.device.type == "cpu" and moved.keep.tolist() == [0, 1]
    assert Plan.identity((1, 1, 2)).to(torch.device("cpu")).shift is None


def test_shift_is_stored_as_float32():
    plan = Plan((1, 1, 2), [0, 1], Schedule.parse("I"), shift=np.zeros((2, 2), dtype=np.float64))
    assert plan.shift.dtype == torch.float32


def test_grid_helpers():
    grid = Grid.from_latents((1, 16, 9, 8, 12))
    assert tuple(grid) == (9, 4, 6) and grid.tokens_per_frame == 24 and grid.size == 216
    assert grid.token(2, 3, 5) == 2 * 24 + 3 * 6 + 5
    assert grid.position(grid.token(2, 3, 5)) == (2, 3, 5)
    with pytest.raises(ValueError, match=re.escape("latent size F,H,W = 9,7,12 is not divisible by the patch size (1, 2, 2)")):
        Grid.from_latents((16, 9, 7, 12))


# -- kept-count buckets ----------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(random_plans(), st.integers(1, 40))
def test_padded_rounds_the_kept_count_up_by_promoting_reused_tokens(case, multiple):
    _, plan = case
    padded = plan.padded(multiple)
    expected = min(-(-plan.num_kept // multiple) * multiple, plan.grid.size)
    assert padded.num_kept == expected
    assert bool((padded.computed >= plan.computed).all())  # only promotions
    still_reused = ~padded.computed
    assert torch.equal(padded.source[still_reused], plan.source[still_reused])  # the planner's own choices
    promoted = padded.computed & ~plan.computed
    if promoted.any() and still_reused.any():  # the stalest reuses go first
        assert plan.offsets[promoted, 0].min() >= plan.offsets[still_reused, 0].max()
    if padded.shift is not None:
        assert torch.equal(padded.shift[still_reused], plan.shift[still_reused])
        assert not padded.shift[promoted].any()
    assert padded.padded(multiple) is padded or padded.num_kept == plan.grid.size
    assert padded.meta["planner"] == plan.meta["planner"]


def test_padded_order_meta_and_errors():
    grid = Grid(3, 1, 4)
    # frame 1: token 4 reuses 0 (straight back), 5 reuses 2 (one column over); frame 2: 8 reuses 4 -> 0
    source = torch.tensor([0, 1, 2, 3, 0, 2, 6, 7, 4, 9, 10, 11])
    plan = Plan(grid, source, Schedule.parse("IPP"))
    assert plan.num_kept == 9
    one = plan.padded(5)
    assert one.num_kept == 10 and one.computed[8]  # two frames back goes first
    assert one.meta["kept_multiple"] == 5 and one.meta["promoted"] == 1
    two = plan.padded(11)
    assert two.computed[8] and two.computed[5] and not two.computed[4]  # then the one that moved in space
    assert plan.padded(3) is plan and plan.padded(1) is plan  # already a multiple
    assert plan.padded(100).num_kept == grid.size
    for bad in (0, -128, 1.5, True, "128"):
        with pytest.raises(ValueError, match="kept_multiple must be an int >= 1"):
            plan.padded(bad)

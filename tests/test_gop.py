"""GOP (x264 params, validation) and Schedule (frame types, references, coding order)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipcodec.gop import GOP, Schedule, latent_frame_of_pixel, pixel_frames_of_latent

FIELDS = "keyint, min-keyint, scenecut, bframes, b-adapt, b-pyramid, ref, open-gop"


@st.composite
def gops(draw, max_keyint: int = 50) -> GOP:
    keyint = draw(st.none() | st.integers(1, max_keyint))
    return GOP(
        keyint=keyint,
        min_keyint=draw(st.integers(1, keyint or max_keyint)),
        scenecut=draw(st.integers(0, 100)),
        bframes=draw(st.integers(0, 16)),
        b_adapt=draw(st.integers(0, 1)),
        b_pyramid=draw(st.sampled_from(["none", "strict", "normal"])),
        ref=draw(st.integers(1, 16)),
        open_gop=draw(st.booleans()),
    )


@st.composite
def laid_out(draw):
    """(gop, frames, cuts, change, schedule) from Schedule.from_gop."""
    gop = draw(gops(max_keyint=12))
    frames = draw(st.integers(1, 40))
    cuts = draw(st.lists(st.integers(0, frames - 1), max_size=6, unique=True))
    change = draw(st.none() | st.lists(st.floats(0, 1), min_size=frames, max_size=frames))
    return gop, frames, cuts, change, Schedule.from_gop(gop, frames, cuts=cuts, change=change)


def keyframes(s: Schedule) -> list[int]:
    return [t for t, kind in enumerate(s.types) if kind in "Ii"]


def b_runs(types: str) -> list[int]:
    return [len(run) for run in re.findall("[Bb]+", types)]


# -- GOP validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keyint": 0}, "GOP.keyint=0 is out of range: use >= 1"),
        ({"keyint": -3}, "GOP.keyint=-3 is out of range: use >= 1"),
        ({"min_keyint": 0}, "GOP.min_keyint=0 is out of range: use >= 1"),
        ({"scenecut": -1}, "GOP.scenecut=-1 is out of range: use 0..100"),
        ({"scenecut": 101}, "GOP.scenecut=101 is out of range: use 0..100"),
        ({"bframes": -1}, "GOP.bframes=-1 is out of range: use 0..16"),
        ({"bframes": 17}, "GOP.bframes=17 is out of range: use 0..16"),
        ({"b_adapt": 2}, "GOP.b_adapt=2 is out of range: use 0..1"),
        ({"b_adapt": -1}, "GOP.b_adapt=-1 is out of range: use 0..1"),
        ({"ref": 0}, "GOP.ref=0 is out of range: use 1..16"),
        ({"ref": 17}, "GOP.ref=17 is out of range: use 1..16"),
        ({"b_pyramid": "full"}, "GOP.b_pyramid='full' is not one of none, strict, normal"),
        ({"b_pyramid": 2}, "GOP.b_pyramid=2 is not one of none, strict, normal"),
        ({"keyint": 4, "min_keyint": 5}, "GOP.min_keyint=5 exceeds keyint=4: min_keyint must be <= keyint"),
    ],
)
def test_gop_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GOP(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keyint": "8"}, "GOP.keyint must be an int, got '8'"),
        ({"keyint": 8.0}, "GOP.keyint must be an int, got 8.0"),
        ({"min_keyint": None}, "GOP.min_keyint must be an int, got None"),
        ({"scenecut": 40.5}, "GOP.scenecut must be an int, got 40.5"),
        ({"bframes": True}, "GOP.bframes must be an int, got True"),
        ({"b_adapt": "1"}, "GOP.b_adapt must be an int, got '1'"),
        ({"ref": [1]}, "GOP.ref must be an int, got [1]"),
        ({"open_gop": 1}, "GOP.open_gop must be a bool, got 1"),
        ({"open_gop": "yes"}, "GOP.open_gop must be a bool, got 'yes'"),
    ],
)
def test_gop_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        GOP(**kwargs)


def test_gop_defaults_are_lipar():
    gop = GOP()
    assert (gop.keyint, gop.min_keyint, gop.scenecut, gop.bframes, gop.b_adapt, gop.b_pyramid, gop.ref, gop.open_gop) == (
        None, 1, 0, 0, 0, "none", 1, False,
    )
    assert Schedule.from_gop(gop, 6).types == "IPPPPP"


def test_min_keyint_equal_to_keyint_is_allowed():
    assert GOP(keyint=4, min_keyint=4).min_keyint == 4
    assert GOP(keyint=None, min_keyint=50).min_keyint == 50


# -- x264 params -----------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(gops())
def test_x264_params_round_trip(gop):
    text = gop.to_x264_params()
    assert GOP.from_x264_params(text) == gop
    assert str(gop) == text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("keyint=8:bframes=2:b-pyramid=normal", GOP(keyint=8, bframes=2, b_pyramid="normal")),
        ("keyint=infinite", GOP(keyint=None)),
        ("keyint=INFINITE:bframes=1", GOP(bframes=1)),
        ("b-pyramid=0", GOP(b_pyramid="none")),
        ("b-pyramid=1", GOP(b_pyramid="strict")),
        ("b-pyramid=2", GOP(b_pyramid="normal")),
        ("open-gop=1", GOP(open_gop=True)),
        ("open-gop=true", GOP(open_gop=True)),
        ("open-gop=0", GOP(open_gop=False)),
        ("min_keyint=2:keyint=5", GOP(keyint=5, min_keyint=2)),
        (" keyint = 6 : ref = 3 ", GOP(keyint=6, ref=3)),
        ("scenecut=40:b-adapt=1", GOP(scenecut=40, b_adapt=1)),
        ("", GOP()),
        ("keyint=4::", GOP(keyint=4)),
    ],
)
def test_x264_params_parse_print_parse(text, expected):
    gop = GOP.from_x264_params(text)
    assert gop == expected
    printed = gop.to_x264_params()
    assert GOP.from_x264_params(printed) == gop
    assert GOP.from_x264_params(printed).to_x264_params() == printed


def test_x264_params_canonical_string():
    assert GOP.from_x264_params("keyint=8:bframes=2:b-pyramid=normal").to_x264_params() == (
        "keyint=8:min-keyint=1:scenecut=0:bframes=2:b-adapt=0:b-pyramid=normal:ref=1:open-gop=0"
    )
    assert GOP(open_gop=True).to_x264_params().endswith("open-gop=1")
    assert GOP().to_x264_params().startswith("keyint=infinite:")


@pytest.mark.parametrize("text, key", [("gop=8", "gop"), ("keyint=8:b-frames=2", "b-frames"), ("weightp=2", "weightp")])
def test_x264_params_unknown_key_names_it_and_lists_accepted(text, key):
    with pytest.raises(ValueError) as info:
        GOP.from_x264_params(text)
    message = str(info.value)
    assert f"unknown GOP key {key!r}" in message
    assert f"accepted keys: {FIELDS}" in message


@pytest.mark.parametrize(
    "text, message",
    [
        ("keyint", "GOP key 'keyint' has no value"),
        ("keyint=abc", "GOP key keyint='abc' is not an integer"),
        ("bframes=1.5", "GOP key bframes='1.5' is not an integer"),
        ("min-keyint=", "GOP key min-keyint='' is not an integer"),
        ("open-gop=maybe", "GOP key open-gop='maybe' is not a boolean: use 0 or 1"),
        ("keyint=0", "GOP.keyint=0 is out of range: use >= 1"),
        ("bframes=20", "GOP.bframes=20 is out of range: use 0..16"),
        ("b-pyramid=3", "GOP.b_pyramid='3' is not one of none, strict, normal"),
        ("b-pyramid=full", "GOP.b_pyramid='full' is not one of none, strict, normal"),
        ("keyint=4:min-keyint=6", "GOP.min_keyint=6 exceeds keyint=4"),
    ],
)
def test_x264_params_value_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GOP.from_x264_params(text)


# -- Schedule.from_gop properties ------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(laid_out())
def test_schedule_structure(case):
    gop, frames, cuts, change, s = case
    types = s.types
    assert len(s) == frames and len(s.refs) == frames
    assert types[0] == "I"
    assert s.ref == gop.ref
    # keyframes at most keyint apart (and the tail after the last one is shorter than keyint)
    if gop.keyint is not None:
        bounds = keyframes(s) + [frames]
        assert all(b - a <= gop.keyint for a, b in zip(bounds, bounds[1:])), types
    # B-frames only when allowed, and never in runs longer than bframes
    if gop.bframes == 0:
        assert not set(types) & set("Bb"), types
    assert all(run <= gop.bframes for run in b_runs(types)), types
    if gop.b_pyramid == "none":
        assert "B" not in types
    # keyframe letters follow open_gop
    assert all(types[k] == ("i" if gop.open_gop and k > 0 else "I") for k in keyframes(s)), types
    # b_adapt=1 keeps frames that changed a lot out of B runs
    if gop.b_adapt and change is not None:
        assert all(change[t] <= 0.5 for t, kind in enumerate(types) if kind in "Bb"), (types, change)


@settings(max_examples=150, deadline=None)
@given(laid_out())
def test_schedule_references(case):
    gop, frames, cuts, change, s = case
    types, refs, order = s.types, s.refs, s.coding_order
    assert sorted(order) == list(range(frames))
    position = {t: k for k, t in enumerate(order)}
    for t, kind in enumerate(types):
        past = [r for r in refs[t] if r < t]
        future = [r for r in refs[t] if r > t]
        assert t not in refs[t]
        assert all(types[r] in "IiPB" for r in refs[t]), (types, t, refs[t])
        assert all(position[r] < position[t] for r in refs[t]), (types, t, refs[t], order)
        assert list(refs[t]) == past + future  # past first, nearest first
        assert past == sorted(past, reverse=True)
        if kind in "Ii":
            assert refs[t] == ()
        elif kind == "P":
            assert not future and 1 <= len(past) <= gop.ref, (types, t, refs[t])
        else:  # B, b: from_gop always closes a B run with a later anchor
            assert 1 <= len(past) <= gop.ref and len(future) == 1, (types, t, refs[t])


@settings(max_examples=150, deadline=None)
@given(laid_out())
def test_schedule_no_reference_crosses_a_keyframe(case):
    gop, frames, cuts, change, s = case
    types = s.types
    keys = keyframes(s)
    for t in range(frames):
        prev_key = max(k for k in keys if k <= t)
        next_key = min([k for k in keys if k > t], default=frames)
        for r in s.reachable[t]:
            if r < t:
                assert r >= prev_key, (types, t, sorted(s.reachable[t]))
            else:  # only an open-GOP keyframe may be referenced from before it, never crossed
                assert r < next_key or (r == next_key and types[r] == "i"), (types, t, sorted(s.reachable[t]))
        if not gop.open_gop:
            assert all(prev_key <= r < next_key for r in s.reachable[t]), (types, t)


@settings(max_examples=150, deadline=None)
@given(laid_out())
def test_schedule_parse_of_letters_gives_same_layout(case):
    *_, s = case
    again = Schedule.parse(str(s), s.ref)
    assert again == s
    assert again.refs == s.refs and again.coding_order == s.coding_order
    assert Schedule.parse(str(s)).coding_order == s.coding_order  # the order does not depend on ref


@settings(max_examples=150, deadline=None)
@given(laid_out())
def test_scene_cuts_become_keyframes_only_past_min_keyint(case):
    gop, frames, cuts, change, s = case
    keys = keyframes(s)
    assert keys[0] == 0
    for prev, k in zip(keys, keys[1:]):
        forced = gop.keyint is not None and k - prev == gop.keyint
        assert forced or (k in cuts and k - prev >= gop.min_keyint), (s.types, cuts, gop)
    for c in cuts:
        if c > 0 and c not in keys:
            prev = max(k for k in keys if k < c)
            assert c - prev < gop.min_keyint, (s.types, cuts, gop)


@settings(max_examples=100, deadline=None)
@given(gops(max_keyint=12), st.integers(2, 40), st.data())
def test_a_continued_stream_keeps_its_keyframe_rhythm(gop, frames, data):
    """The frames of a stream from frame p on, laid out with ``since_keyframe`` = p - the
    last keyframe at or before p, get the stream's keyframes (and their own first frame)."""
    whole = Schedule.from_gop(gop, frames)
    p = data.draw(st.integers(1, frames - 1))
    since = p - max(k for k in keyframes(whole) if k <= p)
    tail = Schedule.from_gop(gop, frames - p, since_keyframe=since)
    assert tail.types[0] in "Ii"  # nothing before the first frame can be referenced
    assert keyframes(tail)[1:] == [k - p for k in keyframes(whole) if k > p]


def test_since_keyframe_counts_for_keyint_and_min_keyint():
    assert Schedule.from_gop(GOP(keyint=4), 8, since_keyframe=2).types == "IPIPPPIP"
    calm = GOP(min_keyint=3)
    assert Schedule.from_gop(calm, 6, cuts=[1, 4], since_keyframe=1).types == "IPPPIP"  # 1: too soon after -1
    with pytest.raises(ValueError, match="since_keyframe=-1"):
        Schedule.from_gop(GOP(), 4, since_keyframe=-1)


@settings(max_examples=100, deadline=None)
@given(gops(max_keyint=12), st.integers(1, 40))
def test_change_only_matters_with_b_adapt(gop, frames):
    fixed = Schedule.from_gop(gop, frames)
    assert Schedule.from_gop(gop, frames, change=[0.0] * frames) == fixed  # calm: nothing to shorten
    busy = Schedule.from_gop(gop, frames, change=[1.0] * frames)
    if gop.b_adapt:
        assert not set(busy.types) & set("Bb")  # every frame changed too much for B prediction
    else:
        assert busy == fixed


@settings(max_examples=100, deadline=None)
@given(gops(max_keyint=12), st.integers(2, 40))
def test_open_gop_b_frames_before_a_keyframe_reference_it(gop, frames):
    s = Schedule.from_gop(gop, frames)
    for k in keyframes(s)[1:]:
        run = []  # the B-frames right before keyframe k
        while s.types[k - 1 - len(run)] in "Bb":
            run.append(k - 1 - len(run))
        if gop.open_gop:
            assert all(k in s.reachable[t] for t in run), (s.types, k)
        else:
            assert not run, (s.types, k)  # a P closes every run before an IDR


# -- hand-checked examples -------------------------------------------------------------------
def test_ibbbp_coding_order_and_refs():
    s = Schedule.parse("IbBbP")
    assert s.coding_order == (0, 4, 2, 1, 3)
    assert s.refs == ((), (0, 2), (0, 4), (2, 4), (0,))
    assert s.reachable == (frozenset(), frozenset({0, 2, 4}), frozenset({0, 4}), frozenset({0, 2, 4}), frozenset({0}))


def test_b_pyramid_strict_vs_normal_on_seven_b_frames():
    strict = Schedule.from_gop(GOP(bframes=7, b_pyramid="strict"), 9)
    assert strict.types == "IbbbBbbbP"
    assert strict.coding_order == (0, 8, 4, 1, 2, 3, 5, 6, 7)
    assert strict.refs == ((), (0, 4), (0, 4), (0, 4), (0, 8), (4, 8), (4, 8), (4, 8), (0,))

    normal = Schedule.from_gop(GOP(bframes=7, b_pyramid="normal"), 9)
    assert normal.types == "IbBbBbBbP"
    assert normal.coding_order == (0, 8, 4, 2, 6, 1, 3, 5, 7)
    assert normal.refs == ((), (0, 2), (0, 4), (2, 4), (0, 8), (4, 6), (4, 8), (6, 8), (0,))

    none = Schedule.from_gop(GOP(bframes=7), 9)
    assert none.types == "IbbbbbbbP"
    assert none.coding_order == (0, 8, 1, 2, 3, 4, 5, 6, 7)
    assert all(none.refs[t] == (0, 8) for t in range(1, 8))


def test_keyint_and_bframes_layout():
    s = Schedule.from_gop(GOP.from_x264_params("keyint=8:bframes=2:b-pyramid=normal"), 12)
    assert s.types == "IBbPBbPPIBbP"
    assert s.coding_order == (0, 3, 1, 2, 6, 4, 5, 7, 8, 11, 9, 10)
    assert s.refs[1] == (0, 3) and s.refs[2] == (1, 3) and s.refs[9] == (8, 11)
    assert s.refs[8] == () and s.refs[7] == (6,)


def test_open_gop_layout():
    s = Schedule.from_gop(GOP.from_x264_params("keyint=4:bframes=3:open-gop=1"), 12)
    assert s.types == "IbbbibbbibbP"
    assert s.coding_order == (0, 4, 1, 2, 3, 8, 5, 6, 7, 11, 9, 10)
    assert all(s.refs[t] == (0, 4) for t in (1, 2, 3))
    assert all(s.refs[t] == (4, 8) for t in (5, 6, 7))
    assert s.refs[4] == () and s.refs[8] == ()
    # closed: the B run stops one frame short of the IDR, which a P closes
    closed = Schedule.from_gop(GOP.from_x264_params("keyint=4:bframes=3"), 12)
    assert closed.types == "IbbPIbbPIbbP"
    assert closed.refs[1] == (0, 3)


def test_multiple_references():
    s = Schedule.from_gop(GOP(bframes=2, ref=3), 10)
    assert s.types == "IbbPbbPbbP"
    assert s.refs[9] == (6, 3, 0) and s.refs[7] == (6, 3, 0, 9)
    assert Schedule.parse("IPPPIPP", ref=3).refs == ((), (0,), (1, 0), (2, 1, 0), (), (4,), (5, 4))


def test_scene_cut_respects_min_keyint():
    gop = GOP(keyint=10, min_keyint=3)
    assert Schedule.from_gop(gop, 10, cuts=[2, 4, 5, 9]).types == "IPPPIPPPPI"
    assert Schedule.from_gop(GOP(), 6, cuts=[3]).types == "IPPIPP"
    assert Schedule.from_gop(GOP(open_gop=True), 6, cuts=[3]).types == "IPPiPP"


def test_b_adapt_shortens_runs_at_big_changes():
    gop = GOP(bframes=3, b_adapt=1)
    change = [0, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert Schedule.from_gop(gop, 9, change=change).types == "IbPbbbPbP"
    assert Schedule.from_gop(GOP(bframes=3), 9, change=change).types == "IbbbPbbbP"


def test_intra_schedule():
    s = Schedule.intra(4)
    assert s.types == "IIII" and s.coding_order == (0, 1, 2, 3) and s.refs == ((),) * 4


@pytest.mark.parametrize(
    "letters, error, message",
    [
        ("", ValueError, "a schedule needs at least one frame"),
        ("PPI", ValueError, "schedule 'PPI' must start with a keyframe (I or i), not 'P'"),
        ("IPXQ", ValueError, "unknown frame type(s) ['Q', 'X'] in 'IPXQ'; use the letters IiPBb"),
    ],
)
def test_schedule_errors(letters, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Schedule(letters)


def test_from_gop_needs_a_frame():
    with pytest.raises(ValueError, match="at least one frame, got 0"):
        Schedule.from_gop(GOP(), 0)


def test_schedule_ref_error_names_the_schedule():
    # a Schedule's own field must not be reported as a GOP field
    with pytest.raises(ValueError, match=re.escape("Schedule.ref=0 is out of range: use 1..16")):
        Schedule("IP", 0)
    with pytest.raises(TypeError, match=re.escape("Schedule.ref must be an int, got 2.0")):
        Schedule.parse("IP", ref=2.0)


# -- latent <-> pixel frames -----------------------------------------------------------------
@given(st.integers(0, 500), st.integers(1, 8))
def test_latent_pixel_frame_mapping(latent, factor):
    pixels = pixel_frames_of_latent(latent, factor)
    assert len(pixels) == (1 if latent == 0 else factor)
    assert all(latent_frame_of_pixel(p, factor) == latent for p in pixels)
    if latent:
        assert pixels.start == pixel_frames_of_latent(latent - 1, factor).stop  # no gaps, no overlaps


def test_latent_pixel_frame_examples_and_errors():
    assert [latent_frame_of_pixel(p) for p in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert pixel_frames_of_latent(0) == range(0, 1) and pixel_frames_of_latent(2) == range(5, 9)
    with pytest.raises(ValueError, match="pixel frame -1 is negative"):
        latent_frame_of_pixel(-1)
    with pytest.raises(ValueError, match="latent frame -2 is negative"):
        pixel_frames_of_latent(-2)

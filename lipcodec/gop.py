"""GOP settings (x264 vocabulary) and the concrete frame-type schedule they produce.

Everything here counts *latent* frames. With a 4x temporal causal VAE (Wan 2.1/2.2),
latent frame 0 is pixel frame 0 and latent frame k >= 1 covers pixel frames 4k-3 .. 4k,
so ``keyint=8`` refreshes every 8 latent frames = every 32 pixel frames (2 s at 16 fps).
:func:`latent_frame_of_pixel` and :func:`pixel_frames_of_latent` do the mapping.

Frame-type letters follow x264's log output:

====  ==========================================================================
I     IDR keyframe: fully computed; nothing references across it
i     open-GOP keyframe: fully computed; B-frames just before it may reference it
P     predicted: tokens may reuse tokens of up to ``ref`` earlier anchors
B     referenced B-frame (b-pyramid): past and future anchors; others may use it
b     B-frame: past and future anchors; nothing references it
====  ==========================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs

FRAME_TYPES = "IiPBb"
TEMPORAL_FACTOR = 4  # pixel frames per latent frame after the first (Wan's causal VAE)
_KEYFRAMES = "Ii"
_ANCHORS = "IiPB"  # frames other frames may reference
_PYRAMIDS = ("none", "strict", "normal")


def latent_frame_of_pixel(pixel_frame: int, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """The latent frame that holds ``pixel_frame`` (causal VAE: pixel 0 -> latent 0)."""
    if pixel_frame < 0:
        raise ValueError(f"pixel frame {pixel_frame} is negative")
    return (pixel_frame + temporal_factor - 1) // temporal_factor


def pixel_frames_of_latent(latent_frame: int, temporal_factor: int = TEMPORAL_FACTOR) -> range:
    """The pixel frames a latent frame covers: ``range(0, 1)`` for 0, else ``4k-3 .. 4k``."""
    if latent_frame < 0:
        raise ValueError(f"latent frame {latent_frame} is negative")
    if latent_frame == 0:
        return range(0, 1)
    return range(temporal_factor * latent_frame - temporal_factor + 1, temporal_factor * latent_frame + 1)


def _in_range(lo: int, hi: int | None = None):
    def check(instance, attribute, value):
        if value is None and attribute.name == "keyint":
            return
        owner = type(instance).__name__
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{owner}.{attribute.name} must be an int, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{owner}.{attribute.name}={value} is out of range: use {bound}")

    return check


@attrs.frozen
class GOP:
    """Keyframe and reference structure, in x264's names, counted in latent frames.

    The defaults are LIPAR's setting: one keyframe at the start (``keyint=None`` means
    infinite), no scene-cut detection, P-frames that reference the previous frame.

    Important:
        keyint: longest distance between keyframes (x264 ``keyint``/ffmpeg ``-g``); None = infinite.
        bframes: consecutive B-frames between anchors (``bframes``/``-bf``).
        ref: how many earlier anchors a P-frame may reference (``ref``/``-refs``).
        scenecut: 0 disables; otherwise a frame where more than ``100 - scenecut`` percent
            of tokens changed becomes a keyframe (x264: higher = more sensitive, default 40).

    To tinker with:
        min_keyint: a scene cut closer than this to the last keyframe stays a P-frame.
        b_adapt: 0 = fixed B pattern; 1 = shorten a B run at frames that change too much
            to gain from B prediction (more than half their tokens changed).
        b_pyramid: "none", "strict" (one referenced B per run) or "normal" (recursive).
        open_gop: B-frames before a keyframe may reference it (it is written ``i``).
    """

    keyint: int | None = attrs.field(default=None, validator=_in_range(1))
    min_keyint: int = attrs.field(default=1, validator=_in_range(1))
    scenecut: int = attrs.field(default=0, validator=_in_range(0, 100))
    bframes: int = attrs.field(default=0, validator=_in_range(0, 16))
    b_adapt: int = attrs.field(default=0, validator=_in_range(0, 1))
    b_pyramid: str = attrs.field(default="none")
    ref: int = attrs.field(default=1, validator=_in_range(1, 16))
    open_gop: bool = attrs.field(default=False)

    @b_pyramid.validator
    def _check_pyramid(self, attribute, value):
        if value not in _PYRAMIDS:
            raise ValueError(f"GOP.b_pyramid={value!r} is not one of {', '.join(_PYRAMIDS)}")

    @open_gop.validator
    def _check_open_gop(self, attribute, value):
        if not isinstance(value, bool):
            raise TypeError(f"GOP.open_gop must be a bool, got {value!r}")

    def __attrs_post_init__(self):
        if self.keyint is not None and self.min_keyint > self.keyint:
            raise ValueError(
                f"GOP.min_keyint={self.min_keyint} exceeds keyint={self.keyint}: "
                "min_keyint must be <= keyint"
            )

    # -- x264 params strings -------------------------------------------------------------
    @classmethod
    def from_x264_params(cls, params: str) -> GOP:
        """Parse ``"keyint=8:bframes=2:b-pyramid=normal"``; unset fields keep their defaults.

        >>> GOP.from_x264_params("keyint=8:bframes=2:b-pyramid=normal").bframes
        2
        """
        values: dict = {}
        for item in filter(None, params.strip().split(":")):
            key, sep, raw = item.partition("=")
            name = key.strip().replace("-", "_")
            if name not in _X264_FIELDS:
                raise ValueError(
                    f"unknown GOP key {key.strip()!r} in {params!r}; accepted keys: "
                    + ", ".join(f.replace("_", "-") for f in _X264_FIELDS)
                )
            if not sep:
                raise ValueError(f"GOP key {key!r} has no value in {params!r}: write {key}=VALUE")
            values[name] = _parse_value(name, raw.strip())
        return cls(**values)

    def to_x264_params(self) -> str:
        """The canonical x264 params string; ``from_x264_params`` turns it back into ``self``."""
        parts = []
        for name in _X264_FIELDS:
            value = getattr(self, name)
            if name == "keyint" and value is None:
                text = "infinite"
            elif isinstance(value, bool):
                text = str(int(value))
            else:
                text = str(value)
            parts.append(f"{name.replace('_', '-')}={text}")
        return ":".join(parts)

    def __str__(self) -> str:
        return self.to_x264_params()


_X264_FIELDS = tuple(f.name for f in attrs.fields(GOP))


def _parse_value(name: str, raw: str):
    if name == "b_pyramid":
        # x264 also accepts 0/1/2 for none/strict/normal
        return _PYRAMIDS[int(raw)] if raw.isdigit() and int(raw) < 3 else raw
    if name == "open_gop":
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"GOP key open-gop={raw!r} is not a boolean: use 0 or 1")
    if name == "keyint" and raw.lower() == "infinite":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"GOP key {name.replace('_', '-')}={raw!r} is not an integer") from None


# ---------------------------------------------------------------------------------------
@attrs.frozen
class Schedule:
    """Concrete frame types per latent frame, in display order, with derived references.

    The letters are the single truth (see the module docstring); ``ref`` bounds how many
    past anchors a frame may use. References and the coding order are derived:

    - coding order: each keyframe/P-frame is coded before the B-frames that precede it in
      display order (an ``I`` closes the run first: nothing references across an IDR);
      inside a B run the referenced ``B`` nearest the middle is coded first, recursively,
      then the ``b`` frames.
    - references: the ``ref`` nearest earlier anchors already coded (never past a
      keyframe), plus, for B-frames, the nearest later anchor already coded.

    >>> s = Schedule.parse("IbBbP")
    >>> s.coding_order
    (0, 4, 2, 1, 3)
    >>> s.refs[1], s.refs[2]
    ((0, 2), (0, 4))
    """

    types: str = attrs.field()
    ref: int = attrs.field(default=1, validator=_in_range(1, 16))

    @types.validator
    def _check_types(self, attribute, value):
        if not value:
            raise ValueError("a schedule needs at least one frame")
        bad = sorted(set(value) - set(FRAME_TYPES))
        if bad:
            raise ValueError(f"unknown frame type(s) {bad} in {value!r}; use the letters {FRAME_TYPES}")
        if value[0] not in _KEYFRAMES:
            raise ValueError(f"schedule {value!r} must start with a keyframe (I or i), not {value[0]!r}")

    @classmethod
    def parse(cls, letters: str, ref: int = 1) -> Schedule:
        return cls(letters.strip(), ref)

    @classmethod
    def intra(cls, frames: int) -> Schedule:
        """Every frame a keyframe: the all-intra schedule."""
        return cls("I" * frames)

    @classmethod
    def from_gop(
        cls, gop: GOP, frames: int, *, cuts: Sequence[int] = (), change: Sequence[float] | None = None,
        since_keyframe: int = 0,
    ) -> Schedule:
        """Lay out ``frames`` latent frames by ``gop``.

        ``cuts`` are detected scene cuts (frames that become keyframes if ``min_keyint``
        allows); ``change[t]`` is the share of tokens of frame t that changed since t-1,
        used by ``b_adapt=1``. ``since_keyframe``: these frames continue a longer stream
        whose last keyframe was that many frames before frame 0 - ``keyint`` and
        ``min_keyint`` count from it; frame 0 is a keyframe here either way (nothing before
        it can be referenced).
        """
        if frames < 1:
            raise ValueError(f"a schedule needs at least one frame, got {frames}")
        if change is not None and len(change) != frames:
            raise ValueError(f"change has {len(change)} entries for {frames} frames: give one share per frame")
        if since_keyframe < 0:
            raise ValueError(f"since_keyframe={since_keyframe}: a count of frames, >= 0")
        cut_set = set(int(c) for c in cuts)
        keyframes, last = [0], -since_keyframe  # last: the keyframe keyint counts from
        for t in range(1, frames):
            since = t - last
            if (gop.keyint is not None and since >= gop.keyint) or (t in cut_set and since >= gop.min_keyint):
                keyframes.append(t)
                last = t
        types = ["P"] * frames
        for k in keyframes:
            types[k] = "i" if (gop.open_gop and k > 0) else "I"
        bounds = keyframes[1:] + [frames]
        for start, end in zip(keyframes, bounds):
            t = start + 1
            while t < end:
                run = min(gop.bframes, end - t - 1)
                if gop.open_gop and end < frames and end - t <= gop.bframes:
                    run = end - t  # the next keyframe is the run's future anchor
                if gop.b_adapt and change is not None:
                    limit = 0
                    while limit < run and change[t + limit] <= 0.5:
                        limit += 1
                    run = limit
                for k in range(t, t + run):
                    types[k] = "b"
                _mark_pyramid(types, t, t + run, gop.b_pyramid)
                t += run + 1  # the anchor after the run stays "P" (or is the next keyframe)
        return cls("".join(types), gop.ref)

    # -- derived ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.types)

    def __str__(self) -> str:
        return self.types

    @property
    def coding_order(self) -> tuple[int, ...]:
        return self._layout[0]

    @property
    def refs(self) -> tuple[tuple[int, ...], ...]:
        """Allowed reference frames per frame (display indices), nearest first, past then future."""
        return self._layout[1]

    @functools.cached_property
    def reachable(self) -> tuple[frozenset[int], ...]:
        """Frames a token may end up copying from once reference chains are resolved."""
        closure: list[frozenset[int]] = [frozenset()] * len(self)
        for t in self.coding_order:
            closure[t] = frozenset(self.refs[t]).union(*(closure[r] for r in self.refs[t]))
        return tuple(closure)

    @functools.cached_property
    def _layout(self):
        return _layout(self.types, self.ref)


def _mark_pyramid(types: list[str], lo: int, hi: int, pyramid: str, top: bool = True) -> None:
    """Promote the middle B of runs ``types[lo:hi]`` to a referenced ``B``."""
    if pyramid == "none" or hi - lo < 2:
        return
    mid = (lo + hi - 1) // 2
    types[mid] = "B"
    if pyramid == "normal":
        _mark_pyramid(types, lo, mid, pyramid, False)
        _mark_pyramid(types, mid + 1, hi, pyramid, False)


def _layout(types: str, ref: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    order: list[int] = []
    run: list[int] = []

    def flush_run(lo_run: list[int]) -> None:
        def code_b(frames: list[int]) -> None:
            upper = [t for t in frames if types[t] == "B"]
            if not upper:
                return
            middle = (frames[0] + frames[-1]) / 2
            pick = min(upper, key=lambda t: (abs(t - middle), t))
            order.append(pick)
            code_b([t for t in frames if t < pick])
            code_b([t for t in frames if t > pick])

        if lo_run:
            code_b(lo_run)
            order.extend(t for t in lo_run if types[t] == "b")
        lo_run.clear()

    for t, kind in enumerate(types):
        if kind in "Bb":
            run.append(t)
        elif kind == "I":  # IDR: close the pending run first, nothing crosses it
            flush_run(run)
            order.append(t)
        else:  # i, P: coded before the B run that precedes it
            order.append(t)
            flush_run(run)
    flush_run(run)

    position = {t: k for k, t in enumerate(order)}
    refs: list[tuple[int, ...]] = []
    for t, kind in enumerate(types):
        if kind in _KEYFRAMES:
            refs.append(())
            continue
        past: list[int] = []
        for s in range(t - 1, -1, -1):
            if types[s] in _ANCHORS and position[s] < position[t]:
                past.append(s)
                if len(past) == ref:
                    break
            if types[s] in _KEYFRAMES:
                break
        future: list[int] = []
        if kind in "Bb":
            for s in range(t + 1, len(types)):
                if types[s] == "I":
                    break
                if types[s] in _ANCHORS and position[s] < position[t]:
                    future.append(s)
                    break
        refs.append(tuple(past) + tuple(future))
    return tuple(order), tuple(refs)


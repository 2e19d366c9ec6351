"""A token plan: for every latent token, the token whose output it takes.

One truth: ``source[i]`` is a flat token id (frame-major raster over the token grid, the
order a video DiT flattens its patches in). ``source[i] == i`` means token i is computed;
otherwise token i reuses the output of ``source[i]``, which is always a computed token
(chains are resolved when the plan is built). Everything else - the kept ids, the gather
and restore indices, multiplicities, ratios, frame types - is derived from it.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import attrs
import numpy as np
import torch

from .atomic import publish
from .gop import Schedule


@attrs.frozen
class Grid:
    """The token grid of one video: latent frames x token rows x token columns."""

    frames: int
    height: int
    width: int

    def __attrs_post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Grid.{name} must be a positive int, got {value!r}")

    @classmethod
    def of(cls, grid) -> Grid:
        return grid if isinstance(grid, Grid) else cls(*(int(v) for v in grid))

    @classmethod
    def from_latents(cls, latents_shape, patch_size=(1, 2, 2)) -> Grid:
        """Token grid of latents shaped (B, C, F, H, W) or (C, F, H, W) for a patch size."""
        *_, f, h, w = latents_shape
        pt, ph, pw = patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(
                f"latent size F,H,W = {f},{h},{w} is not divisible by the patch size {tuple(patch_size)}: "
                "crop or pad the video so each side is a multiple of the patch"
            )
        return cls(f // pt, h // ph, w // pw)

    def check_positions(self, positions: int | None, *, frames: bool = True) -> None:
        """Raise if the grid needs more RoPE positions on an axis than a model's table holds
        (``rope_max_seq_len``; None = unknown, no check). ``frames=False`` checks only rows and
        columns (the streaming runner shifts time positions itself)."""
        if positions is None:
            return
        axes = (("frames", self.frames),) if frames else ()
        for name, size in (*axes, ("rows", self.height), ("columns", self.width)):
            if size > positions:
                raise ValueError(
                    f"the latents are {size} tokens long in {name} (token grid {tuple(self)}), but the model's "
                    f"RoPE table holds {positions} positions per axis (rope_max_seq_len): use a smaller video "
                    f"(at most {positions} tokens per axis) or a model built with a larger rope_max_seq_len"
                )

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width

    def __iter__(self):
        return iter((self.frames, self.height, self.width))

    def token(self, frame, row, col):
        return (frame * self.height + row) * self.width + col

    def position(self, token):
        """(frame, row, col) of flat token ids (ints, arrays or tensors)."""
        frame, rest = token // self.tokens_per_frame, token % self.tokens_per_frame
        return frame, rest // self.width, rest % self.width


def _as_source(source) -> torch.Tensor:
    tensor = torch.as_tensor(source)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise TypeError(f"a plan's source must hold integer token ids, got dtype {tensor.dtype}")
    return tensor.to(torch.int64).flatten()


class PlanError(ValueError):
    """A plan that breaks one of the rules in :class:`Plan`'s docstring."""


@attrs.frozen(eq=False)
class Plan:
    """Which tokens are computed, and where every reused token takes its output from.

    Args:
        grid: token grid (frames, rows, cols) or a :class:`Grid`.
        source: one token id per token; chains (a token reusing a reused token) are
            resolved here, so ``plan.source`` always points at computed tokens.
        schedule: frame types and allowed references; a reused token must end at a frame
            the schedule lets it reach, and keyframes reuse nothing.
        shift: optional sub-token displacement (rows, cols) per token, in token units,
            that a restore step may apply by warping the reference output; None = none.
        meta: free-form description (planner name, parameters) carried into reports.
    """

    grid: Grid = attrs.field(converter=Grid.of)
    source: torch.Tensor = attrs.field(converter=_as_source)
    schedule: Schedule = attrs.field()
    shift: torch.Tensor | None = attrs.field(default=None)
    meta: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self):
        n = self.grid.size
        if self.source.numel() != n:
            raise PlanError(f"source has {self.source.numel()} entries but the grid {tuple(self.grid)} has {n} tokens")
        if len(self.schedule) != self.grid.frames:
            raise PlanError(
                f"schedule {str(self.schedule)!r} has {len(self.schedule)} frames but the grid has {self.grid.frames}"
            )
        bad = (self.source < 0) | (self.source >= n)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise PlanError(f"token {i} has source {int(self.source[i])}, outside 0..{n - 1}")
        object.__setattr__(self, "source", _resolve_chains(self.source, self.grid))
        if self.shift is not None:
            shift = torch.as_tensor(self.shift, dtype=torch.float32, device=self.source.device)
            if shift.shape != (n, 2):
                raise PlanError(f"shift must have shape ({n}, 2), got {tuple(shift.shape)}")
            object.__setattr__(self, "shift", shift)
        self._check_schedule()

    def _check_schedule(self) -> None:
        reused = ~self.computed
        if not reused.any():
            return
        frame_of = torch.arange(self.grid.size, device=self.source.device) // self.grid.tokens_per_frame
        src_frame = self.source // self.grid.tokens_per_frame
        types = self.schedule.types
        reach = self.schedule.reachable
        frames = range(self.grid.frames)
        allowed = torch.tensor([[r in reach[t] for r in frames] for t in frames], device=self.source.device)
        ok = allowed[frame_of, src_frame] | ~reused
        if not ok.all():
            i = int((~ok).nonzero()[0, 0])
            t = int(frame_of[i])
            if types[t] in "Ii":
                raise PlanError(
                    f"frame {t} is a keyframe ({types[t]}) but token {i} reuses token {int(self.source[i])}: "
                    "keyframes are computed in full"
                )
            raise PlanError(
                f"token {i} in frame {t} ({types[t]}) reuses a token of frame {int(src_frame[i])}, which the "
                f"schedule {types!r} does not let frame {t} reference (reachable: {sorted(reach[t])})"
            )

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def identity(cls, grid, schedule: Schedule | None = None) -> Plan:
        """The all-intra plan: every token computed (reproduces the unpatched model)."""
        grid = Grid.of(grid)
        return cls(grid, torch.arange(grid.size), schedule or Schedule.intra(grid.frames), meta={"planner": "intra"})

    # -- derived (cached) -----------------------------------------------------------------
    @functools.cached_property
    def computed(self) -> torch.Tensor:
        """Bool per token: computed (True) or reused (False)."""
        return self.source == torch.arange(self.grid.size, device=self.source.device)

    @functools.cached_property
    def keep(self) -> torch.Tensor:
        """Sorted ids of computed tokens: the gather index after patch embedding."""
        return self.computed.nonzero().flatten()

    @functools.cached_property
    def slot(self) -> torch.Tensor:
        """For every token, the row of its source among the kept tokens: the restore index.

        ``full = kept_output[:, plan.slot]`` rebuilds the whole sequence in one gather.
        """
        return torch.searchsorted(self.keep, self.source)

    @functools.cached_property
    def multiplicity(self) -> torch.Tensor:
        """For every kept token, how many tokens (itself included) take its output."""
        return torch.bincount(self.slot, minlength=self.keep.numel())

    @property
    def num_kept(self) -> int:
        return int(self.keep.numel())

    @property
    def kept_ratio(self) -> float:
        return self.num_kept / self.grid.size

    @functools.cached_property
    def frame_kept(self) -> np.ndarray:
        """Kept ratio per latent frame (float64 numpy array)."""
        per_frame = self.computed.reshape(self.grid.frames, -1).float().mean(1)
        return per_frame.cpu().numpy().astype(np.float64)

    @property
    def frame_types(self) -> str:
        return self.schedule.types

    @functools.cached_property
    def offsets(self) -> torch.Tensor:
        """Per token (frames back, rows, cols) to its source; zeros for computed tokens."""
        here = torch.stack(self.grid.position(torch.arange(self.grid.size, device=self.source.device)), 1)
        there = torch.stack(self.grid.position(self.source), 1)
        return torch.stack([here[:, 0] - there[:, 0], there[:, 1] - here[:, 1], there[:, 2] - here[:, 2]], 1)

    def padded(self, multiple: int) -> Plan:
        """The plan with its kept count rounded up to a multiple of ``multiple`` (at most
        every token): reused tokens are promoted to computed, those whose source lies
        furthest back in time first (then furthest in space, then the lower token id).

        Kept counts in buckets give the pruned sequence a few fixed lengths, so a compiled
        model (``torch.compile`` with static shapes, CUDA graphs) serves many plans with one
        graph per bucket instead of one per plan; 128 matches attention kernels' tiles.
        Promoting only adds computed tokens, so every reuse left is one the planner chose.
        """
        check_kept_multiple(multiple)
        target = min(-(-self.num_kept // multiple) * multiple, self.grid.size)
        need = target - self.num_kept
        if need == 0:
            return self
        reused = (~self.computed).nonzero().flatten()
        frames_back, rows, cols = self.offsets[reused].unbind(1)
        order = np.lexsort((reused.cpu().numpy(), -(rows.abs() + cols.abs()).cpu().numpy(), -frames_back.cpu().numpy()))
        promote = reused[torch.as_tensor(order[:need], device=reused.device)]
        source = self.source.clone()
        source[promote] = promote
        shift = None
        if self.shift is not None:
            shift = self.shift.clone()
            shift[promote] = 0
        meta = {**self.meta, "kept_multiple": multiple, "promoted": need}
        return attrs.evolve(self, source=source, shift=shift, meta=meta)

    def to(self, device) -> Plan:
        """The same plan with its tensors on ``device`` (derived caches are rebuilt there)."""
        shift = None if self.shift is None else self.shift.to(device)
        return attrs.evolve(self, source=self.source.to(device), shift=shift)

    def summary(self) -> str:
        return (
            f"Plan {self.grid.frames}x{self.grid.height}x{self.grid.width} tokens, "
            f"{self.frame_types}, kept {self.num_kept}/{self.grid.size} ({self.kept_ratio:.1%})"
        )

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    # -- persistence ----------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the plan to ``path`` (``.npz``) atomically: a temp file renamed on success."""
        path = Path(path)
        if not path.parent.exists():
            raise FileNotFoundError(f"cannot save the plan to {path}: folder {path.parent} does not exist")
        arrays = {
            "grid": np.array(tuple(self.grid), dtype=np.int64),
            "source": self.source.cpu().numpy(),
            "types": np.array(self.schedule.types),
            "ref": np.array(self.schedule.ref),
            "meta": np.array(json.dumps(self.meta, default=str)),
        }
        if self.shift is not None:
            arrays["shift"] = self.shift.cpu().numpy()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file at {path}: create one with Plan.save or `lipcodec analyze --save-plan`")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with data:
                return cls(
                    tuple(int(v) for v in data["grid"]),
                    torch.from_numpy(data["source"]),
                    Schedule(str(data["types"]), int(data["ref"])),
                    shift=torch.from_numpy(data["shift"]) if "shift" in data else None,
                    meta=json.loads(str(data["meta"])),
                )
        except (KeyError, ValueError, OSError, EOFError) as error:
            if isinstance(error, PlanError):
                raise
            raise PlanError(f"{path} is not a lipcodec plan file ({error}); it must come from Plan.save") from error


def check_kept_multiple(multiple) -> int:
    """``multiple`` if it is a valid kept-count bucket (an int >= 1), else a ValueError."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"kept_multiple must be an int >= 1 (e.g. 128), got {multiple!r}")
    return multiple


def _resolve_chains(source: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Pointer-jump to each chain's end; every end must be a token that points at itself."""
    resolved = source
    for _ in range(grid.size.bit_length() + 1):
        nxt = resolved[resolved]
        if torch.equal(nxt, resolved):
            break
        resolved = nxt
    broken = source[resolved] != resolved  # a chain that ended on a cycle, not a computed token
    if broken.any():
        i = int(broken.nonzero()[0, 0])
        raise PlanError(
            f"token {i} is on a reference cycle that never reaches a computed token "
            f"(it points at {int(source[i])}): every chain must end at a token that points at itself"
        )
    return resolved

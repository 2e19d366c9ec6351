"""Streaming executor for chunk-causal video DiTs (Self-Forcing / CausVid on Wan 2.1 weights).

The latent video arrives frame by frame and is processed in chunks of ``chunk`` latent
frames (Self-Forcing: 3). Per chunk:

1. plan the chunk's tokens (``lipcodec.plan`` on the source latents of the last
   ``plan_context`` frames; the frames before the chunk are passed as they ran, so new
   tokens chain onto what really executed; only references to the past are allowed);
2. a few-step denoising schedule (Self-Forcing sampler: predict x0 = x_t - sigma v, then
   re-noise x0 with fresh noise to the next level); the chunk's kept tokens are the only
   queries and attend to [cached K/V of earlier frames; the chunk's own K/V] - exactly
   block-causal attention, no mask;
3. reused tokens take their reference's final x0 (restoration);
4. one clean pass at t = 0 on the chunk's output writes its K/V into the per-block cache;
5. the cache keeps ``sink`` first frames plus the ``window`` most recent frames.

Recovery (which keys reused tokens contribute, self-attention only; see docs/streaming.md):

- ``none``: no keys for reused tokens; the cache holds kept tokens only.
- ``proportional``: ToMe-style + log(c_j) on the logits of each kept key j (a bias in the
  same SDPA call).
- ``duplicate``: reused tokens re-enter as keys/values copied from their reference's
  *un-rotated* K and V, rotated to their own position. While denoising, a reference in
  the same chunk gives its *noisy* K/V of the current step; one in an earlier chunk its
  clean cached K/V.
- ``clean`` (LIPAR's noise-aware duplication): while denoising, copies come only from the
  clean cache: the reference itself when it is cached, else the token at the reference's
  place in the most recent cached frame. In the clean pass both duplicate modes copy the
  clean K/V of the same pass, so the cache holds every token of every cached frame.

RoPE positions: frame f sits at time position f until the stream outgrows ``rope_frames``;
then the newest chunk is pinned to the last positions and the cached non-sink keys are
re-rotated back by the shift (LIPAR's policy); sink frames keep their positions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import attrs
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from einops import rearrange

from .attention import RECOVERY_MODES, rotate
from .gop import GOP
from .graphs import COMPILE_LOCK, error_line
from .plan import Grid
from .planners import MotionField
from .stream_planning import ChunkPlan, StreamPlanning

FIRST_CHUNK_MODES = ("full", "prune")


def flow_sigma(timestep: float, shift: float) -> float:
    """Shifted flow-matching noise level of a timestep in 0..1000 (Wan/Self-Forcing warp)."""
    s = timestep / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


def _positive(instance, attribute, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"StreamConfig.{attribute.name}={value!r}: use an int >= 1")


def _non_negative_or_none(instance, attribute, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"StreamConfig.{attribute.name}={value!r}: use an int >= 0, or None")


@attrs.frozen(kw_only=True)
class StreamConfig:
    """How a stream is denoised. ``StreamConfig.editing()`` / ``.generation()`` are presets.

    Important:
        chunk: latent frames per chunk (Self-Forcing: 3).
        timesteps: denoising steps, 0..1000 before the shift, first = start noise level
            (generation 1000/750/500/250; LIPAR's editing starts at 400 with 4 steps).
        shift: flow shift applied to every timestep (Wan / Self-Forcing: 5.0; 1 = none).
        sink, window: the cache keeps the first ``sink`` frames of the stream and the
            ``window`` most recent frames (LIPAR 1 + 6). ``window=None``: keep every frame.
        recovery: ``none`` (default, as in the executor and the CLI: the fewest launches),
            ``proportional`` (on the reference model the most faithful streaming mode; its
            bias costs attention time), ``duplicate`` or ``clean`` (LIPAR's) - module
            docstring, streaming.md.
        first_chunk: ``full`` (default): chunk 0 ignores the plan and computes every token,
            so the clean cache every later copy comes from is exact; ``prune``: LIPAR's
            behaviour, chunk 0 is pruned too (``clean`` then has no clean source and runs
            plain pruning in its denoising steps).

    To tinker with:
        rope_frames: time positions used before the RoPE shift starts; None = the model's
            ``rope_max_seq_len``. Self-Forcing was trained on 21 latent frames.
        plan_context: the planner sees at most this many latent frames ending at the new
            chunk; None = every frame so far. The frames before the chunk are given as they
            ran (``PlanContext.executed``): threshold planners keep their decisions and only
            read them, so past ``chunk`` + the planner's reach (lipar: 5 frames, through its
            filters) a longer context plans exactly the same, slower. The default 8 covers
            lipar with chunks of 3.
        plan_ahead: when the next chunk's frames are already pushed, plan it while this
            chunk runs (CUDA: in a worker thread, on a side stream), so planning leaves the
            critical path. Plans and outputs are identical either way; on the CPU nothing
            overlaps and the planning time only moves into the previous chunk's
            ``seconds``. Whether it pays depends on the host (docs/streaming.md).
        seed: the runner's private noise generator (your global RNG is untouched).
    """

    chunk: int = attrs.field(default=3, validator=_positive)
    timesteps: tuple[float, ...] = attrs.field(
        default=(400.0, 300.0, 200.0, 100.0), converter=lambda v: tuple(float(t) for t in v)
    )
    shift: float = attrs.field(default=5.0, converter=float)
    sink: int = attrs.field(default=1, validator=_non_negative_or_none)
    window: int | None = attrs.field(default=6, validator=_non_negative_or_none)
    recovery: str = "none"
    first_chunk: str = "full"
    rope_frames: int | None = attrs.field(default=None, validator=_non_negative_or_none)
    plan_context: int | None = attrs.field(default=8, validator=_non_negative_or_none)
    plan_ahead: bool = True
    seed: int = 0

    def __attrs_post_init__(self):
        ts = self.timesteps
        if not ts or any(not (0.0 < t <= 1000.0) for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"StreamConfig.timesteps={ts}: use strictly decreasing values in (0, 1000]")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"StreamConfig.shift={self.shift}: use a finite value > 0 (1 = no shift)")
        if self.recovery not in RECOVERY_MODES:
            raise ValueError(f"StreamConfig.recovery={self.recovery!r}: use one of {', '.join(RECOVERY_MODES)}")
        if self.first_chunk not in FIRST_CHUNK_MODES:
            raise ValueError(f"StreamConfig.first_chunk={self.first_chunk!r}: use one of {', '.join(FIRST_CHUNK_MODES)}")
        if self.plan_context is not None and self.plan_context < self.chunk:
            raise ValueError(f"StreamConfig.plan_context={self.plan_context} is shorter than chunk={self.chunk}")

    @classmethod
    def editing(cls, **changes) -> StreamConfig:
        """SDEdit video-to-video (LIPAR): start at t = 400, 4 steps, shift 5."""
        return cls(**changes)

    @classmethod
    def generation(cls, **changes) -> StreamConfig:
        """Self-Forcing text-to-video: 1000/750/500/250, shift 5 (push zeros as the source)."""
        return cls(**{"timesteps": (1000.0, 750.0, 500.0, 250.0), **changes})

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(flow_sigma(t, self.shift) for t in self.timesteps)


@attrs.frozen
class Chunk:
    """One finished chunk: its denoised latents (x0) and what it cost."""

    index: int
    start: int  # first latent frame of the stream in this chunk
    latents: torch.Tensor  # (B, C, S, H, W) float32 (float64 for a float64 model)
    seconds: float  # wall time from chunk start to its clean pass done (synchronized)
    kept: int  # computed tokens
    tokens: int
    source: torch.Tensor  # (S*h*w,) stream token id of the computed token each token took its output from
    plan_seconds: float = 0.0  # host time spent making this chunk's plan
    planned_ahead: bool = False  # planned during the previous chunk (not part of ``seconds``)
    pixels: object = None  # decode(latents) when run() was given a decode hook

    @property
    def frames(self) -> range:
        return range(self.start, self.start + self.latents.shape[2])

    @property
    def kept_ratio(self) -> float:
        return self.kept / self.tokens


@attrs.define
class _Ahead:
    """A chunk's plan being made ahead: on a worker thread and the side CUDA ``stream``
    (None: the CPU, where it was made in place and ``made`` is already done)."""

    made: concurrent.futures.Future  # -> ChunkPlan
    stream: object

    def take(self) -> ChunkPlan:
        planned = self.made.result()  # the worker's errors surface here
        if self.stream is not None:  # the main stream waits for the plan, and owns it from here
            torch.cuda.current_stream(planned.source.device).wait_stream(self.stream)
            for tensor in (planned.rows, planned.source, planned.anchors):
                tensor.record_stream(torch.cuda.current_stream(tensor.device))
        return planned


# -- cache ----------------------------------------------------------------------------------
@attrs.define(eq=False)
class _Frame:
    index: int  # stream frame
    row_of: torch.Tensor  # (tpf,) cache row of each place, -1 where the frame has no key
    start: int  # first row
    count: int  # rows
    pos: int  # current RoPE time position


class _Cache:
    """Per-block K (rotated) and V rows of the cached frames, frames contiguous and in order,
    with room for one chunk after them (the tail, written by every forward). The buffers
    grow to the rows in use (a pruned stream caches only what it keeps), up to ``limit``."""

    def __init__(self, blocks: int, shape: tuple[int, int, int, int], dtype, device, limit: int | None):
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(blocks)]  # (B, rows, H, D)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(blocks)]
        self.used = 0
        self.frames: list[_Frame] = []
        self.limit = limit  # most rows ever needed (sink + window + chunk frames); None = unbounded

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, rows: int):
        """Room for ``rows`` rows after the used ones: grow every buffer to exactly that, one
        block at a time (the old buffer is freed before the next is made). Exact, not
        geometric: a windowed cache stops growing once the window is full, and an unbounded
        one is short in practice (its memory runs out long before the copies matter)."""
        size = self.used + rows
        if size <= self.capacity:
            return
        if self.limit is not None and size > self.limit:
            raise RuntimeError(f"KV cache overflow: {self.used} + {rows} rows > {self.limit} (bug: report it)")
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], size, *old.shape[2:])
                new[:, : self.used] = old[:, : self.used]
                buffers[i] = new
                del old

    def lookup(self, ids: torch.Tensor, tpf: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache row (-1 if absent) and time position of stream token ids."""
        rows, pos = torch.full_like(ids, -1), torch.zeros_like(ids)
        frame, place = ids // tpf, ids % tpf
        for fr in self.frames:
            hit = frame == fr.index
            rows = torch.where(hit, fr.row_of[place], rows)
            pos = torch.where(hit, fr.pos, pos)
        return rows, pos

    def evict(self, sink: int, window: int | None):
        """Drop the oldest non-sink frames until at most ``window`` remain."""
        if window is None:
            return
        recent = [fr for fr in self.frames if fr.index >= sink]
        drop = recent[: max(0, len(recent) - window)]
        if not drop:
            return
        lo, hi = drop[0].start, drop[-1].start + drop[-1].count
        moved = self.used - hi
        for buffers in (self.k, self.v):
            for buf in buffers:
                buf[:, lo : lo + moved] = buf[:, hi : self.used].clone()
        gone = {fr.index for fr in drop}
        self.frames = [fr for fr in self.frames if fr.index not in gone]
        for fr in self.frames:
            if fr.start >= hi:
                fr.start -= hi - lo
                fr.row_of = torch.where(fr.row_of >= 0, fr.row_of - (hi - lo), fr.row_of)
        self.used -= hi - lo


# -- per-chunk indices ------------------------------------------------------------------------
@attrs.define(eq=False)
class _Dups:
    """Reused tokens re-inserted as keys in one pass: from this pass (local) or the cache."""

    local_ids: torch.Tensor  # (Sl,) chunk-local ids of reused tokens copying a kept token of this pass
    local_src: torch.Tensor  # (Sl,) kept row of their reference
    local_rope: tuple  # (cos, sin) (1, Sl, 1, D) at their own positions
    cache_ids: torch.Tensor  # (Sc,) chunk-local ids of reused tokens copying a cached key
    cache_rows: torch.Tensor  # (Sc,) cache row
    cache_rope: tuple  # (cos, sin) (1, Sc, 1, D): rotation from the row's position to their own

    @property
    def count(self) -> int:
        return int(self.local_ids.numel() + self.cache_ids.numel())


@attrs.define(eq=False)
class _Pass:
    """What one forward over the chunk needs (denoising steps share one, the clean pass another)."""

    write: torch.Tensor | None  # with dups: (n,) cache rows the [kept; local dups; cache dups] K/V go to
    start: int  # the rows the cache held before the chunk
    keys: int  # attention sees cache rows [0, keys)
    dups: _Dups | None
    key_bias: torch.Tensor | None  # (1, 1, 1, keys) proportional: log c_j of every key row, model dtype


@attrs.define(eq=False)
class _ChunkIndex:
    keep: torch.Tensor  # (Sk,) chunk-local ids of computed tokens
    identity: bool
    rope: tuple  # (cos, sin) (1, Sk, 1, D) of the kept tokens
    source: torch.Tensor  # (N,) stream token id of each token's reference (itself if kept)
    denoise: _Pass
    clean: _Pass
    frame_kept: tuple[int, ...]  # computed tokens per frame of the chunk
    restore: torch.Tensor | None = None  # (N,) row of each token's x0 in [chunk x0; history]
    history: torch.Tensor | None = None  # (B, R, P) the restored outputs of earlier frames reused here


# -- the runner -------------------------------------------------------------------------------
class StreamRunner:
    """Chunk-causal streaming denoiser over a diffusers ``WanTransformer3DModel``.

    >>> runner = StreamRunner(model, prompt_embeds, StreamConfig.editing(), planner="lipar")  # doctest: +SKIP
    >>> for chunk in runner.run(latent_frames):     # any iterator of (B, C, f, H, W) pieces  # doctest: +SKIP
    ...     show(chunk.latents, chunk.seconds)

    Important:
        model: Wan 2.1-style transformer (Self-Forcing / CausVid weights: see
            :func:`lipcodec.checkpoints.load_wan_checkpoint`).
        prompt_embeds: text embeddings (B, L, text_dim); change them with :meth:`set_prompt`.
        config: :class:`StreamConfig`.
        planner: a planner name or object (``intra`` = no pruning); planned chunk by chunk on
            the source latents seen so far, so it may only reference the past.
        gop, plan_kwargs: passed to :func:`lipcodec.plan` (``target_kept=``, ``tau1=``...);
            ``target_kept`` (a parameter, or set on a planner object) is each new chunk's
            budget (the planner sees more context).
            B-frames are refused: they reference frames that have not arrived.
        compile: ``torch.compile`` every block, cache write and attention included, with
            dynamic shapes, so kept counts that change from chunk to chunk reuse a compiled
            graph (:func:`_block_with_cache`). Results match eager to rounding, not bit for
            bit. On a GPU the blocks launch their kernels from inductor's C++ wrapper when a
            C++ compiler is found (:func:`_compile_options`). A threshold planner's decisions
            are compiled too (its ``compile``: the same plans, fewer kernels).
        motion: the source's codec motion vectors (``read_video(path, motion=True).motion``,
            pixel frame 0 = the stream's first frame), for the ``bitstream`` planner: each
            chunk's planner gets the part of the field its plan context covers.

    ``planner``, ``gop``, ``motion`` and ``plan_kwargs`` go to ``self.planning``, a
    :class:`~lipcodec.stream_planning.StreamPlanning`: the stream's planning and its history.
    """

    def __init__(self, model, prompt_embeds: torch.Tensor, config: StreamConfig | None = None, *,
                 planner="intra", gop: GOP | str | None = None, compile: bool = False,
                 motion: MotionField | None = None, **plan_kwargs):
        self.model = model
        self._compiled = compile
        self._block_options = _compile_options(model.device) if compile else None
        self._block_with_cache = (torch.compile(_block_with_cache, dynamic=True, options=self._block_options)
                                  if compile else _block_with_cache)
        self.config = config or StreamConfig()
        cfg = model.config
        if tuple(cfg.patch_size)[0] != 1:
            raise ValueError(f"patch_size {tuple(cfg.patch_size)}: the streaming runner needs a temporal patch of 1")
        if model.blocks[0].attn2.add_k_proj is not None:
            raise ValueError("image-conditioned Wan (I2V, added K/V projections) is not supported by the streaming runner")
        self.patch = tuple(int(p) for p in cfg.patch_size)
        self.rope_frames = self.config.rope_frames or int(cfg.rope_max_seq_len)
        if self.rope_frames > cfg.rope_max_seq_len:
            raise ValueError(
                f"rope_frames={self.rope_frames} exceeds the model's RoPE table ({cfg.rope_max_seq_len} positions)"
            )
        c = self.config
        if c.window is not None and c.sink + c.window + c.chunk > self.rope_frames:
            raise ValueError(
                f"sink + window + chunk = {c.sink + c.window + c.chunk} frames do not fit in rope_frames="
                f"{self.rope_frames} positions: shrink the window or raise rope_frames"
            )
        self.planning = StreamPlanning(planner, chunk=c.chunk, plan_context=c.plan_context, first_chunk=c.first_chunk,
                                       gop=gop, patch_size=self.patch, motion=motion, compile=compile, **plan_kwargs)
        rope = model.rope
        self._tables = (
            rope.freqs_cos.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1),
            rope.freqs_sin.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1),
        )  # per axis (positions, axis_dim)
        self._plan_stream = None  # plan_ahead's side stream (CUDA), made on first use
        self._plan_worker = None  # plan_ahead's thread (CUDA), made on first use
        self.set_prompt(prompt_embeds)
        self.reset()

    # -- public ------------------------------------------------------------------------------
    def reset(self):
        """Forget the stream (cache, history, pending frames); the prompt stays."""
        self._pending: torch.Tensor | None = None  # (B, C, f, H, W) frames not yet in a chunk
        self._shape: tuple | None = None  # (B, C, H, W)
        self._cache: _Cache | None = None
        self._frames = 0  # frames processed
        self._chunks = 0
        self._offset = 0  # RoPE time shift
        self._out_hist: torch.Tensor | None = None  # (B, f*tpf, P) restored outputs from planning.first on
        self.planning.reset()  # the source history, what each token copied, keyframes, the search's scale
        self._ahead: _Ahead | None = None  # the next chunk's plan, made while this chunk runs
        self._gen = None

    @torch.no_grad()
    def set_prompt(self, prompt_embeds: torch.Tensor):
        """Project the text once and cache every block's cross-attention K/V."""
        model = self.model
        dtype = next(model.parameters()).dtype
        text = prompt_embeds.to(model.device, dtype)
        self._text_raw = text
        projected = model.condition_embedder.text_embedder(text)  # (B, L, D)
        self._text_kv = []
        for block in model.blocks:
            attn = block.attn2
            if getattr(attn, "fused_projections", False):
                key, value = attn.to_kv(projected).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(projected), attn.to_v(projected)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))  # (B, L, H, D)
            self._text_kv.append((key, value.unflatten(2, (attn.heads, -1))))

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> list[Chunk]:
        """Add source latent frames (B, C, f, H, W) or (C, f, H, W); returns the chunks they finish."""
        latents = self._check(latents)
        self._pending = latents if self._pending is None else torch.cat([self._pending, latents], 2)
        done = []
        while self._pending.shape[2] >= self.config.chunk:
            piece, self._pending = self._pending[:, :, : self.config.chunk], self._pending[:, :, self.config.chunk :]
            done.append(self._chunk(piece))
        return done

    @torch.no_grad()
    def flush(self) -> list[Chunk]:
        """Process the frames left over (fewer than a chunk) as one short last chunk."""
        if self._pending is None or self._pending.shape[2] == 0:
            return []
        piece, self._pending = self._pending, self._pending[:, :, :0]
        return [self._chunk(piece)]

    def run(self, frames: Iterable, *, encode: Callable | None = None, decode: Callable | None = None) -> Iterator[Chunk]:
        """Stream ``frames`` (any iterator; each item latents (B, C, f, H, W), or pixels that
        ``encode`` turns into them) and yield each chunk as soon as it is done (``decode`` fills
        ``Chunk.pixels``). The leftover frames are flushed at the end."""
        for item in frames:
            for chunk in self.push(encode(item) if encode is not None else item):
                yield _decoded(chunk, decode)
        for chunk in self.flush():
            yield _decoded(chunk, decode)

    @property
    def cached_frames(self) -> list[int]:
        """Stream frames whose K/V the cache holds now (sink first)."""
        return [] if self._cache is None else [fr.index for fr in self._cache.frames]

    def cache_kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """The committed K (rotated, at current positions) and V rows of one block,
        (B, rows, H, D) each, and (frame, rows) per cached frame in row order."""
        cache = self._cache
        if cache is None:
            raise RuntimeError("nothing is cached yet: push latents first")
        frames = [(fr.index, fr.count) for fr in cache.frames]
        return cache.k[block][:, : cache.used], cache.v[block][:, : cache.used], frames

    # -- checks and state --------------------------------------------------------------------
    def _check(self, latents) -> torch.Tensor:
        latents = torch.as_tensor(latents)
        if latents.ndim == 4:
            latents = latents[None]
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, C, f, H, W) or (C, f, H, W), got shape {tuple(latents.shape)}")
        b, c, f, h, w = latents.shape
        if c != self.model.config.in_channels:
            raise ValueError(f"latents have {c} channels but the model takes {self.model.config.in_channels}")
        if h % self.patch[1] or w % self.patch[2]:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch {self.patch[1:]}: crop or pad it")
        Grid(1, h // self.patch[1], w // self.patch[2]).check_positions(int(self.model.config.rope_max_seq_len), frames=False)
        if self._shape is not None and (b, c, h, w) != self._shape:
            raise ValueError(f"latents (B, C, H, W) = {(b, c, h, w)} differ from the stream's {self._shape}")
        if self._text_raw.shape[0] not in (1, b):
            raise ValueError(f"prompt_embeds batch {self._text_raw.shape[0]} does not match latents batch {b}")
        if self._shape is None:
            self._start(b, c, h, w)
        return latents.to(self.model.device, self._sampler_dtype)

    def _start(self, b, c, h, w):
        cfg, conf = self.model.config, self.config
        self._shape = (b, c, h, w)
        self._hw = (h // self.patch[1], w // self.patch[2])
        self.tpf = self._hw[0] * self._hw[1]
        limit = None if conf.window is None else (conf.sink + conf.window + conf.chunk) * self.tpf
        shape = (b, conf.chunk * self.tpf, cfg.num_attention_heads, cfg.attention_head_dim)  # grows with use
        dtype = next(self.model.parameters()).dtype
        self._cache = _Cache(len(self.model.blocks), shape, dtype, self.model.device, limit)
        self._gen = torch.Generator(self.model.device).manual_seed(conf.seed)

    @property
    def _sampler_dtype(self):
        """The sampler (x_t, x0, noise) runs in float32, or float64 for a float64 model."""
        return torch.float64 if next(self.model.parameters()).dtype == torch.float64 else torch.float32

    def _noise(self, shape) -> torch.Tensor:
        noise = torch.randn(shape, generator=self._gen, device=self.model.device, dtype=torch.float32)
        return noise.to(self._sampler_dtype)

    # -- one chunk -----------------------------------------------------------------------------
    def _chunk(self, source: torch.Tensor) -> Chunk:
        """Denoise one chunk of source latents (B, C, S, H, W), write its clean K/V, return it."""
        start_time = time.perf_counter()
        conf = self.config
        b, c, s, h, w = source.shape
        a = self._frames
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # made while the previous chunk ran, from these very frames
            planned = ahead.take()
        else:
            self.planning.add(source)
            planned = self.planning.plan(a, s)
        src = planned.rows  # (N,) stream token ids in the planning context (the output history holds them)
        self.planning.record(planned)
        if conf.plan_ahead and not self.planning.intra and self._pending is not None and self._pending.shape[2] >= conf.chunk:
            self._plan_ahead(a + s, self._pending[:, :, : conf.chunk])  # the next chunk, while this one runs
        self._shift_positions(a + s)
        idx = self._index(a, s, src)
        n = s * self.tpf
        sigmas = conf.sigmas

        # compiled blocks must not run while the planning thread compiles a decision (graphs.COMPILE_LOCK)
        with COMPILE_LOCK if self._compiled else contextlib.nullcontext():
            x = (1.0 - sigmas[0]) * source + sigmas[0] * self._noise(source.shape)  # (B, C, S, H, W)
            for i, sigma in enumerate(sigmas):
                x0 = self._denoise(x, sigma, idx)  # (B, C, S, H, W)
                if i + 1 < len(sigmas):
                    x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * self._noise(x0.shape)
            self._forward(x0, 0.0, idx, idx.clean)  # clean pass: writes the chunk's K/V
        self._commit(a, s, idx)
        self._remember_output(x0, a, s)
        if x0.device.type == "cuda":
            torch.cuda.synchronize(x0.device)
        self._frames += s
        self._chunks += 1
        seconds = time.perf_counter() - start_time
        return Chunk(self._chunks - 1, a, x0, seconds, int(idx.keep.numel()), n, planned.source.cpu(), planned.seconds,
                     planned_ahead=ahead is not None)

    def _plan_ahead(self, a: int, source: torch.Tensor):
        """Start planning the chunk at frame ``a`` (its frames ``source`` are pushed). On CUDA
        a worker thread plans on a side stream while this thread issues the current chunk:
        the planner's host work and its syncs (it reads kept ratios and chain ends back) do
        not hold up this thread's launches - though the two threads share one interpreter,
        which on some hosts slows both (docs/streaming.md). On the CPU it plans in place."""
        self.planning.add(source)
        inputs = self.planning.inputs(a, source.shape[2])
        job = functools.partial(self.planning.plan, a, source.shape[2], inputs)
        if not source.is_cuda:
            made = concurrent.futures.Future()
            made.set_result(job())
            self._ahead = _Ahead(made, None)
            return
        stream = self._plan_stream = self._plan_stream or torch.cuda.Stream(source.device)
        stream.wait_stream(torch.cuda.current_stream(source.device))  # the pushed frames are on the GPU
        for tensor in (self.planning.history, inputs.sources,
                       *([] if inputs.executed is None else [inputs.executed.anchors])):
            tensor.record_stream(stream)  # made on this stream, read on the side one
        if self._plan_worker is None:
            self._plan_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lipcodec-plan")

        def on_side_stream():
            with torch.no_grad(), torch.cuda.stream(stream):  # grad mode and the stream are per thread
                return job()

        self._ahead = _Ahead(self._plan_worker.submit(on_side_stream), stream)

    def _denoise(self, x, sigma, idx: _ChunkIndex) -> torch.Tensor:
        """One step: x0 = x - sigma v on kept tokens, reused tokens restored from their reference."""
        v = self._forward(x, sigma, idx, idx.denoise)  # (B, Sk, P)
        x_tok = self._patchify(x)  # (B, N, P)
        if idx.identity:
            return self._unpatchify(x_tok - sigma * v.to(x.dtype), x.shape[2])
        x0 = x_tok.clone()
        x0[:, idx.keep] = x_tok[:, idx.keep] - sigma * v.to(x.dtype)
        return self._unpatchify(self._restore(x0, idx), x.shape[2])

    def _restore(self, x0: torch.Tensor, idx: _ChunkIndex) -> torch.Tensor:
        """Reused tokens take their reference's x0: this chunk's, or the restored output history
        (one gather with indices made per chunk in :meth:`_index`: no host sync per step)."""
        rows = x0 if idx.history is None else torch.cat([x0, idx.history], 1)  # (B, N + R, P)
        return rows[:, idx.restore]

    # -- the block-causal forward --------------------------------------------------------------
    def _forward(self, x: torch.Tensor, sigma: float, idx: _ChunkIndex, step: _Pass) -> torch.Tensor:
        """Wan's forward on the chunk's kept tokens with the cache as extra keys: (B, Sk, P)."""
        model = self.model
        dtype = self._text_raw.dtype
        hidden = model.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        if not idx.identity:
            hidden = hidden[:, idx.keep]  # (B, Sk, D)
        temb, proj = self._time(sigma, x.shape[0])  # (B, D), (B, 6, D)
        for i, block in enumerate(model.blocks):
            hidden = self._block(i, block, hidden, proj, idx, step)
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        return model.proj_out(hidden)  # (B, Sk, pt*ph*pw*C)

    def _time(self, sigma: float, batch: int):
        """condition_embedder's time branch, op for op (text is projected once per prompt)."""
        embed = self.model.condition_embedder
        t = torch.full((batch,), 1000.0 * sigma, device=self.model.device)  # (B,)
        ts = embed.timesteps_proj(t)
        time_dtype = next(iter(embed.time_embedder.parameters())).dtype
        if ts.dtype != time_dtype:
            ts = ts.to(time_dtype)
        temb = embed.time_embedder(ts).type_as(self._text_raw)  # (B, D)
        return temb, embed.time_proj(embed.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6, D)

    def _block(self, i, block, hidden, proj, idx, step):
        """WanTransformerBlock.forward with block-causal self-attention: one
        :func:`_block_with_cache` call (one compiled graph with ``compile=True``)."""
        text_k, text_v = self._text_kv[i]
        if text_k.shape[0] != hidden.shape[0]:
            text_k, text_v = text_k.expand(hidden.shape[0], -1, -1, -1), text_v.expand(hidden.shape[0], -1, -1, -1)
        dups = step.dups
        copies = None if dups is None else (step.write, dups.local_src, *dups.local_rope, dups.cache_rows, *dups.cache_rope)
        cache = self._cache
        args = (block, hidden, proj, *idx.rope, cache.k[i], cache.v[i], step.start, text_k, text_v, step.key_bias, copies)
        try:
            return self._block_with_cache(*args)
        except Exception as error:
            from torch._dynamo.exc import BackendCompilerFailed

            if not isinstance(error, BackendCompilerFailed) or not self._block_options:
                raise
            warnings.warn(f"compiled blocks: inductor could not build them with {self._block_options} "
                          f"({error_line(error)}); "
                          "compiling with its defaults instead (the Python wrapper: the same kernels, more host time "
                          "per block call)", RuntimeWarning, stacklevel=2)
            self._block_options = None  # nothing ran: the failed compile wrote no cache rows
            self._block_with_cache = torch.compile(_block_with_cache, dynamic=True)
            return self._block_with_cache(*args)

    # -- positions -----------------------------------------------------------------------------
    def _rope(self, t_pos, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (1, n, 1, D) for tokens at time positions t_pos, rows, cols (each (n,))."""
        (ct, ch, cw), (st, sh, sw) = self._tables
        cos = torch.cat([ct[t_pos], ch[rows], cw[cols]], -1)[None, :, None]
        sin = torch.cat([st[t_pos], sh[rows], sw[cols]], -1)[None, :, None]
        return cos, sin

    def _rope_of(self, ids: torch.Tensor, t_pos: torch.Tensor):
        place = ids % self.tpf
        return self._rope(t_pos, place // self._hw[1], place % self._hw[1])

    def _time_pos(self, frames: torch.Tensor) -> torch.Tensor:
        """RoPE time position of stream frames now: sinks keep theirs, others shift back."""
        return torch.where(frames < self.config.sink, frames, frames - self._offset)

    def _shift_positions(self, end: int):
        """Keep the newest chunk inside the RoPE table: shift every non-sink frame back."""
        offset = max(0, end - self.rope_frames)
        delta = offset - self._offset
        if delta <= 0:
            return
        if self.config.window is None:
            raise ValueError(
                f"the stream reached frame {end - 1} but window=None keeps every frame and RoPE has "
                f"{self.rope_frames} positions: set StreamConfig.window to bound the cache"
            )
        cache = self._cache
        moved = [fr for fr in cache.frames if fr.index >= self.config.sink]
        if moved:
            lo = moved[0].start
            (ct, ch, cw), (st, sh, sw) = self._tables
            cos = torch.cat([ct[delta], torch.ones_like(ch[0]), torch.ones_like(cw[0])])[None, None, None]  # (1,1,1,D)
            sin = torch.cat([st[delta], torch.zeros_like(sh[0]), torch.zeros_like(sw[0])])[None, None, None]
            for buf in cache.k:
                buf[:, lo : cache.used] = rotate(buf[:, lo : cache.used], cos, -sin)  # back by delta frames
            for fr in moved:
                fr.pos -= delta
        self._offset = offset

    # -- planning history ----------------------------------------------------------------------
    def _remember_output(self, x0, a, s):
        if self.planning.intra:
            return
        tokens = self._patchify(x0)  # (B, N, P)
        self._out_hist = tokens if self._out_hist is None else torch.cat([self._out_hist, tokens], 1)
        # what the next planning contexts reach, and what the cached frames copy
        cut = self.planning.trim(a + s, keep={fr.index for fr in self._cache.frames})
        self._out_hist = self._out_hist[:, cut * self.tpf :]

    # -- indices for one chunk -----------------------------------------------------------------
    def _index(self, a: int, s: int, src: torch.Tensor) -> _ChunkIndex:
        device, tpf, mode = self.model.device, self.tpf, self.config.recovery
        n = s * tpf
        ids = torch.arange(a * tpf, a * tpf + n, device=device)  # (N,) stream token ids
        computed = src == ids
        keep = computed.nonzero().flatten()  # (Sk,) chunk-local
        identity = bool(computed.all())
        t_pos = self._time_pos(ids // tpf)
        rope = self._rope_of(ids[keep], t_pos[keep])
        cache = self._cache
        used, sk = cache.used, int(keep.numel())
        passes = {}
        key_bias = None  # the same key rows in both passes: their multiplicities too
        if mode == "proportional" and not identity:
            key_bias = self._multiplicity(a, s, src, keep).float().log().to(self._text_raw.dtype)[None, None, None]
        for phase in ("denoise", "clean"):
            dups = None if identity or mode in ("none", "proportional") else self._dups(a, s, src, keep, phase)
            d = 0 if dups is None else dups.count
            if phase == "clean" and mode in ("duplicate", "clean") and not identity:
                if sk + d != n:
                    raise RuntimeError(f"clean pass covers {sk + d} of {n} tokens (bug: report it)")
                write = used + torch.cat([keep, dups.local_ids, dups.cache_ids])  # sorted frame rows
            elif dups is not None:
                write = used + torch.arange(sk + d, device=device)
            else:  # the kept rows go to [used, used + sk) as a slice
                write = None
            passes[phase] = _Pass(write, used, used + sk + d, dups, key_bias)
        cache.reserve(max(step.keys for step in passes.values()) - used)  # the rows this chunk writes
        restore = history = None
        if not identity:  # token i's x0 comes from row restore[i] of [chunk x0; history]
            local = src - a * tpf
            past = local < 0
            restore = torch.where(past, n + past.cumsum(0) - 1, local)
            if self._out_hist is not None:
                history = self._out_hist[:, src[past] - self.planning.first * tpf]  # (B, R, P)
        frame_kept = tuple(torch.bincount(keep // tpf, minlength=s).tolist())
        return _ChunkIndex(keep, identity, rope, src, passes["denoise"], passes["clean"], frame_kept, restore, history)

    def _dups(self, a, s, src, keep, phase) -> _Dups:
        """Reused tokens and where their K/V come from in this pass (module docstring)."""
        device, tpf = self.model.device, self.tpf
        n = s * tpf
        ids = torch.arange(a * tpf, a * tpf + n, device=device)
        local = (src != ids).nonzero().flatten()  # (R,) reused, chunk-local
        ref = src[local]  # (R,) stream ids of their references
        in_chunk = ref >= a * tpf
        noisy_ok = phase == "clean" or self.config.recovery == "duplicate"
        use_local = in_chunk if noisy_ok else torch.zeros_like(in_chunk)
        # cached source: the reference itself, else its place in the latest cached frame
        rows, pos = self._cache.lookup(ref, tpf)
        rows = torch.where(in_chunk, -1, rows)
        if self._cache.frames:
            last = self._cache.frames[-1]
            fallback = last.index * tpf + ref % tpf
            origin = self.planning.sources.get(last.index)  # prefer the token that place copies (one hop)
            if origin is not None:
                hop_rows, hop_pos = self._cache.lookup(origin[ref % tpf], tpf)
                fallback = torch.where(hop_rows >= 0, origin[ref % tpf], fallback)
            fb_rows, fb_pos = self._cache.lookup(fallback, tpf)
            missing = rows < 0
            rows, pos = torch.where(missing, fb_rows, rows), torch.where(missing, fb_pos, pos)
        use_cache = ~use_local & (rows >= 0)
        local_ids, cache_ids = local[use_local], local[use_cache]
        own_pos = self._time_pos(ids // tpf)
        slot = torch.searchsorted(keep, ref[use_local] - a * tpf)  # kept row of the reference
        # cached keys are rotated at (pos, place of the row's token); rotate by own - theirs
        cos_i, sin_i = self._rope_of(ids[cache_ids], own_pos[cache_ids])
        row_ids = self._row_ids(rows[use_cache])
        cos_s, sin_s = self._rope_of(row_ids, pos[use_cache])
        cache_rope = (cos_i * cos_s + sin_i * sin_s, sin_i * cos_s - cos_i * sin_s)
        return _Dups(
            local_ids, slot, self._rope_of(ids[local_ids], own_pos[local_ids]),
            cache_ids, rows[use_cache], cache_rope,
        )

    def _row_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Stream token id held by each cache row."""
        out = torch.full_like(rows, -1)
        for fr in self._cache.frames:
            present = (fr.row_of >= 0).nonzero().flatten()  # places, in row order
            hit = (rows >= fr.start) & (rows < fr.start + fr.count)
            out = torch.where(hit, fr.index * self.tpf + present[(rows - fr.start).clamp(0, fr.count - 1)], out)
        return out

    def _multiplicity(self, a, s, src, keep) -> torch.Tensor:
        """c_j per key row: 1 + reused tokens in the cached frames and the chunk that copy it."""
        device, tpf, cache = self.model.device, self.tpf, self._cache
        n = s * tpf
        ids = torch.arange(a * tpf, a * tpf + n, device=device)
        refs = [src[src != ids]]
        for fr in cache.frames:
            origin = self.planning.sources.get(fr.index)
            if origin is not None:
                own = torch.arange(fr.index * tpf, (fr.index + 1) * tpf, device=device)
                refs.append(origin[origin != own])
        ref = torch.cat(refs)
        rows, _ = cache.lookup(ref, tpf)
        in_chunk = ref >= a * tpf
        rows = torch.where(in_chunk, cache.used + torch.searchsorted(keep, (ref - a * tpf).clamp(min=0)), rows)
        keys = cache.used + int(keep.numel())
        return 1 + torch.bincount(rows[rows >= 0], minlength=keys)[:keys]

    def _commit(self, a: int, s: int, idx: _ChunkIndex):
        """Register the chunk's frames (K/V already written by the clean pass), then trim."""
        cache, tpf, device = self._cache, self.tpf, self.model.device
        complete = idx.identity or self.config.recovery in ("duplicate", "clean")
        row, first = cache.used, 0
        for f in range(s):  # host-known counts: no sync here, the GPU may still be running the chunk
            if complete:
                places = torch.arange(tpf, device=device)
            else:
                places = idx.keep[first : first + idx.frame_kept[f]] - f * tpf  # keep is sorted
                first += idx.frame_kept[f]
            row_of = torch.full((tpf,), -1, dtype=torch.long, device=device)
            row_of[places] = row + torch.arange(places.numel(), device=device)
            cache.frames.append(_Frame(a + f, row_of, row, int(places.numel()), int(self._time_pos(torch.tensor(a + f)))))
            row += int(places.numel())
        cache.used = row
        cache.evict(self.config.sink, self.config.window)

    # -- layout --------------------------------------------------------------------------------
    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        _, ph, pw = self.patch
        return rearrange(x, "b c f (h ph) (w pw) -> b (f h w) (ph pw c)", ph=ph, pw=pw)  # (B, N, P)

    def _unpatchify(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        _, ph, pw = self.patch
        h, w = self._hw
        return rearrange(tokens, "b (f h w) (ph pw c) -> b c f (h ph) (w pw)", f=frames, h=h, w=w, ph=ph, pw=pw)


def _compile_options(device: torch.device) -> dict | None:
    """Inductor options for the compiled blocks. On a GPU, its C++ wrapper: a compiled
    block's kernels are launched from C++ instead of generated Python, which took the host
    ~1.6 ms per block call under the profiler - longer than a pruned block runs on an H200
    (~0.9 ms), so the host bounded pruned streams (docs/streaming.md, "Host time"). It is
    built with the C++ compiler; without one, the Python wrapper (the same kernels) - and
    if the build fails, :meth:`StreamRunner._block` warns and compiles with the defaults."""
    if device.type == "cuda" and any(map(shutil.which, ("g++", "c++", "clang++"))):
        return {"cpp_wrapper": True}
    return None


def _block_with_cache(block, hidden, proj, cos, sin, cache_k, cache_v, start: int, text_k, text_v, key_bias=None,
                      copies=None):
    """A whole Wan block over the chunk's kept tokens (B, Sk, D), the cache as extra keys:
    :func:`_block_in`, the chunk's K/V written into the cache, one SDPA over cache rows
    [0, end), :func:`_block_out`. One function, so ``torch.compile`` makes one graph of it
    per block call, the cache writes in place (inductor stores the new rows; it does not
    copy the buffer): no eager op between the compiled parts, which is what bounded a
    pruned stream's speed on the host.

    Without ``copies`` the kept rows go to [start, start + Sk). With them (``duplicate``,
    ``clean``: write rows, then the local copies' kept rows and RoPE, then the cached
    copies' rows and the rotation from their position to the reused token's), reused
    tokens join as keys: un-rotated K of this pass rotated to their own position, or cached
    K re-rotated, with the values copied; [kept; local; cached] go to the write rows (all
    at or after ``start``; the cached ones read are before it). ``key_bias`` (1, 1, 1, end),
    proportional recovery's log c_j, is added to the logits in the same fused call (cuDNN
    takes a broadcast bias; on an H200 the call takes ~50% longer)."""
    query, key, key_raw, value = _block_in(block, hidden, proj, cos, sin)  # (B, Sk, H, D) each
    if copies is None:
        end = start + key.shape[1]
        cache_k[:, start:end] = key
        cache_v[:, start:end] = value
    else:
        write, local_src, local_cos, local_sin, cache_rows, cache_cos, cache_sin = copies
        end = start + write.shape[0]
        cache_k[:, write] = torch.cat([key, rotate(key_raw[:, local_src], local_cos, local_sin),
                                       rotate(cache_k[:, cache_rows], cache_cos, cache_sin)], 1)
        cache_v[:, write] = torch.cat([value, value[:, local_src], cache_v[:, cache_rows]], 1)
    attn = _sdpa(query, cache_k[:, :end], cache_v[:, :end], bias=key_bias)  # (B, Sk, H, D)
    return _block_out(block, hidden, attn, proj, text_k, text_v)


def _block_in(block, hidden, proj, cos, sin):
    """A Wan block up to self-attention: modulated norm1, q/k/v projections, q/k norms, RoPE.
    Returns query and key rotated, the un-rotated key (what in-chunk duplicates copy) and
    value, (B, Sk, H, D) each - op for op as ``WanTransformerBlock`` and ``WanAttnProcessor``."""
    shift, scale, _, _, _, _ = (block.scale_shift_table + proj.float()).chunk(6, dim=1)  # (B, 1, D) each
    norm = (block.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    attn = block.attn1
    query, key, value = _get_qkv_projections(attn, norm, None)  # (B, Sk, H*D) each
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (z.unflatten(2, (attn.heads, -1)) for z in (query, key, value))
    return rotate(query, cos, sin), rotate(key, cos, sin), key, value


def _block_out(block, hidden, attn_out, proj, text_k, text_v):
    """A Wan block from the self-attention output (B, Sk, H, D) on: output projection and
    gate, cross-attention to the text K/V, modulated norm3, feed-forward and gate."""
    _, _, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + proj.float()).chunk(6, dim=1)
    attn = block.attn1
    out = attn.to_out[1](attn.to_out[0](attn_out.flatten(2, 3).type_as(hidden)))
    hidden = (hidden.float() + out * gate).type_as(hidden)
    norm = block.norm2(hidden.float()).type_as(hidden)
    cross = block.attn2
    query = cross.norm_q(cross.to_q(norm)).unflatten(2, (cross.heads, -1))  # (B, Sk, H, D)
    out = _sdpa(query, text_k, text_v).flatten(2, 3).type_as(query)  # (B, Sk, H*D)
    hidden = hidden + cross.to_out[1](cross.to_out[0](out))
    norm = (block.norm3(hidden.float()) * (1 + c_scale) + c_shift).type_as(hidden)
    return (hidden.float() + block.ffn(norm).float() * c_gate).type_as(hidden)


def _sdpa(q, k, v, bias=None) -> torch.Tensor:
    """SDPA on (B, S, H, D) tensors, as diffusers' native attention backend calls it;
    ``bias`` is added to the logits (broadcast to (B, H, Sq, Sk))."""
    out = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3),
                                         attn_mask=bias)
    return out.permute(0, 2, 1, 3)  # (B, Sq, H, D)


def _decoded(chunk: Chunk, decode):
    return chunk if decode is None else attrs.evolve(chunk, pixels=decode(chunk.latents))


__all__ = ["Chunk", "FIRST_CHUNK_MODES", "StreamConfig", "StreamRunner", "flow_sigma"]

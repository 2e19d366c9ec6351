"""The pruned-DiT executor: run a :class:`~lipcodec.Plan` inside a diffusers video DiT.

Reused tokens leave right after patch embedding and skip every block; kept tokens keep
their own RoPE positions (and per-token timesteps); at the output projection every token
is put back, reused ones restored from their reference. Four diffusers hooks over one
shared state, no cache context needed (``WanVideoToVideoPipeline`` never sets one):

======================  ==============  ==========================================
module                  when            does
======================  ==============  ==========================================
the model               pre-forward     picks/validates the plan, saves x_t and
                                        sigma for restore, gathers a (B, S) timestep
``rope``                post-forward    keeps the full cos/sin, returns kept rows
``blocks.0``            pre-forward     gathers hidden_states to the kept tokens
``proj_out``            post-forward    scatters back and restores reused tokens
``blocks.*.attn1``      processor       attention recovery (lipcodec.attention)
======================  ==============  ==========================================

>>> codec = lipcodec.apply(pipe, "lipar", recovery="duplicate")   # doctest: +SKIP
>>> video = pipe(video=frames, prompt=...).frames                 # doctest: +SKIP
>>> codec.stats.kept_ratio, codec.remove()                        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable

import attrs
import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from einops import rearrange

from .attention import RECOVERY_MODES, KeyRuns, WanRecoveryProcessor, check_recovery, multiplicity_order
from .plan import Grid, Plan, check_kept_multiple
from .planners import Planner
from .planners import plan as make_plan

logger = logging.getLogger(__name__)

RESTORE_MODES = ("copy", "velocity")
_HOOKS = ("lipcodec_root", "lipcodec_rope", "lipcodec_gather", "lipcodec_scatter")


# -- adapters: where a model family is cut ---------------------------------------------------
@attrs.frozen
class Adapter:
    """Where to cut one DiT class. Register new ones with :func:`register_adapter`.

    Attributes:
        rope: module whose output is the (cos, sin) tables, tokens on ``rope_dim``.
        first_block: module whose first input is hidden_states (B, S, D).
        output: module whose output is per-token (B, S, p*C) in patch order (pt, ph, pw, C).
        self_attention: regex over module names of the self-attention modules.
        processor: ``(state, block_index, recovery) -> attention processor``.
        args: names (in positional order) of the forward's latents, timestep and text.
    """

    rope: str
    first_block: str
    output: str
    self_attention: str
    processor: Callable
    rope_dim: int = 1
    args: tuple[str, str, str] = ("hidden_states", "timestep", "encoder_hidden_states")

    def patch_size(self, model) -> tuple[int, int, int]:
        return tuple(int(p) for p in model.config.patch_size)


_ADAPTERS: dict[str, Adapter] = {
    "WanTransformer3DModel": Adapter(
        rope="rope", first_block="blocks.0", output="proj_out", self_attention=r"blocks\.\d+\.attn1",
        processor=WanRecoveryProcessor,
    ),
}


def register_adapter(class_name: str, adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Teach the executor a new model class (CogVideoX, HunyuanVideo, LTX...)."""
    if class_name in _ADAPTERS and not replace:
        raise ValueError(f"an adapter for {class_name} is already registered; pass replace=True to override it")
    _ADAPTERS[class_name] = adapter
    return adapter


def adapters() -> list[str]:
    """Model class names the executor supports."""
    return sorted(_ADAPTERS)


def _adapter_for(model) -> Adapter:
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise TypeError(
        f"lipcodec has no adapter for {type(model).__name__}; supported: {', '.join(adapters())}. "
        "Add one with lipcodec.executor.register_adapter(class_name, Adapter(...))"
    )


# -- sigma: the flow-matching noise level of a timestep --------------------------------------
def sigma_from_timestep(timestep: torch.Tensor) -> torch.Tensor:
    """sigma = t / 1000: diffusers' flow-match schedulers use t = sigma * num_train_timesteps.

    UniPC/DPM in flow mode truncate t to an int (t=999 for sigma=1.0), which makes this off
    by up to 1e-3; ``apply(pipe, ...)`` therefore looks sigma up in ``pipe.scheduler``.
    """
    return timestep.float() / 1000.0


def scheduler_sigma(scheduler) -> Callable[[torch.Tensor], torch.Tensor]:
    """sigma of each timestep by nearest match in ``scheduler.timesteps``/``.sigmas``."""
    ref = weakref.ref(scheduler)

    def sigma(timestep: torch.Tensor) -> torch.Tensor:
        sched = ref()
        if sched is None or getattr(sched, "sigmas", None) is None or getattr(sched, "timesteps", None) is None:
            return sigma_from_timestep(timestep)
        ts = sched.timesteps.to(timestep.device, torch.float32)  # (T,)
        sigmas = sched.sigmas.to(timestep.device, torch.float32)[: ts.numel()]  # (T,)
        t = timestep.float().reshape(-1, 1)  # (n, 1)
        return sigmas[(t - ts).abs().argmin(1)].reshape(timestep.shape)

    return sigma


# -- state -----------------------------------------------------------------------------------
@attrs.define(eq=False)
class _Prepared:
    """A plan's indices on one device, computed once per plan (no syncs in the block path)."""

    plan: Plan
    keep: torch.Tensor  # (Sk,) gather index
    slot: torch.Tensor  # (N,) restore index into kept rows
    source: torch.Tensor  # (N,) reference token per token
    computed: torch.Tensor  # (N,) bool
    identity: bool
    dup_ids: torch.Tensor  # (Sd,) reused tokens re-inserted as keys (duplicate/clean)
    dup_slot: torch.Tensor  # (Sd,) kept row of each one's reference
    kv_slot: torch.Tensor  # (Sk + Sd,) kept row behind every key: kept rows, then dup_slot
    kv_pos: torch.Tensor  # (Sk + Sd,) token position (RoPE) of every key: keep, then dup_ids
    log_mult: torch.Tensor  # (Sk,) float32 log multiplicity over the recovered tokens (proportional)
    runs: KeyRuns | None  # proportional: kept rows are ordered in runs of equal multiplicity
    num_dup: int
    frame_kept: np.ndarray  # (F,) kept tokens per latent frame

    @classmethod
    def build(cls, plan: Plan, device, window: int | None, recovery: str = "none") -> _Prepared:
        plan = plan.to(device)
        n, frames = plan.grid.size, plan.grid.frames
        frame = torch.arange(n, device=device) // plan.grid.tokens_per_frame  # (N,)
        recovered = ~plan.computed
        if window is not None:  # sink frame 0 + the `window` most recent latent frames
            recovered &= (frame >= frames - window) | (frame == 0)
        dup_ids = recovered.nonzero().flatten()
        keep, slot, runs = plan.keep, plan.slot, None
        mult = 1 + torch.bincount(slot[dup_ids], minlength=plan.num_kept)  # (Sk,)
        if recovery == "proportional" and dup_ids.numel():  # kept rows in runs of equal multiplicity
            perm, runs = multiplicity_order(mult)
            rank = torch.empty_like(perm)
            rank[perm] = torch.arange(perm.numel(), device=device)
            keep, slot, mult = keep[perm], rank[slot], mult[perm]
        dup_slot = slot[dup_ids]
        kv_slot = torch.cat([torch.arange(plan.num_kept, device=device), dup_slot])
        kv_pos = torch.cat([keep, dup_ids])
        return cls(
            plan, keep, slot, plan.source, plan.computed, bool(plan.computed.all()),
            dup_ids, dup_slot, kv_slot, kv_pos, mult.float().log(), runs, int(dup_ids.numel()),
            plan.computed.reshape(frames, -1).sum(1).cpu().numpy(),
        )


@attrs.define(eq=False)
class _Call:
    """What one forward call needs in its hooks; dropped when the call ends."""

    prep: _Prepared
    x_tok: torch.Tensor | None = None  # (B, N, P) input latents in patch order (restore="copy")
    sigma: torch.Tensor | None = None  # (B, N or 1, 1) noise level per token
    rope_kv: tuple | None = None  # (cos, sin) at every key's position (kv_pos), gathered once per call
    clean_kv: list | None = None  # per block (k_dup, v_dup) from the clean pass
    capture: list | None = None  # set while priming: blocks write their (k_dup, v_dup) here


@attrs.define
class Stats:
    """What the codec saw. ``kept[i]`` is the kept token count of model call i."""

    calls: int = 0
    primes: int = 0  # clean (t=0) passes run for recovery="clean"
    refreshes: int = 0  # clean sources replaced by an x0 estimate (clean_refresh)
    tokens: int = 0  # tokens per call (the token grid of the last call)
    kept: list[int] = attrs.field(factory=list)
    frame_kept: np.ndarray | None = None  # kept tokens per latent frame (last call's plan)

    @property
    def kept_ratio(self) -> float:
        return float(np.mean(self.kept)) / self.tokens if self.kept else 1.0


class _State:
    """Shared by every hook and processor of one Codec: the current call, or None."""

    def __init__(self):
        self.call: _Call | None = None
        self.after: Callable | None = None  # after(call, output) once a call's output is restored


# -- hooks -----------------------------------------------------------------------------------
def _get(args, kwargs, index, name):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _put(args, kwargs, index, name, value):
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return (*args[:index], value, *args[index + 1 :]), kwargs


class _RootHook(ModelHook):
    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def pre_forward(self, module, *args, **kwargs):
        return self.codec._begin_call(args, kwargs)

    def post_forward(self, module, output):
        self.codec._state.call = None
        return output


class _RopeHook(ModelHook):
    def __init__(self, state: _State, dim: int):
        super().__init__()
        self.state, self.dim = state, dim

    def post_forward(self, module, output):
        call = self.state.call
        if call is None or call.prep.identity:
            return output
        if call.prep.num_dup:  # duplicated keys are rotated to their own positions
            call.rope_kv = tuple(table.index_select(self.dim, call.prep.kv_pos) for table in output)  # (1, Sk+Sd, 1, D)
        return tuple(table.index_select(self.dim, call.prep.keep) for table in output)  # (1, Sk, 1, D) each


class _GatherHook(ModelHook):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        call = self.state.call
        if call is None or call.prep.identity:
            return args, kwargs
        hidden = _get(args, kwargs, 0, "hidden_states")
        return _put(args, kwargs, 0, "hidden_states", hidden[:, call.prep.keep])  # (B, Sk, D)


class _ScatterHook(ModelHook):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        call = self.state.call
        if call is None or call.prep.identity:
            return output
        prep = call.prep
        full = output[:, prep.slot]  # (B, N, P): velocity restore = the reference's prediction
        if call.x_tok is None:
            return full
        # copy: pick v' with x_t[i] - s_i v' = x_t[src] - s_src v_src (same clean estimate)
        x, s = call.x_tok, call.sigma  # (B, N, P), (B, N|1, 1)
        s_src = s[:, prep.source] if s.shape[1] > 1 else s
        safe = torch.where(s > 0, s, torch.ones_like(s))
        v = (x - x[:, prep.source] + s_src * full.float()) / safe  # (B, N, P) float32
        v = torch.where((s > 0) & ~prep.computed[None, :, None], v.to(full.dtype), full)
        if self.state.after is not None:
            self.state.after(call, v)
        return v


# -- the handle ------------------------------------------------------------------------------
class Codec:
    """A plan (or planner) applied to one model. Made by :func:`apply`; undo with :meth:`remove`.

    Attributes:
        stats: :class:`Stats` - calls seen, kept tokens per call and per frame.
        plan: the plan in use (None until a planner has planned).
    """

    def __init__(self, model, plan_or_planner, *, recovery, restore, recovery_window, sigma, plan_kwargs,
                 clean_refresh: int = 0):
        self.model = model
        self.adapter = _adapter_for(model)
        self.recovery = check_recovery(recovery)
        if restore not in RESTORE_MODES:
            raise ValueError(f"unknown restore {restore!r}; valid: {', '.join(RESTORE_MODES)}")
        if not isinstance(clean_refresh, int) or clean_refresh < 0:
            raise ValueError(f"clean_refresh must be an int >= 0 (0 = never), got {clean_refresh!r}")
        if clean_refresh and (self.recovery != "clean" or restore != "copy"):
            raise ValueError(
                f"clean_refresh={clean_refresh} needs recovery='clean' and restore='copy' (got recovery="
                f"{self.recovery!r}, restore={restore!r}): it re-runs the clean pass on the copy restore's x0 estimate"
            )
        self.clean_refresh = clean_refresh
        if recovery_window is not None and (not isinstance(recovery_window, int) or recovery_window < 0):
            raise ValueError(f"recovery_window must be None (all frames) or an int >= 0, got {recovery_window!r}")
        self.restore, self.recovery_window = restore, recovery_window
        self.sigma = sigma or sigma_from_timestep
        self.patch_size = self.adapter.patch_size(model)
        if isinstance(plan_or_planner, Plan):
            self._planner, self.plan = None, plan_or_planner
        elif isinstance(plan_or_planner, str) or callable(plan_or_planner):
            self._planner, self.plan = plan_or_planner, None
        else:
            raise TypeError(
                f"apply() takes a lipcodec.Plan, a planner name or a planner, got {type(plan_or_planner).__name__}"
            )
        self._plan_kwargs = plan_kwargs
        self.stats = Stats()
        self._state = _State()
        if clean_refresh:
            self._state.after = self._refresh_clean
        self._prepared: dict = {}
        self._source: torch.Tensor | None = None  # clean source latents (B, C, F, H, W)
        self._clean: list = []  # [(weakref(text), [per block (k, v)])]
        self._priming: list | None = None  # the capture list while a clean pass runs
        self._num_attention = 0
        self._undo: list[Callable[[], None]] = []
        self._warned = False

    # -- public -----------------------------------------------------------------------------
    def prime(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **forward_kwargs):
        """Hand the codec the clean source latents (B, C, F, H, W) of the video.

        A planner plans on them now. With ``recovery="clean"`` and text embeddings given,
        the clean pass runs now (the model at t=0 on these latents; its duplicated K/V are
        cached per block); without text it runs lazily on the first call for each text.
        """
        self._source = latents.detach()
        self._clean = []
        if self._planner is not None:
            self._set_plan(make_plan(latents, self._planner, patch_size=self.patch_size, **self._plan_kwargs))
        if encoder_hidden_states is not None and self.recovery == "clean":
            self._prime_clean(encoder_hidden_states, None, forward_kwargs)
        return self

    def reset(self):
        """Forget the video: a planner replans on the next input or :meth:`prime`."""
        self._source, self._clean = None, []
        if self._planner is not None:
            self._set_plan(None)

    def remove(self):
        """Take every hook and processor off the model (a no-op when already removed) and
        free what the codec held on the device (indices, clean K/V, the source latents);
        ``plan`` and ``stats`` stay readable."""
        while self._undo:
            self._undo.pop()()
        if getattr(self.model, "_lipcodec", None) is self:
            del self.model._lipcodec
        self._state.call = None
        self._prepared, self._source, self._clean = {}, None, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        plan = self.plan.summary() if self.plan is not None else f"planner {self._planner!r}"
        return f"<lipcodec.Codec {type(self.model).__name__}: {plan}, recovery={self.recovery}, restore={self.restore}>"

    # -- internals --------------------------------------------------------------------------
    def _set_plan(self, plan):
        self.plan, self._prepared, self._clean = plan, {}, []

    def _prepare(self, hidden: torch.Tensor) -> _Prepared:
        grid = Grid.from_latents(hidden.shape, self.patch_size)
        grid.check_positions(getattr(getattr(self.model, "config", None), "rope_max_seq_len", None))
        if self.plan is None or (self._planner is not None and self.plan.grid != grid):
            if not self._warned:
                logger.warning(
                    "lipcodec: planning on the first model input, which is the *noisy* latents; plan on the clean "
                    "source instead with codec.prime(clean_latents) or apply() a pipeline that noises a video"
                )
                self._warned = True
            self._set_plan(make_plan(hidden.detach(), self._planner, patch_size=self.patch_size, **self._plan_kwargs))
        if self.plan.grid != grid:
            raise ValueError(
                f"the plan's token grid {tuple(self.plan.grid)} does not match the input latents "
                f"{tuple(hidden.shape)} (token grid {tuple(grid)} with patch {self.patch_size}): "
                "plan on the latents of this video"
            )
        prep = self._prepared.get(hidden.device)
        if prep is None:
            prep = self._prepared[hidden.device] = _Prepared.build(self.plan, hidden.device, self.recovery_window,
                                                                       self.recovery)
        return prep

    def _begin_call(self, args, kwargs):
        names = self.adapter.args
        hidden = _get(args, kwargs, 0, names[0])
        timestep = _get(args, kwargs, 1, names[1])
        text = _get(args, kwargs, 2, names[2])
        prep = self._prepare(hidden)
        if prep.identity:
            self._count(prep)
            self._state.call = None
            return args, kwargs
        clean_kv = None
        if self.recovery == "clean" and self._priming is None and prep.num_dup:
            clean_kv = self._clean_for(text, timestep, kwargs)
        call = _Call(prep, clean_kv=clean_kv, capture=self._priming)
        if self._priming is None and self.restore == "copy":
            pt, ph, pw = self.patch_size
            call.x_tok = rearrange(
                hidden.float(), "b c (f pt) (h ph) (w pw) -> b (f h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
            )  # (B, N, P) in proj_out's order
            sigma = self.sigma(timestep).float().to(hidden.device)
            call.sigma = sigma.reshape(hidden.shape[0], -1, 1) if sigma.ndim else sigma.reshape(1, 1, 1)  # (B, N|1, 1)
        if timestep is not None and timestep.ndim == 2:  # Wan 2.2 TI2V: one timestep per token
            args, kwargs = _put(args, kwargs, 1, names[1], timestep[:, prep.keep])  # (B, Sk)
        self._count(prep)
        self._state.call = call
        return args, kwargs

    def _count(self, prep: _Prepared):
        if self._priming is None:
            self.stats.calls += 1
            self.stats.tokens = prep.plan.grid.size
            self.stats.kept.append(prep.plan.num_kept)
            self.stats.frame_kept = prep.frame_kept

    def _clean_for(self, text, timestep, kwargs):
        for ref, kv in self._clean:
            if ref() is text:
                return kv
        if self._source is None:
            raise RuntimeError(
                "recovery='clean' needs the clean source latents: call codec.prime(clean_latents) first, "
                "or apply() a video-to-video pipeline (it captures them when it noises the video)"
            )
        return self._prime_clean(text, timestep, kwargs)

    def _refresh_clean(self, call: _Call, v: torch.Tensor):
        """clean_refresh: after every N-th call, the current x0 estimate (every token; reused
        ones already equal their reference's) becomes the clean source; each text's clean
        pass re-runs on it at its next call. The plan stays (made on the real source)."""
        if self._priming is not None or self.stats.calls % self.clean_refresh:
            return
        grid, (pt, ph, pw) = call.prep.plan.grid, self.patch_size
        x0 = call.x_tok - call.sigma * v.float()  # (B, N, P)
        self._source = rearrange(x0, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=grid.frames,
                                 h=grid.height, w=grid.width, pt=pt, ph=ph, pw=pw).detach()
        self._clean = []
        self.stats.refreshes += 1

    def _prime_clean(self, text, timestep, forward_kwargs):
        """Run the model at t=0 on the clean source; cache each block's duplicated K/V."""
        source = self._source
        if source.shape[0] != text.shape[0]:
            source = source[:1].expand(text.shape[0], *source.shape[1:])
        dtype = next(self.model.parameters()).dtype
        zero = torch.zeros(text.shape[0], device=source.device) if timestep is None else torch.zeros_like(timestep)
        extra = {k: v for k, v in forward_kwargs.items() if k not in (*self.adapter.args, "return_dict")}
        kv = [None] * self._num_attention
        self._priming, outer = kv, self._state.call  # blocks write their (k_dup, v_dup) into kv
        try:
            with torch.no_grad():
                self.model(
                    **{self.adapter.args[0]: source.to(dtype), self.adapter.args[1]: zero,
                       self.adapter.args[2]: text}, return_dict=False, **extra,
                )
        finally:
            self._priming, self._state.call = None, outer
        self.stats.primes += 1
        self._clean.append((weakref.ref(text), kv))
        return kv

    def _install(self):
        model, adapter, state = self.model, self.adapter, self._state
        modules = dict(model.named_modules())
        for name, module, hook in (
            ("lipcodec_root", model, _RootHook(self)),
            ("lipcodec_rope", modules[adapter.rope], _RopeHook(state, adapter.rope_dim)),
            ("lipcodec_gather", modules[adapter.first_block], _GatherHook(state)),
            ("lipcodec_scatter", modules[adapter.output], _ScatterHook(state)),
        ):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(hook, name)
            self._undo.append(lambda registry=registry, name=name: registry.remove_hook(name, recurse=False))
        if self.recovery != "none":
            pattern = re.compile(adapter.self_attention + "$")
            attention = [(n, m) for n, m in modules.items() if pattern.match(n)]
            self._num_attention = len(attention)
            for block, (name, module) in enumerate(attention):
                original = module.processor
                processor = adapter.processor(state, block, self.recovery)
                # keep the attention backend chosen with model.set_attention_backend(...)
                processor._attention_backend = getattr(original, "_attention_backend", None)
                module.set_processor(processor)
                self._undo.append(lambda module=module, original=original: module.set_processor(original))
        model._lipcodec = self


# -- entry points ----------------------------------------------------------------------------
def _transformer_of(obj):
    if isinstance(obj, torch.nn.Module):
        return obj, None
    model = getattr(obj, "transformer", None)
    if isinstance(model, torch.nn.Module):
        return model, obj
    raise TypeError(f"lipcodec.apply takes a diffusers transformer or pipeline, got {type(obj).__name__}")


def apply(
    model_or_pipe,
    plan_or_planner: Plan | str | Planner = "intra",
    *,
    recovery: str = "none",
    restore: str = "copy",
    recovery_window: int | None = None,
    clean_refresh: int = 0,
    sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kept_multiple: int | None = None,
    **plan_kwargs,
) -> Codec:
    """Run a plan inside a video DiT; returns the :class:`Codec` handle (a context manager).

    Important:
        model_or_pipe: a supported transformer (see :func:`adapters`) or a diffusers pipeline
            (its ``transformer`` is patched; for a video-to-video pipeline the clean source
            latents are captured when the pipeline noises them, and a planner plans on them).
        plan_or_planner: a :class:`Plan`, a planner name (``lipcodec.planners.available()``)
            or planner object. A bare transformer with a planner and no :meth:`Codec.prime`
            plans on the first hidden_states it sees - the *noisy* input.
        recovery: self-attention recovery, one of ``none``, ``proportional``, ``duplicate``,
            ``clean`` (see :mod:`lipcodec.attention`).
        restore: ``copy`` (default): a reused token's clean estimate x0 = x_t - sigma*v is
            made equal to its reference's; ``velocity``: it takes its reference's v.

    To tinker with:
        recovery_window: re-insert (duplicate/clean) or count (proportional) only the reused
            tokens of frame 0 and of the last ``recovery_window`` latent frames; None = all.
        clean_refresh: with ``recovery="clean"``: after every N-th model call the clean
            pass re-runs (at each text's next call) on the current x0 estimate instead of
            the source latents - the copied K/V follow the edit (one extra t=0 forward per
            text per refresh); 0 (default) = the source's clean pass for the whole run.
        sigma: ``timestep -> sigma`` for restore="copy"; default t/1000 (diffusers'
            flow-match convention), or the pipeline scheduler's own sigma table.
        kept_multiple: round the plan's kept count up to a multiple of this
            (:meth:`Plan.padded`: a given plan or the one a planner makes), so a compiled
            model (static shapes, CUDA graphs) meets a few sequence lengths, not one per plan.
        plan_kwargs: passed to :func:`lipcodec.plan` (``gop=``, ``seed=``, planner params).
    """
    if kept_multiple is not None:
        if isinstance(plan_or_planner, Plan):
            plan_or_planner = plan_or_planner.padded(kept_multiple)
        else:
            plan_kwargs["kept_multiple"] = check_kept_multiple(kept_multiple)
    model, pipe = _transformer_of(model_or_pipe)
    remove(model)
    if sigma is None and pipe is not None and getattr(pipe, "scheduler", None) is not None:
        sigma = scheduler_sigma(pipe.scheduler)
    codec = Codec(
        model, plan_or_planner, recovery=recovery, restore=restore, recovery_window=recovery_window,
        sigma=sigma, plan_kwargs=plan_kwargs, clean_refresh=clean_refresh,
    )
    codec._install()
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        _capture_source(codec, pipe.scheduler)
    return codec


def _capture_source(codec: Codec, scheduler):
    """Wrap the scheduler's SDEdit noising call so the clean latents reach ``codec.prime``."""
    for name, arg, key in (("add_noise", 0, "original_samples"), ("scale_noise", 0, "sample")):
        original = getattr(scheduler, name, None)
        if original is None:
            continue

        def noising(*args, _original=original, _arg=arg, _key=key, **kwargs):
            clean = kwargs.get(_key, args[_arg] if len(args) > _arg else None)
            if clean is not None and clean is not codec._source:
                codec.prime(clean)
            return _original(*args, **kwargs)

        setattr(scheduler, name, noising)  # instance attribute shadows the method
        codec._undo.append(lambda name=name: scheduler.__dict__.pop(name, None))


def remove(model_or_pipe) -> None:
    """Undo :func:`apply` (hooks, processors, scheduler capture); a no-op when not applied."""
    model, _ = _transformer_of(model_or_pipe)
    codec = getattr(model, "_lipcodec", None)
    if codec is not None:
        codec.remove()


__all__ = [
    "Adapter", "Codec", "RECOVERY_MODES", "RESTORE_MODES", "Stats", "adapters", "apply", "register_adapter",
    "remove", "scheduler_sigma", "sigma_from_timestep",
]

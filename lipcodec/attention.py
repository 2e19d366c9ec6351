"""Attention recovery: the self-attention processor that gives kept queries back the keys
the plan took away. One processor per self-attention module; all of them read the
executor's shared per-call state (indices, full RoPE tables, clean K/V).

Modes (the math in short; docs/executor.md has the rest):

- ``none``: kept tokens attend to kept tokens only (this processor is not even installed).
- ``proportional`` (ToMe): logit(i, j) += log c_j, where kept key j stands for c_j tokens.
  The executor orders kept tokens so that keys of equal multiplicity are contiguous runs;
  every multiplicity shared by at least ``MIN_RUN`` keys (on real plans: c = 1, 85-95% of
  keys) gets one plain 128-wide attention call that returns its log-sum-exp, and the other
  keys share one call with the bias folded into an extra q/k channel - q gets ``a``, k gets
  ``log c_j / (a * scale)`` (head zero-padded to 160, which the kernels run slower). The
  calls merge exactly by their log-sum-exps (+ log c), in one fused pass over all parts
  (:func:`merge_attention`). No (N, N) bias exists and every call is a fused kernel (the
  one SDPA, or the ``_native_*`` backend set on the model, would use). With a non-SDPA
  diffusers backend (flash-attn packages, ``_native_math``, ...) the whole key set takes
  one folded call through that backend instead.
- ``duplicate`` (LIPAR's M-degree recovery): reused tokens re-enter as keys/values, copied
  from their reference's *un-rotated* K (after norm_k, before RoPE) and V, then rotated
  with the reused token's own RoPE position. Queries stay kept-only (Sk x (Sk + Sd)).
- ``clean``: like ``duplicate``, but the copied K/V come from a clean (t = 0) pass over
  the source latents, cached once per video and text (see ``Codec.prime``).
"""

from __future__ import annotations

import attrs
import torch
from torch.nn.attention import SDPBackend
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

RECOVERY_MODES = ("none", "proportional", "duplicate", "clean")
# a multiplicity shared by at least this many keys gets its own plain 128-wide call; rarer ones
# share one folded (160-wide) call. Break-even measured on an H200 (cuDNN, 12 heads): an extra
# call + merge costs ~0.1 ms at 16k queries, a key moved out of the folded call saves ~1e-4 ms
# at 16k queries - both scale with the queries, so the break-even is ~1000 keys at any length.
MIN_RUN = 1024
MAX_PARTS = 8  # runs + tail that one merge pass reads: the 7 most common multiplicities get runs
_SDPA_KERNELS = {  # diffusers backends that are PyTorch SDPA -> the fused kernel they force (None: SDPA picks)
    AttentionBackendName.NATIVE: None,
    AttentionBackendName._NATIVE_FLASH: SDPBackend.FLASH_ATTENTION,
    AttentionBackendName._NATIVE_CUDNN: SDPBackend.CUDNN_ATTENTION,
    AttentionBackendName._NATIVE_EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Wan's interleaved RoPE, op for op as ``WanAttnProcessor`` does it (bit-identical).

    With ``width``, returns a new (..., width) buffer whose first D channels hold the result
    and whose other channels are uninitialised: the wider head of a folded call, which the
    caller fills (no copy)."""
    d = x.shape[-1]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]  # (1, S, 1, D/2)
    buffer = torch.empty_like(x) if width is None else x.new_empty(*x.shape[:-1], width)
    buffer[..., 0:d:2] = x1 * cos - x2 * sin
    buffer[..., 1:d:2] = x1 * sin + x2 * cos
    return buffer


def fold_width(d: int, multiple: int) -> int:
    """The head width of a folded call: D + 1 rounded up to ``multiple``."""
    return d + 1 + (-(d + 1)) % multiple


def fill_fold_channels(q_wide, k_wide, log_mult, d: int) -> float:
    """Write the fold into channels D.. of (B, S, H, width) buffers whose first D channels
    hold q and k: q gets ``a``, key j gets ``log c_j / (a * scale)``, the rest zeros. Returns
    the explicit scale (the original 1/sqrt(D): the temperature is unchanged)."""
    scale = d**-0.5
    a = d**0.25  # splits the magnitude between q and k: keeps bf16 rounding small on both sides
    q_wide[..., d] = a
    k_wide[..., d] = (log_mult / (a * scale)).to(k_wide.dtype)[None, :, None]
    q_wide[..., d + 1 :] = 0
    k_wide[..., d + 1 :] = 0
    return scale


def fold_log_multiplicity(q, k, v, log_mult, multiple: int = 8):
    """Append one q/k channel so that softmax(scale * q.k) gains + log c_j per key j.

    q (B, Sq, H, D), k/v (B, Sk, H, D), log_mult (Sk,). Returns q, k, v zero-padded to a
    head width that is a multiple of ``multiple``, and the explicit scale (the original
    1/sqrt(D): the temperature is unchanged).
    """
    d = q.shape[-1]
    q, k, v = (torch.nn.functional.pad(z, (0, fold_width(d, multiple) - d)) for z in (q, k, v))
    return q, k, v, fill_fold_channels(q, k, log_mult, d)


@attrs.frozen
class KeyRuns:
    """Kept keys ordered by multiplicity: ``runs`` are (start, end, log c) of the exact runs,
    keys from ``tail`` on have mixed multiplicities ``tail_log_mult`` (folded call)."""

    runs: tuple[tuple[int, int, float], ...]
    tail: int
    tail_log_mult: torch.Tensor  # (Sk - tail,) float32


def multiplicity_order(mult: torch.Tensor, min_run: int | None = None) -> tuple[torch.Tensor, KeyRuns]:
    """The order of kept keys that makes runs of equal multiplicity, and those runs.

    mult (Sk,) int: tokens each kept key stands for. Every multiplicity shared by at least
    ``min_run`` keys (default :data:`MIN_RUN`) gets a run, most common first, at most
    ``MAX_PARTS - 1`` of them; every other key goes to the tail. Returns ``perm`` (Sk,) (new
    order = old[perm]) and the :class:`KeyRuns`. One host sync (once per plan)."""
    min_run = MIN_RUN if min_run is None else min_run
    values, counts = mult.unique(return_counts=True)
    top = counts.argsort(descending=True, stable=True)
    top = top[counts[top] >= min_run][: MAX_PARTS - 1]
    group = torch.full_like(mult, len(top))  # (Sk,) run index; len(top) = the tail
    for i, j in enumerate(top.tolist()):
        group[mult == values[j]] = i
    perm = group.argsort(stable=True)
    runs, start = [], 0
    for j in top.tolist():
        n = int(counts[j])
        runs.append((start, start + n, float(values[j].float().log())))
        start += n
    return perm, KeyRuns(tuple(runs), start, mult[perm][start:].float().log())


def attention_lse(q, k, v, scale: float, kernel: SDPBackend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: q (B, Sq, H, D), k/v (B, Sk, H, D) ->
    out (B, Sq, H, D), lse (B, H, Sq) float32, from ``kernel`` or else the fused kernel SDPA
    itself would pick for these inputs (cuDNN, flash or memory-efficient on CUDA; flash on
    the CPU)."""
    qt, kt, vt = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, S, D)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=scale)
    else:
        choice = int(kernel) if kernel is not None else torch._fused_sdp_choice(qt, kt, vt, None, 0.0, False, scale=scale)
        if choice == int(SDPBackend.CUDNN_ATTENTION):
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, scale=scale)[:2]
        elif choice == int(SDPBackend.FLASH_ATTENTION):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, scale=scale)[:2]
    lse = lse.reshape(*lse.shape[:2], -1)[..., : q.shape[1]]  # cuDNN adds a unit dim, efficient pads to 32
    return out.transpose(1, 2), lse.float()


def proportional_attention(q, k, v, runs: KeyRuns, kernel: SDPBackend | None = None, rope=None) -> torch.Tensor:
    """Exact ``softmax(scale q.k + log c) v`` over keys ordered as ``runs`` says (module docstring).
    q (B, Sq, H, D), k/v (B, Sk, H, D) -> (B, Sq, H, D), scale 1/sqrt(D). With ``rope``
    (cos, sin), q and k come un-rotated and are rotated here, straight into the wider head
    the folded tail takes (no copy of q: at 8k-16k queries that copy cost 1-2% of a step).

    One attention call per run and one for the folded tail, merged by :func:`merge_attention`.
    The tail is padded to a 160-wide head (129 -> 160, not 136): no SDPA kernel runs 160
    slower than 136, cuDNN up to 8% faster (docs/benchmarks.md, attention kernel table)."""
    d, tail = q.shape[-1], runs.tail
    width = fold_width(d, 32) if tail < k.shape[1] else None
    if rope is not None:  # (..., width) buffers; q, k are views of their first D channels
        q_wide, k_wide = rotate(q, *rope, width), rotate(k, *rope, width)
        q, k = q_wide[..., :d], k_wide[..., :d]
    parts = []
    for start, end, log_c in runs.runs:
        out, lse = attention_lse(q, k[:, start:end], v[:, start:end], d**-0.5, kernel)
        parts.append((out, lse + log_c))
    if width is not None:  # mixed multiplicities folded into an extra channel
        if rope is not None:
            k_wide = k_wide[:, tail:]
        else:
            q_wide, k_wide = (torch.nn.functional.pad(z, (0, width - d)) for z in (q, k[:, tail:]))
        scale = fill_fold_channels(q_wide, k_wide, runs.tail_log_mult, d)
        out, lse = attention_lse(q_wide, k_wide, torch.nn.functional.pad(v[:, tail:], (0, width - d)), scale, kernel)
        parts.append((out[..., :d], lse))
    return merge_attention(parts)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over disjoint key sets merged into attention over their union:
    parts [(out (B, S, H, D), lse (B, H, S) float32)] -> sum_r softmax_r(lse)_r out_r, (B, S, H, D).

    float32 accumulation. On CUDA one Triton pass reads every part once and writes the result
    once (the chain of pairwise merges it replaces ran 2-3x slower, in PyTorch's strided
    broadcast kernel: docs/benchmarks.md)."""
    if len(parts) == 1:
        return parts[0][0]
    outs = [out for out, _ in parts]
    lse = torch.stack([lse for _, lse in parts])  # (R, B, H, S)
    if outs[0].is_cuda and _merge_kernel is not None and len(parts) <= MAX_PARTS:
        return _merge_cuda(outs, lse)
    weight = torch.softmax(lse, 0).transpose(2, 3).unsqueeze(-1)  # (R, B, S, H, 1)
    return sum(w * out for w, out in zip(weight, outs)).to(outs[0].dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of PyTorch come without Triton
    _merge_kernel = None
else:
    @triton.jit
    def _merge_kernel(result, lse, o0, o1, o2, o3, o4, o5, o6, o7, s0, s1, s2, s3, s4, s5, s6, s7,
                      rows_total, heads, seq, R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
        """Row n = (b * S + s) * H + h of every part (row stride s_r), weights from lse (R, B, H, S)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = rows < rows_total
        cols = tl.arange(0, DP)
        both = valid[:, None] & (cols[None, :] < D)
        h, bs = rows % heads, rows // heads
        lse_at = ((bs // seq) * heads + h) * seq + bs % seq  # (B, H, S) offset of each row
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for r in tl.static_range(R):
            top = tl.maximum(top, tl.load(lse + r * rows_total + lse_at, mask=valid, other=0.0))
        outs, strides = (o0, o1, o2, o3, o4, o5, o6, o7), (s0, s1, s2, s3, s4, s5, s6, s7)
        acc, total = tl.zeros([BLOCK, DP], tl.float32), tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(R):
            w = tl.exp(tl.load(lse + r * rows_total + lse_at, mask=valid, other=0.0) - top)
            part = tl.load(outs[r] + rows[:, None] * strides[r] + cols[None, :], mask=both, other=0.0)
            acc += w[:, None] * part.to(tl.float32)
            total += w
        tl.store(result + rows[:, None] * D + cols[None, :], (acc / total[:, None]).to(result.dtype.element_ty), mask=both)


def _merge_cuda(outs: list[torch.Tensor], lse: torch.Tensor) -> torch.Tensor:
    """The Triton merge: outs (B, S, H, D) each, lse (R, B, H, S) contiguous."""
    b, s, h, d = outs[0].shape
    flat = []  # each part as rows of (B, S, H) with one row stride
    for out in outs:
        if out.stride(3) != 1 or out.stride(1) != h * out.stride(2) or (b > 1 and out.stride(0) != s * out.stride(1)):
            out = out.contiguous()
        flat.append(out)
    result = torch.empty(b, s, h, d, dtype=outs[0].dtype, device=outs[0].device)
    rows, block = b * s * h, 64
    pad = flat + [flat[0]] * (MAX_PARTS - len(flat))
    with torch.cuda.device(result.device):  # Triton launches on the current device
        _merge_kernel[(triton.cdiv(rows, block),)](
            result, lse, *pad, *[out.stride(2) for out in pad], rows, h, s,
            R=len(outs), D=d, DP=triton.next_power_of_2(d), BLOCK=block,
        )
    return result


def _sdpa_backend(backend) -> AttentionBackendName | None:
    """The diffusers backend if it is PyTorch's SDPA (the runs call its kernels directly)."""
    backend = backend or _AttentionBackendRegistry.get_active_backend()[0]
    return backend if backend in _SDPA_KERNELS else None


class WanRecoveryProcessor:
    """Self-attention processor for ``WanAttention`` (``blocks.*.attn1``) with recovery."""

    _attention_backend = None  # set by model.set_attention_backend, as for WanAttnProcessor
    _parallel_config = None

    def __init__(self, state, block: int, mode: str):
        self.state, self.block, self.mode = state, block, check_recovery(mode)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        call = self.state.call
        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # (B, Sk, H*D) each
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, Sk, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        recover = call is not None and not call.prep.identity and call.prep.num_dup
        cached = recover and self.mode == "clean" and call.clean_kv is not None
        head_dim, scale, out = query.shape[-1], None, None
        if recover and self.mode in ("duplicate", "clean") and not cached:
            # every key at once: kept keys and copies of their references' un-rotated keys,
            # gathered by kv_slot and rotated at their own positions (one gather, no cat)
            sk = query.shape[1]
            if rotary_emb is not None:
                query = rotate(query, *rotary_emb)
            key = key[:, call.prep.kv_slot]  # (B, Sk + Sd, H, D)
            if call.rope_kv is not None:
                key = rotate(key, *call.rope_kv)
            value = value[:, call.prep.kv_slot]
            if call.capture is not None:  # Codec.prime: the clean pass keeps its duplicated K/V
                call.capture[self.block] = (key[:, sk:], value[:, sk:])
        else:
            proportional = recover and self.mode == "proportional"
            sdpa = _sdpa_backend(self._attention_backend) if proportional else None
            if sdpa is not None:  # runs + folded tail (it rotates q and k itself)
                out = proportional_attention(query, key, value, call.prep.runs, _SDPA_KERNELS[sdpa], rotary_emb)
            else:
                if rotary_emb is not None:
                    query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
                if proportional:  # another backend: one folded call
                    query, key, value, scale = fold_log_multiplicity(query, key, value, call.prep.log_mult)
                elif cached:  # "clean": the duplicated K/V of the clean pass, already rotated
                    key_dup, value_dup = call.clean_kv[self.block]  # (1 or B, Sd, H, D)
                    b = key.shape[0]
                    key = torch.cat([key, key_dup.expand(b, -1, -1, -1).to(key.dtype)], 1)  # (B, Sk + Sd, H, D)
                    value = torch.cat([value, value_dup.expand(b, -1, -1, -1).to(value.dtype)], 1)

        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=scale,
                backend=self._attention_backend, parallel_config=None,
            )  # (B, Sk, H, D')
        out = out[..., :head_dim].flatten(2, 3).type_as(query)  # (B, Sk, H*D)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def check_recovery(mode: str) -> str:
    if mode not in RECOVERY_MODES:
        raise ValueError(f"unknown recovery {mode!r}; valid: {', '.join(RECOVERY_MODES)}")
    return mode


__all__ = [
    "MAX_PARTS", "RECOVERY_MODES", "KeyRuns", "WanRecoveryProcessor", "attention_lse", "check_recovery",
    "fill_fold_channels", "fold_log_multiplicity", "fold_width", "merge_attention", "multiplicity_order",
    "proportional_attention", "rotate",
]

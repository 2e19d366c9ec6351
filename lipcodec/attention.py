"""Attention recovery: the self-attention processor that gives kept queries back the keys
the plan took away. One processor per self-attention module; all of them read the
executor's shared per-call state (indices, full RoPE tables, clean K/V).

Modes (the math in short; docs/executor.md has the rest):

- ``none``: kept tokens attend to kept tokens only (this processor is not even installed).
- ``proportional`` (ToMe): logit(i, j) += log c_j, where kept key j stands for c_j tokens.
  Folded into one extra q/k channel - q gets ``a``, k gets ``log c_j / (a * scale)`` -
  and SDPA is called with the model's own ``scale``, so no (N, N) bias exists and fused
  kernels still run. The head dim is zero-padded to a multiple of 8 for them.
- ``duplicate`` (LIPAR's M-degree recovery): reused tokens re-enter as keys/values, copied
  from their reference's *un-rotated* K (after norm_k, before RoPE) and V, then rotated
  with the reused token's own RoPE position. Queries stay kept-only (Sk x (Sk + Sd)).
- ``clean``: like ``duplicate``, but the copied K/V come from a clean (t = 0) pass over
  the source latents, cached once per video and text (see ``Codec.prime``).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

RECOVERY_MODES = ("none", "proportional", "duplicate", "clean")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE, op for op as ``WanAttnProcessor`` does it (bit-identical)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]  # (1, S, 1, D/2)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def fold_log_multiplicity(q, k, v, log_mult):
    """Append one q/k channel so that softmax(scale * q.k) gains + log c_j per key j.

    q (B, Sq, H, D), k/v (B, Sk, H, D), log_mult (Sk,). Returns padded q, k, v and the
    explicit scale (the original 1/sqrt(D): the temperature is unchanged).
    """
    b, sq, h, d = q.shape
    scale = d**-0.5
    a = d**0.25  # splits the magnitude between q and k: keeps bf16 rounding small on both sides
    pad = (-(d + 1)) % 8
    q_extra = q.new_full((b, sq, h, 1), a)  # (B, Sq, H, 1)
    k_extra = (log_mult / (a * scale)).to(k.dtype)[None, :, None, None].expand(b, -1, h, 1)  # (B, Sk, H, 1)
    q = torch.cat([q, q_extra, q.new_zeros(b, sq, h, pad)], -1)  # (B, Sq, H, D + 1 + pad)
    k = torch.cat([k, k_extra, k.new_zeros(b, k.shape[1], h, pad)], -1)
    v = torch.cat([v, v.new_zeros(b, v.shape[1], h, 1 + pad)], -1)
    return q, k, v, scale


class WanRecoveryProcessor:
    """Self-attention processor for ``WanAttention`` (``blocks.*.attn1``) with recovery."""

    _attention_backend = None  # set by model.set_attention_backend, as for WanAttnProcessor
    _parallel_config = None

    def __init__(self, state, block: int, mode: str):
        if mode not in RECOVERY_MODES:
            raise ValueError(f"unknown recovery {mode!r}; valid: {', '.join(RECOVERY_MODES)}")
        self.state, self.block, self.mode = state, block, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        call = self.state.call
        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # (B, Sk, H*D) each
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, Sk, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        recover = call is not None and not call.prep.identity and call.prep.num_dup
        cached = recover and self.mode == "clean" and call.clean_kv is not None
        head_dim, scale = query.shape[-1], None
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
            if rotary_emb is not None:
                query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
            if recover and self.mode == "proportional":
                query, key, value, scale = fold_log_multiplicity(query, key, value, call.prep.log_mult)
            elif cached:  # "clean": the duplicated K/V of the clean pass, already rotated
                key_dup, value_dup = call.clean_kv[self.block]  # (1 or B, Sd, H, D)
                b = key.shape[0]
                key = torch.cat([key, key_dup.expand(b, -1, -1, -1).to(key.dtype)], 1)  # (B, Sk + Sd, H, D)
                value = torch.cat([value, value_dup.expand(b, -1, -1, -1).to(value.dtype)], 1)

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


__all__ = ["RECOVERY_MODES", "WanRecoveryProcessor", "fold_log_multiplicity", "rotate", "check_recovery"]

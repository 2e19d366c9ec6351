"""Load generator weights released in the original Wan key layout into diffusers' Wan.

Self-Forcing (``self_forcing_dmd.pt``) and CausVid release a ``torch.save`` dict such as
``{"generator": {...}, "generator_ema": {...}}`` whose keys are the original Wan names
behind a wrapper prefix (``model.blocks.0.self_attn.q.weight``). Their causal model has
exactly Wan's parameters - causality lives in the attention mask and the KV cache - so
the weights load into ``WanTransformer3DModel`` and run with :mod:`lipcodec.streaming`.

>>> model = load_wan_checkpoint("self_forcing_dmd.pt")            # doctest: +SKIP
>>> model = load_wan_checkpoint(path, key="generator", dtype=torch.bfloat16)  # doctest: +SKIP

Keys are renamed with diffusers' own single-file converter
(``convert_wan_transformer_to_diffusers``); every key must then match the model exactly
(names and shapes), else :class:`CheckpointError` lists what is missing, unexpected or
mis-shaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

# sub-dicts tried in order by key="auto" (EMA first: Self-Forcing's inference uses --use_ema)
AUTO_KEYS = ("generator_ema", "generator", "model_ema", "ema", "state_dict", "model", "module")
WRAPPER_PREFIXES = ("model.diffusion_model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                    "_orig_mod.", "module.", "model.", "generator.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: says which keys and what to do."""


def load_state_dict(path_or_dict, key: str | None = "auto") -> dict[str, torch.Tensor]:
    """The flat tensor dict of a checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``)
    or an already-loaded dict, with ``key`` picking the sub-dict (``"auto"``, a name, or None)."""
    if isinstance(path_or_dict, Mapping):
        data = dict(path_or_dict)
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - say which file and why
                raise CheckpointError(f"{path} could not be read as a torch checkpoint: {error}") from error
    if not isinstance(data, Mapping):
        raise CheckpointError(f"the checkpoint holds a {type(data).__name__}, not a dict of tensors")
    nested = [k for k, v in data.items() if isinstance(v, Mapping)]
    if key == "auto":
        if nested:
            pick = next((k for k in AUTO_KEYS if k in nested), None)
            if pick is None:
                raise CheckpointError(
                    f"the checkpoint has sub-dicts {nested} and none is a known generator key "
                    f"({', '.join(AUTO_KEYS)}): pass key=NAME"
                )
            data = data[pick]
    elif key is not None:
        if key not in data or not isinstance(data[key], Mapping):
            raise CheckpointError(f"the checkpoint has no sub-dict {key!r}; it has {nested or 'none'} (key=None = top level)")
        data = data[key]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found (top-level keys: {list(data)[:8]}): pass key= to pick the weights")
    return tensors


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``model.``, ``module.``, ``_orig_mod.``, FSDP...) that every key shares."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def layout(state_dict) -> str:
    """``"wan"`` (original: ``self_attn``, ``head.head``), ``"diffusers"`` or ``"unknown"``."""
    keys = set(state_dict)
    if any(".self_attn." in k for k in keys) or "head.head.weight" in keys:
        return "wan"
    if any(".attn1." in k for k in keys) or "proj_out.weight" in keys:
        return "diffusers"
    return "unknown"


def convert_wan_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan names -> diffusers names (diffusers' converter; the input is not modified)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state_dict))


def infer_config(state_dict: dict[str, torch.Tensor], attention_head_dim: int = 128) -> dict:
    """``WanTransformer3DModel`` config from diffusers-named weights. Head size is not in the
    shapes: every released Wan uses 128 (pass another for test models)."""
    try:
        patch = state_dict["patch_embedding.weight"]  # (D, C, pt, ph, pw)
        inner = patch.shape[0]
        blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
        config = dict(
            patch_size=tuple(patch.shape[2:]),
            num_attention_heads=inner // attention_head_dim,
            attention_head_dim=attention_head_dim,
            in_channels=patch.shape[1],
            out_channels=state_dict["proj_out.weight"].shape[0] // math.prod(patch.shape[2:]),
            text_dim=state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            freq_dim=state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            ffn_dim=state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0],
            num_layers=max(blocks) + 1,
            cross_attn_norm="blocks.0.norm2.weight" in state_dict,
        )
    except KeyError as error:
        raise CheckpointError(f"cannot infer the model config: weight {error} is missing; pass config=") from None
    if inner % attention_head_dim:
        raise CheckpointError(f"hidden size {inner} is not a multiple of attention_head_dim={attention_head_dim}")
    if "blocks.0.attn2.add_k_proj.weight" in state_dict:
        config["added_kv_proj_dim"] = state_dict["blocks.0.attn2.add_k_proj.weight"].shape[1]
    if "condition_embedder.image_embedder.norm1.weight" in state_dict:
        config["image_dim"] = state_dict["condition_embedder.image_embedder.norm1.weight"].shape[0]
    return config


def check_state_dict(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless names and shapes match ``model`` exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if not (missing or unexpected or shapes):
        return
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            lines.append(f"{title} ({len(items)}): {', '.join(items[:8])}{more}")
    raise CheckpointError(
        "the checkpoint does not fit WanTransformer3DModel:\n  " + "\n  ".join(lines) + "\n"
        "Check that it is a Wan 2.1 generator of this size (config=, attention_head_dim=), "
        "and key= picks the generator weights."
    )


def load_wan_checkpoint(path_or_dict, model=None, *, key: str | None = "auto", config: dict | None = None,
                        attention_head_dim: int = 128, dtype: torch.dtype | None = None, device=None):
    """A ``WanTransformer3DModel`` with the checkpoint's weights (original Wan or diffusers names).

    Important:
        path_or_dict: a file (``.pt``, ``.pth``, ``.safetensors``) or a loaded dict.
        model: load into this model (its config must fit); None builds one from ``config``
            or, without it, from the weight shapes (:func:`infer_config`).
        key: the sub-dict holding the generator (``"auto"``: ``generator_ema``, then
            ``generator``, ...; None: the top level).
        dtype, device: where the loaded model goes.
    """
    from diffusers import WanTransformer3DModel

    state = strip_prefixes(load_state_dict(path_or_dict, key))
    kind = layout(state)
    if kind == "unknown":
        raise CheckpointError(
            f"unrecognised key layout (first keys: {sorted(state)[:4]}): expected original Wan names "
            "(blocks.N.self_attn.q.weight, head.head.weight) or diffusers names (blocks.N.attn1.to_q.weight)"
        )
    if kind == "wan":
        state = convert_wan_state_dict(state)
    if model is None:
        with torch.device("meta"):
            model = WanTransformer3DModel(**(config or infer_config(state, attention_head_dim)))
        check_state_dict(model, state)
        model.load_state_dict(state, strict=True, assign=True)
        # non-persistent buffers (RoPE tables) were built on "meta": rebuild them for real
        model.rope = type(model.rope)(model.rope.attention_head_dim, model.rope.patch_size, model.rope.max_seq_len)
    else:
        check_state_dict(model, state)
        model.load_state_dict(state, strict=True)
    model = model.eval()
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


__all__ = [
    "CheckpointError", "check_state_dict", "convert_wan_state_dict", "infer_config", "layout",
    "load_state_dict", "load_wan_checkpoint", "strip_prefixes",
]

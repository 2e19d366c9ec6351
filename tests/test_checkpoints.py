"""Loading generator checkpoints in the original Wan layout (Self-Forcing / CausVid style)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from lipcodec.checkpoints import CheckpointError, infer_config, layout, load_state_dict, load_wan_checkpoint

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)

# the original Wan name of every diffusers parameter, written out (independent of the converter)
TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # Wan's cross-attention norm is norm3; diffusers calls it norm2
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}


def original_name(name: str) -> str:
    if name.startswith("blocks."):
        _, n, rest = name.split(".", 2)
        for ours, theirs in BLOCK.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"blocks.{n}.{theirs}{rest[len(ours):]}"
        raise KeyError(name)
    for ours, theirs in TOP.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    raise KeyError(name)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture
def self_forcing_file(model, tmp_path):
    """A tiny checkpoint shaped like self_forcing_dmd.pt: generator + generator_ema, 'model.' prefix."""
    ema = {f"model.{original_name(k)}": v.clone() for k, v in model.state_dict().items()}
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": raw, "generator_ema": ema}, path)
    return path


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, return_dict=False)[0]


def test_original_layout_loads_into_diffusers_wan(model, self_forcing_file):
    loaded = load_wan_checkpoint(self_forcing_file, attention_head_dim=12)
    assert all(loaded.config[k] == (tuple(v) if isinstance(v, tuple) else v) for k, v in TINY.items() if k != "rope_max_seq_len")
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the EMA weights, every one
    assert torch.equal(forward(loaded), forward(model))
    assert loaded.config.num_layers == 2 and loaded.config.attention_head_dim == 12


def test_key_picks_the_sub_dict_and_model_can_be_given(model, self_forcing_file):
    target = WanTransformer3DModel(**TINY)
    out = load_wan_checkpoint(self_forcing_file, target, key="generator")
    assert out is target and all((v == 0).all() for v in out.state_dict().values() if v.is_floating_point())
    with pytest.raises(CheckpointError, match="no sub-dict 'ema_model'.*generator"):
        load_wan_checkpoint(self_forcing_file, target, key="ema_model")


def test_diffusers_layout_and_prefixes_pass_through(model):
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert layout(load_state_dict(state)) == "diffusers"
    loaded = load_wan_checkpoint(state, config=TINY)
    assert torch.equal(forward(loaded), forward(model))


def test_inferred_config(model):
    from lipcodec.checkpoints import convert_wan_state_dict

    state = convert_wan_state_dict({original_name(k): v for k, v in model.state_dict().items()})
    config = infer_config(state, attention_head_dim=12)
    for name in ("patch_size", "num_attention_heads", "in_channels", "out_channels", "text_dim", "ffn_dim",
                 "num_layers", "cross_attn_norm"):
        assert config[name] == TINY[name], name


def test_mismatched_keys_are_named(model, tmp_path):
    good = {original_name(k): v for k, v in model.state_dict().items()}
    missing = dict(good)
    del missing["blocks.1.self_attn.q.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): blocks\.1\.attn1\.to_q\.weight"):
        load_wan_checkpoint(missing, WanTransformer3DModel(**TINY))
    extra = dict(good, **{"blocks.0.self_attn.extra_gate": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): blocks\.0\.attn1\.extra_gate"):
        load_wan_checkpoint(extra, WanTransformer3DModel(**TINY))
    bigger = WanTransformer3DModel(**dict(TINY, ffn_dim=64))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*ffn\.net\.0\.proj\.weight: checkpoint \(32, 24\), model \(64, 24\)"):
        load_wan_checkpoint(good, bigger)
    with pytest.raises(CheckpointError, match="unrecognised key layout"):
        load_wan_checkpoint({"encoder.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="pass key=NAME"):
        load_wan_checkpoint({"optimizer": {"step": torch.zeros(1)}})
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_wan_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_wan_checkpoint(tmp_path / "absent.pt")

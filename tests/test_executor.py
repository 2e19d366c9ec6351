"""The pruned-DiT executor on diffusers' tiny Wan configs (CPU, float32)."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVideoToVideoPipeline,
)
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402
from einops import rearrange  # noqa: E402
from PIL import Image  # noqa: E402

import lipcodec  # noqa: E402
import lipcodec.testing  # noqa: E402
from lipcodec import Grid, Plan  # noqa: E402
from lipcodec.attention import (  # noqa: E402
    MAX_PARTS, RECOVERY_MODES, attention_lse, fold_log_multiplicity, merge_attention, multiplicity_order,
    proportional_attention, rotate,
)
from lipcodec.executor import adapters, apply, remove  # noqa: E402

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)


# -- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 16, 16, generator=g)  # token grid 3 x 8 x 8
    return x, torch.tensor([500.0]), torch.randn(1, 12, 16, generator=g)


def reuse_plan(grid, frac=0.5, seed=0) -> Plan:
    """Reuse the same-place token of the previous frame for a random share of P-frame tokens."""
    return lipcodec.testing.same_place_plan(grid, frac, seed)


def tokens(x, patch=(1, 2, 2)):
    """Latents (B, C, F, H, W) -> (B, N, pt*ph*pw*C), the order proj_out emits."""
    return rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (pt ph pw c)", pt=patch[0], ph=patch[1], pw=patch[2])


def run(model, x, t, e):
    with torch.no_grad():
        return model(x, t, e, return_dict=False)[0]


def kept_only_forward(model, x, t, e, keep):
    """Wan's forward with the blocks run on the kept tokens only: (B, Sk, P) out of proj_out."""
    with torch.no_grad():
        cos, sin = model.rope(x)
        rotary = (cos[:, keep], sin[:, keep])  # (1, Sk, 1, D)
        h = model.patch_embedding(x).flatten(2).transpose(1, 2)[:, keep]  # (B, Sk, D)
        temb, proj, text, _ = model.condition_embedder(t, e, None)
        proj = proj.unflatten(1, (6, -1))
        for block in model.blocks:
            h = block(h, text, proj, rotary)
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (model.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        return model.proj_out(h)


# -- tiny pipelines -------------------------------------------------------------------------
def tiny_pipeline(cls=WanVideoToVideoPipeline, scheduler="unipc"):
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{**TINY, "in_channels": 16, "out_channels": 16, "text_dim": 32}).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return cls(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=sched)


def video(frames=9, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, k, axis=1)) for k in range(frames)]


TEXT = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
NEG = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
PIPE_GRID = Grid(3, 2, 2)  # 9 frames of 32x32 -> latents (1, 16, 3, 4, 4)


def v2v(pipe, steps=6, **kw):
    with torch.no_grad():
        return pipe(video=video(), prompt_embeds=TEXT, negative_prompt_embeds=NEG, height=32, width=32,
                    num_inference_steps=steps, strength=0.7, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames


# -- identity: the all-intra plan is the unpatched model, bit for bit ---------------------------
@pytest.mark.parametrize("recovery", RECOVERY_MODES)
def test_intra_plan_is_bit_exact(model, inputs, recovery):
    x, t, e = inputs
    reference = run(model, x, t, e)
    with apply(model, Plan.identity(Grid(3, 8, 8)), recovery=recovery):
        assert torch.equal(run(model, x, t, e), reference)
    with apply(model, "intra", recovery=recovery):
        assert torch.equal(run(model, x, t, e), reference)


def test_intra_plan_is_bit_exact_with_per_token_timesteps(model, inputs):
    x, _, e = inputs
    t = torch.linspace(0, 999, 192)[None]  # (B, S): Wan 2.2 TI2V style
    reference = run(model, x, t, e)
    with apply(model, "intra"):
        assert torch.equal(run(model, x, t, e), reference)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_intra_plan_is_bit_exact_in_video_to_video_pipeline(scheduler):
    pipe = tiny_pipeline(scheduler=scheduler)
    reference = v2v(pipe)
    with apply(pipe, "intra") as codec:
        out = v2v(pipe)
    assert torch.equal(out, reference)
    assert codec.stats.calls == 2 * 4  # int(6 * 0.7) = 4 steps, cond + uncond each


def test_intra_plan_is_bit_exact_in_text_to_video_pipeline():
    pipe = tiny_pipeline(WanPipeline)

    def t2v():
        with torch.no_grad():
            return pipe(prompt_embeds=TEXT, negative_prompt_embeds=NEG, height=32, width=32, num_frames=9,
                        num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    reference = t2v()
    with apply(pipe, Plan.identity(PIPE_GRID), recovery="duplicate"):
        assert torch.equal(t2v(), reference)


# -- gather / scatter ---------------------------------------------------------------------------
def test_blocks_run_on_kept_tokens_and_reused_take_their_reference(model, inputs):
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8))
    with apply(model, plan, recovery="none", restore="velocity") as codec:
        out = tokens(run(model, x, t, e))  # (1, N, P)
    expected = kept_only_forward(model, x, t, e, plan.keep)[:, plan.slot]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert codec.stats.kept == [plan.num_kept]


def test_per_token_timesteps_are_gathered(model, inputs):
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8))
    with apply(model, plan, restore="velocity"):
        scalar = run(model, x, t, e)
        per_token = run(model, x, t.expand(1, 192), e)  # (B, S) with the same value everywhere
        torch.testing.assert_close(per_token, scalar, rtol=0, atol=1e-5)
        varied = t.expand(1, 192).clone()
        varied[:, ~plan.computed] = 17.0  # reused tokens are absent: their timestep cannot matter
        assert torch.equal(run(model, x, varied, e), per_token)


# -- recovery: exact when duplicates are exact and RoPE is off ---------------------------------
@pytest.mark.parametrize("recovery", ["proportional", "duplicate"])
def test_recovery_is_exact_for_identical_duplicates_without_rope(model, inputs, recovery):
    model = copy.deepcopy(model)
    model.rope.freqs_cos.fill_(1.0)  # cos = 1, sin = 0: RoPE is the identity
    model.rope.freqs_sin.zero_()
    x, t, e = inputs
    x = x[:, :, :1].expand(-1, -1, 3, -1, -1).contiguous()  # every frame the same: reused tokens are exact copies
    plan = reuse_plan((3, 8, 8), frac=0.6)
    full = run(model, x, t, e)
    with apply(model, plan, recovery=recovery):
        torch.testing.assert_close(run(model, x, t, e), full, rtol=0, atol=2e-5)
    with apply(model, plan, recovery="none"):  # the test can tell: without recovery it is off
        assert (run(model, x, t, e) - full).abs().max() > 1e-3


def test_proportional_fold_equals_explicit_log_bias():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 12, generator=g) for _ in range(3))  # (B, S, H, D)
    log_mult = torch.log(torch.tensor([1.0, 3.0, 1.0, 2.0, 7.0]))
    qf, kf, vf, scale = fold_log_multiplicity(q, k, v, log_mult)
    assert qf.shape[-1] % 8 == 0 and scale == 12**-0.5
    folded = torch.nn.functional.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (qf, kf, vf)), scale=scale)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + log_mult  # small explicit reference
    explicit = torch.einsum("bhqk,bkhd->bhqd", logits.softmax(-1), v)
    torch.testing.assert_close(folded[..., :12], explicit, rtol=0, atol=1e-5)


@pytest.mark.parametrize("min_run, expected", [(99, []), (5, [1]), (2, [1, 2, 3]), (1, [1, 2, 3, 5, 7])])
def test_proportional_runs_equal_the_explicit_log_bias(min_run, expected):
    """Keys split into runs of equal multiplicity (one call each, merged by log-sum-exp) plus
    a folded tail give softmax(q.k / sqrt(D) + log c) v, whatever the split."""
    g = torch.Generator().manual_seed(1)
    mult = torch.tensor([1, 3, 1, 2, 7, 1, 3, 1, 2, 1, 5])  # (Sk,)
    perm, runs = multiplicity_order(mult, min_run)
    assert sorted(perm.tolist()) == list(range(11))
    assert [round(math.exp(c)) for _, _, c in runs.runs] == expected  # most common first (ties: smaller c)
    for start, end, log_c in runs.runs:
        assert torch.all(mult[perm][start:end] == round(math.exp(log_c)))
    torch.testing.assert_close(runs.tail_log_mult, mult[perm][runs.tail :].float().log())
    q = torch.randn(2, 4, 3, 16, generator=g)  # (B, Sq, H, D)
    k, v = (torch.randn(2, 11, 3, 16, generator=g)[:, perm] for _ in range(2))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4 + mult[perm].float().log()
    explicit = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
    torch.testing.assert_close(proportional_attention(q, k, v, runs), explicit, rtol=0, atol=1e-5)


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton merge)")


@pytest.mark.parametrize("device, dtype, atol", [
    ("cpu", torch.float32, 1e-5), pytest.param("cuda", torch.bfloat16, 8e-3, marks=NEEDS_CUDA)])
@pytest.mark.parametrize("sizes, d", [((40, 24), 128), ((7, 9, 30, 2, 5, 11, 1, 3), 128), ((20, 13, 6), 48)])
def test_merge_attention_equals_attention_over_the_union(device, dtype, atol, sizes, d):
    """Attention over each part of a key split, merged by log-sum-exp, is attention over all
    keys - also when a part's output is a slice of a wider head (the folded tail's layout),
    and for a head width that is not a power of two (the reference model's 48)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 33, 3, d, generator=g).to(device, dtype)  # (B, Sq, H, D)
    k, v = (torch.randn(2, sum(sizes), 3, d, generator=g).to(device, dtype) for _ in range(2))
    parts, start = [], 0
    for i, n in enumerate(sizes):
        key, value = k[:, start : start + n], v[:, start : start + n]
        if i == 1:  # padded to a wider head and sliced back, as the folded tail comes out
            out, lse = attention_lse(*(torch.nn.functional.pad(z, (0, 32)) for z in (q, key, value)), d**-0.5)
            out = out[..., :d]
        else:
            out, lse = attention_lse(q, key, value, d**-0.5)
        parts.append((out, lse))
        start += n
    assert len(parts) <= MAX_PARTS
    whole = torch.nn.functional.scaled_dot_product_attention(*(z.float().transpose(1, 2) for z in (q, k, v))).transpose(1, 2)
    merged = merge_attention(parts)
    assert merged.dtype == dtype and merged.shape == q.shape
    torch.testing.assert_close(merged.float(), whole, rtol=0, atol=atol)


def test_proportional_attention_rotates_into_the_folded_head():
    """Given the RoPE tables, proportional_attention rotates q and k itself (into the wider
    head of the folded call): the same result as rotating first, inputs untouched."""
    g = torch.Generator().manual_seed(3)
    mult = torch.tensor([1, 1, 2, 1, 3, 1, 1, 2, 5, 1, 1, 4])
    perm, runs = multiplicity_order(mult, 3)  # a c = 1 run and a folded tail
    assert runs.runs and runs.tail < len(mult)
    q, k, v = (torch.randn(2, 12, 3, 16, generator=g) for _ in range(3))
    angle = torch.randn(1, 12, 1, 16, generator=g)
    cos, sin = angle.cos(), angle.sin()
    before = [z.clone() for z in (q, k, v)]
    rotated_first = proportional_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, runs)
    torch.testing.assert_close(proportional_attention(q, k, v, runs, rope=(cos, sin)), rotated_first, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


def test_multiplicity_order_caps_the_runs():
    mult = torch.arange(1, 13).repeat_interleave(3)  # 12 multiplicities, 3 keys each
    _, runs = multiplicity_order(mult, 1)
    assert len(runs.runs) == MAX_PARTS - 1 and runs.tail == 3 * (MAX_PARTS - 1)


@pytest.mark.parametrize("min_run", [10**6, 30, 1])
def test_proportional_runs_equal_one_folded_call_in_the_model(model, inputs, monkeypatch, min_run):
    """In the model, the runs path (PyTorch SDPA) equals the single folded call another
    attention backend takes; the plan has several multiplicities (chains over 3 frames)."""
    monkeypatch.setattr(lipcodec.attention, "MIN_RUN", min_run)
    # set_attention_backend also sets diffusers' process-wide default: restore it afterwards
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName.NATIVE)
    calls = []
    runs_attention = lipcodec.attention.proportional_attention
    monkeypatch.setattr(lipcodec.attention, "proportional_attention", lambda *a: calls.append(1) or runs_attention(*a))
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8), frac=0.6)
    assert len(plan.multiplicity.unique()) >= 3
    with apply(model, plan, recovery="proportional") as codec:
        runs = run(model, x, t, e)
        split = codec._prepared[x.device].runs  # c = 1, 2, 3 on 55, 34, 23 keys
        expected = {10**6: (0, 0), 30: (2, 89), 1: (3, plan.num_kept)}[min_run]  # (runs, first tail key)
        assert (len(split.runs), split.tail) == expected, split
    assert len(calls) == len(model.blocks)  # the runs path ran in every block
    other = copy.deepcopy(model)
    other.set_attention_backend("_native_math")
    with apply(other, plan, recovery="proportional"):
        folded = run(other, x, t, e)
    assert len(calls) == len(model.blocks)  # ... and not with the other backend
    torch.testing.assert_close(runs, folded, rtol=0, atol=2e-5)


def test_recovery_window_limits_reinserted_frames(model, inputs):
    x, t, e = inputs
    x = torch.cat([x, x[:, :, :2]], 2)  # 5 frames
    plan = reuse_plan((5, 8, 8), frac=0.5)
    codec = apply(model, plan, recovery="duplicate", recovery_window=2)
    out = run(model, x, t, e)
    prep = next(iter(codec._prepared.values()))
    frames = prep.dup_ids // 64
    assert set(frames.tolist()) <= {0, 3, 4} and prep.num_dup == int((~plan.computed[192:]).sum())
    assert torch.isfinite(out).all()
    codec.remove()


def test_clean_recovery_primes_once_per_text(model, inputs):
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8))
    codec = apply(model, plan, recovery="clean")
    with pytest.raises(RuntimeError, match="prime"):
        run(model, x, t, e)
    codec.prime(x)
    out = run(model, x, t, e)
    run(model, x, t, e)
    assert codec.stats.primes == 1 and codec.stats.calls == 2 and torch.isfinite(out).all()
    run(model, x, t, torch.zeros_like(e))  # another text: its own clean pass
    assert codec.stats.primes == 2
    import gc
    import weakref

    cached = weakref.ref(codec._clean[0][1][0][0])  # one block's clean keys
    codec.remove()
    gc.collect()
    assert cached() is None, "remove() must free the clean K/V (GPU memory) even while the codec is referenced"
    assert codec.stats.primes == 2 and codec.plan is plan  # what was measured stays readable


def test_clean_refresh_reprimes_on_the_x0_estimate(model, inputs):
    """clean_refresh=1: after each call the clean pass's source becomes that call's x0
    estimate x - sigma v (sigma = t / 1000), and the next call re-primes on it."""
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8))
    with apply(model, plan, recovery="clean") as plain:
        plain.prime(x)
        first, second = run(model, x, t, e), run(model, x, t, e)
    with apply(model, plan, recovery="clean", clean_refresh=1) as codec:
        codec.prime(x)
        out = run(model, x, t, e)
        torch.testing.assert_close(out, first, rtol=0, atol=0)  # the first call primes on the source
        torch.testing.assert_close(codec._source, x - 0.5 * out, rtol=0, atol=1e-6)
        again = run(model, x, t, e)
        assert codec.stats.primes == 2 and codec.stats.refreshes == 2
    assert (again - second).abs().max() > 1e-4  # the refreshed K/V change the output


@pytest.mark.parametrize("kwargs, message", [
    ({"recovery": "duplicate", "clean_refresh": 2}, "clean_refresh=2 needs recovery='clean' and restore='copy'"),
    ({"recovery": "clean", "restore": "velocity", "clean_refresh": 1}, "needs recovery='clean' and restore='copy'"),
    ({"recovery": "clean", "clean_refresh": -1}, "clean_refresh must be an int >= 0"),
])
def test_clean_refresh_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply(model, reuse_plan((3, 8, 8)), **kwargs)
    assert getattr(model, "_lipcodec", None) is None


def test_all_modes_finite_and_shaped(model, inputs):
    x, t, e = inputs
    for recovery in RECOVERY_MODES:
        with apply(model, reuse_plan((3, 8, 8)), recovery=recovery) as codec:
            codec.prime(x, e)
            out = run(model, x, t, e)
        assert out.shape == x.shape and torch.isfinite(out).all()


# -- restore ------------------------------------------------------------------------------------
def test_copy_restore_gives_reused_tokens_their_reference_clean_estimate(model, inputs):
    x, _, e = inputs
    plan = reuse_plan((3, 8, 8))
    t = torch.rand(1, 192) * 900 + 50  # per-token sigmas, all > 0
    with apply(model, plan):
        v = tokens(run(model, x, t, e))
    x0 = tokens(x) - (t / 1000)[..., None] * v  # (1, N, P)
    torch.testing.assert_close(x0, x0[:, plan.source], rtol=0, atol=1e-5)


def test_custom_sigma_is_used(model, inputs):
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8))
    with apply(model, plan, sigma=lambda ts: torch.full_like(ts.float(), 0.25)):
        v = tokens(run(model, x, t, e))
    x0 = tokens(x) - 0.25 * v
    torch.testing.assert_close(x0, x0[:, plan.source], rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_copy_restore_ends_reused_latents_equal_to_their_reference(scheduler):
    pipe = tiny_pipeline(scheduler=scheduler)
    plan = reuse_plan(PIPE_GRID, frac=0.6)
    with apply(pipe, plan) as codec:
        latents = tokens(v2v(pipe))
    torch.testing.assert_close(latents, latents[:, plan.source], rtol=0, atol=1e-5)
    assert codec.stats.kept == [plan.num_kept] * 8


# -- pipelines: CFG, lazy planning on the clean source ------------------------------------------
def test_cfg_calls_share_the_plan_made_on_the_clean_source():
    pipe = tiny_pipeline()
    seen, plan = [], reuse_plan(PIPE_GRID, frac=0.5, seed=2)

    def planner(ctx):
        seen.append(ctx.latents.clone())
        return plan

    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, k, out: outputs.append(tokens(out[0])), with_kwargs=True)
    with apply(pipe, planner, restore="velocity") as codec:
        v2v(pipe)
    handle.remove()
    assert len(seen) == 1 and codec.plan is plan
    assert seen[0].shape == (16, 3, 4, 4) and seen[0].abs().max() < 10  # the VAE latents, not noise-dominated input
    assert len(outputs) == 8  # 4 steps x (cond, uncond)
    for out in outputs:  # every call restored with the same plan
        assert torch.equal(out, out[:, plan.source])
    assert not torch.equal(outputs[0], outputs[1])  # cond and uncond differ, and still share it


def test_clean_recovery_in_pipeline_primes_cond_and_uncond():
    pipe = tiny_pipeline()
    with apply(pipe, reuse_plan(PIPE_GRID), recovery="clean") as codec:
        out = v2v(pipe)
    assert codec.stats.primes == 2 and torch.isfinite(out).all()


# -- remove / reapply / stats -------------------------------------------------------------------
def test_apply_twice_then_remove_restores_the_model(model, inputs):
    x, t, e = inputs
    reference = run(model, x, t, e)
    processors = dict(model.attn_processors)
    plan = reuse_plan((3, 8, 8))
    first = apply(model, plan, recovery="duplicate")
    once = run(model, x, t, e)
    second = apply(model, plan, recovery="duplicate")
    assert torch.equal(run(model, x, t, e), once)
    assert list(model._diffusers_hook.hooks) == ["lipcodec_root"]
    assert model._lipcodec is second and first.stats.calls == 1 and second.stats.calls == 1
    remove(model)
    assert torch.equal(run(model, x, t, e), reference)
    assert model.attn_processors.keys() == processors.keys()
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    assert not model._diffusers_hook.hooks and not hasattr(model, "_lipcodec")
    remove(model)  # no-op
    second.remove()  # no-op
    remove(WanTransformer3DModel(**TINY))  # never patched: no-op


def test_remove_from_pipeline_unpatches_scheduler():
    pipe = tiny_pipeline()
    apply(pipe, "intra")
    assert "add_noise" in vars(pipe.scheduler)
    remove(pipe)
    assert "add_noise" not in vars(pipe.scheduler) and not hasattr(pipe.transformer, "_lipcodec")


def test_stats(model, inputs):
    x, t, e = inputs
    plan = reuse_plan((3, 8, 8))
    with apply(model, plan) as codec:
        for _ in range(3):
            run(model, x, t, e)
    assert codec.stats.calls == 3 and codec.stats.kept == [plan.num_kept] * 3 and codec.stats.tokens == 192
    assert codec.stats.frame_kept.tolist() == plan.computed.reshape(3, -1).sum(1).tolist()
    assert codec.stats.kept_ratio == pytest.approx(plan.kept_ratio)


# -- errors -------------------------------------------------------------------------------------
def test_errors_name_the_problem_and_the_choices(model, inputs):
    x, t, e = inputs
    with pytest.raises(ValueError, match="unknown recovery 'dup'.*none, proportional, duplicate, clean"):
        apply(model, "intra", recovery="dup")
    with pytest.raises(ValueError, match="unknown restore 'x0'.*copy, velocity"):
        apply(model, "intra", restore="x0")
    with apply(model, Plan.identity(Grid(2, 8, 8))):
        with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(1, 4, 3, 16, 16\).*\(3, 8, 8\)"):
            run(model, x, t, e)
    with pytest.raises(TypeError, match="no adapter for Linear; supported: WanTransformer3DModel"):
        apply(torch.nn.Linear(2, 2), "intra")
    assert "WanTransformer3DModel" in adapters()
    assert not hasattr(model, "_lipcodec")  # a failed apply leaves nothing behind


def test_lazy_exports():
    assert lipcodec.apply is apply and lipcodec.remove is remove


def test_speed_benchmark_smoke(tmp_path, repo_script):
    import json

    bench = repo_script("benchmarks/executor_speed.py")
    out = tmp_path / "speed.json"
    bench.main(["--tiny", "--kept", "0.5", "--reps", "1", "--warmup", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["recovery"] for r in rows] == [None, None, *RECOVERY_MODES, "ceiling"]
    assert all(r["ms"] > 0 for r in rows)


def test_gpu_suite_smoke(tmp_path, repo_script):
    """benchmarks/gpu_suite.py on tiny configs: every section runs and the table holds
    together (a ceiling per plan, Pearson r over the plans, compiled rows equal eager)."""
    import json

    suite = repo_script("benchmarks/gpu_suite.py")
    out = tmp_path / "suite.json"
    modes = ["none", "proportional", "duplicate"]
    suite.main(["--tiny", "--budgets", "0.8", "0.5", "--modes", *modes, "--reps", "1", "--warmup", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    full = [r for r in result["rows"] if r["section"] == "full"]
    assert full[0]["name"] == "unpatched" and len(full) == 1 + 2 * 2 * 4  # 2 clips x 2 budgets x (3 modes + ceiling)
    assert {r["clip"] for r in full[1:]} == set(suite.CLIPS) and all(r["plan_ms"] > 0 for r in full[1:])
    assert -1 <= result["pearson"]["ceiling"]["r"] <= 1 and result["pearson"]["none"]["points"] == 4
    for mode in modes:  # composes with torch.compile (proportional: no as_strided view is written to)
        assert result["compile"][mode]["max_abs_diff_vs_eager"] < 1e-3, result["compile"]
    assert [r["recovery"] for r in result["rows"] if r["section"] == "14b"] == [None, "none", "duplicate", "ceiling"]


@pytest.mark.needs_cxx
def test_gpu_suite_buckets_share_compiled_graphs(tmp_path, repo_script):
    """benchmarks/gpu_suite.py --sections buckets (tiny, CPU inductor): unpadded, every
    distinct kept count compiles the blocks; with a multiple, plans in one bucket reuse its graph."""
    import json

    suite = repo_script("benchmarks/gpu_suite.py")
    out = tmp_path / "buckets.json"
    suite.main(["--tiny", "--sections", "buckets", "--multiples", "0", "32", "--edit-steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())["buckets"]["multiples"]
    unpadded, padded = result["0"], result["32"]
    assert unpadded["graphs"] == len({r["kept"] for r in unpadded["rows"]}) >= 2
    assert padded["graphs"] == 1 and all(r["kept"] % 32 == 0 for r in padded["rows"])
    for row in unpadded["rows"] + padded["rows"]:  # a graph is compiled exactly when the count is new
        assert (row["new_graphs"] > 0) == row["new_count"], row


def test_recovery_processors_keep_the_chosen_attention_backend(model):
    model.set_attention_backend("native")
    before = {n: p._attention_backend for n, p in model.attn_processors.items()}
    with lipcodec.apply(model, Plan.identity((2, 8, 8)), recovery="duplicate"):
        after = {n: p._attention_backend for n, p in model.attn_processors.items()}
    assert after == before and before["blocks.0.attn1.processor"] is not None


def test_grid_beyond_the_rope_table_is_a_clear_error(model):
    """diffusers itself fails with a reshape error deep in its RoPE; lipcodec names the axis,
    the table size and the fix before the model runs."""
    text = torch.randn(1, 4, 16)
    with apply(model, "intra"):
        with pytest.raises(ValueError, match=r"33 tokens long in rows .*RoPE table holds 32 positions"):
            model(torch.randn(1, 4, 1, 66, 8), torch.tensor([500.0]), text)
        model(torch.randn(1, 4, 1, 64, 8), torch.tensor([500.0]), text)  # 32 rows: runs
    with pytest.raises(ValueError, match="in frames"):
        Grid(33, 4, 4).check_positions(32)
    Grid(33, 4, 4).check_positions(32, frames=False)  # streaming shifts time positions itself
    Grid(33, 40, 40).check_positions(None)  # unknown table: no check

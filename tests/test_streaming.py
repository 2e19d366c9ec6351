"""The streaming (chunk-causal, KV-cached) runner on diffusers' tiny Wan config (CPU).

Two references, both built on diffusers' own ``WanTransformer3DModel.forward``:

- ``reference_stream``: chunk-causal denoising written the straightforward way - a
  per-block list of each frame's *un-rotated* K/V, rotated to the current positions at
  every use and concatenated before the chunk's own keys. Same float ops as the runner, so
  with the intra plan and no RoPE shift the runner equals it **bit for bit** (window
  larger than the video, or the same trimming on both sides).
- ``masked_reference``: no cache at all; every step runs the whole sequence seen so far
  (clean outputs of earlier chunks at t = 0, the noisy chunk at t) with per-token
  timesteps and an explicit block-causal boolean mask. Different reduction lengths, so
  it matches to float tolerance (float64 here: 1e-9).
"""

from __future__ import annotations

import copy
import re

import attrs
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from lipcodec import Plan, Schedule
from lipcodec.attention import rotate
from lipcodec.streaming import Chunk, StreamConfig, StreamRunner, flow_sigma

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
TPF = 16  # tokens per latent frame of 8x8 latents


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up costs more than the math (10-40x on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture(scope="module")
def model64(model):
    import copy

    return copy.deepcopy(model).double()


def video(frames=7, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, frames, 8, 8, generator=g, dtype=dtype), torch.randn(1, 12, 16, generator=g, dtype=dtype)


def stream(model, x, text, config, **kwargs) -> list[Chunk]:
    runner = StreamRunner(model, text, config, **kwargs)
    return runner.push(x) + runner.flush()


def cat(chunks):
    return torch.cat([c.latents for c in chunks], 2)


# -- reference 1: a list of per-frame raw K/V, rotated at each use ----------------------------
class _RefState:
    def __init__(self, model, sink, window, rope_frames):
        self.model, self.sink, self.window, self.rope_frames = model, sink, window, rope_frames
        self.frames: list[list[tuple]] = [[] for _ in model.blocks]  # per block: (frame, k_raw, v)
        self.start = self.count = self.offset = 0
        self.write = False

    def pos(self, frame):
        return frame if frame < self.sink else frame - self.offset

    def tables(self, frames):
        """cos/sin (1, n*16, 1, D) for whole frames at their current positions."""
        rope = self.model.rope
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            t, h, w = table.split(split, dim=1)
            pos = torch.tensor([self.pos(f) for f in frames])
            f_, r, c = torch.meshgrid(pos, torch.arange(4), torch.arange(4), indexing="ij")
            out.append(torch.cat([t[f_.flatten()], h[r.flatten()], w[c.flatten()]], -1)[None, :, None])
        return out


class _RefProcessor:
    def __init__(self, state, block):
        self.state, self.block = state, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        chunk = list(range(st.start, st.start + st.count))
        cos, sin = st.tables(chunk)
        q_rot, k_rot = rotate(q, cos, sin), rotate(k, cos, sin)
        cached = st.frames[self.block]
        recent = [e for e in cached if e[0] >= st.sink]
        visible = [e for e in cached if e[0] < st.sink] + (recent if st.window is None else recent[len(recent) - st.window :])
        keys = [rotate(kr, *st.tables([f])) for f, kr, _ in visible] + [k_rot]
        values = [val for _, _, val in visible] + [v]
        out = torch.nn.functional.scaled_dot_product_attention(
            q_rot.permute(0, 2, 1, 3), torch.cat(keys, 1).permute(0, 2, 1, 3), torch.cat(values, 1).permute(0, 2, 1, 3)
        ).permute(0, 2, 1, 3)
        if st.write:
            for i, f in enumerate(chunk):
                cached.append((f, k[:, i * TPF : (i + 1) * TPF], v[:, i * TPF : (i + 1) * TPF]))
        out = out.flatten(2, 3).type_as(q_rot)
        return attn.to_out[1](attn.to_out[0](out))


def reference_stream(model, x, text, config, rope_frames=None):
    """Chunk-causal Self-Forcing sampling over diffusers' forward; returns (x0 video, state)."""
    state = _RefState(model, config.sink, config.window, rope_frames or model.config.rope_max_seq_len)
    originals = {name: m.processor for name, m in model.named_modules() if name.endswith("attn1")}
    for i, block in enumerate(model.blocks):
        block.attn1.set_processor(_RefProcessor(state, i))
    g = torch.Generator().manual_seed(config.seed)
    sig, out = config.sigmas, []
    try:
        with torch.no_grad():
            for a in range(0, x.shape[2], config.chunk):
                src = x[:, :, a : a + config.chunk]
                state.start, state.count = a, src.shape[2]
                state.offset = max(state.offset, a + src.shape[2] - state.rope_frames)
                xt = (1.0 - sig[0]) * src + sig[0] * torch.randn(src.shape, generator=g).to(x.dtype)
                state.write = False
                for i, sigma in enumerate(sig):
                    v = model(xt, torch.full((1,), 1000.0 * sigma), text, return_dict=False)[0]
                    x0 = xt - sigma * v
                    if i + 1 < len(sig):
                        xt = (1.0 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(x0.shape, generator=g).to(x.dtype)
                state.write = True
                model(x0, torch.full((1,), 0.0), text, return_dict=False)
                out.append(x0)
    finally:
        for name, m in model.named_modules():
            if name in originals:
                m.set_processor(originals[name])
    return torch.cat(out, 2), state


# -- reference 2: the whole sequence with an explicit block-causal mask -----------------------
class _MaskedProcessor(WanAttnProcessor):
    mask = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, None, _MaskedProcessor.mask, rotary_emb)


def masked_reference(model, x, text, config):
    originals = {name: m.processor for name, m in model.named_modules() if name.endswith("attn1")}
    for block in model.blocks:
        block.attn1.set_processor(_MaskedProcessor())
    g = torch.Generator().manual_seed(config.seed)
    sig, done = config.sigmas, []
    try:
        with torch.no_grad():
            for a in range(0, x.shape[2], config.chunk):
                src = x[:, :, a : a + config.chunk]
                s = src.shape[2]
                chunk_of = torch.arange(a + s).div(config.chunk, rounding_mode="floor").repeat_interleave(TPF)
                _MaskedProcessor.mask = chunk_of[None, :] <= chunk_of[:, None]  # (N, N) block-causal, True = attend
                xt = (1.0 - sig[0]) * src + sig[0] * torch.randn(src.shape, generator=g).to(x.dtype)
                for i, sigma in enumerate(sig):
                    seq = torch.cat(done + [xt], 2)
                    t = torch.cat([torch.zeros(a * TPF), torch.full((s * TPF,), 1000.0 * sigma)])[None].to(x.dtype)
                    v = model(seq, t, text, return_dict=False)[0][:, :, a:]
                    x0 = xt - sigma * v
                    if i + 1 < len(sig):
                        xt = (1.0 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(x0.shape, generator=g).to(x.dtype)
                done.append(x0)
    finally:
        for name, m in model.named_modules():
            if name in originals:
                m.set_processor(originals[name])
    return torch.cat(done, 2)


# -- plans --------------------------------------------------------------------------------------
class SamePlace:
    """Test planner: in P-frames a seeded random share of tokens reuses the same place one frame back."""

    name = "same-place"

    def __init__(self, share=0.5, seed=0, back=1):
        self.share, self.seed, self.back = share, seed, back

    def __call__(self, ctx):
        grid = ctx.grid
        g = torch.Generator().manual_seed(self.seed + grid.frames)
        source = torch.arange(grid.size)
        ids = torch.arange(grid.tokens_per_frame, grid.size)
        reused = ids[torch.rand(ids.numel(), generator=g) < self.share]
        source[reused] = reused - self.back * grid.tokens_per_frame
        return Plan(grid, source, Schedule.parse("I" + "P" * (grid.frames - 1)))


class Future:
    """Test planner that is not causal: the second-last frame (a b-frame) copies the last."""

    name = "future"

    def __call__(self, ctx):
        grid = ctx.grid
        source = torch.arange(grid.size)
        last = (grid.frames - 1) * grid.tokens_per_frame
        source[last - grid.tokens_per_frame : last] += grid.tokens_per_frame
        return Plan(grid, source, Schedule.parse("I" + "P" * (grid.frames - 3) + "bP"))


# -- config ------------------------------------------------------------------------------------
def test_config_presets_and_errors():
    assert StreamConfig.generation().timesteps == (1000.0, 750.0, 500.0, 250.0)
    assert StreamConfig.editing().timesteps[0] == 400.0 and len(StreamConfig.editing().timesteps) == 4
    assert StreamConfig(shift=1.0).sigmas == (0.4, 0.3, 0.2, 0.1)
    assert flow_sigma(1000.0, 5.0) == 1.0 and abs(flow_sigma(400.0, 5.0) - 2.0 / 2.6) < 1e-12
    with pytest.raises(ValueError, match="strictly decreasing"):
        StreamConfig(timesteps=(250, 500))
    with pytest.raises(ValueError, match="recovery"):
        StreamConfig(recovery="copy")
    with pytest.raises(ValueError, match="first_chunk"):
        StreamConfig(first_chunk="skip")
    with pytest.raises(ValueError, match="chunk"):
        StreamConfig(chunk=0)


def test_construction_errors(model):
    _, text = video()
    with pytest.raises(ValueError, match="B-frames"):
        StreamRunner(model, text, planner="lipar", gop="bframes=2")
    with pytest.raises(ValueError, match="rope_frames"):
        StreamRunner(model, text, StreamConfig(sink=1, window=6, chunk=3, rope_frames=8))
    with pytest.raises(ValueError, match="RoPE table"):
        StreamRunner(model, text, StreamConfig(rope_frames=64))
    runner = StreamRunner(model, text, StreamConfig())
    with pytest.raises(ValueError, match="channels"):
        runner.push(torch.zeros(1, 3, 2, 8, 8))
    runner.push(torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="differ from the stream"):
        runner.push(torch.zeros(1, 4, 1, 8, 10))
    with pytest.raises(ValueError, match=r"40 tokens long in columns .*rope_max_seq_len"):  # RoPE: 32 per axis
        StreamRunner(model, text, StreamConfig()).push(torch.zeros(1, 4, 1, 8, 80))
    StreamRunner(model, text, StreamConfig()).push(torch.zeros(1, 4, 1, 8, 64))  # 32 columns: fits


def test_future_reference_is_refused(model):
    x, text = video(6)
    runner = StreamRunner(model, text, StreamConfig(chunk=3, first_chunk="prune"), planner=Future())
    with pytest.raises(ValueError, match="only reference the past"):
        runner.push(x)


# -- equality with the references -------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 16])
def test_intra_equals_reference_bit_for_bit(model, window):
    """Window None (untrimmed) or larger than the video: same ops as the straightforward reference."""
    x, text = video(7)
    config = StreamConfig(chunk=3, window=window, sink=1)
    ours = cat(stream(model, x, text, config))
    ref, _ = reference_stream(model, x, text, config)
    assert ours.shape == x.shape
    assert torch.equal(ours, ref)


def test_reference_equals_explicit_block_causal_mask(model64):
    """The cache semantics are block-causal attention: float64, tolerance for reduction order."""
    x, text = video(7, dtype=torch.float64)
    config = StreamConfig(chunk=3, window=None, timesteps=(1000, 500), shift=3.0)
    ours = cat(stream(model64, x, text, config))
    masked = masked_reference(model64, x, text, config)
    assert torch.allclose(ours, masked, rtol=0, atol=1e-9), (ours - masked).abs().max()


def test_generation_preset_starts_from_pure_noise(model):
    x, text = video(4)
    config = StreamConfig.generation(chunk=2)
    a = cat(stream(model, x, text, config))
    b = cat(stream(model, torch.zeros_like(x), text, config))
    assert torch.equal(a, b)  # sigma 1 at t = 1000: the source does not matter


def test_kv_cache_after_clean_pass(model):
    x, text = video(6)
    config = StreamConfig(chunk=3, window=None, sink=1)
    runner = StreamRunner(model, text, config)
    runner.push(x[:, :, :3])
    _, state = reference_stream(model, x[:, :, :3], text, config)
    assert runner.cached_frames == [0, 1, 2]
    for block in range(len(model.blocks)):
        k, v, frames = runner.cache_kv(block)
        assert frames == [(0, TPF), (1, TPF), (2, TPF)]
        ref_k = torch.cat([rotate(kr, *state.tables([f])) for f, kr, _ in state.frames[block]], 1)
        ref_v = torch.cat([val for _, _, val in state.frames[block]], 1)
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    # the clean pass is at t = 0 on the chunk's output: redoing it reproduces the cache
    first = runner.cache_kv(0)[0].clone()
    runner2 = StreamRunner(model, text, config)
    runner2.push(x[:, :, :3])
    assert torch.equal(runner2.cache_kv(0)[0], first)


def test_window_trimming(model):
    x, text = video(8)
    config = StreamConfig(chunk=2, sink=1, window=3)
    runner = StreamRunner(model, text, config)
    seen = []
    for a in range(0, 8, 2):
        runner.push(x[:, :, a : a + 2])
        seen.append(runner.cached_frames)
        k, _, frames = runner.cache_kv(0)
        assert k.shape[1] == len(runner.cached_frames) * TPF
    assert seen == [[0, 1], [0, 1, 2, 3], [0, 3, 4, 5], [0, 5, 6, 7]]
    assert runner._cache.capacity == (1 + 3 + 2) * TPF  # pre-allocated: sink + window + chunk frames
    ours = torch.cat([c.latents for c in StreamRunner(model, text, config).push(x)], 2)
    ref, _ = reference_stream(model, x, text, config)
    assert torch.equal(ours, ref)  # same trimming on both sides: bit for bit
    untrimmed, _ = reference_stream(model, x, text, StreamConfig(chunk=2, sink=1, window=None))
    assert not torch.equal(ours, untrimmed)  # and trimming does change frames 6..7


def test_rope_shift_policy(model64):
    """Past rope_frames the newest chunk is pinned to the last positions, cached keys re-rotated."""
    x, text = video(10, dtype=torch.float64)
    config = StreamConfig(chunk=2, sink=1, window=3, rope_frames=6, timesteps=(800, 400))
    runner = StreamRunner(model64, text, config)
    ours = cat(runner.push(x))
    ref, state = reference_stream(model64, x, text, config, rope_frames=6)  # rotates raw keys at current positions
    assert state.offset == 4
    # diffusers rounds its RoPE tables to float32 (cos^2 + sin^2 = 1 only to ~1e-7), so a
    # key rotated to p and then back by the shift differs from one rotated to p - shift by ~1e-7
    assert torch.equal(ours[:, :, :6], ref[:, :, :6])  # before the first shift: bit for bit
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5), (ours - ref).abs().max()
    # cached keys sit at their shifted positions: k == rotate(raw k, table at pos)
    k, _, frames = runner.cache_kv(1)
    ref_k = torch.cat([rotate(kr, *state.tables([f])) for f, kr, _ in state.frames[1] if f in (0, 7, 8, 9)], 1)
    assert [f for f, _ in frames] == [0, 7, 8, 9]
    assert torch.allclose(k, ref_k, rtol=0, atol=1e-5)
    assert torch.allclose(k[:, :TPF], ref_k[:, :TPF], rtol=0, atol=0)  # the sink frame is never rotated
    # without a sink, attention only sees relative positions: same as never shifting
    no_sink = StreamConfig(chunk=2, sink=0, window=4, rope_frames=6, timesteps=(800, 400))
    shifted = cat(stream(model64, x, text, no_sink))
    plain = cat(stream(model64, x, text, attrs.evolve(no_sink, rope_frames=None)))
    assert torch.allclose(shifted, plain, rtol=0, atol=1e-5)
    wrong = cat(stream(model64, x, text, attrs.evolve(no_sink, window=None, rope_frames=None)))
    assert not torch.allclose(shifted, wrong, rtol=0, atol=1e-3)  # the window matters: the check can fail


def test_streams_longer_than_the_rope_table(model):
    x, text = video(40)  # the tiny model's table has 32 positions
    runner = StreamRunner(model, text, StreamConfig(chunk=3, window=4, timesteps=(500,)))
    out = cat(runner.push(x) + runner.flush())
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="window=None"):
        StreamRunner(model, text, StreamConfig(chunk=3, window=None, timesteps=(500,))).push(x)


# -- incremental API ---------------------------------------------------------------------------
def test_incremental_pushes_match_one_push(model):
    x, text = video(8)
    config = StreamConfig(chunk=3, window=4)
    whole = stream(model, x, text, config)
    runner = StreamRunner(model, text, config)
    pieces, got, a = [1, 2, 1, 3, 1], [], 0
    for n in pieces:
        got += runner.push(x[:, :, a : a + n])
        a += n
    assert [c.index for c in got] == [0, 1] and a == 8
    got += runner.flush()
    assert [list(c.frames) for c in got] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert runner.flush() == []
    assert torch.equal(cat(got), cat(whole))
    assert all(c.seconds > 0 and c.kept_ratio == 1.0 for c in got)
    # run(): any iterator, with encode/decode hooks
    frames = (x[0, :, i : i + 1] * 2 for i in range(8))  # (C, 1, H, W) pieces, "encoded" by halving
    ran = list(StreamRunner(model, text, config).run(frames, encode=lambda p: p / 2, decode=lambda z: z.mean()))
    assert torch.equal(cat(ran), cat(whole)) and ran[-1].pixels == ran[-1].latents.mean()


def test_reset_restarts_the_stream(model):
    x, text = video(6)
    runner = StreamRunner(model, text, StreamConfig(chunk=3))
    first = cat(runner.push(x))
    runner.reset()
    assert runner.cached_frames == []
    assert torch.equal(cat(runner.push(x)), first)


# -- pruning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recovery", ["none", "proportional", "duplicate", "clean"])
def test_pruned_stream_restores_references(model, recovery):
    x, text = video(9)
    config = StreamConfig(chunk=3, window=4, recovery=recovery)
    chunks = stream(model, x, text, config, planner=SamePlace(0.5))
    out = cat(chunks).reshape(1, 4, 9, 4, 2, 4, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(1, 9 * TPF, 16)  # tokens
    assert chunks[0].kept_ratio == 1.0  # first_chunk="full"
    assert all(0.3 < c.kept_ratio < 0.8 for c in chunks[1:])
    for c in chunks:
        src = c.source
        ids = torch.arange(c.start * TPF, c.start * TPF + src.numel())
        assert c.kept == int((src == ids).sum())
        assert torch.equal(out[0, ids], out[0, src])  # restoration: a reused token's output is its reference's
        reused = src != ids
        assert (src[reused] // TPF < ids[reused] // TPF).all() and (src[reused] % TPF == ids[reused] % TPF).all()
    assert torch.isfinite(out).all()


@pytest.mark.needs_cxx
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (inductor's GPU code for the cache writes)"))])
@pytest.mark.parametrize(("recovery", "graphs"), [("none", 2), ("proportional", 2), ("duplicate", 2), ("clean", 3)])
def test_compiled_stream_matches_eager_without_recompiling(model, recovery, graphs, device):
    """compile=True: the same stream to rounding, and no recompilation per chunk although
    kept counts, cache lengths and copy counts change (dynamic shapes). Each block is one
    graph, the cache writes and the attention inside: one for the first chunk (unpruned,
    its cache empty: dynamo specializes the 0), one for every later chunk - with the
    multiplicities' bias for ``proportional``, the copied keys for ``duplicate``/``clean``
    (``clean``'s denoising steps copy only cached keys: no local copies, another 0, a third
    graph)."""
    from torch._dynamo.utils import counters

    x, text = video(12)
    net, x, text = copy.deepcopy(model).to(device), x.to(device), text.to(device)
    config = StreamConfig(chunk=3, window=4, recovery=recovery)
    eager = stream(net, x, text, config, planner=SamePlace(0.5))
    torch._dynamo.reset()
    counters.clear()
    compiled = stream(net, x, text, config, planner=SamePlace(0.5), compile=True)
    assert len({c.kept for c in compiled}) >= 3  # the kept count changes between chunks
    assert [c.kept for c in compiled] == [c.kept for c in eager]
    torch.testing.assert_close(cat(compiled).cpu(), cat(eager).cpu(), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs


def test_cache_grows_to_the_rows_in_use(model):
    """The KV cache is allocated for the rows a chunk writes, not for full frames: a `none`
    stream caches kept rows only and stays below the full-frame bound that `duplicate`
    (every row of every cached frame) reaches."""
    x, text = video(9)
    capacity = {}
    for recovery in ("none", "duplicate"):
        runner = StreamRunner(model, text, StreamConfig(chunk=3, window=4, recovery=recovery), planner=SamePlace(0.5))
        chunks = runner.push(x)
        cache = runner._cache
        assert cache.limit == (1 + 4 + 3) * TPF
        assert sum(fr.count for fr in cache.frames) == cache.used <= cache.capacity <= cache.limit
        capacity[recovery] = (cache.capacity, [c.kept for c in chunks])
    assert capacity["duplicate"][0] == (1 + 4 + 3) * TPF
    cap, kept = capacity["none"]
    # the most rows ever written: chunk 2 on frames 0 (sink), 2 (full, chunk 0) and 3-5 (chunk 1's kept rows)
    assert cap == 2 * TPF + kept[1] + kept[2] < (1 + 4 + 3) * TPF, (cap, kept)


def test_recovery_modes_differ_where_they_should(model):
    x, text = video(6)
    runs = {}
    for recovery in ("none", "proportional", "duplicate", "clean"):
        config = StreamConfig(chunk=3, window=4, recovery=recovery, first_chunk="prune")
        runs[recovery] = stream(model, x, text, config, planner=SamePlace(0.5))
    assert runs["none"][0].kept_ratio < 1.0  # LIPAR's first chunk: pruned too
    # chunk 0 has no clean cache: "clean" denoises it with plain pruning, exactly like "none"
    assert torch.equal(runs["clean"][0].latents, runs["none"][0].latents)
    assert not torch.equal(runs["duplicate"][0].latents, runs["none"][0].latents)  # noisy in-chunk copies
    assert not torch.equal(runs["proportional"][0].latents, runs["none"][0].latents)
    # from chunk 1 on the clean cache exists and every mode is different
    later = {k: v[1].latents for k, v in runs.items()}
    names = list(later)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.equal(later[a], later[b]), (a, b)


def test_all_kept_plan_is_the_intra_stream(model):
    x, text = video(6)
    intra = cat(stream(model, x, text, StreamConfig(chunk=3)))
    for recovery in ("none", "proportional", "duplicate", "clean"):
        config = StreamConfig(chunk=3, recovery=recovery, first_chunk="prune")
        assert torch.equal(cat(stream(model, x, text, config, planner=SamePlace(0.0))), intra)


def test_clean_cache_holds_rerotated_copies(model64):
    """Clean pass, clean recovery: a reused token's cached key is its reference's key at its own position."""
    x, text = video(6, dtype=torch.float64)
    config = StreamConfig(chunk=3, window=None, recovery="clean", timesteps=(600, 300))
    runner = StreamRunner(model64, text, config, planner=SamePlace(0.5))
    chunks = runner.push(x)
    src = torch.cat([c.source for c in chunks])  # (6*16,) stream ids
    rope = model64.rope
    cos_all, sin_all = rope(x)  # (1, 96, 1, D) at absolute positions (no shift here)
    for block in range(len(model64.blocks)):
        k, v, frames = runner.cache_kv(block)
        assert frames == [(f, TPF) for f in range(6)]  # complete frames
        reused = (src != torch.arange(src.numel())).nonzero().flatten()
        s = src[reused]
        assert reused.numel() > 10 and (s < 3 * TPF).any() and (s >= 3 * TPF).any()  # cached and in-chunk refs
        raw = rotate(k[:, s], cos_all[:, s], -sin_all[:, s])  # un-rotate the reference's key
        expected = rotate(raw, cos_all[:, reused], sin_all[:, reused])
        assert torch.allclose(k[:, reused], expected, rtol=0, atol=1e-6), (k[:, reused] - expected).abs().max()  # f32 tables
        assert torch.equal(v[:, reused], v[:, s])
    # the cached key rows of reused tokens are not simply their reference's rotated key
    assert not torch.allclose(k[:, reused], k[:, s])


def test_lipar_planner_streams_with_bounded_history(model):
    """The real planner, chunk by chunk on the past: a static scene with one moving corner."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 1, 24, 24, generator=g) + 0.02 * torch.randn(1, 4, 12, 24, 24, generator=g)
    x[:, :, :, :4, :4] += torch.randn(1, 4, 12, 4, 4, generator=g)  # tokens (0..1, 0..1) change every frame
    _, text = video()
    runner = StreamRunner(model, text, StreamConfig(chunk=3, plan_context=6, window=3), planner="lipar")
    chunks = runner.push(x)
    assert chunks[0].kept_ratio == 1.0 and all(c.kept_ratio < 0.3 for c in chunks[1:])
    for c in chunks[1:]:
        ids = torch.arange(c.start * 144, c.start * 144 + c.source.numel())
        moving = (ids % 144 // 12 < 2) & (ids % 12 < 2)
        assert (c.source[moving] == ids[moving]).all()  # the moving corner is always computed
        reused = c.source != ids  # the still background copies the first chunk, before the plan context
        assert (c.source[reused] // 144 < 3).float().mean() > 0.8
        if c.start + 3 > 6:
            assert (c.source[reused] // 144 < c.start + 3 - 6).any()
    assert runner.planning.history.shape[2] == 3 and runner._out_hist.shape[1] == 3 * 144  # history bounded
    assert torch.isfinite(cat(chunks)).all()


def drifting_corner(frames=15):
    """A still scene drifting slowly (the guard breaks long chains) with one changing corner."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 1, 24, 24, generator=g) + 0.02 * torch.randn(1, 4, frames, 24, 24, generator=g)
    x = x + 0.03 * torch.randn(1, 4, 1, 24, 24, generator=g) * torch.arange(frames).float()[:, None, None]
    x[:, :, :, :4, :4] += torch.randn(1, 4, frames, 4, 4, generator=g)
    return x


@pytest.mark.parametrize("ahead", [False, True])
def test_frames_that_ran_are_kept_so_context_beyond_the_planners_reach_changes_nothing(model, ahead):
    """Each chunk is planned with the frames before it as they ran (ExecutedFrames): lipar's
    filters reach 5 frames back, so a plan context of chunk + 5 plans exactly as every frame
    so far would - and every token's recorded source is a computed token."""
    x, (_, text) = drifting_corner(), video()
    runs = {}
    for context in (8, None):
        runner = StreamRunner(model, text, StreamConfig(chunk=3, plan_context=context, window=3, plan_ahead=ahead),
                              planner="lipar")
        runs[context] = runner.push(x)
        tpf = runner.tpf
        sources = runner.planning.sources
        for f, finals in sources.items():  # what each token finally copies was computed
            for g in set((finals // tpf).tolist()) & set(sources):
                mine = finals[finals // tpf == g]
                assert torch.equal(sources[g][mine % tpf], mine)
    short, full = runs[8], runs[None]
    assert 0.1 < sum(c.kept for c in full[1:]) / sum(c.tokens for c in full[1:]) < 0.9
    assert all(torch.equal(a.source, b.source) and torch.equal(a.latents, b.latents) for a, b in zip(short, full))
    # the guard chains across chunks: a stream of slow drift keeps recomputing what drifted away
    assert len({int(c.kept) for c in full[2:]}) > 1


def test_stream_planning_alone_makes_the_runners_plans(model):
    """StreamPlanning.push replays a stream's plans without a model: the runner's, chunk by chunk."""
    from lipcodec.stream_planning import StreamPlanning

    x, (_, text) = drifting_corner(), video()
    runner = StreamRunner(model, text, StreamConfig(chunk=3, window=3), planner="lipar", target_kept=0.6)
    chunks = runner.push(x)
    planning = StreamPlanning("lipar", chunk=3, target_kept=0.6)
    plans = [planning.push(x[:, :, a : a + 3]) for a in range(0, 15, 3)]
    assert [p.start for p in plans] == [c.start for c in chunks]
    assert all(torch.equal(p.source, c.source) for p, c in zip(plans, chunks))
    assert [p.kept_ratio for p in plans] == [c.kept_ratio for c in chunks]
    assert plans[0].kept_ratio == 1.0 and all(abs(p.kept_ratio - 0.6) <= 1 / 12 for p in plans[1:])
    assert planning.history.shape[2] == 8 - 3  # what the next context can reach
    for kwargs, message in (({"plan_context": 2}, "plan_context=2 is shorter than chunk=3"),
                            ({"first_chunk": "half"}, "first_chunk='half': use 'full' or 'prune'"),
                            ({"gop": "bframes=2"}, "GOP bframes=2: streaming is causal"),
                            ({"patch_size": (2, 2, 2)}, "patch_size=(2, 2, 2): a stream needs (1, h, w)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            StreamPlanning("lipar", **kwargs)
    with pytest.raises(ValueError, match=re.escape("source latents must be (B, C, S, H, W), got shape (4, 3, 24, 24)")):
        planning.push(x[0, :, :3])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (compiled decisions are captured CUDA graphs)"))])
def test_compiled_planning_makes_the_same_plans(model, device):
    """compile=True (StreamRunner(compile=True) passes it on) makes a threshold planner compile
    its decisions - on a GPU, before their CUDA graphs are captured - and plans the same
    stream; other planners and the caller's planner object are left as they are."""
    from lipcodec.planners.lipar import Lipar
    from lipcodec.planners.reference import DECISION_GRAPHS
    from lipcodec.stream_planning import StreamPlanning

    x = drifting_corner().to(device)
    DECISION_GRAPHS.clear()
    plain = StreamPlanning("lipar", target_kept=0.6)
    compiled = StreamPlanning("lipar", target_kept=0.6, compile=True)
    for a in range(0, 15, 3):
        ours, theirs = compiled.push(x[:, :, a : a + 3]), plain.push(x[:, :, a : a + 3])
        assert torch.equal(ours.source, theirs.source) and ours.scale == theirs.scale
    assert compiled._planner.compile and not plain._planner.compile
    assert sorted({compile for _, compile, _ in DECISION_GRAPHS._entries}) == ([False, True] if device == "cuda" else [])
    given = Lipar(tau1=0.1)
    assert StreamPlanning(given, compile=True)._planner == attrs.evolve(given, compile=True) and not given.compile
    assert StreamPlanning("motion", compile=True)._planner.compile  # every threshold planner
    assert not hasattr(StreamPlanning("intra", compile=True)._planner, "compile")
    _, text = video()
    assert StreamRunner(model, text, StreamConfig(chunk=3), planner="lipar", compile=True).planning._planner.compile
    with pytest.raises(TypeError, match="pass a name, not an instance"):
        StreamPlanning(given, tau1=0.2)._planner


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled decisions, the planning thread)")
def test_a_compiled_stream_compiles_decisions_beside_its_blocks(model):
    """StreamRunner(compile=True) with a threshold planner: the planning thread compiles its
    decisions while the main thread runs (and compiles) the blocks - dynamo's tracing is
    process-wide, graphs.COMPILE_LOCK keeps them apart - and the stream plans as eagerly."""
    from lipcodec.planners.reference import DECISION_GRAPHS

    x, (_, text) = drifting_corner().cuda(), video()
    net, text = copy.deepcopy(model).cuda(), text.cuda()
    config = StreamConfig(chunk=3, window=3)
    eager = stream(net, x, text, config, planner="lipar", target_kept=0.6)
    DECISION_GRAPHS.clear()
    torch._dynamo.reset()
    compiled = stream(net, x, text, config, planner="lipar", target_kept=0.6, compile=True)
    assert [c.planned_ahead for c in compiled] == [False] + [True] * (len(compiled) - 1)
    assert all(torch.equal(a.source, b.source) for a, b in zip(compiled, eager))
    assert {compile for _, compile, _ in DECISION_GRAPHS._entries} == {True}  # its decisions: compiled
    torch.testing.assert_close(cat(compiled), cat(eager), rtol=1e-4, atol=1e-4)


def test_bitstream_planner_gets_the_motion_its_context_covers(model, monkeypatch):
    """Codec motion vectors in streaming: each chunk's planner sees the field from its plan
    context's first frame on (latent frame f = pixel frame 4f), so its frame 0 is the context's."""
    import numpy as np

    from lipcodec import stream_planning
    from lipcodec.planners import MotionField

    x, text = video(12)
    frames = 4 * 12 - 3
    vectors = np.zeros((frames, 4, 4, 2), np.float32)
    vectors[..., 0] = np.arange(frames)[:, None, None]  # dy = the pixel frame's index: tells which frame it is
    motion = MotionField(vectors, block=16, frame_size=(64, 64), picture_types="I" + "P" * (frames - 1))
    seen, real = [], stream_planning.make_plan

    def spy(context, *args, **kwargs):
        field = kwargs["motion"]
        seen.append((context.shape[2], float(field.vectors[0, 0, 0, 0]), len(field.vectors), len(field.picture_types)))
        return real(context, *args, **kwargs)

    monkeypatch.setattr(stream_planning, "make_plan", spy)
    runner = StreamRunner(model, text, StreamConfig(chunk=3, plan_context=6), planner="bitstream", motion=motion)
    chunks = runner.push(x)
    assert len(chunks) == 4 and len(seen) == 3  # chunk 0 is computed in full, unplanned
    starts = [0, 3, 6]  # chunk c's context: frames max(0, 3c + 3 - 6) .. 3c + 2 (the context slides)
    for c, (start, (length, first, n, types)) in enumerate(zip(starts, seen), 1):
        assert length == 3 * c + 3 - start
        assert first == 4 * start and n == types == frames - 4 * start
    assert torch.isfinite(cat(chunks)).all()


def test_proportional_multiplicities(model):
    """c_j per key row: 1 + the reused tokens of the cached frames and the chunk that copy it;
    both passes add log c_j to the logits of key row j."""
    x, text = video(6)
    runner = StreamRunner(model, text, StreamConfig(chunk=3, recovery="proportional"), planner=SamePlace(0.5))
    runner.push(x[:, :, :3])  # chunk 0: computed in full, 48 rows
    runner.planning.add(x[:, :, 3:])
    src = runner.planning.plan(3, 3).rows
    idx = runner._index(3, 3, src)
    ids = torch.arange(48, 96)
    keep = ids[src == ids]
    row = {int(t): r for r, t in enumerate(list(range(48)) + keep.tolist())}  # cache rows, then the chunk's kept rows
    expected = torch.ones(48 + keep.numel())
    for t in src[src != ids]:
        expected[row[int(t)]] += 1
    assert expected.max() >= 2
    for step in (idx.denoise, idx.clean):
        assert step.dups is None and step.keys == expected.numel()
        torch.testing.assert_close(step.key_bias, expected.log()[None, None, None])


def test_target_kept_is_each_chunks_budget(model):
    """With target_kept, every pruned chunk keeps about that share of its own tokens (the
    planner sees a longer context, whose earlier frames do not count) - also when the
    planner comes as an object with target_kept set, as ``lipcodec edit --stream`` passes it
    (that path once budgeted the whole context: 88% kept per chunk for a budget of 68%)."""
    from lipcodec.planners import get as get_planner

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 1, 24, 24, generator=g) + 0.3 * torch.randn(1, 4, 12, 24, 24, generator=g).cumsum(2) * 0.1
    _, text = video()
    streams = []
    for planner, params in (("lipar", {"target_kept": 0.6}), (get_planner("lipar", target_kept=0.6), {})):
        runner = StreamRunner(model, text, StreamConfig(chunk=3, plan_context=9), planner=planner, **params)
        chunks = runner.push(x)
        assert chunks[0].kept_ratio == 1.0  # first_chunk="full"
        for c in chunks[1:]:
            assert abs(c.kept_ratio - 0.6) <= 1 / 12, [c.kept_ratio for c in chunks]  # within 1/4 frame's share
        assert runner.planning.threshold_scale is not None  # each chunk's search started at the previous chunk's scale
        streams.append([c.source for c in chunks])
    assert all(torch.equal(a, b) for a, b in zip(*streams))  # by name or as an object: the same plans


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the side stream)"))])
def test_plan_ahead_changes_when_planning_happens_not_the_stream(model, device):
    """Frames pushed ahead are planned during the previous chunk (on CUDA on a side stream):
    the same plans and latents as planning each chunk when it starts; chunks pushed one at a
    time have nothing to plan ahead."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 1, 24, 24, generator=g) + 0.3 * torch.randn(1, 4, 14, 24, 24, generator=g).cumsum(2) * 0.1
    _, text = video()  # 14 frames: four chunks of 3 and a short one at flush
    net = copy.deepcopy(model).to(device)
    x, text = x.to(device), text.to(device)
    runs = {}
    for ahead in (True, False):
        config = StreamConfig(chunk=3, plan_context=6, recovery="clean", plan_ahead=ahead)
        runs[ahead] = stream(net, x, text, config, planner="lipar", target_kept=0.6)
    (on, off) = runs[True], runs[False]
    assert [c.planned_ahead for c in on] == [False, True, True, True, False]  # the short last chunk: at flush
    assert not any(c.planned_ahead for c in off)
    assert all(c.plan_seconds > 0 for c in on[1:])
    for a, b in zip(on, off):
        assert torch.equal(a.source, b.source) and a.kept == b.kept
    assert min(c.kept_ratio for c in on[1:]) < 1.0
    assert torch.equal(cat(on), cat(off))
    runner = StreamRunner(net, text, StreamConfig(chunk=3, plan_context=6, recovery="clean"), planner="lipar",
                          target_kept=0.6)
    one_by_one = [c for a in range(0, 14, 3) for c in runner.push(x[:, :, a : a + 3])] + runner.flush()
    assert not any(c.planned_ahead for c in one_by_one)
    assert torch.equal(cat(one_by_one), cat(on))


@pytest.mark.parametrize("plan_ahead", [True, False])
def test_gop_keyint_counts_along_the_stream(model, plan_ahead):
    """keyint=4 with a planning context of 7 frames: a keyframe (every token computed) every
    4 frames of the stream - each context is told how far back the stream's last keyframe
    is - where counting from each context's start would give another rhythm."""
    x, text = video(22)
    config = StreamConfig(chunk=3, plan_context=7, plan_ahead=plan_ahead)
    chunks = stream(model, x, text, config, planner="lipar", gop="keyint=4", tau1=1e6, tau2=None)  # all else reused
    computed = []
    for c in chunks:
        tpf = c.tokens // len(c.frames)
        computed += [f for i, f in enumerate(c.frames)
                     if torch.equal(c.source[i * tpf : (i + 1) * tpf], torch.arange(f * tpf, (f + 1) * tpf))]
    assert computed == [0, 1, 2, 4, 8, 12, 16, 20]  # chunk 0 in full, then the stream's keyframes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the planning thread)"))])
def test_plan_ahead_failure_fails_the_push_that_needs_the_plan(model, device):
    """A planner that fails while planning ahead (on CUDA in the planning thread) fails the
    push with the planner's own error, and the runner, reset, streams again."""

    class FailsOnce(SamePlace):
        calls = 0

        def __call__(self, ctx):
            FailsOnce.calls += 1
            if FailsOnce.calls == 2:
                raise RuntimeError("planner failed on purpose")
            return super().__call__(ctx)

    x, text = video(9)
    net = copy.deepcopy(model).to(device)
    runner = StreamRunner(net, text.to(device), StreamConfig(chunk=3), planner=FailsOnce(0.5))
    with pytest.raises(RuntimeError, match="planner failed on purpose"):
        runner.push(x.to(device))  # chunk 1 planned ahead (call 1), then chunk 2 (call 2)
    assert FailsOnce.calls == 2
    runner.reset()
    again = runner.push(x.to(device))  # calls 3 and 4
    assert [c.planned_ahead for c in again] == [False, True, True]


def test_streaming_benchmark_smoke(tmp_path, repo_script):
    """benchmarks/streaming.py --tiny: every row runs, the unpruned row is the reference,
    pruned rows keep fewer tokens and plan ahead (but the in-place row), repeats are kept;
    ceiling rows stream frames cropped to the asked share of token columns (14 in the tiny
    clip) and chunk latency gets its Pearson r against that share."""
    import json

    bench = repo_script("benchmarks/streaming.py")
    out = tmp_path / "streaming.json"
    bench.main(["--tiny", "--frames", "6", "--modes", "none", "clean", "--repeats", "2", "--ceiling", "0.5", "0.8",
                "--target-kept", "0.68", "0.4", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["unpruned", "unpruned full cache", "lipar none", "lipar clean", "lipar none, planned in place",
                          "lipar none, fixed thresholds", "lipar none, target 0.4",
                          "lipar none, fixed thresholds, target 0.4", "ceiling 50% of tokens", "ceiling 79% of tokens"]
    # the sweep: a smaller budget keeps less, and every row carries its budget and its ratios to the unpruned row
    assert rows["lipar none, target 0.4"]["kept"] < rows["lipar none"]["kept"]
    assert rows["lipar none, fixed thresholds, target 0.4"]["kept"] < rows["lipar none, fixed thresholds"]["kept"]
    assert [rows[n]["target_kept"] for n in list(rows)[2:8]] == [0.68] * 4 + [0.4] * 2 and result["target_kept"] == [0.68, 0.4]
    assert rows["unpruned"]["speedup"] == 1 and rows["unpruned"]["target_kept"] is None
    assert all(r["speedup"] == pytest.approx(r["fps_with_plan"] / rows["unpruned"]["fps_with_plan"]) for r in rows.values())
    assert all(r["gpu_speedup"] is None and r["peak_ratio"] is None for r in rows.values())  # CPU: no kernel time, no peak
    assert [rows[n]["kept"] for n in list(rows)[-2:]] == [7 / 14, 11 / 14]
    assert rows["ceiling 50% of tokens"]["err_vs_unpruned"] is None and rows["ceiling 50% of tokens"]["chunk_ms"] > 0
    assert list(result["ceiling_pearson_r"]) == ["chunk_ms"] and -1 <= result["ceiling_pearson_r"]["chunk_ms"] <= 1
    assert all(r["gpu_ms"] is None for r in rows.values())  # kernel time is --kernel-time's, on a GPU
    for bad in (["--kernel-time"], ["--target-kept", "0.5", "1.2"]):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", *bad, "--out", str(out)])
    assert rows["unpruned"]["err_vs_unpruned"] == 0 and rows["unpruned"]["kept"] == 1
    for name in ("lipar none", "lipar clean"):
        assert rows[name]["kept"] < 1 and rows[name]["planned_ahead"] == 1  # chunk 1 of 2 planned during chunk 0
    assert rows["lipar none, planned in place"]["planned_ahead"] == 0
    assert rows["lipar none, planned in place"]["err_vs_unpruned"] == rows["lipar none"]["err_vs_unpruned"]
    assert 0 < rows["lipar none, fixed thresholds"]["kept"] < 1  # thresholds from the clip's budget: some reuse
    assert all(len(r["fps_with_plan_runs"]) == 2 for r in rows.values()) and result["repeats"] == 2


def test_host_time_benchmark(tmp_path, repo_script):
    """benchmarks/host_time.py: the idle analysis on a trace whose answer is known (main
    stream = the busiest; overlapping kernels merged; idle time split by the launching
    thread's top-level operators, nested ones not counted twice, other threads ignored),
    and the --tiny smoke run: every row, its runs, the JSON."""
    import json

    bench = repo_script("benchmarks/host_time.py")
    kernel = [(7, 0, 10), (7, 5, 7), (7, 20, 10), (7, 40, 5), (9, 50, 3)]  # (stream, start, duration) in us
    ops = [(1, "A", 10, 15), (1, "A.child", 12, 6), (1, "B", 33, 3), (2, "W", 12, 28)]
    trace = {"traceEvents": [{"cat": "kernel", "tid": t, "ts": a, "dur": d} for t, a, d in kernel]
             + [{"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": t, "ts": 0, "dur": 1} for t in (1, 1, 1, 2)]
             + [{"cat": "cpu_op", "name": n, "tid": t, "ts": a, "dur": d} for t, n, a, d in ops]}
    gaps = bench.idle_gaps(trace)
    assert gaps["busy_ms"] == pytest.approx(0.027) and gaps["idle_ms"] == pytest.approx(0.018)  # idle: 12-20, 30-40
    assert gaps["idle_by_op_ms"] == pytest.approx({"A": 0.008, "B": 0.003})
    assert gaps["idle_without_op_ms"] == pytest.approx(0.007)

    out = tmp_path / "host_time.json"
    result = bench.main(["--tiny", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    runs = result["ms_per_chunk"]["eager"]
    assert list(runs) == ["unpruned", "none ahead", "none in place", "fixed ahead", "fixed in place"]
    assert all(len(r) == 2 and min(r) > 0 for r in runs.values())
    for bad in (["--gaps"], ["--wrappers", "java"]):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", *bad, "--out", str(out)])


def test_recovery_defaults_agree():
    """One default recovery mode everywhere: the streaming API once defaulted to LIPAR's
    ``clean`` while ``lipcodec edit --stream`` and the executor used ``none``."""
    import inspect

    from lipcodec.cli import build_parser
    from lipcodec.editing import edit_stream
    from lipcodec.executor import apply

    defaults = {
        "StreamConfig": StreamConfig().recovery,
        "edit_stream": inspect.signature(edit_stream).parameters["recovery"].default,
        "apply": inspect.signature(apply).parameters["recovery"].default,
        "edit --stream": build_parser().parse_args(["edit", "--stream", "clip.mp4", "-o", "out.mp4"]).recovery,
    }
    assert set(defaults.values()) == {"none"}, defaults


def test_compiled_blocks_launch_from_cpp_on_a_gpu(monkeypatch):
    """On a GPU the compiled blocks use inductor's C++ wrapper (the Python one's host time
    bounded pruned streams), built with the C++ compiler; without a compiler, or on the
    CPU, inductor's defaults."""
    from lipcodec import streaming

    assert streaming._compile_options(torch.device("cpu")) is None
    monkeypatch.setattr(streaming.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert streaming._compile_options(torch.device("cuda")) == {"cpp_wrapper": True}
    monkeypatch.setattr(streaming.shutil, "which", lambda name: None)
    assert streaming._compile_options(torch.device("cuda")) is None


@pytest.mark.needs_cxx
def test_compiled_blocks_fall_back_when_their_options_fail_to_build(model, monkeypatch):
    """A compile with the runner's options that fails to build (a C++ wrapper on a system
    whose compiler cannot build it) warns, names the options and the cause, and compiles
    with inductor's defaults: the stream still runs, equal to eager to rounding."""
    from lipcodec import streaming

    x, text = video(6)
    config = StreamConfig(chunk=3, window=4)
    eager = stream(model, x, text, config, planner=SamePlace(0.5))
    torch._dynamo.reset()
    broken = {"cpp.cxx": ("/nonexistent/g++",)}
    monkeypatch.setattr(streaming, "_compile_options", lambda device: broken)
    runner = StreamRunner(model, text, config, planner=SamePlace(0.5), compile=True)
    with pytest.warns(RuntimeWarning, match=r"could not build them with .*nonexistent.*compiling with its defaults"):
        chunks = runner.push(x) + runner.flush()
    assert runner._block_options is None
    torch.testing.assert_close(cat(chunks), cat(eager), rtol=1e-4, atol=1e-4)

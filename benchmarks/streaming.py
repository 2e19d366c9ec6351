"""Streaming (Self-Forcing-style) editing: unpruned vs pruned, per recovery mode.

LIPAR's Fig. 9 ablation as numbers: for one clip, each row streams the same source
latents with the same noise (StreamConfig.editing(): t = 400, 4 steps, shift 5, chunks of
3 latent frames, cache sink 1 + window 6, one clean t = 0 pass per chunk) and reports

- ``kept``: computed share of tokens (mean over chunks);
- ``err_vs_unpruned``: relative L2 error of the output latents against the unpruned
  stream with the same cache window, and their latent PSNR (dB);
- ``fps``: denoising throughput in output pixel frames per second (latent frames x 4 /
  the summed chunk latencies, VAE not run), planning on the critical path excluded;
  ``fps_with_plan``: end to end, every chunk's wall time with its planning. A chunk whose
  frames were pushed ahead is planned while the GPU runs the chunk before it
  (``StreamConfig.plan_ahead``, a side CUDA stream): its planning is hidden, so both
  columns agree unless the host cannot keep up; ``plan_ms``: host time of planning per
  chunk, hidden or not;
- ``err_kept``: the same relative error over the computed tokens only - restored tokens
  copy their reference, so this is where attention recovery shows;
- ``chunk_ms``: mean latency of chunks 1.. (chunk 0 is computed in full by default);
- ``peak_gib``: peak CUDA memory of the row;
- ``gpu_ms`` (``--kernel-time``): kernel time per chunk, summed over one more stream run
  under ``torch.profiler`` (planning's kernels on the side stream included) - what the
  row costs the GPU, free of the host's launch overhead and of its scatter;
  ``plan_gpu_ms``: the part on side streams, i.e. the planning done ahead (planning in
  place runs on the main stream and is not split out); ``gpu_ms_by_kind``: the main
  stream's by kernel kind (:func:`kernel_kind`: compiled, gemm, attention, other - the
  eager work around the blocks, where pruning's gathers and restores run).

Rows: ``unpruned`` (window 6), ``unpruned full cache`` (every frame kept in the cache, as
Self-Forcing's baseline), then the lipar planner at ``--target-kept`` (default 0.68 =
~32% reuse) with recovery none / proportional / duplicate (noisy) / clean (noise-aware),
and ``none`` twice more: with ``plan_ahead=False`` (each chunk planned when it starts), and
with fixed thresholds (LIPAR's own rule, one decision per chunk: ``tau1``/``tau2`` scaled
once by the budget search over the whole clip, so it keeps about the same share).
``--ceiling [KEPT ...]`` adds the streaming ceiling: the unpruned stream of the same clip
cropped to about KEPT of each frame's token columns (default ``--target-kept``) - what a
chunk costs when it holds only that many tokens and no pruning logic runs, the
shortened-sequence ceiling of streaming; with two or more, the Pearson r of chunk latency
against the token share (the unpruned row included).
``--target-kept A B ...``: the rows above at budget A, and at each further budget two
``none`` rows planned ahead, with the per-chunk budget search and with fixed thresholds -
how speed and memory follow the share reused, side by side in one run (``--ceiling``
without values then crops to every budget). Every row reports its ratios to the unpruned
row: ``speedup`` (end to end), ``gpu_speedup`` and ``peak_ratio``.
``--compile``: every row, the unpruned ones too, with ``StreamRunner(compile=True)``
(the blocks' dense parts compiled with dynamic shapes, and the planner's decisions before
they are captured; the untimed first stream of each row pays the compilation); two more
rows, ``none`` planned ahead and with fixed thresholds, have their decisions uncompiled.

Full size (CUDA, bf16): Wan2.1-T2V-1.3B config with random weights, 480x832, latents
(1, 16, F, 60, 104) from the bundled clip's pixel proxy (ping-pong looped), text
(1, 512, 4096). ``--tiny``: the tiny config on CPU, a smoke test of the same table.

    python benchmarks/streaming.py --out results/streaming.json              # GPU
    python benchmarks/streaming.py --compile --out results/streaming_compiled.json
    python benchmarks/streaming.py --compile --modes none --target-kept 0.68 0.6 0.5 --ceiling --out sweep.json
    python benchmarks/streaming.py --tiny --out /tmp/streaming.json          # CPU smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import platform

import attrs
import numpy as np
import torch
from diffusers import WanTransformer3DModel
from einops import rearrange

import lipcodec
from lipcodec import fixtures
from lipcodec.atomic import write_text_atomic
from lipcodec.fidelity import latent_psnr
from lipcodec.planners import get as get_planner
from lipcodec.streaming import StreamConfig, StreamRunner
from lipcodec.testing import TINY_WAN as TINY
from lipcodec.testing import WAN_1_3B


@attrs.frozen
class Row:
    """One row of the table: how it streams, and what it is compared with."""

    name: str
    config: StreamConfig
    plan: dict = attrs.field(factory=dict)  # planner keywords (none: unpruned)
    clip: torch.Tensor | None = None  # None: the full clip
    recovery: str | None = None
    kept: float | None = None  # the token share, when the chunks do not report it (ceiling rows)
    ceiling: bool = False
    compiled_decisions: bool = True  # with --compile: the planner's decisions too (StreamPlanning.compile)
    target: float | None = None  # the --target-kept budget its plans were made for


def stream(model, source, text, config, compile=False, compiled_decisions=True, **planner):
    """Run one stream; returns (latents, chunks, peak GiB). ``compiled_decisions=False``:
    with ``compile``, the planner's decisions stay uncompiled (CUDA graphs of eager kernels)."""
    cuda = source.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runner = StreamRunner(model, text, config, compile=compile, **planner)
    runner.planning.compile = compile and compiled_decisions  # read when it first plans
    chunks = runner.push(source) + runner.flush()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return torch.cat([c.latents for c in chunks], 2), chunks, peak


def fixed_thresholds(latents: torch.Tensor, target: float) -> dict:
    """LIPAR's own rule: fixed thresholds, one decision per chunk - ``lipar``'s ``tau1`` and
    ``tau2`` scaled once, by the budget search over the whole clip, so that about ``target``
    of its tokens is kept. Planner keywords for :class:`StreamRunner`."""
    scale = lipcodec.plan(latents, "lipar", target_kept=target).meta["threshold_scale"]
    lipar = get_planner("lipar")
    return {"planner": "lipar", "tau1": lipar.tau1 * scale, "tau2": lipar.tau2 * scale}


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind, by its name: ``compiled`` (inductor's Triton code - with
    ``--compile`` the blocks' fused elementwise work, the cache writes, the planner's
    compiled decisions), ``gemm``, ``attention``, or ``other``: eager kernels, mostly around
    the blocks - the sampler, the patch embedding, the gathers of kept tokens and the
    scatters and copies that restore the rest (what pruning adds shows as its difference to
    the unpruned row), and copies, fills and memsets."""
    lower = name.lower()
    if lower.startswith("triton"):
        return "compiled"
    if any(k in lower for k in ("gemm", "cutlass", "nvjet", "cublas", "xmma")):
        return "gemm"
    if any(k in lower for k in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    return "other"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default 21, tiny 9)")
    parser.add_argument("--target-kept", type=float, nargs="+", default=[0.68], metavar="KEPT",
                        help="lipar planner budget (0.68 = ~32%% reuse); more values add `none` rows at each (a sweep)")
    parser.add_argument("--modes", nargs="+", default=["none", "proportional", "duplicate", "clean"])
    parser.add_argument("--first-chunk", default="full", choices=("full", "prune"))
    parser.add_argument("--repeats", type=int, default=3, help="timed streams per row; the median is reported")
    parser.add_argument("--compile", action="store_true", help="every row with StreamRunner(compile=True)")
    parser.add_argument("--ceiling", type=float, nargs="*", default=None, metavar="KEPT",
                        help="add unpruned rows on frames cropped to about KEPT of the tokens (default: --target-kept)")
    parser.add_argument("--kernel-time", action="store_true",
                        help="profile one more stream per row and report its GPU kernel time per chunk (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (tiny default 1: tiny ops)")
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1 timed stream per row is needed")
    if any(not 0 < k < 1 for k in args.target_kept):
        parser.error(f"--target-kept {args.target_kept}: budgets must be in (0, 1)")
    ceilings = args.target_kept if args.ceiling == [] else args.ceiling or []
    if any(not 0 < k <= 1 for k in ceilings):
        parser.error(f"--ceiling {ceilings}: token shares must be in (0, 1]")
    if args.kernel_time and (args.tiny or not torch.cuda.is_available()):
        parser.error("--kernel-time sums CUDA kernels: it needs a GPU (drop it with --tiny)")
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("no CUDA device: the full-size benchmark needs a GPU; use --tiny for a CPU smoke test")
    frames = args.frames or (9 if args.tiny else 21)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg, size, text_shape = (TINY, (128, 224), (1, 16, 32)) if args.tiny else (WAN_1_3B, (480, 832), (1, 512, 4096))

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg).to(dtype).eval()
        text = torch.randn(text_shape, dtype=dtype)
    source = fixtures.looped_latents(fixtures.bundled_clip(), frames, size).to(device)
    base = StreamConfig.editing(first_chunk=args.first_chunk)
    print(f"latents {tuple(source.shape)}, {frames * 4} output pixel frames, device {device} {dtype}", flush=True)

    def timed(specs) -> list[tuple]:
        """Every row streams its clip once untimed (every new sequence length pays one-time
        kernel setup, e.g. a cuDNN execution plan, and --compile the compilation - twice with
        --compile: a planner decision whose key comes once per stream, e.g. chunk 1's shorter
        context, is compiled when it comes again), then the
        rows take turns, ``--repeats`` rounds of one stream each - so a host that drifts
        during the run (host-bound rows scatter from run to run) shifts every row alike.
        Per row: the run of median wall time, the peak memory, every run's end-to-end FPS,
        and with --kernel-time the GPU time of one more, profiled stream."""
        for spec in specs:
            print(f"  warm-up: {spec.name}", flush=True)
            for _ in range(2 if args.compile else 1):  # a decision key seen once per stream is captured in the second
                stream(model, spec.clip, text, spec.config, args.compile, spec.compiled_decisions, **spec.plan)
        runs = {spec.name: [] for spec in specs}
        for i in range(args.repeats):
            print(f"  round {i + 1}/{args.repeats}: every row once", flush=True)
            for spec in specs:
                runs[spec.name].append(stream(model, spec.clip, text, spec.config, args.compile,
                                              spec.compiled_decisions, **spec.plan))
        out = []
        for spec in specs:
            walls = [sum(c.seconds for c in chunks) for _, chunks, _ in runs[spec.name]]
            latents, chunks, _ = runs[spec.name][int(np.argsort(walls)[len(walls) // 2])]
            if args.kernel_time:
                print(f"  kernel time: {spec.name}", flush=True)
            out.append((latents, chunks, max(peak for _, _, peak in runs[spec.name]), [frames * 4 / w for w in walls],
                        kernel_ms(spec) if args.kernel_time else (None, None, None)))
        return out

    def kernel_ms(spec) -> tuple[float, float, dict]:
        """GPU kernel time per chunk of one more stream, from the profiler's device events:
        (all kernels, those on side streams - the planning ahead of the next chunk, the main
        stream's by kind - :func:`kernel_kind`)."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _, chunks, _ = stream(model, spec.clip, text, spec.config, args.compile, spec.compiled_decisions, **spec.plan)
            torch.cuda.synchronize()
        events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
        per_stream = collections.Counter()
        for event in events:
            per_stream[event.device_resource_id()] += event.duration_ns()
        main = max(per_stream, key=per_stream.get)
        kinds = collections.Counter()
        for event in events:
            if event.device_resource_id() == main:
                kinds[kernel_kind(event.name())] += event.duration_ns() / 1e6 / len(chunks)
        total = sum(per_stream.values())
        return total / 1e6 / len(chunks), (total - per_stream[main]) / 1e6 / len(chunks), dict(kinds)

    target, *sweep = args.target_kept
    pruned = {"planner": "lipar", "target_kept": target}
    specs = [Row("unpruned", base), Row("unpruned full cache", StreamConfig.editing(window=None))]
    specs += [Row(f"lipar {mode}", StreamConfig.editing(recovery=mode, first_chunk=args.first_chunk), plan=pruned,
                  recovery=mode, target=target) for mode in args.modes]
    none = StreamConfig.editing(recovery="none", first_chunk=args.first_chunk)
    if "none" in args.modes:
        specs.append(Row("lipar none, planned in place", attrs.evolve(none, plan_ahead=False), plan=pruned,
                         recovery="none", target=target))
        fixed = fixed_thresholds(source, target)
        specs.append(Row("lipar none, fixed thresholds", none, plan=fixed, recovery="none", target=target))
        if args.compile:  # what compiling the decisions gives, side by side
            specs += [Row(f"{name}, decisions uncompiled", none, plan=plan, recovery="none", compiled_decisions=False,
                          target=target)
                      for name, plan in (("lipar none", pruned), ("lipar none, fixed thresholds", fixed))]
    for more in sweep:  # how speed and memory follow the budget: the per-chunk search and fixed thresholds
        specs += [Row(f"lipar none, target {more:g}", none, plan={"planner": "lipar", "target_kept": more},
                      recovery="none", target=more),
                  Row(f"lipar none, fixed thresholds, target {more:g}", none, plan=fixed_thresholds(source, more),
                      recovery="none", target=more)]
    cols = source.shape[-1] // 2  # token columns (patch 2)
    for share in ceilings:
        keep = max(1, round(share * cols))
        specs.append(Row(f"ceiling {keep / cols:.0%} of tokens", base, clip=source[..., : 2 * keep], kept=keep / cols,
                         ceiling=True))  # kept: the share of the full frame's tokens it computes
    with torch.no_grad():
        measured = timed([attrs.evolve(spec, clip=source) if spec.clip is None else spec for spec in specs])
    reference = measured[0][0]
    rows, ceiling = [], []

    def record(name, latents, chunks, peak, fps_runs, gpu, recovery=None, reference=reference, kept=None, target=None):
        gpu_ms, plan_gpu_ms, gpu_kinds = gpu
        plan = sum(c.plan_seconds for c in chunks)
        exposed = sum(c.plan_seconds for c in chunks if not c.planned_ahead)  # inside the chunks' own seconds
        seconds = sum(c.seconds for c in chunks) - exposed
        kept = float(np.mean([c.kept_ratio for c in chunks])) if kept is None else kept
        row = {"name": name, "recovery": recovery, "target_kept": target, "kept": kept, "err_vs_unpruned": None,
               "err_kept": None, "psnr_vs_unpruned": None}
        if reference is not None:  # None: a ceiling row, another frame size
            computed = torch.cat([c.source == torch.arange(c.start * c.tokens // len(c.frames),
                                                           c.start * c.tokens // len(c.frames) + c.tokens)
                                  for c in chunks])  # (F*h*w,) per token
            tok_out, tok_ref = (rearrange(t, "b c f (h ph) (w pw) -> b (f h w) (ph pw c)", ph=2, pw=2)[:, computed]
                                for t in (latents.float().cpu(), reference.float().cpu()))
            row.update(err_vs_unpruned=float((latents - reference).norm() / reference.norm()),
                       err_kept=float((tok_out - tok_ref).norm() / tok_ref.norm()),
                       psnr_vs_unpruned=latent_psnr(reference, latents))
        row.update({
            "seconds": seconds, "fps": frames * 4 / seconds, "fps_with_plan": frames * 4 / (seconds + exposed),
            "chunk_ms": 1e3 * float(np.mean([c.seconds - (0 if c.planned_ahead else c.plan_seconds)
                                             for c in chunks[1:]] or [seconds])),
            "plan_ms": 1e3 * plan / len(chunks), "planned_ahead": sum(c.planned_ahead for c in chunks),
            "peak_gib": peak, "fps_with_plan_runs": fps_runs, "gpu_ms": gpu_ms,
            "plan_gpu_ms": plan_gpu_ms, "gpu_ms_by_kind": gpu_kinds,
        })
        unpruned = (rows or [row])[0]  # ratios to the first row, measured in the same run
        row.update(speedup=row["fps_with_plan"] / unpruned["fps_with_plan"],
                   gpu_speedup=None if gpu_ms is None else unpruned["gpu_ms"] / gpu_ms,
                   peak_ratio=peak / unpruned["peak_gib"] if cuda else None)
        rows.append(row)
        quality = ("" if reference is None else f"err {row['err_vs_unpruned']:7.4f}  err_kept {row['err_kept']:7.4f}  "
                   f"psnr {row['psnr_vs_unpruned']:6.2f} dB")
        print(f"  {name:<28} kept {kept:5.3f}  {quality:<45} {row['fps']:8.2f} fps ({row['fps_with_plan']:7.2f} w/ plan)  "
              f"chunk {row['chunk_ms']:7.1f} ms{'' if gpu_ms is None else f' (GPU {gpu_ms:6.1f}, side {plan_gpu_ms:5.1f})'}  "
              f"plan {row['plan_ms']:6.1f} ms  peak {peak:6.2f} GiB  "
              f"(runs {min(fps_runs):.1f}-{max(fps_runs):.1f} fps w/ plan)  {row['speedup']:.2f}x"
              + ("" if gpu_ms is None else f", GPU {row['gpu_speedup']:.2f}x")
              + ("" if row["peak_ratio"] is None else f", peak {row['peak_ratio']:.2f}x"), flush=True)
        if gpu_kinds:
            print("      main stream, ms per chunk: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(gpu_kinds.items())))

    for spec, out in zip(specs, measured):
        record(spec.name, *out, recovery=spec.recovery, kept=spec.kept, target=spec.target,
               **({"reference": None} if spec.ceiling else {}))  # a ceiling row has another frame size
        if spec.ceiling:
            ceiling.append(rows[-1])

    pearson = None
    if len(ceiling) >= 2:  # chunk latency against the token share, the unpruned row as share 1
        points = [rows[0], *ceiling]
        pearson = {key: float(np.corrcoef([r["kept"] for r in points], [r[key] for r in points])[0, 1])
                   for key in ("chunk_ms", "gpu_ms") if points[0][key] is not None}
        print(f"against the token share over {len(points)} rows: Pearson r = "
              + ", ".join(f"{v:.4f} ({k})" for k, v in pearson.items()))

    result = {
        "benchmark": "streaming",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": str(dtype), "config": "tiny" if args.tiny else "wan2.1-1.3b", "latents": list(source.shape),
        "stream": {"chunk": base.chunk, "timesteps": base.timesteps, "shift": base.shift, "sink": base.sink,
                   "window": base.window, "first_chunk": args.first_chunk},
        "target_kept": args.target_kept, "compile": args.compile, "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
        "ceiling_pearson_r": pearson,
    }
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

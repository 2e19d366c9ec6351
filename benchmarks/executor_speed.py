"""Executor speed: one Wan transformer forward, unpatched vs lipcodec, per kept ratio and recovery.

Full size (CUDA, bf16): Wan2.1-T2V-1.3B config, random weights, 81 frames at 480x832 =
latents (1, 16, 21, 60, 104) = 32,760 tokens, text (1, 512, 4096). Rows:

- ``unpatched``: the diffusers model as is (the baseline every speedup divides);
- ``intra``: lipcodec applied with the all-intra plan (hook overhead only);
- per kept ratio (same-place plans, frame 0 kept, a seeded random share of the other
  tokens reuse the previous frame's token): each recovery mode, and ``ceiling`` = the
  blocks simply run on the kept-only sequence (no hooks, no recovery, no restore).

Times are CUDA events (CPU: perf_counter) after warm-up, median of --reps.

    python benchmarks/executor_speed.py --out results/executor_speed.json          # GPU
    python benchmarks/executor_speed.py --tiny --reps 2 --out /tmp/speed.json      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

import lipcodec
from lipcodec import Grid, Plan
from lipcodec.atomic import write_text_atomic
from lipcodec.testing import TINY_WAN as TINY
from lipcodec.testing import WAN_1_3B, same_place_plan
from lipcodec.attention import RECOVERY_MODES



def plan_with_kept(grid: Grid, kept: float, seed: int = 0) -> Plan:
    """Frame 0 computed; the other frames' tokens reuse the previous frame's token at a
    share that leaves ``kept`` of all tokens computed."""
    reuse = min(1.0, (1 - kept) * grid.size / (grid.size - grid.tokens_per_frame))
    return same_place_plan(grid, reuse, seed)


def kept_only_forward(model, x, t, text, keep):
    """The ceiling: Wan's forward with the blocks run on the kept tokens only (no scatter)."""
    cos, sin = model.rope(x)
    rotary = (cos[:, keep], sin[:, keep])  # (1, Sk, 1, D)
    h = model.patch_embedding(x).flatten(2).transpose(1, 2)[:, keep].contiguous()  # (B, Sk, D)
    temb, proj, text, _ = model.condition_embedder(t, text, None)
    proj = proj.unflatten(1, (6, -1))  # (B, 6, D)
    for block in model.blocks:
        h = block(h, text, proj, rotary)
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = (model.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
    return model.proj_out(h)  # (B, Sk, P)


def timed(fn, reps: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per row (default 10, tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, tiny 1)")
    parser.add_argument("--kept", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--modes", nargs="+", default=list(RECOVERY_MODES), choices=RECOVERY_MODES)
    parser.add_argument("--restore", default="copy", choices=("copy", "velocity"))
    parser.add_argument("--backend", help="diffusers attention backend for every row (e.g. _native_cudnn, flash)")
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("no CUDA device: the full-size benchmark needs a GPU; use --tiny for a CPU smoke test")
    reps = args.reps or (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg, shape, text_shape = (TINY, (1, 16, 5, 16, 16), (1, 16, 32)) if args.tiny else (
        WAN_1_3B, (1, 16, 21, 60, 104), (1, 512, 4096))

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg).to(dtype).eval()
        if args.backend:  # the same backend for the baseline, lipcodec and the ceiling
            model.set_attention_backend(args.backend)
        x = torch.randn(shape, dtype=dtype)
        text = torch.randn(text_shape, dtype=dtype)
        t = torch.tensor([700.0])
    grid = Grid.from_latents(shape, cfg["patch_size"])

    def forward():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    rows = []

    def record(name, kept_ratio, recovery, fn):
        ms = timed(fn, reps, warmup, cuda)
        rows.append({"name": name, "kept": kept_ratio, "recovery": recovery, "ms": statistics.median(ms), "all_ms": ms})
        print(f"  {name:<28} {statistics.median(ms):10.2f} ms", flush=True)

    with torch.no_grad():
        record("unpatched", 1.0, None, forward)
        with lipcodec.apply(model, Plan.identity(grid), restore=args.restore):
            record("intra (hook overhead)", 1.0, None, forward)
        for kept in args.kept:
            plan = plan_with_kept(grid, kept)
            for recovery in args.modes:
                with lipcodec.apply(model, plan, recovery=recovery, restore=args.restore) as codec:
                    codec.prime(x, text)  # clean: the t=0 pass, once per video (not timed)
                    record(f"kept {plan.kept_ratio:.2f} {recovery}", plan.kept_ratio, recovery, forward)
            keep = plan.keep.to(device)
            record(f"kept {plan.kept_ratio:.2f} ceiling", plan.kept_ratio, "ceiling",
                   lambda keep=keep: kept_only_forward(model, x, t, text, keep))

    base = rows[0]["ms"]
    print(f"\n{'row':<30}{'kept':>7}{'ms':>11}{'speedup':>9}")
    for row in rows:
        row["speedup"] = base / row["ms"]
        print(f"{row['name']:<30}{row['kept']:7.2f}{row['ms']:11.2f}{row['speedup']:8.2f}x")
    result = {
        "config": "tiny" if args.tiny else "wan2.1-1.3b", "latents": list(shape), "text": list(text_shape),
        "tokens": grid.size, "backend": args.backend or "native", "dtype": str(dtype), "device": torch.cuda.get_device_name() if cuda else platform.processor(),
        "torch": torch.__version__, "reps": reps, "warmup": warmup, "restore": args.restore, "rows": rows,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

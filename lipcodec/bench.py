"""``lipcodec bench``: a timing table over planners and recovery modes on one model.

Each row times the video-to-video pipeline call up to the final latents (the VAE encodes
the video once per session and the encoding is reused, so the numbers are the denoising
loop: the transformer, the scheduler and lipcodec's hooks; decode excluded) with the plan fixed: the planner plans once during the warm-up runs and
the timed runs reuse that plan, so planning time is not in the numbers. On CUDA the
time comes from CUDA events around the pipeline call; on CPU from ``time.perf_counter``.
Reported: median, min and max over ``repeat`` runs after ``warmup`` untimed ones, and the
speed-up of the median against the unpatched pipeline's median.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .editing import Session, build_planner, cached_encode, check_modes, parse_gop, room_to_recompile
from .planners import share_params


def _time_once(session: Session) -> float:
    from PIL import Image

    pipe, frames, s = session.pipe, session.frames, session.settings
    device = session.device
    text = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in session.text.items()}
    guidance = s["guidance_scale"] if text.get("negative_prompt_embeds") is not None or "prompt" in text else 1.0
    video = [Image.fromarray(f) for f in frames]
    call = dict(video=video, height=frames.shape[1], width=frames.shape[2], num_inference_steps=s["steps"],
                strength=s["strength"], guidance_scale=guidance, output_type="latent",
                generator=torch.Generator(device).manual_seed(s["seed"]), **text)
    with torch.no_grad(), cached_encode(pipe.vae, session.encode_cache):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            pipe(**call)
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        pipe(**call)
        return time.perf_counter() - t0


def bench(session: Session, planners, recoveries=("none",), *, gop=None, restore: str = "copy",
          repeat: int = 3, warmup: int = 1, params: dict | None = None, compiled: bool = False,
          kept_multiple: int | None = None, progress: bool = False) -> list[dict]:
    """Rows of {label, planner, recovery, kept_ratio, median_s, min_s, max_s, speedup, times}.

    ``kept_multiple`` pads every plan (:meth:`~lipcodec.Plan.padded`). ``compiled``: the
    session's blocks are compiled with static shapes; every row then warms up at least once
    (its compilation), with dynamo's recompile limit raised to a graph per row."""
    from tqdm.auto import tqdm

    from . import apply, remove

    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat={repeat} must be >= 1 and warmup={warmup} >= 0")
    for recovery in recoveries:
        check_modes(recovery, restore)
    gop = parse_gop(gop)
    old = dict(getattr(session.pipe, "_progress_bar_config", {}))
    session.pipe.set_progress_bar_config(disable=True)
    if not session.encode_cache:  # one untimed run fills the encoding cache: no row pays for the VAE
        _time_once(session)
    shares = share_params(planners, params or {})  # each planner takes the parameters it knows
    jobs = [("unpatched", None, "none", {})] + [(f"{p} {r}", p, r, share) for p, share in zip(planners, shares)
                                                 for r in recoveries]
    rows = []
    with room_to_recompile(len(jobs)) if compiled else contextlib.nullcontext():
        try:
            for label, planner, recovery, share in tqdm(jobs, desc="bench", unit="row", disable=not progress, leave=False):
                remove(session.pipe)
                codec = None
                if planner is not None:
                    built = build_planner(planner, share)
                    codec = apply(session.pipe, built, recovery=recovery, restore=restore, gop=gop,
                                  seed=session.settings["seed"], frames=session.frames, motion=session.video.motion,
                                  kept_multiple=kept_multiple)
                try:
                    for _ in range(max(warmup, 1 if codec is not None or compiled else 0)):
                        _time_once(session)
                    if codec is not None:  # fix the plan: timed runs do not replan
                        plan = codec.plan
                        codec.remove()
                        codec = apply(session.pipe, plan, recovery=recovery, restore=restore)
                    times = [_time_once(session) for _ in range(repeat)]
                    kept = codec.plan.kept_ratio if codec is not None else 1.0
                finally:
                    if codec is not None:
                        codec.remove()
                rows.append({"label": label, "planner": planner or "-", "recovery": recovery, "kept_ratio": kept,
                             "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                             "times": times})
        finally:
            session.pipe._progress_bar_config = old
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"] if row["median_s"] > 0 else float("nan")
    return rows


def table(rows: list[dict], device: str) -> str:
    lines = [f"{'configuration':<28}{'kept':>8}{'median s':>11}{'min s':>9}{'max s':>9}{'speed-up':>10}"]
    for r in rows:
        lines.append(f"{r['label']:<28}{r['kept_ratio']:8.1%}{r['median_s']:11.4f}{r['min_s']:9.4f}"
                     f"{r['max_s']:9.4f}{r['speedup']:9.2f}x")
    lines.append(f"({device}; {'CUDA events' if device.startswith('cuda') else 'wall clock'}; median of "
                 f"{len(rows[0]['times'])} runs after warm-up; planning excluded)")
    return "\n".join(lines)


__all__ = ["bench", "table"]

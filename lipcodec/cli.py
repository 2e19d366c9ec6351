"""The ``lipcodec`` command line: one function per subcommand (``cmd_<name>``).

Exit codes: 0 ok, 2 usage or bad input (one clear line on stderr), 3 NaN/Inf in latents
or model outputs (the line says where), 1 internal error, 130 interrupted.
Adding a subcommand: write ``add_<name>(subparsers)`` that builds its parser and sets
``func=cmd_<name>``, append it to ``SUBCOMMANDS``; reuse :func:`add_input_args`,
:func:`add_plan_args`, :func:`load_video`, :func:`get_latents` and :func:`make_plan`.
Raise :class:`UsageError` (or let a ``VideoError``/``FileNotFoundError`` through) for
anything the user can fix.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from .atomic import write_text_atomic
from .gop import TEMPORAL_FACTOR, pixel_frames_of_latent



class UsageError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------
# shared argument groups and steps
def add_input_args(parser: argparse.ArgumentParser) -> None:
    """VIDEO and how to read it, plus where latents come from."""
    parser.add_argument("video", nargs="?", metavar="VIDEO", help="input video (default: the bundled Big Buck Bunny clip)")
    parser.add_argument("--fps", type=float, help="resample to this frame rate (default: keep the source rate)")
    parser.add_argument("--size", type=_size, metavar="WxH", help="scale to cover WxH and center-crop (multiples of 16)")
    parser.add_argument("--max-frames", type=int, metavar="N", help="read at most N frames (then cut to 4k+1)")
    parser.add_argument("--vae", metavar="DIR", help="local diffusers AutoencoderKLWan folder (default: pixel proxy latents)")
    parser.add_argument("--device", default="cpu", help="device for the VAE (default: cpu)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or tables")


def add_kept_multiple_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kept-multiple", type=int, metavar="N",
                        help="round the kept token count up to a multiple of N (e.g. 128; with --compile, "
                             "plans in one bucket share one compiled graph)")


def check_kept_multiple_arg(args) -> None:
    if args.kept_multiple is not None and args.kept_multiple < 1:
        raise UsageError(f"--kept-multiple {args.kept_multiple} must be >= 1, e.g. 128")


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--planner", default="lipar", help="planner name (default: lipar); see --list-planners")
    parser.add_argument("--gop", metavar="X264PARAMS", help="GOP as x264 params, e.g. keyint=8:bframes=2:b-pyramid=normal")
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="planner parameter (repeatable)"
    )
    parser.add_argument("--motion", action="store_true", help="decode codec motion vectors (automatic for bitstream)")
    add_kept_multiple_arg(parser)
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE first, e.g. one that registers a custom planner (repeatable)",
    )
    parser.add_argument("--list-planners", action="store_true", help="list registered planners and exit")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 832x480") from None
    return h, w


def parse_params(items: list[str]) -> dict:
    """``["tau1=0.1", "mode=fast"]`` -> ``{"tau1": 0.1, "mode": "fast"}`` (JSON values, else strings)."""
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"planner parameter {item!r} must be KEY=VALUE, e.g. -p tau1=0.1")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"True": True, "False": False, "None": None}.get(raw, raw)
        params[key.strip().replace("-", "_")] = value
    return params


def load_video(args, *, motion: bool = False):
    from .fixtures import bundled_clip
    from .video import read_video

    path = Path(args.video) if args.video else bundled_clip()
    return read_video(
        path, fps=args.fps, size=args.size, max_frames=args.max_frames, fit="wan", motion=motion,
        progress=not args.quiet,
    )


def get_latents(args, video):
    """(latents (C, F, H, W), kind) where kind is "vae" or "pixel proxy"."""
    from .video import pixel_proxy_latents, vae_latents

    if args.vae:
        if not Path(args.vae).is_dir():
            raise UsageError(f"--vae {args.vae}: no such folder; pass a local AutoencoderKLWan folder (config.json + weights)")
        return vae_latents(video.frames, args.vae, device=args.device), "vae"
    return pixel_proxy_latents(video.frames), "pixel proxy"


def build_planner(args):
    """Import plugins, then build the planner and GOP; bad names or values are usage errors."""
    from . import planners
    from .gop import GOP

    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UsageError(f"--import {module}: {error}; put the module on PYTHONPATH") from None
    try:
        gop = GOP.from_x264_params(args.gop) if args.gop else None
    except (ValueError, TypeError) as error:
        raise UsageError(f"--gop {args.gop!r}: {error}") from None
    try:
        planner = planners.get(args.planner, **parse_params(args.param))
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    check_kept_multiple_arg(args)
    if args.kept_multiple is not None and getattr(args, "stream", False):
        raise UsageError("--kept-multiple pads full-sequence plans; --stream plans chunk by chunk: drop one")
    return planner, gop


def make_plan(args, video, latents, planner, gop):
    import lipcodec

    return lipcodec.plan(latents, planner=planner, gop=gop, frames=video.frames, motion=video.motion,
                         kept_multiple=args.kept_multiple)


def check_output(path: str | None, video_path, what: str) -> Path | None:
    """Fail early (before decoding) on an output whose folder is missing or that is the input."""
    if path is None:
        return None
    out = Path(path)
    if not out.parent.is_dir():
        raise UsageError(f"{what} {out}: folder {out.parent} does not exist; create it first")
    if video_path is not None and Path(video_path).exists() and out.exists() and os.path.samefile(out, video_path):
        raise UsageError(f"{what} {out} is the input video; refusing to overwrite it: choose another name")
    return out


# ---------------------------------------------------------------------------------------
# analyze
def add_analyze(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="plan a video and report which tokens are computed",
        description="Decode VIDEO, get latents (VAE or pixel proxy), plan, and report per latent frame.",
    )
    add_input_args(parser)
    add_plan_args(parser)
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--overlay", metavar="FILE.mp4", help="write the video with the plan drawn on it (.mkv = lossless)")
    parser.add_argument("--save-plan", metavar="FILE.npz", help="save the plan (lipcodec.Plan.load reads it)")
    parser.set_defaults(func=cmd_analyze)


def frame_report(plan, temporal_factor: int = TEMPORAL_FACTOR) -> list[dict]:
    """Per latent frame: type, kept share, pixel frames, mean (dt, dy, dx) offset of reused tokens."""
    grid = plan.grid
    offsets = plan.offsets.reshape(grid.frames, -1, 3).float()
    reused = ~plan.computed.reshape(grid.frames, -1)
    rows = []
    for k in range(grid.frames):
        pixels = pixel_frames_of_latent(k, temporal_factor)
        mean = offsets[k][reused[k]].mean(0).tolist() if reused[k].any() else None
        rows.append(
            {
                "index": k,
                "type": plan.frame_types[k],
                "kept": float(plan.frame_kept[k]),
                "pixel_frames": [pixels.start, pixels.stop - 1],
                "ref_offset": None if mean is None else [round(v, 3) for v in mean],
            }
        )
    return rows


def cmd_analyze(args) -> int:
    from .video import write_video

    video_arg = Path(args.video) if args.video else None
    json_out = check_output(args.json, video_arg, "--json")
    overlay_out = check_output(args.overlay, video_arg, "--overlay")
    plan_out = check_output(args.save_plan, video_arg, "--save-plan")
    planner, gop = build_planner(args)

    video = load_video(args, motion=args.motion or args.planner == "bitstream")
    latents, kind = get_latents(args, video)
    plan = make_plan(args, video, latents, planner, gop)
    rows = frame_report(plan)
    gop_text = str(gop) if gop is not None else "default"
    report = {
        "video": str(video.path),
        "frames": rows,
        "kept_ratio": plan.kept_ratio,
        "kept_tokens": plan.num_kept,
        "tokens": plan.grid.size,
        "grid": list(plan.grid),
        "frame_types": plan.frame_types,
        "planner": args.planner,
        "params": parse_params(args.param),
        "gop": gop_text,
        "latents": kind,
        "latent_shape": list(latents.shape),
        "pixel_frames": len(video),
        "size": list(video.size),
        "fps": video.fps,
        "picture_types": video.picture_types,
    }
    if not args.quiet:
        print(_table(report, video))
    if json_out:
        write_text_atomic(json_out, json.dumps(report, indent=2) + "\n")
    if overlay_out:
        from .overlay import draw_plan

        drawn = draw_plan(video.frames, plan, label="proxy" if kind == "pixel proxy" else "")
        codec = "ffv1" if overlay_out.suffix.lower() == ".mkv" else "h264"
        write_video(overlay_out, drawn, video.fps, codec=codec, protect=[video.path])
    if plan_out:
        plan.save(plan_out)
    return 0


def _table(report: dict, video) -> str:
    h, w = report["size"]
    lines = [
        f"video    {report['video']}: {report['pixel_frames']} frames {w}x{h} @ {report['fps']:g} fps",
        f"latents  {tuple(report['latent_shape'])} ({report['latents']})"
        + ("  -- pixel proxy, not a VAE: pass --vae DIR for real latents" if report["latents"] == "pixel proxy" else ""),
        f"planner  {report['planner']}  params {report['params'] or '{}'}  gop {report['gop']}",
        "",
        f"{'frame':>5}  {'pixels':>7}  type  {'kept':>6}  {'ref dt':>6}  {'ref dy':>6}  {'ref dx':>6}",
    ]
    for row in report["frames"]:
        a, b = row["pixel_frames"]
        pixels = f"{a}" if a == b else f"{a}-{b}"
        off = row["ref_offset"]
        refs = "       -       -       -" if off is None else "".join(f"  {v:6.2f}" for v in off)
        lines.append(f"{row['index']:>5}  {pixels:>7}  {row['type']:^4}  {row['kept']:6.1%}{refs}")
    lines.append("")
    lines.append(
        f"kept {report['kept_tokens']}/{report['tokens']} tokens ({report['kept_ratio']:.1%}), "
        f"frame types {report['frame_types']}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# shared by edit / compare / bench
def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model, the prompt and the SDEdit settings."""
    parser.add_argument(
        "--model", default="reference", metavar="DIR",
        help="local diffusers Wan pipeline folder (model_index.json), or 'reference' (default): the embedded model",
    )
    parser.add_argument("--prompt", help="edit prompt (needs a text encoder in the model; else --prompt-embeds)")
    parser.add_argument("--negative-prompt", help="negative prompt (with a text encoder)")
    parser.add_argument(
        "--prompt-embeds", metavar="FILE",
        help="safetensors with 'prompt_embeds' (1, L, D) [+ 'negative_prompt_embeds']; default: the model "
        "folder's prompt_embeds.safetensors",
    )
    parser.add_argument("--strength", type=float, default=0.6, help="SDEdit strength in (0, 1] (default 0.6)")
    parser.add_argument("--steps", type=int, default=10, help="scheduler steps at strength 1 (default 10)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model's; 5 for Wan pipelines, 2 for reference; "
                             "1 = off: half the cost)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", help="transformer dtype: float32, bfloat16, float16")
    parser.add_argument(
        "--memory-limit", metavar="SIZE",
        help="refuse runs estimated above SIZE (e.g. 8G); default: free memory on the device",
    )
    parser.add_argument("--fps", type=float, help="resample to this frame rate (default: keep the source rate)")
    parser.add_argument("--size", type=_size, metavar="WxH", help="scale to cover WxH and center-crop (multiples of 16)")
    parser.add_argument("--max-frames", type=int, metavar="N", help="read at most N frames (then cut to 4k+1)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or tables")


def add_recovery_args(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    from .attention import RECOVERY_MODES

    if several:
        parser.add_argument(
            "--recoveries", default="none", metavar="A,B",
            help=f"attention recovery modes, comma-separated ({', '.join(RECOVERY_MODES)}; default none)",
        )
    else:
        parser.add_argument("--recovery", default="none", help=f"attention recovery: {', '.join(RECOVERY_MODES)} (default none)")
    parser.add_argument("--restore", default="copy", help="restore for reused tokens: copy (default) or velocity")


def _device(args) -> str:
    if args.device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def prepare_session(args, video_path, *, motion: bool = False, compile: bool = False):
    """Check the settings, load the model and prompt, estimate memory, decode ``video_path``."""
    from .editing import parse_bytes, prepare

    return prepare(
        video_path if video_path is not None else _bundled(), args.model, prompt=args.prompt,
        negative_prompt=args.negative_prompt, prompt_embeds=args.prompt_embeds, strength=args.strength,
        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, device=_device(args), dtype=args.dtype,
        fps=args.fps, size=args.size, max_frames=args.max_frames,
        memory_limit=parse_bytes(args.memory_limit) if args.memory_limit else None, progress=not args.quiet,
        motion=motion, compile=compile,
    )


def _bundled():
    from .fixtures import bundled_clip

    return bundled_clip()


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what} {text!r} names nothing; pass a comma-separated list, e.g. intra,lipar")
    return items


def write_json(target: str | None, data, video_arg=None) -> None:
    """``--json FILE`` (atomic) or ``--json -`` (stdout)."""
    if target is None:
        return
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        write_text_atomic(Path(target), text)


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _check_json_target(target, video_arg):
    if target is not None and target != "-":
        check_output(target, video_arg, "--json")


VIDEO_SUFFIXES = {".mp4": "h264", ".mov": "h264", ".mkv": "ffv1"}


# ---------------------------------------------------------------------------------------
# edit
def add_edit(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="edit a video with a video DiT, computing only the tokens the plan keeps",
        description="SDEdit IN with a Wan video-to-video pipeline under a lipcodec plan; write OUT.",
    )
    parser.add_argument("video", nargs="?", metavar="IN", help="input video (default: the bundled Big Buck Bunny clip)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output video (.mp4 H.264, .mkv lossless FFV1)")
    add_model_args(parser)
    add_plan_args(parser)
    add_recovery_args(parser)
    parser.add_argument("--reference", action="store_true", help="also run unpruned (same noise) and report fidelity")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' = stdout)")
    parser.add_argument(
        "--stream", action="store_true",
        help="stream chunk by chunk (chunk-causal, KV cache; the embedded model): --steps steps from --strength",
    )
    parser.add_argument("--first-chunk", default="full", choices=("full", "prune"),
                        help="with --stream: compute chunk 0 in full (default) or prune it as LIPAR does")
    parser.add_argument("--vae", metavar="DIR",
                        help="with --stream and a Self-Forcing/CausVid checkpoint as --model: a local Wan VAE folder")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (GPU: faster once compiled; the first steps pay it)")
    parser.set_defaults(func=cmd_edit)


def cmd_edit(args) -> int:
    from .editing import edit, parse_bytes
    from .video import write_video

    args.video = args.video or _bundled()
    out = check_output(args.output, args.video, "-o")
    codec = VIDEO_SUFFIXES.get(out.suffix.lower())
    if codec is None:
        raise UsageError(f"-o {out}: unknown video type {out.suffix or '(none)'}; use .mp4 (H.264) or .mkv (lossless)")
    _check_json_target(args.json, args.video)
    planner, gop = build_planner(args)
    if args.stream:
        if args.guidance_scale is not None:
            raise UsageError("--guidance-scale: streaming runs without classifier-free guidance (Self-Forcing style, "
                             "one pass per step); drop it")
        return _edit_stream(args, out, codec, planner, gop)
    result = edit(
        args.video, args.model, prompt=args.prompt, negative_prompt=args.negative_prompt,
        prompt_embeds=args.prompt_embeds, strength=args.strength, steps=args.steps, planner=planner, gop=gop,
        recovery=args.recovery, restore=args.restore, seed=args.seed, reference=args.reference,
        guidance_scale=args.guidance_scale, device=_device(args), dtype=args.dtype, fps=args.fps, size=args.size,
        max_frames=args.max_frames, memory_limit=parse_bytes(args.memory_limit) if args.memory_limit else None,
        compile=args.compile, kept_multiple=args.kept_multiple, progress=not args.quiet,
    )
    write_video(out, result.frames, result.fps, codec=codec, protect=[args.video], progress=not args.quiet)
    report = {"input": str(args.video), "output": str(out), **result.report.to_dict()}
    if not args.quiet and args.json != "-":
        print(result.report.table())
        print(f"wrote    {out}")
    write_json(args.json, report)
    return 0


def _edit_stream(args, out, codec, planner, gop) -> int:
    from .editing import edit_stream
    from .video import write_video

    result = edit_stream(
        args.video, args.model, prompt=args.prompt, strength=args.strength, steps=args.steps, planner=planner,
        gop=gop, recovery=args.recovery, first_chunk=args.first_chunk, seed=args.seed, reference=args.reference,
        vae=args.vae, prompt_embeds=args.prompt_embeds, fps=args.fps, size=args.size, max_frames=args.max_frames,
        device=_device(args), dtype=args.dtype, compile=args.compile, progress=not args.quiet,
    )
    write_video(out, result.frames, result.fps, codec=codec, protect=[args.video], progress=not args.quiet)
    if not args.quiet and args.json != "-":
        print(result.table())
        print(f"wrote    {out}")
    report = {
        "input": str(args.video), "output": str(out), "stream": True, "kept_ratio": result.kept_ratio,
        "chunk_kept": list(result.chunk_kept),
        "chunk_seconds": list(result.chunk_seconds), "plan_seconds": result.plan_seconds, "fidelity": result.fidelity,
    }
    write_json(args.json, report)
    return 0


# ---------------------------------------------------------------------------------------
# compare
def add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run several planners/GOPs and the unpruned baseline (same noise); write a report folder",
        description="For each IN: the unpruned run and one run per planner x GOP x recovery, from the same noise; "
        "writes report.md/.html/.json, per-frame plots (PNG) and a side-by-side video to -o DIR.",
    )
    parser.add_argument("videos", nargs="*", metavar="IN", help="input videos (default: the bundled Big Buck Bunny clip)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder (replaced atomically)")
    parser.add_argument("--planners", default="intra,lipar", metavar="A,B,C", help="planners (default intra,lipar)")
    parser.add_argument(
        "--gops", nargs="+", default=None, metavar="X264PARAMS",
        help="GOPs to try, each an x264 params string ('default' = the planner's own)",
    )
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="planner parameter for every planner"
    )
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE", help="import MODULE first (repeatable)"
    )
    parser.add_argument("--list-planners", action="store_true", help="list registered planners and exit")
    parser.add_argument("--warmup", type=int, default=1, help="untimed unpruned runs first (default 1)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (static shapes); a run that compiled (a new kept "
                             "count or recovery mode) runs twice and is timed the second time")
    add_kept_multiple_arg(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the JSON report here ('-' = stdout)")
    add_model_args(parser)
    add_recovery_args(parser, several=True)
    parser.set_defaults(func=cmd_compare)


def _planner_list(args) -> tuple[list[str], list, dict, list[dict]]:
    """--planners, --gops, -p (all of them) and each planner's share of -p."""
    from . import planners as registry
    from .editing import build_planner as check_planner
    from .editing import parse_gop

    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UsageError(f"--import {module}: {error}; put the module on PYTHONPATH") from None
    names = _split(args.planners, "--planners")
    params = parse_params(args.param)
    for name in names:
        if name not in registry.available():
            raise UsageError(f"unknown planner {name!r}; available: {', '.join(registry.available())}")
    try:
        shares = registry.share_params(names, params)
    except ValueError as error:
        raise UsageError(f"-p: {error}") from None
    for name, share in zip(names, shares):
        check_planner(name, share)
    gops = [None if g in ("default", "") else g for g in (args.gops or ["default"])]
    for g in gops:
        if g is not None:
            parse_gop(g)  # validate now, label with the user's own text
    return names, gops, params, shares


def cmd_compare(args) -> int:
    from .editing import check_modes
    from .report import compare_session, configs, write_report

    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: folder {out.parent} does not exist; create it first")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; the report is a folder: pass a new folder name")
    args.videos = args.videos or [str(_bundled())]
    for video in args.videos:
        if out.exists() and Path(video).exists() and Path(video).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"-o {out} contains the input {video}, and the report replaces the folder: choose another")
    _check_json_target(args.json, None)
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup} must be >= 0")
    check_kept_multiple_arg(args)
    names, gops, _, shares = _planner_list(args)
    recoveries = _split(args.recoveries, "--recoveries")
    for recovery in recoveries:
        check_modes(recovery, args.restore)
    cfgs = [cfg for name, share in zip(names, shares) for cfg in configs([name], gops, recoveries, (args.restore,), share)]
    results = []
    for video in args.videos:
        session = prepare_session(args, video, motion="bitstream" in names, compile=args.compile)
        results.append(compare_session(session, cfgs, warmup=args.warmup, compiled=args.compile,
                                       kept_multiple=args.kept_multiple, progress=not args.quiet))
    setup = {"model": args.model, "strength": args.strength, "steps": args.steps, "seed": args.seed,
             "guidance": args.guidance_scale, "device": _device(args), "dtype": args.dtype,
             **({"compile": True} if args.compile else {}),
             **({"kept_multiple": args.kept_multiple} if args.kept_multiple else {})}
    write_report(out, results, setup, protect=args.videos, progress=not args.quiet)
    if not args.quiet and args.json != "-":
        from .report import table_rows

        for result in results:
            head, rows = table_rows(result)
            print(result["video"])
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
            for row in rows:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        print(f"wrote    {out}/report.md, report.html, report.json, plots and side-by-side videos")
    write_json(args.json, {"setup": setup, "videos": results})
    return 0


# ---------------------------------------------------------------------------------------
# bench
def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="timing table over planners and recovery modes on one model",
        description="Time the denoising loop (plan fixed, warm-up, median of --repeat runs; CUDA events on GPU) "
        "unpatched and per planner x recovery.",
    )
    parser.add_argument("video", nargs="?", metavar="IN", help="input video (default: the bundled clip)")
    parser.add_argument("--planners", default="intra,lipar", metavar="A,B", help="planners (default intra,lipar)")
    parser.add_argument("--gop", metavar="X264PARAMS", help="GOP for every planner")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="planner parameter")
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE", help="import MODULE first (repeatable)"
    )
    parser.add_argument("--list-planners", action="store_true", help="list registered planners and exit")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per row first (default 1)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON ('-' = stdout)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (static shapes); every row warms up (compiles) first")
    add_kept_multiple_arg(parser)
    add_model_args(parser)
    add_recovery_args(parser, several=True)
    parser.set_defaults(func=cmd_bench, gops=None)


def cmd_bench(args) -> int:
    from .bench import bench, table
    from .editing import check_modes, parse_gop

    _check_json_target(args.json, args.video)
    if args.repeat < 1 or args.warmup < 0:
        raise UsageError(f"--repeat {args.repeat} must be >= 1 and --warmup {args.warmup} >= 0")
    check_kept_multiple_arg(args)
    names, _, params, _ = _planner_list(args)
    recoveries = _split(args.recoveries, "--recoveries")
    for recovery in recoveries:
        check_modes(recovery, args.restore)
    gop = parse_gop(args.gop)
    session = prepare_session(args, args.video, motion="bitstream" in names, compile=args.compile)
    rows = bench(session, names, recoveries, gop=gop, restore=args.restore, repeat=args.repeat, warmup=args.warmup,
                 params=params, compiled=args.compile, kept_multiple=args.kept_multiple, progress=not args.quiet)
    device = str(session.device)
    if not args.quiet and args.json != "-":
        print(table(rows, device))
    n, h, w = session.frames.shape[:3]
    write_json(args.json, {"device": device, "frames": n, "size": [h, w], "model": args.model,
                           "steps": args.steps, "strength": args.strength, "gop": str(gop) if gop else "default",
                           "compile": args.compile, "kept_multiple": args.kept_multiple, "rows": rows})
    return 0


# ---------------------------------------------------------------------------------------
SUBCOMMANDS = [add_analyze, add_edit, add_compare, add_bench]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lipcodec",
        description="Codec-style token planning for video diffusion transformers.",
    )
    parser.add_argument("--version", action="version", version=f"lipcodec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage error
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "list_planners", False):
        from . import planners

        for module in args.imports:
            importlib.import_module(module)
        print("\n".join(planners.available()))
        return 0

    from .editing import EditError, NumericalError
    from .plan import PlanError
    from .video import VideoError

    prog = f"lipcodec {args.command}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once per place, printed below as the command's own
        for developers_only in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=developers_only)  # hidden by Python by default too
        try:
            code = args.func(args)
        except NumericalError as error:  # NaN/Inf in latents or model outputs: says where
            _flush_warnings(caught, prog)
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 3
        except (UsageError, EditError, VideoError, FileNotFoundError, FileExistsError, IsADirectoryError) as error:
            _flush_warnings(caught, prog)
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        except PlanError as error:  # a planner produced an invalid plan: a bug, not the user's
            _flush_warnings(caught, prog)
            print(f"{prog}: internal error: the planner made an invalid plan: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception:
            _flush_warnings(caught, prog)
            traceback.print_exc()
            print(f"{prog}: internal error (traceback above); please report it", file=sys.stderr)
            return 1
    _flush_warnings(caught, prog)
    return code


def _flush_warnings(caught, prog: str) -> None:
    for warning in caught:
        print(f"{prog}: warning: {warning.message}", file=sys.stderr)
    caught.clear()


if __name__ == "__main__":
    sys.exit(main())

"""The ``lipcodec`` command line: one function per subcommand (``cmd_<name>``).

Exit codes: 0 ok, 2 usage or bad input (one clear line on stderr), 1 internal error.
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
import tempfile
import traceback
import warnings
from pathlib import Path



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


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--planner", default="lipar", help="planner name (default: lipar); see --list-planners")
    parser.add_argument("--gop", metavar="X264PARAMS", help="GOP as x264 params, e.g. keyint=8:bframes=2:b-pyramid=normal")
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="planner parameter (repeatable)"
    )
    parser.add_argument("--motion", action="store_true", help="decode codec motion vectors (automatic for bitstream)")
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
    return planner, gop


def make_plan(args, video, latents, planner, gop):
    import lipcodec

    return lipcodec.plan(latents, planner=planner, gop=gop, frames=video.frames, motion=video.motion)


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


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def frame_report(plan, temporal_factor: int = 4) -> list[dict]:
    """Per latent frame: type, kept share, pixel frames, mean (dt, dy, dx) offset of reused tokens."""
    from .gop import pixel_frames_of_latent

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
SUBCOMMANDS = [add_analyze]


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

    from .plan import PlanError
    from .video import VideoError

    prog = f"lipcodec {args.command}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = args.func(args)
        except (UsageError, VideoError, FileNotFoundError, IsADirectoryError) as error:
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

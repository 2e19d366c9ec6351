"""``lipcodec compare``: several plans against the unpruned run, written as a report folder.

For each input video: one unpruned run and one run per configuration (planner x GOP x
recovery), all from the same noise (same seed). Per configuration: kept tokens, time,
speed-up, PSNR/SSIM and latent PSNR against the unpruned output, warp error (temporal
consistency, :func:`lipcodec.metrics.warp_error`), plus any registered perceptual metric.

The folder (written to a temp folder next to it, renamed when complete)::

    report.md           tables, one per input
    report.html         the same tables with the plots
    report.json         every number, per-frame series included
    <clip>_kept.png     kept ratio per latent frame, one line per configuration
    <clip>_psnr.png     PSNR per pixel frame against the unpruned output
    <clip>_side_by_side.mp4   source | unpruned | each configuration, labelled
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import attrs
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import metrics
from .atomic import publish
from .editing import Session, fidelity_of, gop_label, parse_gop, room_to_recompile, to_uint8

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PSNR_CAP = 60.0  # identical frames (inf dB) are drawn at this height


@attrs.frozen
class Config:
    """One configuration to compare: a planner (+ parameters), a GOP, recovery and restore."""

    planner: str
    gop: str | None = None
    recovery: str = "none"
    restore: str = "copy"
    params: dict = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        parts = [self.planner]
        if self.gop:
            parts.append(self.gop)
        if self.recovery != "none":
            parts.append(self.recovery)
        if self.restore != "copy":
            parts.append(self.restore)
        return " ".join(parts)


def configs(planners, gops=(None,), recoveries=("none",), restores=("copy",), params=None) -> list[Config]:
    """Every combination, in the order given (planner outermost)."""
    return [Config(p, g, r, s, dict(params or {})) for p in planners for g in gops for r in recoveries for s in restores]


def compare_session(session: Session, cfgs, *, warmup: int = 1, compiled: bool = False,
                    kept_multiple: int | None = None, progress: bool = False) -> dict:
    """Run the unpruned baseline (after ``warmup`` untimed runs) and each configuration.

    ``kept_multiple`` pads every plan (:meth:`~lipcodec.Plan.padded`). ``compiled``: the
    session's blocks are compiled with static shapes, so a run that meets a new sequence
    length (or recovery processor) pays a compilation; a run during which dynamo compiled a
    graph is repeated and the repeat is timed (``recompiled`` in its row), and dynamo's
    recompile limit is raised to a graph per configuration for the comparison (past it the
    blocks would run eagerly and the later rows time eager steps)."""
    from tqdm.auto import tqdm

    def timed(run):  # (the run, whether it had to be repeated because it compiled)
        if not compiled:
            return run(), False
        before = _compiled_graphs()
        with room_to_recompile(len(cfgs) + 1):
            result = run()
        return (run(), True) if _compiled_graphs() > before else (result, False)

    for _ in range(warmup):
        session.run_unpruned()
    base, _ = timed(session.run_unpruned)
    frames = session.frames
    result = {
        "video": str(session.video.path) if session.video.path else "frames",
        "frames": int(frames.shape[0]), "size": list(frames.shape[1:3]), "fps": float(session.video.fps),
        "unpruned": {
            "seconds": base.seconds, "calls": base.calls,
            "warp_error": _mean_warp(base.pixels),
            "source_warp_error": _mean_warp(frames),
        },
        "rows": [],
    }
    outputs = {"source": frames, "unpruned": to_uint8(base.pixels)}
    for cfg in tqdm(cfgs, desc="configurations", unit="run", disable=not progress, leave=False):
        run, recompiled = timed(functools.partial(
            session.run, cfg.planner, gop=parse_gop(cfg.gop), recovery=cfg.recovery, restore=cfg.restore,
            desc=cfg.label, kept_multiple=kept_multiple, **cfg.params))
        fid = fidelity_of(base, run, reference_warp=result["unpruned"]["warp_error"])
        row = {
            "label": cfg.label, "planner": cfg.planner, "gop": gop_label(parse_gop(cfg.gop)),
            "recovery": cfg.recovery, "restore": cfg.restore, "params": cfg.params,
            "kept_ratio": run.plan.kept_ratio, "kept_tokens": run.plan.num_kept, "tokens": run.plan.grid.size,
            "frame_types": run.plan.frame_types, "frame_kept": [float(v) for v in run.plan.frame_kept],
            "seconds": run.seconds, **{k: v for k, v in fid.items() if k not in ("unpruned_seconds", "unpruned_warp_error")},
            **({"recompiled": recompiled} if compiled else {}),
        }
        for name in metrics.perceptual_metrics():
            row[name] = float(np.mean(metrics.perceptual(name, base.pixels, run.pixels)))
        result["rows"].append(row)
        outputs[cfg.label] = to_uint8(run.pixels)
    result["_outputs"] = outputs
    return result


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _mean_warp(frames) -> float:
    return float(metrics.warp_error(frames).mean()) if len(frames) > 1 else 0.0


# -- tables ----------------------------------------------------------------------------------------
COLUMNS = [("configuration", "label", "{}"), ("kept %", "kept_ratio", "{:.1%}"), ("time s", "seconds", "{:.3f}"),
           ("speed-up", "speedup", "{:.2f}x"), ("PSNR dB", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"),
           ("latent PSNR dB", "latent_psnr", "{:.2f}"), ("warp error", "warp_error", "{:.4f}"),
           ("frame types", "frame_types", "{}")]


def _cell(fmt: str, value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf (identical)"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    extra = [name for name in metrics.perceptual_metrics() if result["rows"] and name in result["rows"][0]]
    cols = COLUMNS + [(name, name, "{:.4f}") for name in extra]
    base = result["unpruned"]
    rows = [["unpruned", "100.0%", f"{base['seconds']:.3f}", "1.00x", "-", "-", "-", f"{base['warp_error']:.4f}", "-"]
            + ["-"] * len(extra)]
    for row in result["rows"]:
        rows.append([_cell(fmt, row[key]) for _, key, fmt in cols])
    return [c[0] for c in cols], rows


def markdown(results: list[dict], setup: dict) -> str:
    lines = ["# lipcodec compare", "", _setup_line(setup), ""]
    for result in results:
        h, w = result["size"]
        lines += [f"## {result['video']}", "",
                  f"{result['frames']} frames {w}x{h} @ {result['fps']:g} fps; source warp error "
                  f"{result['unpruned']['source_warp_error']:.4f}. PSNR/SSIM/latent PSNR are against the unpruned "
                  "output (same noise); speed-up = unpruned time / time.", ""]
        head, rows = table_rows(result)
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        stem = result["stem"]
        lines += ["", f"![kept ratio per latent frame]({stem}_kept.png) ![PSNR per frame]({stem}_psnr.png)", "",
                  f"Side by side: [{stem}_side_by_side.mp4]({stem}_side_by_side.mp4) (source, unpruned, "
                  + ", ".join(r["label"] for r in result["rows"]) + ")", ""]
    return "\n".join(lines)


def html_page(results: list[dict], setup: dict) -> str:
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>lipcodec compare</title><style>",
           "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>",
           "<h1>lipcodec compare</h1>", f"<p>{html.escape(_setup_line(setup))}</p>"]
    for result in results:
        head, rows = table_rows(result)
        stem = html.escape(result["stem"])
        out.append(f"<h2>{html.escape(result['video'])}</h2><table><tr>"
                   + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        out.append(f"</table><p><img src='{stem}_kept.png'> <img src='{stem}_psnr.png'></p>"
                   f"<p><video src='{stem}_side_by_side.mp4' controls loop></video></p>")
    out.append("</body></html>")
    return "\n".join(out)


def _setup_line(setup: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in setup.items())


# -- plots (PIL, no matplotlib) ---------------------------------------------------------------------
def line_plot(series: dict, *, title: str, xlabel: str, ylabel: str, ylim: tuple[float, float] | None = None,
              size: tuple[int, int] = (640, 360)) -> Image.Image:
    """A simple line chart: one polyline (with point markers) per named series of y values."""
    width, height = size
    font = ImageFont.load_default()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 170, 30, height - 45
    values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    lo, hi = ylim if ylim else ((min(values), max(values)) if values else (0.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    count = max((len(ys) for ys in series.values()), default=1)

    def x_of(i):
        return left + (right - left) * (i / max(count - 1, 1))

    def y_of(v):
        return bottom - (bottom - top) * ((min(max(v, lo), hi) - lo) / (hi - lo))

    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):  # y grid and ticks
        v = lo + (hi - lo) * k / 4
        y = y_of(v)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{v:.3g}", fill="black", font=font)
    step = max(1, count // 10)
    for i in range(0, count, step):
        draw.text((x_of(i) - 3, bottom + 4), str(i), fill="black", font=font)
    draw.text(((left + right) // 2 - 30, height - 18), xlabel, fill="black", font=font)
    draw.text((4, top - 22), ylabel, fill="black", font=font)
    for n, (name, ys) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        points = [(x_of(i), y_of(v)) for i, v in enumerate(ys) if v is not None and not math.isnan(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        ly = top + 14 * n
        draw.line([right + 10, ly + 6, right + 28, ly + 6], fill=color, width=3)
        draw.text((right + 32, ly), name[:22], fill="black", font=font)
    return image


def side_by_side(videos: dict) -> np.ndarray:
    """(T, H, N*W, 3) uint8: the named videos next to each other, each labelled top-left."""
    font = ImageFont.load_default()
    length = min(len(v) for v in videos.values())
    tiles = []
    for name, frames in videos.items():
        labelled = []
        for frame in frames[:length]:
            image = Image.fromarray(frame)
            draw = ImageDraw.Draw(image)
            box = draw.textbbox((2, 1), name[:24], font=font)
            draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="black")
            draw.text((2, 1), name[:24], fill="white", font=font)
            labelled.append(np.asarray(image))
        tiles.append(np.stack(labelled))
    return np.concatenate(tiles, axis=2)


# -- the folder ------------------------------------------------------------------------------------
def write_report(folder, results: list[dict], setup: dict, *, protect=(), progress: bool = False) -> Path:
    """Write the report folder atomically (a temp folder next to it, renamed when complete)."""
    from .video import write_video

    folder = Path(folder)
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"cannot write the report {folder}: folder {folder.parent} does not exist; create it first")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is a file; the report is a folder: pass a new folder name")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        stems = _stems([r["video"] for r in results])
        for result, stem in zip(results, stems):
            result["stem"] = stem
            outputs = result.pop("_outputs")
            kept = {r["label"]: r["frame_kept"] for r in result["rows"]}
            line_plot(kept, title=f"{stem}: kept tokens per latent frame", xlabel="latent frame",
                      ylabel="kept ratio", ylim=(0.0, 1.0)).save(tmp / f"{stem}_kept.png")
            psnr = {r["label"]: [min(v, PSNR_CAP) for v in r["frame_psnr"]] for r in result["rows"]}
            finite = [v for ys in psnr.values() for v in ys]
            line_plot(psnr, title=f"{stem}: PSNR vs unpruned per frame (inf drawn at {PSNR_CAP:g})", xlabel="frame",
                      ylabel="PSNR dB", ylim=(min(finite, default=0.0) - 1, PSNR_CAP)).save(tmp / f"{stem}_psnr.png")
            grid = side_by_side(outputs)
            write_video(tmp / f"{stem}_side_by_side.mp4", grid[:, :, : grid.shape[2] // 2 * 2], result["fps"],
                        protect=protect, progress=progress)
        (tmp / "report.md").write_text(markdown(results, setup))
        (tmp / "report.html").write_text(html_page(results, setup))
        (tmp / "report.json").write_text(json.dumps({"setup": setup, "videos": results}, indent=2,
                                                    default=_json_default) + "\n")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _stems(paths: list[str]) -> list[str]:
    stems, seen = [], {}
    for p in paths:
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(p).stem) or "video"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _replace_dir(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    publish(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["Config", "compare_session", "configs", "html_page", "line_plot", "markdown", "side_by_side",
           "table_rows", "write_report"]

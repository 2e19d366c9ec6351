"""`lipcodec edit / compare / bench` through the console script, on a real 17-frame clip
with diffusers' tiny Wan configs saved as a pipeline folder; atomic writes under kill."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lipcodec import fidelity, fixtures
from lipcodec.cli import main
from lipcodec.editing import save_tiny_model
from lipcodec.video import read_video

SCRIPT = Path(sys.executable).with_name("lipcodec")
LIPCODEC = str(SCRIPT) if SCRIPT.exists() else shutil.which("lipcodec")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-wan")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = fidelity.load_clip(frames=17, size=(64, 64))  # bikes.mp4: real camera motion
    return fixtures.h264(frames, tmp_path_factory.mktemp("clip") / "bikes17.mp4")


def run_cli(*args, timeout=240):
    assert LIPCODEC, "the lipcodec console script is not installed (pip install -e .)"
    return subprocess.run([LIPCODEC, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_edit_writes_the_video_and_a_json_report(tmp_path, clip, model_dir):
    out = tmp_path / "edited.mp4"
    run = run_cli("edit", clip, "-o", out, "--model", model_dir, "--planner", "lipar", "--gop", "keyint=2",
                  "--recovery", "duplicate", "--strength", "0.5", "--steps", "4", "--reference", "--json", "-", "-q")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # --json - : only JSON on stdout
    assert report["output"] == str(out) and report["frames"] == 17 and report["frame_types"] == "IPIPI"
    assert report["recovery"] == "duplicate" and report["gop"].startswith("keyint=2")
    assert 0 < report["kept_ratio"] <= 1 and report["fidelity"]["ssim"] > 0
    assert "%|" not in run.stderr  # --quiet: no progress bars
    video = read_video(out, progress=False)
    assert video.frames.shape == (17, 64, 64, 3)
    assert read_video(clip, progress=False).frames.shape == (17, 64, 64, 3)  # the input is untouched


def test_edit_prints_a_table_and_shows_progress(tmp_path, clip, model_dir, capsys):
    code = main(["edit", str(clip), "-o", str(tmp_path / "e.mkv"), "--model", str(model_dir), "--strength", "0.5",
                 "--steps", "2"])  # in-process: the console script is covered above
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "kept" in out and "frame types" in out and f"wrote    {tmp_path / 'e.mkv'}" in out
    assert "pruned" in err and "decode bikes17.mp4" in err  # progress bars: denoising, decoding
    assert read_video(tmp_path / "e.mkv", progress=False).frames.shape == (17, 64, 64, 3)


@pytest.mark.needs_cxx
def test_edit_compile_matches_eager(tmp_path, clip, model_dir, capsys):
    """--compile (the blocks compiled in place, lipcodec's hooks around and inside them): the
    same pruned edit and the same fidelity report as eager, to rounding."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    args = ["edit", str(clip), "--model", str(model_dir), "--strength", "0.5", "--steps", "2", "--recovery",
            "duplicate", "-p", "target_kept=0.6", "--reference", "--json", "-", "-q"]
    reports, frames = [], []
    for name, extra in (("eager.mkv", []), ("compiled.mkv", ["--compile"])):
        assert main([*args, "-o", str(tmp_path / name), *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
        frames.append(read_video(tmp_path / name, progress=False).frames.astype(int))
    eager, compiled = reports
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    assert compiled["kept_ratio"] == eager["kept_ratio"] < 1
    assert abs(compiled["fidelity"]["psnr"] - eager["fidelity"]["psnr"]) < 0.5
    assert np.abs(frames[1] - frames[0]).max() <= 2  # lossless FFV1: pixel rounding only


@pytest.mark.needs_cxx
def test_compare_compile_times_compiled_steps_and_buckets_share_graphs(tmp_path, clip, model_dir, capsys):
    """compare --compile: a run during which dynamo compiled is repeated, and the repeat is
    what is timed; --kept-multiple pads every plan, so configurations in one bucket (same
    recovery) reuse the graph and are not repeated. dynamo's recompile limit is raised for
    the comparison: with it at 1, every new count would otherwise run eagerly, uncompiled."""
    import torch

    torch._dynamo.reset()
    args = ["compare", str(clip), "-o", str(tmp_path / "r"), "--model", str(model_dir), "--planners", "lipar",
            "--gops", "default", "keyint=2", "keyint=3", "--strength", "0.5", "--steps", "2", "--warmup", "0",
            "--compile", "--kept-multiple", "32", "--json", "-", "-q"]
    with torch._dynamo.config.patch(recompile_limit=1):
        assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"]["compile"] is True and data["setup"]["kept_multiple"] == 32
    rows = data["videos"][0]["rows"]
    assert all(r["kept_tokens"] % 32 == 0 and r["kept_tokens"] < r["tokens"] for r in rows), rows
    seen = set()
    for row in rows:  # a graph per kept count: the first row at a count compiled, later ones reuse it
        assert row["recompiled"] == (row["kept_tokens"] not in seen), rows
        seen.add(row["kept_tokens"])
    assert len(seen) < len(rows)  # at least two configurations shared a bucket


def test_compare_writes_the_report_folder(tmp_path, clip, model_dir):
    out = tmp_path / "report"
    run = run_cli("compare", clip, "-o", out, "--model", model_dir, "--planners", "intra,lipar", "--gops", "default",
                  "keyint=2", "--strength", "0.5", "--steps", "2", "--warmup", "0", "-q")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "bikes17_kept.png", "bikes17_psnr.png", "bikes17_side_by_side.mp4", "report.html", "report.json", "report.md",
    ]
    data = json.loads((out / "report.json").read_text())
    (video,) = data["videos"]
    assert [r["label"] for r in video["rows"]] == ["intra", "intra keyint=2", "lipar", "lipar keyint=2"]
    intra = video["rows"][0]
    assert intra["kept_ratio"] == 1.0 and intra["psnr"] == math.inf and intra["ssim"] == pytest.approx(1.0)
    assert intra["latent_psnr"] == math.inf  # the all-intra plan reproduces the unpruned run bit for bit
    lipar = video["rows"][3]
    assert lipar["frame_types"] == "IPIPI" and len(lipar["frame_kept"]) == 5 and len(lipar["frame_psnr"]) == 17
    for row in video["rows"]:
        assert row["speedup"] == pytest.approx(video["unpruned"]["seconds"] / row["seconds"])
        assert "recompiled" not in row  # eager: nothing is repeated
        assert row["warp_error"] >= 0
    md = (out / "report.md").read_text()
    assert "| configuration | kept % | time s | speed-up | PSNR dB | SSIM | latent PSNR dB | warp error |" in md
    assert "| intra | 100.0% |" in md and "inf (identical)" in md and "bikes17_kept.png" in md
    assert "<table>" in (out / "report.html").read_text()
    assert Image.open(out / "bikes17_kept.png").size == (640, 360)
    side = read_video(out / "bikes17_side_by_side.mp4", fit=None, progress=False)
    assert side.frames.shape == (17, 64, 64 * 6, 3)  # source | unpruned | four configurations
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no temp folder left


def test_bench_prints_a_timing_table(clip, model_dir):
    """One -p for several planners: target_kept reaches lipar and skips intra (which takes
    no parameters)."""
    run = run_cli("bench", clip, "--model", model_dir, "--planners", "intra,lipar", "--recoveries", "none,duplicate",
                  "--repeat", "2", "--warmup", "0", "--steps", "2", "--strength", "0.5", "-p", "target_kept=0.5",
                  "--json", "-", "-q")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["device"] == "cpu" and data["frames"] == 17
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["unpatched", "intra none", "intra duplicate", "lipar none", "lipar duplicate"]
    for row in data["rows"]:
        assert len(row["times"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
    assert data["rows"][0]["speedup"] == 1.0 and data["rows"][1]["kept_ratio"] == 1.0
    assert all(abs(r["kept_ratio"] - 0.5) < 0.06 for r in data["rows"][3:]), data["rows"]


@pytest.mark.needs_cxx
def test_bench_compile_pads_and_compiles_every_row(clip, model_dir, capsys):
    """bench --compile --kept-multiple: plans padded to the multiple; each row's length is
    compiled during its warm-up (the block at each length, and once the wrapper of
    lipcodec's hooks), even with dynamo's recompile limit at 1, which bench raises to a
    graph per row."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):
        assert main(["bench", str(clip), "--model", str(model_dir), "--planners", "lipar", "--repeat", "1",
                     "--warmup", "0", "--steps", "2", "--strength", "0.5", "--compile", "--kept-multiple", "32",
                     "--json", "-", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["compile"] is True and data["kept_multiple"] == 32
    lipar = data["rows"][1]
    assert round(lipar["kept_ratio"] * 80) % 32 == 0 and lipar["kept_ratio"] < 1  # 80 tokens in all
    assert counters["stats"]["unique_graphs"] - before == 3  # the block at both lengths, plus the hook wrapper


# -- atomic writes: a kill mid-write leaves no output -------------------------------------------
SLOW_WRITER = """
import signal, sys, time
# a shell's background job (CI run with `&`) inherits SIGINT as ignored, and Python then
# keeps it ignored: restore the handler an interactive Ctrl-C reaches
signal.signal(signal.SIGINT, signal.default_int_handler)
import lipcodec.video as video
original = video._encode
def slow(tmp, frames, *args):
    def frames_then_stall():
        for i, frame in enumerate(frames):
            if i == 5:
                print("MIDWRITE", flush=True)
                time.sleep(60)
            yield frame
    return original(tmp, frames_then_stall(), *args)
video._encode = slow
from lipcodec.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_kill_mid_write_leaves_no_output(tmp_path, clip, model_dir, sig):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "edited.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, "edit", str(clip), "-o", str(out), "--model", str(model_dir),
         "--strength", "0.5", "--steps", "2", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "MIDWRITE", proc.stderr.read()
        temps = list(out_dir.iterdir())
        assert len(temps) == 1 and temps[0].name.startswith(".edited.mp4.")  # the write goes to a temp file
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not out.exists()
    if sig == signal.SIGINT:  # a clean interrupt also removes the temp file, exit 130
        assert proc.returncode == 130 and list(out_dir.iterdir()) == []
    assert np.array_equal(read_video(clip, progress=False).frames, read_video(clip, progress=False).frames)

"""`lipcodec analyze`: through the console script (subprocess) and in-process via main()."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lipcodec import Plan, fixtures
from lipcodec.cli import main, parse_params
from lipcodec.planners import register_planner
from lipcodec.video import read_video

SCRIPT = Path(sys.executable).with_name("lipcodec")
LIPCODEC = str(SCRIPT) if SCRIPT.exists() else shutil.which("lipcodec")

# A tiny custom planner: in P-frames every other token reuses its right neighbour in the
# previous frame (so the overlay has reference lines). Written to a file for subprocesses.
PLANNER_SOURCE = '''
import attrs, torch
from lipcodec.gop import Schedule
from lipcodec.plan import Plan
from lipcodec.planners import register_planner

@register_planner("checker-test", replace=True)
@attrs.frozen
class Checker:
    name: str = "checker-test"
    shift: int = 1

    def __call__(self, ctx):
        grid = ctx.grid
        schedule = Schedule.from_gop(ctx.gop, grid.frames)
        f, r, c = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
        reuse = (f > 0) & ((r + c) % 2 == 0) & torch.tensor([t not in "Ii" for t in schedule.types])[f]
        source = torch.where(reuse, grid.token(f - 1, r, (c + self.shift).clamp(max=grid.width - 1)), grid.token(f, r, c))
        return Plan(grid, source.flatten(), schedule, meta={"planner": self.name})
'''

namespace: dict = {}
exec(PLANNER_SOURCE, namespace)  # registers "checker-test" in this process too


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A short 9-frame pan as H.264: 9 pixel frames = 3 latent frames, 64x96 = 4x6 tokens."""
    return fixtures.h264(fixtures.pan(9, (64, 96), (1, 2)), tmp_path_factory.mktemp("clip") / "pan.mp4")


def run_cli(*args, cwd=None, env_extra=None):
    assert LIPCODEC, "the lipcodec console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", **(env_extra or {})}
    return subprocess.run([LIPCODEC, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


# -- through the console script ------------------------------------------------------------
def test_console_script_analyze_writes_json_overlay_and_plan(tmp_path, clip):
    (tmp_path / "myplanner.py").write_text(PLANNER_SOURCE)
    out = run_cli(
        "analyze", str(clip), "--planner", "checker-test", "--import", "myplanner", "-p", "shift=1",
        "--gop", "keyint=2", "--json", str(tmp_path / "r.json"), "--overlay", str(tmp_path / "o.mp4"),
        "--save-plan", str(tmp_path / "p.npz"), cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pixel proxy" in out.stdout and "checker-test" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["latents"] == "pixel proxy" and report["planner"] == "checker-test"
    assert report["gop"].startswith("keyint=2") and report["params"] == {"shift": 1}
    assert [f["type"] for f in report["frames"]] == ["I", "P", "I"]
    assert [f["index"] for f in report["frames"]] == [0, 1, 2]
    assert report["frames"][1]["kept"] == 0.5  # 12 of 24 tokens reused; 2 sit in the last column (no shift)
    assert report["frames"][1]["ref_offset"] == pytest.approx([1.0, 0.0, 10 / 12], abs=1e-3)
    assert report["kept_ratio"] == pytest.approx(5 / 6)
    plan = Plan.load(tmp_path / "p.npz")
    assert plan.frame_types == "IPI" and plan.kept_ratio == pytest.approx(report["kept_ratio"])
    overlay = read_video(tmp_path / "o.mp4", fit=None, progress=False)
    assert overlay.frames.shape == (9, 64, 96, 3)
    source = read_video(clip, fit=None, progress=False).frames
    # latent frame 1 (pixels 1-4) is half reused: dimmed on average
    assert overlay.frames[1:5].mean() < 0.85 * source[1:5].mean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myplanner.py", "o.mp4", "p.npz", "r.json"]


def test_console_script_bad_input_exits_2_without_traceback(tmp_path):
    out = run_cli("analyze", str(tmp_path / "missing.mp4"), "--planner", "intra", "-q")
    assert out.returncode == 2
    assert "lipcodec analyze: error: no video at" in out.stderr and "Traceback" not in out.stderr


# -- in-process ----------------------------------------------------------------------------
def test_default_video_is_the_bundled_clip(tmp_path, capsys):
    assert main(["analyze", "--planner", "intra", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["video"] == str(fixtures.bundled_clip())
    assert report["kept_ratio"] == 1.0 and report["frame_types"] == "I" * 9
    assert report["grid"] == [9, 15, 26] and report["latent_shape"] == [16, 9, 30, 52]
    table = capsys.readouterr().out
    assert "pixel proxy" in table and "kept 3510/3510 tokens (100.0%)" in table


def test_kept_multiple_rounds_the_kept_count_up(tmp_path, capsys):
    args = ["analyze", "-p", "target_kept=0.68", "-q", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    plain = json.loads((tmp_path / "r.json").read_text())
    assert main([*args, "--kept-multiple", "128"]) == 0
    padded = json.loads((tmp_path / "r.json").read_text())
    tokens = 9 * 15 * 26
    kept = round(padded["kept_ratio"] * tokens)
    assert kept % 128 == 0 and 0 < kept - round(plain["kept_ratio"] * tokens) < 128
    assert main(["edit", "--stream", "--kept-multiple", "128", "-o", str(tmp_path / "s.mp4")]) == 2
    assert "--kept-multiple pads full-sequence plans" in capsys.readouterr().err
    assert main(["edit", "--stream", "--guidance-scale", "2", "-o", str(tmp_path / "s.mp4")]) == 2
    assert "streaming runs without classifier-free guidance" in capsys.readouterr().err
    assert not (tmp_path / "s.mp4").exists()


def test_quiet_prints_nothing(clip, capsys):
    assert main(["analyze", str(clip), "--planner", "intra", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_fps_size_and_max_frames_reach_the_reader(tmp_path, clip):
    args = ["analyze", str(clip), "--planner", "intra", "-q", "--size", "64x32", "--fps", "8", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["size"] == [32, 64] and report["fps"] == 8 and report["pixel_frames"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--planner", "no-such"], "unknown planner 'no-such'; available: "),
        (["--planner", "checker-test", "-p", "bogus=1"], "planner 'checker-test'"),
        (["--planner", "intra", "-p", "novalue"], "must be KEY=VALUE"),
        (["--planner", "intra", "--gop", "keyint=x"], "--gop 'keyint=x'"),
        (["--planner", "intra", "--json", "/no/such/folder/r.json"], "folder /no/such/folder does not exist"),
        (["--planner", "intra", "--vae", "/no/such/vae"], "--vae /no/such/vae: no such folder"),
        (["--planner", "intra", "--import", "no_such_module_xyz"], "--import no_such_module_xyz"),
        (["--planner", "intra", "--kept-multiple", "0"], "--kept-multiple 0 must be >= 1"),
    ],
)
def test_usage_errors_exit_2(clip, capsys, args, message):
    assert main(["analyze", str(clip), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_videos_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a video at all\n" * 20)
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 16)
    for name, message in [("notes.txt", "not a video"), ("noise.mp4", "not a video FFmpeg can read"), (".", "is a folder")]:
        assert main(["analyze", str(tmp_path / name), "--planner", "intra", "-q"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_overlay_refuses_to_overwrite_the_input(tmp_path, clip, capsys):
    before = clip.read_bytes()
    assert main(["analyze", str(clip), "--planner", "intra", "-q", "--overlay", str(clip)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert clip.read_bytes() == before


def test_argparse_usage_error_exits_2(capsys):
    assert main(["analyze", "--size", "big"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main([]) == 2


def test_internal_error_exits_1(clip, capsys):
    @register_planner("broken-test", replace=True)
    def broken(**params):
        def plan(ctx):
            raise RuntimeError("boom")

        plan.name = "broken-test"
        return plan

    assert main(["analyze", str(clip), "--planner", "broken-test", "-q"]) == 1
    assert "internal error" in capsys.readouterr().err


def test_motion_is_decoded_for_the_bitstream_planner(clip, monkeypatch):
    seen = {}

    @register_planner("spy-test", replace=True)
    def spy(**params):
        def plan(ctx):
            seen["motion"] = ctx.motion
            return Plan.identity(ctx.grid)

        plan.name = "spy-test"
        return plan

    assert main(["analyze", str(clip), "--planner", "spy-test", "-q"]) == 0
    assert seen["motion"] is None
    assert main(["analyze", str(clip), "--planner", "spy-test", "-q", "--motion"]) == 0
    assert seen["motion"].vectors.shape == (9, 4, 6, 2)


def test_list_planners(capsys):
    assert main(["analyze", "--list-planners"]) == 0
    assert "intra" in capsys.readouterr().out.split()


def test_parse_params():
    assert parse_params(["tau1=0.1", "mode=fast", "on=true", "n=3", "x=None"]) == {
        "tau1": 0.1, "mode": "fast", "on": True, "n": 3, "x": None,
    }  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_vae_latents_from_a_local_folder(tmp_path, clip):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[])
    vae.save_pretrained(tmp_path / "vae")
    args = ["analyze", str(clip), "--planner", "intra", "-q", "--vae", str(tmp_path / "vae"), "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["latents"] == "vae" and report["latent_shape"] == [16, 3, 8, 12]


def test_the_cli_prints_warnings_for_users_and_hides_developers_ones(monkeypatch, capsys):
    """A command's warnings print once as its own ("lipcodec analyze: warning: ..."), but the
    deprecation notices of libraries underneath (torch.compile's torch.jit, say) stay hidden,
    as Python hides them by default: a user can do nothing about them."""
    import warnings

    import lipcodec.cli as cli

    def noisy(args):
        warnings.warn("torch.jit.script_method is deprecated", DeprecationWarning)
        warnings.warn("something the user should know", UserWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_analyze", noisy)  # main() builds its parser after this
    assert cli.main(["analyze"]) == 0
    err = capsys.readouterr().err
    assert "lipcodec analyze: warning: something the user should know" in err
    assert "deprecated" not in err

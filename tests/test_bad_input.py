"""Bad input, nothing lost: every case gets one clear line naming the problem and the fix,
a non-zero exit code (2 = bad input, 3 = NaN/Inf), and no output file. In-process through
``lipcodec.cli.main`` (the console script itself is exercised in test_cli_edit.py)."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
import torch

from lipcodec import fidelity, fixtures
from lipcodec.cli import main
from lipcodec.editing import save_tiny_model
from lipcodec.video import read_video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    f = {}
    frames = fixtures.pan(17, (64, 64), (1, 2))
    f["good"] = fixtures.h264(frames, root / "good.mp4")
    f["text"] = root / "notes.txt"
    f["text"].write_text("this is not a video\n" * 20)
    f["binary"] = root / "noise.mp4"
    f["binary"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = f["good"].read_bytes()
    f["cut_mp4"] = root / "cut.mp4"  # MP4 with its index at the end, cut in half: index lost
    f["cut_mp4"].write_bytes(data[: len(data) // 2])
    f["mkv"] = root / "full.mkv"
    _write(f["mkv"], frames, "ffv1")
    raw = f["mkv"].read_bytes()
    f["cut_mkv"] = root / "cut.mkv"  # MKV cut at 60%: the frames before the cut decode
    f["cut_mkv"].write_bytes(raw[: int(len(raw) * 0.6)])
    f["zero"] = root / "zero.avi"  # a video stream with no frames
    with av.open(str(f["zero"]), "w") as c:
        s = c.add_stream("mpeg4", rate=16)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
    f["audio"] = root / "audio.m4a"
    with av.open(str(f["audio"]), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    f["odd"] = root / "odd.mkv"  # 67x45: cropped to 64x32 (multiples of 16)
    _write(f["odd"], fixtures.pan(9, (45, 67), (1, 1)), "ffv1")
    f["vfr"] = root / "vfr.mkv"  # frames alternately on screen 80 ms and 40 ms
    _write(f["vfr"], fixtures.pan(20, (64, 64), (1, 1)), "ffv1", durations=(80, 40))
    return f


def _write(path, frames, codec, durations=None):
    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=16)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        t = 0
        for i, a in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(a, format="rgb24")
            if durations:
                vf.pts, vf.time_base = t, tb
                s.time_base = tb
                t += durations[i % len(durations)]
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    m = {"tiny": save_tiny_model(root / "tiny")}
    pipe = fidelity.tiny_wan_pipeline()
    pipe.save_pretrained(str(root / "no-embeds"))  # no text encoder, no saved embeddings
    m["no_embeds"] = root / "no-embeds"
    for name, poison in (("nan_out", lambda p: p.transformer.proj_out.bias), ("nan_vae", lambda p: p.vae.quant_conv.bias)):
        broken = fidelity.tiny_wan_pipeline()
        with torch.no_grad():
            poison(broken).fill_(float("nan"))
        m[name] = save_tiny_model(root / name)
        broken.save_pretrained(str(m[name]))  # same embeddings, broken weights
    return m


def edit(files, models, tmp_path, *extra, video="good", model="tiny", out="out.mp4"):
    target = out if isinstance(out, str) and "/" in out else tmp_path / out
    args = ["edit", str(files[video]) if video in files else video, "-o", str(target), "--model",
            str(models[model]) if model in models else model, "--strength", "0.5", "--steps", "2", "-q", *extra]
    return main(args), target


# (case, video, model, extra args, exit code, message fragments)
CASES = [
    ("missing file", "/nonexistent/clip.mp4", "tiny", [], 2, ["no video at /nonexistent/clip.mp4", "check the path"]),
    ("text file", "text", "tiny", [], 2, ["notes.txt", "not a video"]),
    ("a folder", "/tmp", "tiny", [], 2, ["/tmp is a folder, not a video file", "pass the path of one video file"]),
    ("not a video", "binary", "tiny", [], 2, ["is not a video FFmpeg can read", "re-encode"]),
    ("truncated mp4", "cut_mp4", "tiny", [], 2, ["truncated (an MP4 cut short loses its index)"]),
    ("zero frames", "zero", "tiny", [], 2, ["has a video stream but no decodable frames"]),
    ("audio only", "audio", "tiny", [], 2, ["has no video stream (streams: audio)", "pass a file with video"]),
    ("too large", "good", "tiny", ["--memory-limit", "64K"], 2, ["needs about", "only 64.0 KiB is available",
                                                                  "try --size", "--max-frames"]),
    ("invalid GOP", "good", "tiny", ["--gop", "keyint=banana"], 2, ["--gop 'keyint=banana'"]),
    ("GOP field", "good", "tiny", ["--gop", "keyframes=8"], 2, ["--gop 'keyframes=8'", "keyint"]),
    ("unknown planner", "good", "tiny", ["--planner", "nope"], 2, ["unknown planner 'nope'", "available: ",
                                                                   "intra", "lipar", "motion"]),
    ("threshold < 0", "good", "tiny", ["-p", "tau1=-0.5"], 2, ["tau1=-0.5 is out of range", "threshold >= 0"]),
    ("target_kept > 1", "good", "tiny", ["-p", "target_kept=1.5"], 2, ["target_kept=1.5 is out of range"]),
    ("strength > 1", "good", "tiny", ["--strength", "1.5"], 2, ["strength=1.5 is out of range"]),
    ("no steps run", "good", "tiny", ["--strength", "0.1"], 2, ["runs no denoising step", "raise steps"]),
    ("unknown recovery", "good", "tiny", ["--recovery", "magic"], 2, ["unknown recovery 'magic'", "duplicate"]),
    ("bad size", "good", "tiny", ["--size", "70x50"], 2, ["not a multiple of 16", "use (48, 64)"]),
    ("bad dtype", "good", "tiny", ["--dtype", "int8"], 2, ["dtype 'int8' is not supported"]),
    ("no CUDA", "good", "tiny", ["--device", "cuda:7"], 2, ["cuda:7"]),
    ("NaN in outputs", "good", "nan_out", [], 3, ["NaN in the transformer output at denoising step 0",
                                                  "latent frame 0 (pixel frames 0)", "--dtype float32"]),
    ("NaN in latents", "good", "nan_vae", [], 3, ["NaN in the VAE encoding of the input video", "latent frame 0"]),
    ("unknown edit word", "good", "reference", ["--prompt", "watercolor"], 2, ["watercolor", "grayscale"]),
    ("missing model", "good", "/nonexistent/model", [], 2, ["no model at /nonexistent/model", "never downloads"]),
    ("prompt, no encoder", "good", "no_embeds", ["--prompt", "a cat"], 2, ["has no text encoder",
                                                                          "--prompt-embeds FILE"]),
    ("prompt vs embeds", "good", "tiny", ["--prompt", "a cat"], 2, ["saved embeddings encode", "not 'a cat'"]),
    ("bad embeds file", "good", "tiny", ["--prompt-embeds", "__text__"], 2, ["is not a safetensors file"]),
]


@pytest.mark.parametrize("case, video, model, extra, code, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(files, models, tmp_path, capsys, case, video, model, extra, code, fragments):
    extra = [str(files["text"]) if e == "__text__" else e for e in extra]
    got, out = edit(files, models, tmp_path, *extra, video=video, model=model)
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("lipcodec edit: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_output_in_a_missing_folder(files, models, tmp_path, capsys):
    code, _ = edit(files, models, tmp_path, out=str(tmp_path / "nope" / "out.mp4"))
    assert code == 2 and "folder " + str(tmp_path / "nope") + " does not exist; create it first" in capsys.readouterr().err


def test_output_equal_to_the_input(files, models, tmp_path, capsys):
    before = files["good"].read_bytes()
    code, _ = edit(files, models, tmp_path, out=str(files["good"]))
    assert code == 2 and "is the input video; refusing to overwrite it" in capsys.readouterr().err
    assert files["good"].read_bytes() == before


def test_output_of_an_unknown_type(files, models, tmp_path, capsys):
    code, _ = edit(files, models, tmp_path, out="out.gif")
    assert code == 2 and "unknown video type .gif; use .mp4 (H.264) or .mkv" in capsys.readouterr().err


def test_truncated_mkv_decodes_the_valid_frames_with_a_warning(files, models, tmp_path, capsys):
    """Documented choice (docs/video.md): a damaged stream keeps its valid frames and warns."""
    full = len(read_video(files["mkv"], fit=None, progress=False))
    code, out = edit(files, models, tmp_path, video="cut_mkv", out="cut.mp4")
    err = capsys.readouterr().err
    assert code == 0, err
    assert "lipcodec edit: warning:" in err and "truncated or corrupt, keeping the valid frames" in err
    edited = read_video(out, progress=False)
    assert 1 <= len(edited) < full


def test_odd_size_is_cropped_to_the_model_grid(files, models, tmp_path, capsys):
    code, out = edit(files, models, tmp_path, video="odd", out="odd.mp4")
    assert code == 0, capsys.readouterr().err
    assert read_video(out, fit=None, progress=False).frames.shape == (9, 32, 64, 3)  # 67x45 -> 64x32


def test_variable_frame_rate_is_resampled_by_timestamps(files, models, tmp_path, capsys):
    code, out = edit(files, models, tmp_path, "--fps", "25", video="vfr", out="vfr.mp4")
    assert code == 0, capsys.readouterr().err
    # 20 frames alternately 80 ms and 40 ms on screen = 1.2 s -> 30 frames at 25 fps -> 29 (4k+1)
    edited = read_video(out, fit=None, progress=False)
    assert len(edited) == 29 and edited.fps == pytest.approx(25.0)


def test_compare_and_bench_reject_bad_lists(files, models, tmp_path, capsys):
    base = ["--model", str(models["tiny"]), "-q"]
    assert main(["compare", str(files["good"]), "-o", str(tmp_path / "r"), "--planners", "intra,nope", *base]) == 2
    assert "unknown planner 'nope'; available:" in capsys.readouterr().err
    assert main(["compare", str(files["good"]), "-o", str(tmp_path / "r"), "--gops", "keyint=x", *base]) == 2
    assert "keyint=x" in capsys.readouterr().err
    assert main(["compare", str(files["good"]), "-o", str(tmp_path / "no" / "r"), *base]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    assert main(["compare", str(files["good"]), "-o", str(tmp_path / "r"), "--kept-multiple", "0", *base]) == 2
    assert "--kept-multiple 0 must be >= 1" in capsys.readouterr().err
    assert main(["bench", str(files["good"]), "--recoveries", "none,magic", *base]) == 2
    assert "unknown recovery 'magic'" in capsys.readouterr().err
    assert main(["bench", str(files["good"]), "--repeat", "0", *base]) == 2
    assert "--repeat 0 must be >= 1" in capsys.readouterr().err
    assert main(["bench", str(files["good"]), "--planners", "intra,lipar", "-p", "taget_kept=0.5", *base]) == 2
    assert "taget_kept: none of the planners (intra, lipar) takes it" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

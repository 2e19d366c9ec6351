"""`lipcodec edit --stream`: chunk-by-chunk editing with the embedded chunk-causal model."""

import json

import pytest

from lipcodec.cli import main
from lipcodec.video import read_video

SMALL = ["--size", "224x128", "--steps", "2", "-q"]  # 33 frames -> 9 latent frames = 3 chunks


def stream_edit(tmp_path, capsys, *extra):
    out = tmp_path / "out.mp4"
    code = main(["edit", "--stream", "-o", str(out), "--prompt", "grayscale", *SMALL, "--json", "-", *extra])
    captured = capsys.readouterr()
    return code, out, captured


def test_stream_edit_writes_every_frame_and_reports_per_chunk(tmp_path, capsys):
    code, out, captured = stream_edit(tmp_path, capsys, "-p", "target_kept=0.6", "--recovery", "clean", "--reference")
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["stream"] is True and len(report["chunk_seconds"]) == 3
    assert 0.3 < report["kept_ratio"] < 1.0  # chunk 0 in full, later chunks pruned
    assert report["fidelity"]["psnr"] > 20 and report["fidelity"]["speedup"] > 0
    video = read_video(out, progress=False)
    assert video.frames.shape == (33, 128, 224, 3)


def test_stream_edit_with_the_intra_plan_computes_everything(tmp_path, capsys):
    code, _, captured = stream_edit(tmp_path, capsys, "--planner", "intra")
    assert code == 0, captured.err
    assert json.loads(captured.out)["kept_ratio"] == 1.0


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--model", "some/folder"], ["--stream needs a chunk-causal model", "--model reference"]),
        (["--prompt", "watercolor"], ["unknown edit word 'watercolor'", "grayscale"]),
    ],
)
def test_stream_edit_bad_input_exits_2(tmp_path, capsys, extra, fragments):
    code, out, captured = stream_edit(tmp_path, capsys, *extra)
    assert code == 2 and not out.exists()
    last = captured.err.strip().splitlines()[-1]
    assert "Traceback" not in captured.err and all(f in last for f in fragments)

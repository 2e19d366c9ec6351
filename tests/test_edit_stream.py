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
    assert abs(report["kept_ratio"] - (1 + 2 * 0.6) / 3) < 0.03  # chunk 0 in full, chunks 1-2 at their own budget
    assert report["chunk_kept"][0] == 1.0 and all(abs(k - 0.6) < 0.05 for k in report["chunk_kept"][1:])
    assert sum(report["chunk_kept"]) / 3 == pytest.approx(report["kept_ratio"])  # equal chunks
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
        (["--device", "cuda:99"], ["device 'cuda:99'"]),  # no GPU here, or not 100 of them
        (["--dtype", "int8"], ["dtype 'int8' is not supported", "bfloat16"]),
        (["--gop", "keyint=8:bframes=2"], ["bframes=2: streaming is causal", "use bframes=0"]),  # was a traceback
        (["--gop", "keyint=x"], ["keyint='x' is not an integer"]),
    ],
)
def test_stream_edit_bad_input_exits_2(tmp_path, capsys, extra, fragments):
    code, out, captured = stream_edit(tmp_path, capsys, *extra)
    assert code == 2 and not out.exists()
    last = captured.err.strip().splitlines()[-1]
    assert "Traceback" not in captured.err and all(f in last for f in fragments)


def test_stream_edit_without_a_prompt_says_so(tmp_path, capsys):
    """As the full-sequence edit does (it said "unknown edit word None")."""
    assert main(["edit", "--stream", "-o", str(tmp_path / "out.mp4"), *SMALL]) == 2
    assert capsys.readouterr().err.strip().endswith("no prompt: pass prompt='...' (--prompt) describing the edited video")


def test_stream_edit_with_a_self_forcing_checkpoint(tmp_path, capsys):
    """A generator checkpoint in the original Wan layout + a local Wan VAE folder + embeddings."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import save_file
    from test_checkpoints import original_name

    from lipcodec.testing import TINY_WAN

    torch.manual_seed(0)
    generator = WanTransformer3DModel(**TINY_WAN)
    generator.save_config(tmp_path)  # config.json beside it: the tiny heads are not Wan's 128 wide
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{original_name(k)}": v for k, v in generator.state_dict().items()}}, ckpt)
    vae_dir = tmp_path / "vae"
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(vae_dir)
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 8, TINY_WAN["text_dim"])}, str(embeds))
    out = tmp_path / "out.mp4"
    common = ["edit", "--stream", "-o", str(out), "--model", str(ckpt), "--size", "64x64", "--steps", "2", "-q"]

    assert main([*common, "--json", "-", "--vae", str(vae_dir), "--prompt-embeds", str(embeds)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["chunk_seconds"]) == 3 and report["kept_ratio"] <= 1.0
    assert read_video(out, progress=False).frames.shape == (33, 64, 64, 3)

    import lipcodec

    streamed = lipcodec.edit(out, ckpt, vae=vae_dir, prompt_embeds=embeds, size=(64, 64), steps=2)  # the Python API
    assert type(streamed).__name__ == "StreamEdit" and streamed.frames.shape == (33, 64, 64, 3)

    out.unlink()
    assert main(common) == 2 and not out.exists()
    assert "pass --vae DIR (a local AutoencoderKLWan folder) and --prompt-embeds FILE" in capsys.readouterr().err

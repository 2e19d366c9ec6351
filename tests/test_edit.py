"""lipcodec.edit: the Python API on a real 17-frame clip with diffusers' tiny Wan configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lipcodec
from lipcodec import Plan, fidelity, fixtures
from lipcodec.editing import (
    EditError,
    NumericalError,
    estimate_memory,
    load_model,
    parse_bytes,
    save_prompt_embeds,
    save_tiny_model,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-wan")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """bikes.mp4 (real camera motion): 17 frames scaled/cropped to 64x64, as H.264."""
    frames = fidelity.load_clip(frames=17, size=(64, 64))
    return fixtures.h264(frames, tmp_path_factory.mktemp("clip") / "bikes17.mp4")


@pytest.fixture()
def embeds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)


def test_edit_from_a_folder_reports_plan_time_memory_and_fidelity(model_dir, clip):
    result = lipcodec.edit(clip, model_dir, strength=0.5, steps=10, planner="lipar", gop="keyint=2",
                           recovery="duplicate", reference=True, target_kept=0.6)
    frames, report = result  # unpacks like a tuple
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    assert report.frames == 17 and report.size == (64, 64) and report.latent_shape == (16, 5, 8, 8)
    assert report.frame_types == "IPIPI" and len(report.frame_kept) == 5
    assert report.frame_kept[0] == 1.0 and report.frame_kept[2] == 1.0  # keyframes are computed in full
    assert report.kept_tokens == round(report.kept_ratio * report.tokens) and report.tokens == 5 * 4 * 4
    assert report.kept_ratio < 1.0 and report.denoise_steps == 5 and report.model_calls == 10  # CFG: 2 per step
    assert report.seconds > 0 and report.peak_memory > 0 and report.memory_estimate > 0
    fid = report.fidelity
    assert math.isfinite(fid["psnr"]) and 0 < fid["ssim"] <= 1 and math.isfinite(fid["latent_psnr"])
    assert len(fid["frame_psnr"]) == 17 and fid["speedup"] > 0 and fid["warp_error"] >= 0
    assert result.reference_frames.shape == frames.shape
    frame_mse = 10 ** (-np.array(fid["frame_psnr"]) / 10)
    assert fid["psnr"] == pytest.approx(-10 * math.log10(frame_mse.mean()))  # the MSE pooled over frames
    assert fid["psnr"] < np.mean(fid["frame_psnr"])  # (not the mean of per-frame dB, which is larger)
    assert "kept" in report.table() and report.to_dict()["fidelity"]["psnr"] == fid["psnr"]


def test_intra_edit_equals_the_unpruned_run_bit_for_bit(clip, embeds):
    pipe = fidelity.tiny_wan_pipeline()  # a pipeline object, embeddings passed directly
    result = lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], strength=0.5,
                           steps=6, planner="intra", reference=True)
    assert result.report.kept_ratio == 1.0 and result.report.frame_types == "IIIII"
    assert result.report.fidelity["psnr"] == math.inf and result.report.fidelity["latent_psnr"] == math.inf
    assert np.array_equal(result.frames, result.reference_frames)
    assert not hasattr(pipe.transformer, "_lipcodec")  # the codec was removed afterwards


def test_edit_takes_a_ready_plan_and_checks_its_grid(clip, embeds):
    pipe = fidelity.tiny_wan_pipeline()
    plan = Plan.identity((5, 4, 4))
    result = lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], strength=0.5, steps=4, planner=plan)
    assert result.report.kept_ratio == 1.0 and result.report.gop == "from plan"
    with pytest.raises(EditError, match=r"token grid \(3, 4, 4\) does not fit"):
        lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], strength=0.5, steps=4, planner=Plan.identity((3, 4, 4)))


def test_model_resolution_table(tmp_path, model_dir):
    embedded = load_model("reference")
    assert embedded.source == "reference" and embedded.guidance_scale == lipcodec.models.GUIDANCE == 2.0
    assert type(embedded.pipe.transformer).__name__ == "WanTransformer3DModel"
    ckpt = tmp_path / "self_forcing.pt"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(EditError, match="Self-Forcing/CausVid checkpoint, a chunk-causal model: edit with it by streaming"):
        load_model(ckpt)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    with pytest.raises(EditError, match="single model's folder"):
        load_model(model_dir / "transformer")
    loaded = load_model(model_dir)
    assert type(loaded.pipe).__name__ == "WanVideoToVideoPipeline" and loaded.prompt_embeds.shape == (1, 16, 32)
    assert loaded.embeds_prompt == "random tiny-model embedding"
    # a text-to-video Wan pipeline becomes a video-to-video one sharing its modules
    from diffusers import WanPipeline

    v2v = fidelity.tiny_wan_pipeline()
    t2v = WanPipeline(tokenizer=None, text_encoder=None, transformer=v2v.transformer, vae=v2v.vae,
                      scheduler=v2v.scheduler)
    converted = load_model(t2v).pipe
    assert type(converted).__name__ == "WanVideoToVideoPipeline" and converted.transformer is v2v.transformer


def test_prompt_errors(clip, tmp_path, embeds):
    pipe = fidelity.tiny_wan_pipeline()
    with pytest.raises(EditError, match="no text encoder.*--prompt-embeds"):
        lipcodec.edit(clip, pipe, prompt="a watercolor")
    with pytest.raises(EditError, match=r"shape \(1, 16, 8\); the model takes \(1, L, 32\)"):
        lipcodec.edit(clip, pipe, prompt_embeds=torch.zeros(1, 16, 8))
    path = save_prompt_embeds(tmp_path / "e.safetensors", embeds[0], embeds[1], prompt="a cat")
    result = lipcodec.edit(clip, pipe, prompt_embeds=path, strength=0.25, steps=4, planner="intra")
    assert result.frames.shape == (17, 64, 64, 3)


def test_nan_in_a_model_output_names_step_and_frame(clip, embeds):
    pipe = fidelity.tiny_wan_pipeline()
    calls = []

    def poison(module, args, output):  # registered first, so it runs before lipcodec's check
        calls.append(1)
        if len(calls) == 3:  # step 1, cond call
            output[0][:, :, 2] = float("nan")
        return output

    handle = pipe.transformer.register_forward_hook(poison)
    try:
        with pytest.raises(NumericalError, match=r"NaN in the transformer output at denoising step 1 \(model call 3\), "
                                                 r"first at latent frame 2 \(pixel frames 5-8\)"):
            lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], strength=0.5, steps=10)
    finally:
        handle.remove()
    assert not hasattr(pipe.transformer, "_lipcodec") and "encode" not in pipe.vae.__dict__  # hooks undone


def test_nan_in_the_encoded_latents(clip, embeds):
    pipe = fidelity.tiny_wan_pipeline()
    with torch.no_grad():
        pipe.vae.quant_conv.bias[3] = float("inf")
    with pytest.raises(NumericalError, match=r"in the VAE encoding of the input video, first at latent frame 0 .*channel 3"):
        lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], strength=0.5, steps=4)


def test_memory_estimate_and_refusal(clip, embeds):
    pipe = fidelity.tiny_wan_pipeline()
    small = estimate_memory(17, 64, 64, pipe)
    big = estimate_memory(81, 480, 832, pipe)
    assert big.total > 50 * small.total and set(small.parts) >= {"frames", "vae", "latents", "weights", "attention"}
    # the full-size Wan 1.3B defaults: the CPU attention matrix alone is 12 heads x 32760^2 x 4 bytes x 2
    assert estimate_memory(81, 480, 832).parts["attention"] == 12 * 32760**2 * 8
    assert "attention" not in estimate_memory(81, 480, 832, device="cuda").parts
    with pytest.raises(EditError, match=r"needs about .* but only 1000 B is available: try --size 16x16 or --max-frames"):
        lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], memory_limit=1000)
    assert parse_bytes("2G") == 2 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("100") == 100
    with pytest.raises(EditError, match="must look like"):
        parse_bytes("lots")


def test_settings_are_checked_before_any_work(clip, embeds):
    pipe = fidelity.tiny_wan_pipeline()
    for kwargs, message in (
        ({"strength": 1.5}, "out of range: use 0 < strength <= 1"),
        ({"steps": 0}, "must be an int >= 1"),
        ({"strength": 0.05, "steps": 10}, "runs no denoising step"),
        ({"planner": "nope"}, "unknown planner 'nope'; available: .*intra.*lipar"),
        ({"tau1": -1.0}, "tau1=-1.0 is out of range"),
        ({"recovery": "magic"}, "unknown recovery 'magic'; available: none, proportional, duplicate, clean"),
        ({"gop": "keyint=banana"}, "gop 'keyint=banana'"),
    ):
        with pytest.raises(EditError, match=message):
            lipcodec.edit(clip, pipe, prompt_embeds=embeds[0], **kwargs)


def test_edit_example_runs_as_written(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "edited.mp4"
    run = subprocess.run([sys.executable, "examples/edit_video.py", "--out", str(out)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("frames (17, 64, 64, 3), frame types I") and "kept" in lines[0]
    assert lines[1].startswith("fidelity vs unpruned: PSNR") and lines[2].startswith("by hand: 17 frames, 12 model calls")
    assert out.is_file()


def test_kept_multiple_pads_plans_in_plan_apply_and_edit(model_dir, clip):
    from lipcodec.video import pixel_proxy_latents, read_video

    latents = pixel_proxy_latents(read_video(clip, fit="wan", progress=False).frames)[None]
    plain = lipcodec.plan(latents, "lipar", target_kept=0.6)
    padded = lipcodec.plan(latents, "lipar", target_kept=0.6, kept_multiple=16)
    assert plain.num_kept % 16 and padded.num_kept == -(-plain.num_kept // 16) * 16
    assert torch.equal(padded.source, plain.padded(16).source)
    with pytest.raises(ValueError, match="kept_multiple must be an int >= 1"):
        lipcodec.plan(latents, "lipar", kept_multiple=0)
    result = lipcodec.edit(clip, model_dir, strength=0.5, steps=2, planner="lipar", target_kept=0.6, kept_multiple=16)
    assert result.report.kept_tokens % 16 == 0 and result.plan.meta["kept_multiple"] == 16
    given = lipcodec.edit(clip, model_dir, strength=0.5, steps=2, planner=plain, kept_multiple=16)  # a Plan too
    assert given.report.kept_tokens == padded.num_kept


@pytest.mark.needs_cxx
def test_kept_multiple_lets_plans_share_one_compiled_graph(model_dir, clip):
    """With static-shape compilation (``compile=True``), every new kept count compiles the
    blocks again; plans padded into one bucket reuse the graph."""
    from torch._dynamo.utils import counters

    from lipcodec.editing import prepare
    from lipcodec.testing import same_place_plan

    session = prepare(clip, model_dir, strength=0.5, steps=2, compile=True)
    grid = lipcodec.Grid(5, 4, 4)
    plans = [same_place_plan(grid, reuse) for reuse in (0.3, 0.35, 0.45)]
    kept = [p.num_kept for p in plans]
    assert len(set(kept)) == 3 and len({-(-k // 16) for k in kept[:2]}) == 1  # two counts, one bucket
    torch._dynamo.reset()
    counters.clear()

    def graphs_after(plan, **kwargs) -> int:
        session.run(plan, **kwargs)
        return counters["stats"]["unique_graphs"]

    first = graphs_after(plans[0], kept_multiple=16)
    assert first >= 1
    assert graphs_after(plans[1], kept_multiple=16) == first  # same bucket: no new graph
    assert graphs_after(plans[2]) > first  # an unpadded new count compiles again

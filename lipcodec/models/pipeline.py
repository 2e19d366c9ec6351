"""A diffusers-style SDEdit pipeline over the reference model, so :func:`lipcodec.edit`,
:func:`lipcodec.apply` and the fidelity tools run on it as on ``WanVideoToVideoPipeline``.

Sampler: flow-matching Euler (diffusers' ``FlowMatchEulerDiscreteScheduler``, shift 1).
``num_inference_steps`` steps span sigma 1 -> 0; SDEdit keeps the last
``int(steps * strength)`` of them, starting from x = (1 - s) z + s * noise (the scheduler's
``scale_noise``, which ``lipcodec.apply`` wraps to capture the clean latents for planning).
The noise comes from ``generator`` (same seed = same noise, so pruned and unpruned runs
compare). Classifier-free guidance (``guidance_scale > 1``, default ``GUIDANCE`` = 2) uses
``negative_prompt`` or the unconditional embedding (10% of the training samples were
unconditional); 1 = off halves the cost and weakens the edits (negative then fails on some
clips: docs/model-card.md).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from . import GUIDANCE


class ReferenceVAE:
    """The autoencoder with the parts of ``AutoencoderKLWan``'s interface lipcodec uses:
    ``encode(x).latent_dist.mean`` / ``decode(z, return_dict=False)[0]`` on *raw* latents
    in [-1, 1] pixel space, and ``config.latents_mean/latents_std`` for the normalisation."""

    def __init__(self, ae):
        self.ae = ae
        self.config = types.SimpleNamespace(
            latents_mean=ae.latents_mean.tolist(), latents_std=ae.latents_std.tolist(), z_dim=16,
            scale_factor_temporal=4, scale_factor_spatial=8, base_dim=64,
        )

    @property
    def dtype(self):
        return next(self.ae.parameters()).dtype

    @property
    def device(self):
        return next(self.ae.parameters()).device

    def encode(self, video: torch.Tensor, return_dict: bool = True):
        z = self.ae.encode(video.to(self.device, self.dtype))
        dist = types.SimpleNamespace(mean=z, mode=lambda: z, sample=lambda generator=None: z)
        return types.SimpleNamespace(latent_dist=dist) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        x = self.ae.decode(z.to(self.device, self.dtype))
        return types.SimpleNamespace(sample=x) if return_dict else (x,)


class ReferencePipeline:
    """``pipe(video=frames, prompt="grayscale", strength=0.5, num_inference_steps=10, ...)``.

    ``text_encoder``/``tokenizer`` stand for the word table, so a text prompt is accepted
    (one word of ``pipe.vocabulary``); ``prompt_embeds`` (1, L, 32) work too.
    """

    vae_scale_factor_temporal = 4
    vae_scale_factor_spatial = 8

    def __init__(self, model):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.video_processor import VideoProcessor

        self.model = model
        self.transformer = model.transformer
        self.vae = ReferenceVAE(model.ae)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        self.video_processor = VideoProcessor(vae_scale_factor=8)
        self.text_encoder = model.embed  # a word -> embedding callable
        self.tokenizer = model.vocabulary
        self.vocabulary = model.vocabulary
        self._progress_bar_config = {}

    def to(self, device):
        self.model.to(device)
        return self

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = kwargs

    def _embeds(self, prompt, embeds):
        if embeds is not None:
            return embeds.to(self.transformer.device, self.transformer.dtype)
        return self.model.embed("" if prompt is None else prompt).to(self.transformer.device)

    @torch.no_grad()
    def __call__(self, video=None, prompt=None, negative_prompt=None, height=None, width=None,
                 num_inference_steps: int = 10, strength: float = 0.5, guidance_scale: float = GUIDANCE,
                 generator: torch.Generator | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                 output_type: str = "np", callback_on_step_end=None, **ignored):
        from . import to_video_tensor

        if prompt is None and prompt_embeds is None:
            raise ValueError(f"no prompt: pass one word of {', '.join(self.vocabulary)}")
        model, tr = self.model, self.transformer
        cond = self._embeds(prompt, prompt_embeds)
        uncond = self._embeds(negative_prompt, negative_prompt_embeds) if guidance_scale > 1 else None
        x = to_video_tensor(video, model.device, model.ae_dtype)
        z = model.ae.normalize(self.vae.encode(x).latent_dist.mean.float())  # (1, 16, F, h, w)
        self.scheduler.set_timesteps(num_inference_steps, device=z.device)
        n = min(int(num_inference_steps * strength), num_inference_steps)
        start = num_inference_steps - n
        timesteps = self.scheduler.timesteps[start:]
        self.scheduler.set_begin_index(start)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(z.shape, generator=generator, device=gen_device, dtype=torch.float32).to(z.device)
        latents = self.scheduler.scale_noise(z, timesteps[:1], noise) if n > 0 else z
        for i, t in enumerate(timesteps):
            inp = latents.to(tr.dtype)
            tt = t.expand(latents.shape[0]).to(latents.device)
            v = tr(inp, tt, cond, return_dict=False)[0].float()
            if uncond is not None:
                v_u = tr(inp, tt, uncond, return_dict=False)[0].float()
                v = v_u + guidance_scale * (v - v_u)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        if output_type == "latent":
            return types.SimpleNamespace(frames=latents)
        frames = self.vae.decode(model.ae.denormalize(latents), return_dict=False)[0]
        out = self.video_processor.postprocess_video(frames.float(), output_type=output_type)
        return types.SimpleNamespace(frames=out if output_type != "np" else np.asarray(out))

"""lipcodec's embedded reference model: a small, honestly trained video DiT + autoencoder.

No pretrained video model can be downloaded here, so lipcodec ships its own (about
13 MB of float16 weights, ``lipcodec/models/weights/reference.safetensors``; model card:
docs/model-card.md):

- ``.ae`` / ``.vae``: a causal conv autoencoder with Wan 2.1's latent geometry (4x time,
  8x space, 16 channels; latent frame 0 = pixel frame 0), see :mod:`.autoencoder`;
- ``.transformer``: a small diffusers ``WanTransformer3DModel`` (patch (1, 2, 2)) trained
  with flow matching to make SDEdit-style edits, full-sequence and chunk-causal;
- ``.vocabulary``: the words it was trained on (``identity``, ``grayscale``, ``sepia``,
  ``negative``, ``warm``, ``cool``, ``posterize``); ``.embed(word)`` gives the
  ``encoder_hidden_states`` (1, 4, 32) from a learned table stored with the weights.

>>> from lipcodec import models, fixtures                                  # doctest: +SKIP
>>> from lipcodec.video import read_video
>>> model = models.reference()                                             # CPU, float32
>>> frames = read_video(fixtures.bundled_clip(), size=(128, 224)).frames
>>> out = model.edit(frames, "grayscale", strength=0.5, steps=10, seed=0)  # (T, H, W, 3) uint8, guidance 2
>>> pipe = model.pipeline()       # what lipcodec.edit / lipcodec.apply take, like a diffusers pipeline
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .autoencoder import VideoAutoencoder
from .edits import VOCABULARY

WEIGHTS = Path(__file__).parent / "weights" / "reference.safetensors"
GUIDANCE = 2.0  # default classifier-free guidance of full-sequence edits (two passes per step; model card)
TEXT_TOKENS = 4
CONFIG = {
    "transformer": dict(
        patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=48, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=768, num_layers=5, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64,
    ),
    "autoencoder": dict(enc_widths=[24, 48, 96, 128], dec_widths=[64, 96, 160], z_dim=16),
    "vocabulary": list(VOCABULARY),
    "text_tokens": TEXT_TOKENS,
}


class Reference(nn.Module):
    """Autoencoder + denoiser + word embeddings. Build with :func:`reference` (trained) or
    :meth:`build` (random, for training)."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.config = json.loads(json.dumps(config))
        self.ae = VideoAutoencoder(**config["autoencoder"])
        self.transformer = WanTransformer3DModel(**config["transformer"])
        vocab, tokens, dim = len(config["vocabulary"]), config["text_tokens"], config["transformer"]["text_dim"]
        self.embeddings = nn.Parameter(torch.randn(vocab + 1, tokens, dim))  # last row: unconditional ("")
        self.vocabulary = tuple(config["vocabulary"])

    @classmethod
    def build(cls, config: dict | None = None, seed: int = 0) -> Reference:
        torch.manual_seed(seed)
        return cls(config or CONFIG)

    # -- words -----------------------------------------------------------------------------
    def index(self, word: str) -> int:
        """Row of ``word`` in the embedding table ("" = unconditional); unknown words raise."""
        key = str(word).strip().lower()
        if key == "":
            return len(self.vocabulary)
        if key not in self.vocabulary:
            raise ValueError(
                f"unknown edit word {word!r}: the reference model knows {', '.join(self.vocabulary)}"
            )
        return self.vocabulary.index(key)

    def embed(self, word: str) -> torch.Tensor:
        """encoder_hidden_states (1, 4, 32) for ``word`` (one of :attr:`vocabulary`, or "")."""
        e = self.embeddings[self.index(word)][None]  # (1, L, D)
        return e.detach().to(self.transformer.dtype)

    # -- pixels <-> normalised latents ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def vae(self):
        from .pipeline import ReferenceVAE

        return ReferenceVAE(self.ae)

    def encode(self, frames) -> torch.Tensor:
        """(T, H, W, 3) uint8 frames (T = 4k+1, sides % 8) -> normalised latents (1, 16, k+1, H/8, W/8)."""
        x = to_video_tensor(frames, self.device, self.ae_dtype)
        with torch.no_grad():
            return self.ae.normalize(self.ae.encode(x).float())

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (1, 16, F, h, w) -> (4F-3, 8h, 8w, 3) uint8 frames."""
        with torch.no_grad():
            x = self.ae.decode(self.ae.denormalize(latents.to(self.device, self.ae_dtype)))
        return to_uint8_frames(x[0])

    @property
    def ae_dtype(self) -> torch.dtype:
        return next(self.ae.parameters()).dtype

    # -- editing -------------------------------------------------------------------------------
    def pipeline(self):
        """A diffusers-style video-to-video pipeline over this model (see :mod:`.pipeline`)."""
        from .pipeline import ReferencePipeline

        return ReferencePipeline(self)

    def edit(self, frames, word: str, *, strength: float = 0.5, steps: int = 10, seed: int = 0,
             guidance_scale: float = GUIDANCE) -> np.ndarray:
        """SDEdit ``frames`` (T, H, W, 3) uint8 with ``word``; returns uint8 frames
        (``guidance_scale`` 1 = no classifier-free guidance: half the cost, weaker edits)."""
        latents = self.pipeline()(video=frames, prompt=word, num_inference_steps=steps, strength=strength,
                                  guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                                  output_type="latent").frames
        return self.decode(latents)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path, dtype=torch.float16, metadata: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        for k in ("ae.latents_mean", "ae.latents_std"):
            state[k] = state[k].float()
        meta = {"config": json.dumps(self.config), **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32) -> Reference:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference weights at {path}: reinstall lipcodec (they ship in the package)")
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = cls(config)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        model.eval().requires_grad_(False)
        model.to(device)
        if dtype != model.transformer.dtype:  # diffusers warns on any dtype .to(), even a no-op
            model.transformer.to(dtype)
        return model


def to_video_tensor(frames, device, dtype=torch.float32) -> torch.Tensor:
    """(T, H, W, 3) uint8 (array, tensor or list of PIL images) -> (1, 3, T, H, W) in [-1, 1]."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames])
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
    return (x.to(device).permute(3, 0, 1, 2)[None].to(dtype) / 127.5 - 1.0)


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def reference(device="cpu", dtype=torch.float32) -> Reference:
    """The shipped, trained reference model on ``device`` (transformer in ``dtype``; the
    autoencoder stays float32)."""
    return Reference.load(WEIGHTS, device=device, dtype=dtype)


__all__ = ["CONFIG", "Reference", "VOCABULARY", "WEIGHTS", "reference", "to_uint8_frames", "to_video_tensor"]

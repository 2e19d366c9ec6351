"""A small causal video autoencoder with Wan 2.1's latent geometry.

4x in time, 8x in space, 16 channels, causal: latent frame 0 codes pixel frame 0 alone,
latent frame k >= 1 codes pixel frames 4k-3 .. 4k (the same rule as Wan's VAE), so one
(1, 2, 2) DiT patch covers 16x16 pixels and 4 frames.

Design (TAEHV-like, plain convolutions): frame 0 is repeated 3 times in front, every group
of 4 frames is stacked along channels (12 channels), and a 2-D conv net maps each group to
16 latent channels at 1/8 of the size. ``TimeMix`` layers add the previous latent frame's
features (never a later one), so the code stays causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

TEMPORAL, SPATIAL, Z_DIM = 4, 8, 16


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x):  # (N, C, H, W)
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class TimeMix(nn.Module):
    """x_f + conv([x_f, x_{f-1}]) over latent frames f (x_{-1} = 0): causal in time."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * c, c, 3, padding=1)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x, frames: int):  # (B*F, C, H, W)
        x5 = rearrange(x, "(b f) c h w -> b f c h w", f=frames)
        prev = F.pad(x5[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0))  # (B, F, C, H, W), frame f holds x_{f-1}
        both = rearrange(torch.cat([x5, prev], 2), "b f c h w -> (b f) c h w")
        return x + self.conv(F.silu(both))


class Encoder(nn.Module):
    def __init__(self, widths=(24, 48, 96, 128), z_dim: int = Z_DIM):
        super().__init__()
        c0, c1, c2, c3 = widths
        self.stem = nn.Conv2d(3 * TEMPORAL, c0, 3, padding=1)
        self.down = nn.ModuleList([nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in ((c0, c1), (c1, c2), (c2, c3))])
        self.res = nn.ModuleList([ResBlock(c) for c in (c2, c3)])
        self.mix = TimeMix(c3)
        self.res_out = ResBlock(c3)
        self.out = nn.Conv2d(c3, z_dim, 3, padding=1)

    def forward(self, x, frames: int):  # (B*F, 12, H, W) -> (B*F, z, H/8, W/8)
        x = self.down[0](F.silu(self.stem(x)))  # 1/2
        x = self.res[0](self.down[1](F.silu(x)))  # 1/4
        x = self.res[1](self.down[2](F.silu(x)))  # 1/8
        x = self.res_out(self.mix(x, frames))
        return self.out(F.silu(x))


class Decoder(nn.Module):
    """Latents -> 4 frames per latent frame; the last stage runs at 1/2 size and a pixel
    shuffle makes full resolution (no full-resolution convolution: cheap on a CPU)."""

    def __init__(self, widths=(48, 96, 128), z_dim: int = Z_DIM):
        super().__init__()
        c1, c2, c3 = widths
        self.inp = nn.Conv2d(z_dim, c3, 3, padding=1)
        self.res_in = nn.ModuleList([ResBlock(c3), ResBlock(c3)])
        self.mix_in = TimeMix(c3)
        self.up = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1) for a, b in ((c3, c2), (c2, c1))])
        self.res = nn.ModuleList([ResBlock(c) for c in (c2, c1)])
        self.mix = TimeMix(c2)
        self.out = nn.Conv2d(c1, 3 * TEMPORAL * 4, 3, padding=1)

    def forward(self, z, frames: int):  # (B*F, z, h, w) -> (B*F, 12, 8h, 8w)
        x = self.inp(z)
        x = self.res_in[1](self.mix_in(self.res_in[0](x), frames))
        x = self.res[0](self.up[0](F.interpolate(F.silu(x), scale_factor=2.0, mode="nearest")))
        x = self.mix(x, frames)
        x = self.res[1](self.up[1](F.interpolate(F.silu(x), scale_factor=2.0, mode="nearest")))
        return F.pixel_shuffle(self.out(F.silu(x)), 2)


class VideoAutoencoder(nn.Module):
    """Raw (un-normalised) latents; :class:`lipcodec.models.ReferenceVAE` adds normalisation."""

    def __init__(self, enc_widths=(24, 48, 96, 128), dec_widths=(64, 96, 160), z_dim: int = Z_DIM):
        super().__init__()
        self.encoder = Encoder(tuple(enc_widths), z_dim)
        self.decoder = Decoder(tuple(dec_widths), z_dim)
        for m in self.modules():  # He init keeps the signal alive through the plain conv stack
            if isinstance(m, nn.Conv2d) and m.weight.abs().sum() > 0:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.register_buffer("latents_mean", torch.zeros(z_dim))
        self.register_buffer("latents_std", torch.ones(z_dim))

    @staticmethod
    def check(t: int, h: int, w: int) -> None:
        if (t - 1) % TEMPORAL or h % SPATIAL or w % SPATIAL:
            raise ValueError(
                f"video of {t} frames {w}x{h}: the autoencoder needs 4k+1 frames and sides that are multiples of 8 "
                "(read it with lipcodec.video.read_video(path, fit='wan'))"
            )

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 4k+1, H, W) in [-1, 1] -> raw latents (B, 16, k+1, H/8, W/8)."""
        b, _, t, h, w = video.shape
        self.check(t, h, w)
        x = torch.cat([video[:, :, :1].expand(-1, -1, TEMPORAL - 1, -1, -1), video], 2)  # (B, 3, 4F, H, W)
        frames = x.shape[2] // TEMPORAL
        x = rearrange(x, "b c (f s) h w -> (b f) (s c) h w", s=TEMPORAL)  # (B*F, 12, H, W)
        z = self.encoder(x, frames)
        return rearrange(z, "(b f) c h w -> b c f h w", b=b)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, 16, F, h, w) -> (B, 3, 4F-3, 8h, 8w), roughly in [-1, 1]."""
        b, _, frames = z.shape[:3]
        x = self.decoder(rearrange(z, "b c f h w -> (b f) c h w"), frames)
        x = rearrange(x, "(b f) (s c) h w -> b c (f s) h w", b=b, s=TEMPORAL)
        return x[:, :, TEMPORAL - 1 :]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean.view(1, -1, 1, 1, 1).to(z)) / self.latents_std.view(1, -1, 1, 1, 1).to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std.view(1, -1, 1, 1, 1).to(z) + self.latents_mean.view(1, -1, 1, 1, 1).to(z)

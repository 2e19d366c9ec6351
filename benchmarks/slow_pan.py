"""How far token-grid references get on camera pans that are not whole tokens per frame.

    python benchmarks/slow_pan.py

A window pans across a real photo (scikit-image's astronaut, upscaled) at a range of
speeds; latents are the pixel proxy (Wan geometry: one token = 16x16 px, one latent frame
= 4 pixel frames). For each speed the table gives the share of tokens after frame 0 that
each planner reuses at its default thresholds.
"""

import lipcodec
from lipcodec import fixtures
from lipcodec.video import pixel_proxy_latents

SPEEDS = [0, 1, 2, 3, 4, 6, 8, 12, 16]  # pixels per pixel frame; 4 px = 1 token per latent frame


def main():
    print(f"{'px/frame':>8} {'tokens/latent frame':>20} " + " ".join(f"{p:>8}" for p in ("lipar", "motion")))
    for speed in SPEEDS:
        frames = fixtures.pan(frames=33, size=(240, 416), step=(0, speed))
        latents = pixel_proxy_latents(frames)[None]
        reused = []
        for planner in ("lipar", "motion"):
            plan = lipcodec.plan(latents, planner)
            reused.append(1 - plan.computed.reshape(plan.grid.frames, -1)[1:].float().mean().item())
        print(f"{speed:>8} {speed * 4 / 16:>20.2f} " + " ".join(f"{r:>8.1%}" for r in reused))


if __name__ == "__main__":
    main()

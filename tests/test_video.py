"""lipcodec.video: reading rules, motion vectors, atomic writes, bad input, the pixel proxy."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from lipcodec import fixtures
from lipcodec.video import (
    VideoError,
    VideoWarning,
    pixel_proxy_latents,
    pool_motion_vectors,
    read_video,
    resample_indices,
    transcode_h264,
    write_video,
)


@pytest.fixture(scope="module")
def pan_file(tmp_path_factory):
    """17 frames panning (dy, dx) = (2, 3) px per frame, libx264, no B-frames, refs=1."""
    frames = fixtures.pan(17, (128, 192), (2, 3))
    return fixtures.h264(frames, tmp_path_factory.mktemp("pan") / "pan.mp4"), frames


def _write_lossless(path, frames, fps=16):
    return write_video(path, frames, fps, codec="ffv1")


# -- reading and fit rules ---------------------------------------------------------------
def test_bundled_clip_reads_to_wan_grid():
    video = read_video(fixtures.bundled_clip(), progress=False)
    assert video.frames.shape == (33, 240, 416, 3) and video.frames.dtype == np.uint8
    assert video.fps == 16.0 and video.source_size == (240, 416)
    assert video.picture_types[0] == "I" and set(video.picture_types[1:]) == {"P"}
    assert video.path == fixtures.bundled_clip()


def test_fit_wan_crops_to_16_and_4k_plus_1(tmp_path):
    frames = fixtures.lavfi(size=(90, 140), frames=11)  # 11 frames, 140x90
    path = _write_lossless(tmp_path / "odd.mkv", frames)
    video = read_video(path, progress=False)
    assert video.frames.shape == (9, 80, 128, 3)  # 4k+1 <= 11, multiples of 16 inside 90x140
    top, left = (90 - 80) // 2, (140 - 128) // 2
    np.testing.assert_array_equal(video.frames[0], frames[0, top : top + 80, left : left + 128])
    raw = read_video(path, fit=None, progress=False)
    assert raw.frames.shape == (11, 90, 140, 3)
    np.testing.assert_array_equal(raw.frames, frames)  # FFV1 is lossless


def test_size_resizes_preserving_aspect_then_center_crops(tmp_path):
    frames = np.zeros((5, 64, 128, 3), np.uint8)
    frames[:, :, :64] = 255  # left half white
    path = _write_lossless(tmp_path / "half.mkv", frames)
    video = read_video(path, size=(64, 64), progress=False)  # scale 1 covers 64x64: crop the center
    assert video.frames.shape == (5, 64, 64, 3)
    assert video.frames[0, :, :28].mean() > 250 and video.frames[0, :, 36:].mean() < 5
    up = read_video(path, size=(128, 128), progress=False)  # scale 2 -> 128x256, center crop
    assert up.frames.shape == (5, 128, 128, 3)
    assert up.frames[0, :, :56].mean() > 250 and up.frames[0, :, 72:].mean() < 5


def test_size_must_be_multiple_of_16_for_wan(tmp_path, pan_file):
    with pytest.raises(VideoError, match=r"multiple of 16.*use \(96, 160\)"):
        read_video(pan_file[0], size=(100, 170), progress=False)
    assert read_video(pan_file[0], size=(100, 170), fit=None, progress=False).frames.shape[1:3] == (100, 170)


def test_max_frames_and_fps_resampling(tmp_path):
    frames = fixtures.lavfi(frames=32, rate=16)
    path = _write_lossless(tmp_path / "a.mkv", frames)
    assert len(read_video(path, max_frames=10, progress=False)) == 9  # 10 -> 4k+1
    assert len(read_video(path, max_frames=10, fit=None, progress=False)) == 10
    half = read_video(path, fps=8, fit=None, progress=False)
    assert half.fps == 8 and len(half) == 16
    np.testing.assert_array_equal(half.frames, frames[::2])
    double = read_video(path, fps=32, fit=None, progress=False)
    assert len(double) == 64
    np.testing.assert_array_equal(double.frames[::2], frames)  # every frame shown twice
    np.testing.assert_array_equal(double.frames[1::2], frames)


def test_resample_indices_handles_variable_frame_rate():
    times = np.array([0.0, 0.1, 0.15, 0.5, 0.55])  # bursts and a gap
    assert resample_indices(times, 10, 0.05).tolist() == [0, 1, 2, 2, 2, 3]  # the frame on screen
    assert resample_indices(np.array([0, 0.04, 0.08, 0.12]), 25, 0.04).tolist() == [0, 1, 2, 3]


def test_variable_frame_rate_file_uses_timestamps(tmp_path):
    path = tmp_path / "vfr.mkv"
    frames = fixtures.lavfi(frames=6)
    pts = [0, 1, 2, 6, 7, 8]  # 1/10 s ticks: a 0.4 s hold after frame 2
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 192, 128, "bgr0"
        for frame, t in zip(frames, pts):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = t, Fraction(1, 10)
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = read_video(path, fps=10, fit=None, progress=False)
    picks = [int(np.argmin([np.abs(f.astype(int) - g).mean() for g in frames])) for f in video.frames]
    assert picks == [0, 1, 2, 2, 2, 2, 3, 4, 5]


# -- motion vectors ----------------------------------------------------------------------
def test_motion_vectors_match_a_known_pan(pan_file):
    path, _ = pan_file
    video = read_video(path, fit=None, motion=True, progress=False)
    field = video.motion
    assert field.block == 16 and field.frame_size == (128, 192)
    assert field.vectors.shape == (17, 8, 12, 2) and field.vectors.dtype == np.float32
    assert field.picture_types == video.picture_types == "I" + "P" * 16
    assert np.isnan(field.vectors[0]).all()  # frame 0: no previous frame
    error = np.abs(field.vectors[1:] - np.array([2.0, 3.0], np.float32)).max(-1)
    assert np.nanmean(error <= 1.0) > 0.9


def test_motion_vectors_scale_with_resize(tmp_path, pan_file):
    path, _ = pan_file
    video = read_video(path, size=(256, 384), fit="wan", motion=True, progress=False)
    field = video.motion
    assert field.frame_size == (256, 384) and field.vectors.shape == (17, 16, 24, 2)
    error = np.abs(field.vectors[1:] - np.array([4.0, 6.0], np.float32)).max(-1)
    assert np.nanmean(error <= 2.0) > 0.9


def test_motion_vectors_follow_resampling(pan_file):
    path, _ = pan_file
    field = read_video(path, fps=8, fit=None, motion=True, progress=False).motion  # every 2nd frame
    assert field.vectors.shape[0] == 8
    error = np.abs(field.vectors[1:] - np.array([4.0, 6.0], np.float32)).max(-1)
    assert np.nanmean(error <= 2.0) > 0.9


def test_picture_types_with_b_frames(tmp_path):
    path = fixtures.h264(fixtures.pan(17, (64, 96), (1, 2)), tmp_path / "b.mp4", bframes=2)
    video = read_video(path, fit=None, motion=True, progress=False)
    assert video.picture_types[0] == "I" and "B" in video.picture_types
    assert set(video.picture_types) <= set("IPB")


def test_pool_motion_vectors_area_weighted():
    dtype = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("dst_x", "<i2"), ("dst_y", "<i2"),
             ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]  # fmt: skip
    mvs = np.array(
        [
            (-1, 16, 16, 8, 8, 4, 8, 4),  # block (0, 0): dx 1, dy 2
            (-1, 8, 16, 20, 8, 8, 0, 4),  # left half of block (0, 1): dx 2
            (-1, 8, 16, 28, 8, 16, 0, 4),  # right half of block (0, 1): dx 4
            (1, 16, 16, 8, 24, 40, 40, 4),  # future reference: ignored
        ],
        dtype=dtype,
    )
    out = pool_motion_vectors(mvs, size=(32, 48))
    assert out.shape == (2, 3, 2)
    np.testing.assert_allclose(out[0, 0], [2.0, 1.0])
    np.testing.assert_allclose(out[0, 1], [0.0, 3.0])
    assert np.isnan(out[1]).all() and np.isnan(out[0, 2]).all()
    scaled = pool_motion_vectors(mvs, scale=(2.0, 2.0), offset=(0, 16), size=(64, 64))  # 2x up, crop 16 left
    # x 0..16 scales to 0..32, minus the crop: -16..16 -> output block column 0; y 0..16 -> rows 0 and 1
    np.testing.assert_allclose(scaled[:2, 0], [[4.0, 2.0], [4.0, 2.0]])
    np.testing.assert_allclose(scaled[0, 1:3], [[0.0, 4.0], [0.0, 8.0]])


def test_no_motion_vectors_is_a_clear_error(tmp_path):
    path = _write_lossless(tmp_path / "lossless.mkv", fixtures.lavfi(frames=5))
    with pytest.raises(VideoError, match="exported no motion vectors.*transcode_h264"):
        read_video(path, motion=True, progress=False)
    out = transcode_h264(path, tmp_path / "x264.mp4")
    assert read_video(out, motion=True, progress=False).motion is not None


# -- writing -------------------------------------------------------------------------------
@pytest.mark.parametrize("codec, name", [("h264", "o.mp4"), ("ffv1", "o.mkv"), ("png", "frames")])
def test_write_video_round_trip(tmp_path, codec, name):
    frames = fixtures.lavfi(frames=5, size=(64, 96))
    out = write_video(tmp_path / name, frames, 16, codec=codec)
    assert out == tmp_path / name and [p.name for p in tmp_path.iterdir()] == [name]
    if codec == "png":
        assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)]
        return
    back = read_video(out, fit=None, progress=False)
    assert back.frames.shape == frames.shape and back.fps == 16
    tolerance = 0 if codec == "ffv1" else 12
    assert np.abs(back.frames.astype(int) - frames).mean() <= tolerance


@pytest.mark.parametrize("codec, name", [("h264", "o.mp4"), ("ffv1", "o.mkv"), ("png", "frames")])
def test_failed_write_leaves_nothing(tmp_path, codec, name):
    frames = fixtures.lavfi(frames=5, size=(64, 96))

    def dying():
        yield from frames[:3]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_video(tmp_path / name, dying(), 16, codec=codec)
    assert list(tmp_path.iterdir()) == []  # no output, no temp


def test_failed_write_keeps_the_old_file(tmp_path):
    old = write_video(tmp_path / "o.mp4", fixtures.still(5, (64, 96)), 16)
    before = old.read_bytes()
    with pytest.raises(VideoError, match="frames must be"):
        write_video(old, [np.zeros((64, 96, 3), np.uint8), np.zeros((64, 96), np.uint8)], 16)
    assert old.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["o.mp4"]


def test_write_refuses_to_overwrite_the_input(tmp_path, pan_file):
    path, _ = pan_file
    video = read_video(path, fit=None, progress=False)
    before = path.read_bytes()
    with pytest.raises(VideoError, match="refusing to overwrite the input"):
        write_video(path, video, 16)
    with pytest.raises(VideoError, match="refusing to overwrite the input"):
        write_video(path.parent / "." / path.name, video.frames, 16, protect=[path])
    assert path.read_bytes() == before


def test_write_errors(tmp_path):
    frames = fixtures.still(3, (64, 96))
    with pytest.raises(FileNotFoundError, match="folder .*missing.* does not exist; create it first"):
        write_video(tmp_path / "missing" / "o.mp4", frames, 16)
    with pytest.raises(VideoError, match="even sides.*crop to 96x62 or use codec='ffv1'"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 63, 97, 3), np.uint8), 16)
    with pytest.raises(VideoError, match="codec='vp9' is not supported"):
        write_video(tmp_path / "o.webm", frames, 16, codec="vp9")
    with pytest.raises(VideoError, match="no frames to write"):
        write_video(tmp_path / "o.mp4", [], 16)
    write_video(tmp_path / "odd.mkv", np.zeros((2, 63, 97, 3), np.uint8), 16, codec="ffv1")  # odd is fine lossless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mkv"]


# -- bad input -------------------------------------------------------------------------------
def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no video at .*nope.mp4: check the path"):
        read_video("nope.mp4")


def test_folder_text_and_audio_only(tmp_path):
    with pytest.raises(VideoError, match="is a folder, not a video file"):
        read_video(tmp_path)
    (tmp_path / "notes.txt").write_text("hello " * 50)
    with pytest.raises(VideoError, match="not a video"):
        read_video(tmp_path / "notes.txt")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="is not a video FFmpeg can read"):
        read_video(tmp_path / "noise.mp4")
    wav = tmp_path / "a.wav"
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with pytest.raises(VideoError, match=r"has no video stream \(streams: audio\)"):
        read_video(wav)


def test_zero_frames(tmp_path):
    path = tmp_path / "empty.y4m"
    path.write_text("YUV4MPEG2 W32 H32 F16:1 Ip A1:1 C420jpeg\n")
    with pytest.raises(VideoError, match="has a video stream but no decodable frames"):
        read_video(path, progress=False)


def test_truncated_file_decodes_valid_frames_with_a_warning(tmp_path):
    frames = fixtures.pan(17, (64, 96), (1, 2))
    path = tmp_path / "full.ts"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=16, options={"g": "4"})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: len(data) * 3 // 5])
    with pytest.warns(VideoWarning, match="truncated or corrupt, keeping the valid frames"):
        video = read_video(cut, fit=None, progress=False)
    assert 0 < len(video) < 17
    mp4 = fixtures.h264(frames, tmp_path / "full.mp4")  # moov at the end: a cut MP4 has no index
    (tmp_path / "cut.mp4").write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(VideoError, match="truncated"):
        read_video(tmp_path / "cut.mp4")
    assert path.read_bytes() == data  # inputs untouched


def test_tiny_and_odd_sizes(tmp_path):
    rng = np.random.default_rng(0)
    odd = _write_lossless(tmp_path / "odd.mkv", rng.integers(0, 256, (5, 33, 47, 3), dtype=np.uint8))
    assert read_video(odd, fit=None, progress=False).frames.shape == (5, 33, 47, 3)
    assert read_video(odd, progress=False).frames.shape == (5, 32, 32, 3)
    tiny = _write_lossless(tmp_path / "tiny.mkv", rng.integers(0, 256, (5, 12, 40, 3), dtype=np.uint8))
    with pytest.raises(VideoError, match="smaller than one 16x16 token block"):
        read_video(tiny, progress=False)
    assert read_video(tiny, size=(16, 48), progress=False).frames.shape == (5, 16, 48, 3)


def test_bad_arguments(pan_file):
    path, _ = pan_file
    for kwargs, message in [
        ({"fit": "cogvideo"}, "fit='cogvideo' is not supported"),
        ({"fps": 0}, "fps=0 must be positive"),
        ({"max_frames": 0}, "max_frames=0 must be >= 1"),
    ]:
        with pytest.raises(VideoError, match=message):
            read_video(path, progress=False, **kwargs)


# -- pixel proxy -------------------------------------------------------------------------------
def test_pixel_proxy_shape_and_standardization():
    frames = fixtures.pan(9, (64, 96), (1, 1))
    latents = pixel_proxy_latents(frames)
    assert latents.shape == (16, 3, 8, 12) and latents.dtype == torch.float32
    torch.testing.assert_close(latents.mean((1, 2, 3)), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std((1, 2, 3), unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert pixel_proxy_latents(frames, channels=6).shape == (6, 3, 8, 12)


def test_pixel_proxy_is_causal_in_wan_groups():
    frames = fixtures.pan(13, (32, 48), (1, 2))
    base = pixel_proxy_latents(frames, standardize=False)
    for k in range(3):  # pixel frame 4k+1 belongs to latent frame k+1 only
        changed = frames.copy()
        changed[4 * k + 1] = 255 - changed[4 * k + 1]
        moved = (pixel_proxy_latents(changed, standardize=False) - base).abs().amax((0, 2, 3)) > 1e-6
        assert moved.tolist() == [f == k + 1 for f in range(4)]
    first = frames.copy()
    first[0] = 0
    moved = (pixel_proxy_latents(first, standardize=False) - base).abs().amax((0, 2, 3)) > 1e-6
    assert moved.tolist() == [True, False, False, False]


def test_pixel_proxy_static_video_is_below_lipar_threshold_moving_is_above():
    still = pixel_proxy_latents(fixtures.still(9, (64, 96)) + np.uint8(0))
    assert (still[:, 1:] - still[:, :-1]).abs().mean() < 0.15
    moving = pixel_proxy_latents(fixtures.pan(9, (64, 96), (4, 6)))
    assert (moving[:, 1:] - moving[:, :-1]).abs().mean() > 0.15


def test_pixel_proxy_errors():
    with pytest.raises(ValueError, match="10 frames is not 4k\\+1: keep the first 9"):
        pixel_proxy_latents(np.zeros((10, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="multiples of 8"):
        pixel_proxy_latents(np.zeros((5, 20, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must be \(T, H, W, 3\)"):
        pixel_proxy_latents(np.zeros((5, 16, 16), np.uint8))


def test_outputs_get_ordinary_permissions_not_the_temp_files_private_ones(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); published outputs must not."""
    import os

    from lipcodec import Plan

    mask = os.umask(0)
    os.umask(mask)
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    video = write_video(tmp_path / "v.mp4", frames, 16)
    pngs = write_video(tmp_path / "frames", frames, 16, codec="png")
    plan = Plan.identity((2, 2, 2)).save(tmp_path / "p.npz")
    assert (video.stat().st_mode & 0o777) == 0o666 & ~mask
    assert (plan.stat().st_mode & 0o777) == 0o666 & ~mask
    assert (pngs.stat().st_mode & 0o777) == 0o777 & ~mask

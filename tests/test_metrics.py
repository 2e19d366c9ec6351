"""lipcodec.metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipcodec import Grid, Plan, Schedule, fixtures, metrics


def test_psnr_of_a_uniform_offset_is_hand_computed():
    a = np.zeros((2, 8, 8, 3))
    b = a + 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert metrics.psnr(a, b) == pytest.approx([20.0, 20.0])
    # uint8 input is scaled by 1/255: an offset of 51 levels = 0.2 -> 10 log10(1 / 0.04)
    u = np.zeros((1, 8, 8, 3), np.uint8)
    assert metrics.psnr(u, u + 51)[0] == pytest.approx(10 * math.log10(1 / 0.04))
    assert metrics.psnr(u, u)[0] == math.inf


def test_ssim_of_constant_frames_is_the_luminance_term():
    # constant frames: variances and covariance are 0, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1)
    a, b = np.full((1, 16, 16, 3), 0.2), np.full((1, 16, 16, 3), 0.4)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.4 + c1) / (0.2**2 + 0.4**2 + c1)
    assert metrics.ssim(a, b)[0] == pytest.approx(expected, rel=1e-9)
    assert metrics.ssim(a, a)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.ssim(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))


def test_latent_error_by_hand():
    ref = torch.tensor([0.0, 1.0, 2.0, 4.0])  # range 4
    out = torch.tensor([0.0, 1.0, 2.0, 2.0])  # one error of 2: MSE = 4 / 4 = 1
    err = metrics.latent_error(ref, out)
    assert err.mse == pytest.approx(1.0) and err.max_abs == pytest.approx(2.0)
    assert err.psnr == pytest.approx(10 * math.log10(16 / 1))
    assert metrics.latent_error(ref, ref).psnr == math.inf


def test_warp_error_of_a_changed_patch_on_a_flat_frame_is_exact():
    # On a flat frame every warp returns the same flat frame, whatever flow is estimated,
    # so the error is exactly (patch area / frame area) x |change| / 255.
    flat = np.full((2, 64, 64, 3), 128, np.uint8)
    for p in (8, 16):
        x = flat.copy()
        x[1, 24 : 24 + p, 24 : 24 + p] = 200
        (err,) = metrics.warp_error(x)
        assert err == pytest.approx(p * p / (64 * 64) * 72 / 255, rel=1e-6)


def test_warp_error_is_near_zero_for_a_pure_translation():
    pan = fixtures.pan(5, (64, 64), (2, 3))  # a photo panned 2 px down, 3 px right per frame
    moving = metrics.warp_error(pan, downscale=1)
    assert moving.shape == (4,) and moving.max() < 0.005  # < 1.3 grey levels: interpolation only
    assert metrics.warp_error(fixtures.still(3, (64, 64))) == pytest.approx([0.0, 0.0])
    # the same content without coherent motion (another photo) is far from consistent
    cut = np.concatenate([pan[:1], fixtures.still(1, (64, 64), "coffee")])
    assert metrics.warp_error(cut)[0] > 10 * moving.max()


def test_warp_checks_its_convention():
    image = np.arange(25, dtype=np.float64).reshape(5, 5)
    f = np.zeros((2, 5, 5))
    f[1] = 1.0  # out[r, c] = image[r, c + 1]
    out, valid = metrics.warp(image, f)
    assert np.allclose(out[:, :4], image[:, 1:]) and not valid[:, 4].any() and valid[:, :4].all()


def test_kept_tokens_and_speedup():
    grid = Grid(2, 2, 2)
    source = torch.arange(8)
    source[4:6] = torch.tensor([0, 1])  # two tokens of frame 1 reuse frame 0
    plan = Plan(grid, source, Schedule.parse("IP"))
    kept = metrics.kept_tokens(plan)
    assert (kept.kept, kept.tokens, kept.saved) == (6, 8, 2)
    assert kept.ratio == pytest.approx(0.75) and kept.frame_kept == (1.0, 0.5) and kept.frame_types == "IP"
    assert metrics.speedup(2.0, 0.5) == 4.0 and math.isnan(metrics.speedup(0.0, 1.0))


def test_perceptual_hook():
    with pytest.raises(KeyError, match="LPIPS needs downloaded weights"):
        metrics.perceptual("lpips-test", np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
    metrics.register_perceptual("mean-abs-test", lambda a, b: np.abs(a - b).mean((1, 2, 3)), replace=True)
    assert "mean-abs-test" in metrics.perceptual_metrics()
    value = metrics.perceptual("mean-abs-test", np.zeros((2, 8, 8, 3)), np.full((2, 8, 8, 3), 0.25))
    assert value == pytest.approx([0.25, 0.25])


def test_pooled_psnr_pools_the_mse_of_all_frames():
    a = np.zeros((3, 8, 8, 3))
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB; frame 2 identical (inf)
    frame_psnr = metrics.psnr(a, b)
    pooled = metrics.pooled_psnr(frame_psnr)
    assert pooled == pytest.approx(10 * math.log10(1 / np.mean((a - b) ** 2)))  # the whole video's MSE
    assert pooled == pytest.approx(-10 * math.log10((0.01 + 1e-4) / 3))
    assert metrics.pooled_psnr([math.inf, math.inf]) == math.inf
    assert metrics.pooled_psnr([20.0, 20.0]) == pytest.approx(20.0)
    assert math.isnan(metrics.pooled_psnr([]))

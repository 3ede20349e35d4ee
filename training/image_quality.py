"""Full-reference image quality: PSNR and SSIM on RGB images in [0, 1], per image.

Both come from scikit-image so the figures compare with published restoration results. SSIM is Wang
et al. (2004) as their reference code computes it: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, data_range 1, population covariances, averaged over the valid region (the border a window
does not fit is left out) and over the three RGB channels (not the Y channel some super-resolution
papers use). torchmetrics' SSIM is not used: it averages over the reflect-padded full image, which
reads about 0.002 higher on a 128 px crop. LPIPS is not computed: the ``lpips`` package ships only its
linear heads and downloads the AlexNet/VGG backbone at first use, which an offline run cannot do.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

DATA_RANGE = 1.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _per_image(pred: torch.Tensor, target: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    p = pred.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    t = target.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    return list(zip(p, t, strict=True))


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of (N, C, H, W) images in [0, 1]; identical images give +inf."""
    with np.errstate(divide="ignore"):
        values = [peak_signal_noise_ratio(t, p, data_range=DATA_RANGE) for p, t in _per_image(pred, target)]
    return torch.tensor(values, dtype=torch.float64)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(N,) SSIM of (N, C, H, W) images in [0, 1]."""
    # scikit-image sizes the Gaussian window from sigma and truncate: radius = int(truncate * sigma + 0.5).
    truncate = ((window - 1) / 2 - 0.5 + 1e-9) / sigma
    values = [
        structural_similarity(t, p, channel_axis=2, data_range=DATA_RANGE, gaussian_weights=True, sigma=sigma,
                              truncate=truncate, use_sample_covariance=False, K1=0.01, K2=0.03)
        for p, t in _per_image(pred, target)
    ]
    return torch.tensor(values, dtype=torch.float64)

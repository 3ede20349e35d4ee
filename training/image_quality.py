"""Full-reference image quality: PSNR and SSIM on RGB images in [0, 1], per image.

SSIM is Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, over
the valid region, averaged over the three channels: the common setting of face restoration
benchmarks (computed on RGB here, not on the Y channel that super-resolution papers sometimes use).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(N,) PSNR in dB of (N, C, H, W) images in [0, 1]."""
    mse = torch.mean((pred.float() - target.float()) ** 2, dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / (mse + eps))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(N,) SSIM of (N, C, H, W) images in [0, 1]."""
    c = pred.shape[1]
    w = _gaussian_window(window, sigma).to(pred.device)[None, None].repeat(c, 1, 1, 1)
    x, y = pred.float(), target.float()
    c1, c2 = 0.01**2, 0.03**2
    mu_x = F.conv2d(x, w, groups=c)
    mu_y = F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))

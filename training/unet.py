"""A compact U-Net for face restoration, sized for CPU: 2.0 M parameters at the default 32 base
channels, 0.5 M at 16.

It predicts a residual added to its input (global residual learning, as in most restoration nets):
its last layer starts at zero, so it starts as the identity map (the degraded-input baseline) and
training only has to learn the correction.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class UNet(nn.Module):
    """(N, 3, H, W) in [0, 1] -> restored (N, 3, H, W); H and W divisible by 2**levels."""

    def __init__(self, base_channels: int = 32, levels: int = 3) -> None:
        super().__init__()
        self.levels = levels
        widths = [base_channels * 2**i for i in range(levels + 1)]
        self.stem = _block(3, widths[0])
        self.down = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1) for i in range(levels)
        )
        self.enc = nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(levels))
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in reversed(range(levels)))
        self.dec = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(levels)))
        self.out = nn.Conv2d(widths[0], 3, 3, padding=1)
        for m in self.modules():  # He init for LeakyReLU: torch's default shrinks activations layer by layer
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out.weight)  # start as the identity map
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2**self.levels or x.shape[-2] % 2**self.levels:
            raise ValueError(f"input side must be divisible by {2**self.levels} (got {tuple(x.shape[-2:])})")
        skips = [self.stem(x * 2.0 - 1.0)]
        for down, enc in zip(self.down, self.enc, strict=True):
            skips.append(enc(down(skips[-1])))
        h = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            skip = skips.pop()
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            h = dec(torch.cat([h, skip], dim=1))
        return x + self.out(h)

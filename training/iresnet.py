"""IResNet backbones (insightface arcface_torch), the standard face-recognition trunk.

Module names and parameter layout match insightface's ``iresnet.py`` exactly, so weights released
for it (converted once to safetensors: this project never unpickles a ``.pth``) load with
``load_state_dict``. ``iresnet_tiny`` is the same architecture, narrower and one block per stage,
sized for CPU tests; the input side may be any multiple of 16 (insightface hard-codes 112).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ARCHITECTURES: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    # name: (blocks per stage, channels per stage)
    "iresnet_tiny": ((1, 1, 1, 1), (16, 32, 64, 128)),
    "iresnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "iresnet34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "iresnet50": ((3, 4, 14, 3), (64, 128, 256, 512)),
    "iresnet100": ((3, 13, 30, 3), (64, 128, 256, 512)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv-BN-PReLU-conv-BN with the stride on the second conv (the "improved" residual unit)."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    """Face embedding network: aligned crop (N, 3, S, S) in [-1, 1] -> (N, embedding_size)."""

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 (got {input_size})")
        self.input_size = input_size
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        side = input_size // 16
        self.fc = nn.Linear(widths[3] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as insightface: a fixed-scale BN on the embedding
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers: list[nn.Module] = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with torch.autocast(x.device.type, enabled=False):  # the embedding head in float32, as insightface
            return self.features(self.fc(x.float()))


def build_iresnet(
    name: str, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0
) -> IResNet:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(ARCHITECTURES)}")
    layers, widths = ARCHITECTURES[name]
    return IResNet(layers, widths, embedding_size=embedding_size, input_size=input_size, dropout=dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())

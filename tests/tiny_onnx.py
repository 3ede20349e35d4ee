"""Builders for a tiny insightface model pack (buffalo_l file layout) with the real models' I/O contract.

insightface routes an ONNX file to a model class by its input size and output count, so tiny models
with the same contract load through exactly the production path. The detector is hand-set rather
than random so a test can rely on it: it fires on textured regions (any photo) and never on a flat
image, with fixed box and keypoint offsets. The other models have seeded random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2  # SCRFD 10g: two anchors per location, 9 outputs (scores, boxes, keypoints x 3 strides)
# Keypoint offsets from the anchor centre, in stride units: eyes, nose tip, mouth corners.
KPS_OFFSETS = (-0.4, -0.3, 0.4, -0.3, 0.0, 0.1, -0.3, 0.5, 0.3, 0.5)
BOX_HALF = 1.5  # box edges, in stride units from the anchor centre

BUFFALO_FILES = ("det_10g.onnx", "w600k_r50.onnx", "genderage.onnx", "1k3d68.onnx", "2d106det.onnx")


class TinySCRFD(nn.Module):
    """Scores = sigmoid(gain * (local texture - threshold)) on the coarsest stride only."""

    def __init__(self, gain: float = 40.0, threshold: float = 0.06) -> None:
        super().__init__()
        self.gain = gain
        self.threshold = threshold
        self.box = nn.Conv2d(1, 4, 1)
        self.kps = nn.Conv2d(1, 10, 1)
        with torch.no_grad():
            for conv, bias in ((self.box, [BOX_HALF] * 4), (self.kps, KPS_OFFSETS)):
                conv.weight.zero_()
                conv.bias.copy_(torch.tensor(bias))

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        c = t.shape[1]
        t = t.permute(0, 2, 3, 1).reshape(-1, 1, c)
        return t.expand(-1, ANCHORS, c).reshape(-1, c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        texture = (x - functional.avg_pool2d(x, 3, 1, 1)).abs().mean(dim=1, keepdim=True)
        scores, boxes, kps = [], [], []
        for stride in STRIDES:
            feat = functional.avg_pool2d(texture, stride, stride)
            logit = self.gain * (feat - self.threshold)
            if stride != STRIDES[-1]:
                logit = logit * 0.0 - 30.0
            scores.append(self._flat(torch.sigmoid(logit)))
            boxes.append(self._flat(self.box(feat)))
            kps.append(self._flat(self.kps(feat)))
        return (*scores, *boxes, *kps)


class TinyHead(nn.Module):
    """Conv -> pool -> linear, the shape of any insightface crop model."""

    def __init__(self, out_dim: int, squash: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8 * 4 * 4, out_dim)
        self.squash = squash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
        y = self.fc(y)
        return torch.tanh(y) if self.squash else y


def _export(model: nn.Module, size: int, path: Path, n_out: int, batch_dynamic: bool,
            spatial_dynamic: bool = False) -> Path:
    """Export with fixed spatial sizes (insightface routes crop models on them; only a detector may
    leave them free, as the released det_10g does); weights embedded in the file."""
    model.eval()
    x = torch.zeros(1, 3, size, size)
    out_names = [f"out{i}" for i in range(n_out)]
    axes: dict[str, dict[int, str]] | None = None
    if batch_dynamic:
        axes = {"input.1": {0: "batch"}, **{n: {0: "batch"} for n in out_names}}
    elif spatial_dynamic:
        axes = {"input.1": {2: "height", 3: "width"}, **{n: {0: "anchors"} for n in out_names}}
    torch.onnx.export(
        model, (x,), str(path), input_names=["input.1"], output_names=out_names,
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )
    return path


def build_scrfd(path: Path, dynamic: bool = False) -> Path:
    """``dynamic``: free height and width, so insightface builds a fixed-size session per input size."""
    return _export(TinySCRFD(), DET_SIZE, path, 9, batch_dynamic=False, spatial_dynamic=dynamic)


def build_arcface(path: Path, dim: int = 512, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return _export(TinyHead(dim), 112, path, 1, batch_dynamic=True)


def build_genderage(path: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    return _export(TinyHead(3, squash=True), 96, path, 1, batch_dynamic=True)


def build_landmark(path: Path, points: int, dims: int, seed: int = 2) -> Path:
    """1k3d68: 3309 outputs (1103 3-D points, the last 68 used); 2d106det: 212 outputs."""
    torch.manual_seed(seed)
    return _export(TinyHead(points * dims, squash=True), 192, path, 1, batch_dynamic=True)


def build_buffalo_pack(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """Write a buffalo_l-layout folder of tiny models; ``skip`` leaves named files out."""
    folder.mkdir(parents=True, exist_ok=True)
    builders = {
        "det_10g.onnx": build_scrfd,
        "w600k_r50.onnx": build_arcface,
        "genderage.onnx": build_genderage,
        "1k3d68.onnx": lambda p: build_landmark(p, 1103, 3),
        "2d106det.onnx": lambda p: build_landmark(p, 106, 2),
    }
    for name, build in builders.items():
        if name not in skip:
            build(folder / name)
    return folder

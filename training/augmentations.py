"""Image transforms for recognition training and evaluation (torchvision v2, on uint8 CHW tensors).

Pixel-level ops (RandAugment) run on uint8 as torchvision expects; random erasing runs last on the
normalised float tensor and fills with 0, the mean, as in the synthetic-face papers that use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from training.config import AugmentConfig

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)  # insightface: (x / 255 - 0.5) / 0.5, pixels in [-1, 1]


class ResizeTo:
    """Square resize with antialiasing, skipped when the crop already has the model's size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] == (self.size, self.size):
            return image
        return v2.functional.resize(image, [self.size, self.size], antialias=True)


def _to_model_input(size: int | None) -> list[Callable]:
    return [] if size is None else [ResizeTo(size)]


def recognition_train_transform(aug: AugmentConfig, input_size: int) -> v2.Compose:
    ops = _to_model_input(input_size)
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.randaugment:
        ops.append(v2.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if aug.random_erasing > 0:
        ops.append(v2.RandomErasing(p=aug.random_erasing, scale=aug.erasing_scale, value=0.0))
    return v2.Compose(ops)


def recognition_eval_transform(input_size: int) -> v2.Compose:
    return v2.Compose(
        [*_to_model_input(input_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )

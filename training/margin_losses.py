"""Additive-margin softmax losses for face recognition, and a PartialFC-style sampled classifier.

One formula covers the family (insightface's combined margin): the target logit becomes
``s * (cos(m1 * theta + m2) - m3)``; ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.4), SphereFace-like
forms use m1 > 1. The classifier holds one unit-normalised centre per identity.

With many identities (millions in WebFace42M-scale sets) the full softmax dominates memory and time.
``sample_rate < 1`` keeps, per step, every centre that a label in the *global* batch points at plus
random negatives up to ``sample_rate * num_classes`` (PartialFC, An et al. 2022). PartialFC shards
centres across GPUs; here every worker holds the whole matrix and all workers draw the same subset
(labels are all-gathered, the draw is seeded by the step), so DDP's gradient average stays exact.
Only the sampled rows receive gradients (unsampled rows still see weight decay).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
}


class CombinedMargin(nn.Module):
    """Turns cosine logits into margin logits: target ``s*(cos(m1*theta+m2)-m3)``, others ``s*cos``."""

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> None:
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        # ArcFace past theta = pi - m2 is no longer monotonic in theta; insightface falls back to a
        # linear penalty there (cos(theta) - m2 * sin(pi - m2)), which keeps the loss well behaved.
        self._theta_limit = math.cos(math.pi - m2)
        self._sinmm = math.sin(math.pi - m2) * m2

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Margin applied to the target cosines (before the scale)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3  # CosFace: no arccos, exact gradient everywhere
        if self.m1 == 1.0 and self.m3 == 0.0:
            sin = torch.sqrt((1.0 - cos_target * cos_target).clamp_min(0.0))
            cos_m = cos_target * math.cos(self.m2) - sin * math.sin(self.m2)
            return torch.where(cos_target > self._theta_limit, cos_m, cos_target - self._sinmm)
        theta = torch.acos(cos_target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cosine`` (N, C) in [-1, 1], ``labels`` (N,) class indices (-1 = no target among C)."""
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        cols = labels[rows]
        target = self.target_logit(cosine[rows, cols])
        logits = cosine.index_put((rows, cols), target)
        return logits * self.s


def margin_from_config(kind: str, s: float, m1: float, m2: float, m3: float) -> CombinedMargin:
    if kind in MARGIN_PRESETS:
        m1, m2, m3 = MARGIN_PRESETS[kind]
    return CombinedMargin(s=s, m1=m1, m2=m2, m3=m3)


class MarginSoftmaxHead(nn.Module):
    """Class centres + margin + cross-entropy: ``loss = head(embeddings, labels)``."""

    def __init__(
        self, embedding_size: int, num_classes: int, margin: CombinedMargin, sample_rate: float = 1.0
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1] (got {sample_rate})")
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.margin = margin
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        self.step = 0  # seeds the negative draw; set by the training loop so all workers agree

    def sampled_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the centres used this step and the labels remapped into them."""
        num_sample = max(1, int(self.sample_rate * self.num_classes))
        all_labels = _gather_labels(labels)
        positive = torch.unique(all_labels.cpu(), sorted=True)
        if positive.numel() < num_sample:
            gen = torch.Generator().manual_seed(0x5EED + self.step)
            scores = torch.rand(self.num_classes, generator=gen)
            scores[positive] = 2.0  # positives always win the draw
            index = torch.sort(torch.topk(scores, num_sample).indices).values
        else:
            index = positive
        index = index.to(labels.device)
        remapped = torch.searchsorted(index, labels)
        return index, remapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.weight
        if self.sample_rate < 1.0:
            index, labels = self.sampled_classes(labels)
            weight = weight[index]
        # Cosines near 1 and arccos need float32: never let autocast run this in half precision.
        with torch.autocast(embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(weight.float())).clamp(-1.0, 1.0)
            return F.cross_entropy(self.margin(cosine, labels), labels)


def _gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """All workers' labels, so every worker samples the same centres (a no-op without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return labels
    sizes = [torch.zeros(1, dtype=torch.long, device=labels.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([labels.numel()], device=labels.device))
    biggest = int(max(s.item() for s in sizes))
    padded = torch.full((biggest,), -1, dtype=labels.dtype, device=labels.device)
    padded[: labels.numel()] = labels
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    flat = torch.cat(gathered)
    return flat[flat >= 0]

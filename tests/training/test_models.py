"""IResNet sizes and shapes, the margin formulas, and PartialFC's class sampling."""

from __future__ import annotations

import math

import pytest
import torch

from training.iresnet import build_iresnet, count_parameters
from training.margin_losses import CombinedMargin, MarginSoftmaxHead, margin_from_config

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("name", "millions"), [("iresnet18", 24.03), ("iresnet50", 43.59), ("iresnet100", 65.16)]
)
def test_iresnet_variants_have_insightface_parameter_counts(name: str, millions: float) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = build_iresnet(name)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.01)


def test_iresnet_uses_insightface_parameter_names() -> None:
    with torch.device("meta"):
        keys = set(build_iresnet("iresnet50").state_dict())
    for key in (
        "conv1.weight",
        "prelu.weight",
        "layer1.0.bn1.running_mean",
        "layer3.13.conv2.weight",
        "layer1.0.downsample.0.weight",
        "bn2.weight",
        "fc.weight",
        "features.running_var",
    ):
        assert key in keys


@pytest.mark.parametrize("side", [48, 112])
def test_tiny_iresnet_embeds_crops_of_any_multiple_of_16(side: int) -> None:
    model = build_iresnet("iresnet_tiny", embedding_size=32, input_size=side).eval()
    assert model(torch.randn(2, 3, side, side)).shape == (2, 32)


def test_arcface_adds_angular_margin_to_the_target_only() -> None:
    margin = margin_from_config("arcface", 64.0, 0, 0, 0)
    theta = torch.tensor([[0.7, 1.2, 2.0]])
    logits = margin(torch.cos(theta), torch.tensor([1]))
    expected = 64.0 * torch.cos(torch.tensor([0.7, 1.2 + 0.5, 2.0]))
    expected[0], expected[2] = 64.0 * math.cos(0.7), 64.0 * math.cos(2.0)
    assert torch.allclose(logits[0], expected, atol=1e-4)


def test_arcface_falls_back_to_linear_penalty_past_pi_minus_m() -> None:
    margin = CombinedMargin(s=1.0, m1=1.0, m2=0.5, m3=0.0)
    cos = torch.tensor([[math.cos(2.9)]])  # theta + m > pi: cos(theta + m) would grow again
    out = margin(cos, torch.tensor([0]))
    assert out.item() == pytest.approx(math.cos(2.9) - math.sin(math.pi - 0.5) * 0.5, abs=1e-6)


def test_cosface_subtracts_m3_from_the_target_cosine() -> None:
    margin = margin_from_config("cosface", 30.0, 0, 0, 0)
    cos = torch.tensor([[0.8, 0.3], [0.1, 0.6]])
    out = margin(cos, torch.tensor([0, 1]))
    assert torch.allclose(out, 30.0 * torch.tensor([[0.4, 0.3], [0.1, 0.2]]), atol=1e-5)


def test_combined_margin_is_cos_of_m1_theta_plus_m2_minus_m3() -> None:
    margin = margin_from_config("combined", 10.0, 1.2, 0.3, 0.2)
    theta = 0.9
    out = margin(torch.tensor([[math.cos(theta)]]), torch.tensor([0]))
    assert out.item() == pytest.approx(10.0 * (math.cos(1.2 * theta + 0.3) - 0.2), abs=1e-4)


def test_partial_fc_keeps_every_positive_and_fills_with_negatives() -> None:
    torch.manual_seed(0)
    head = MarginSoftmaxHead(8, 100, CombinedMargin(), sample_rate=0.2)
    labels = torch.tensor([3, 97, 3, 50])
    index, remapped = head.sampled_classes(labels)
    assert len(index) == 20 and len(set(index.tolist())) == 20
    assert torch.equal(index[remapped], labels)  # remapped labels point at the same centres
    head.step = 1
    other, _ = head.sampled_classes(labels)
    assert not torch.equal(index, other)  # negatives are redrawn every step


def test_partial_fc_loss_is_the_softmax_over_the_sampled_centres() -> None:
    torch.manual_seed(0)
    head = MarginSoftmaxHead(8, 50, CombinedMargin(s=16.0), sample_rate=0.3)
    emb, labels = torch.randn(4, 8), torch.tensor([1, 7, 7, 30])
    loss = head(emb, labels)
    index, remapped = head.sampled_classes(labels)
    cos = torch.nn.functional.linear(
        torch.nn.functional.normalize(emb), torch.nn.functional.normalize(head.weight[index])
    ).clamp(-1, 1)
    expected = torch.nn.functional.cross_entropy(head.margin(cos, remapped), remapped)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index] = False
    assert head.weight.grad[untouched].abs().sum() == 0  # only sampled centres learn this step

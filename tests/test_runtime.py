"""Precision set-ups: the training autocast keeps trainable depthwise convolutions in fp32."""

from __future__ import annotations

import torch
from torch import nn

from msc_detector.runtime import Precision


def block(frozen_depthwise: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1),  # dense
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # depthwise
        nn.Conv2d(8, 4, 1),
    )
    net[1].weight.requires_grad_(not frozen_depthwise)
    return net


def dtypes(net: nn.Module, precision: Precision) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for layer in net:
        layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with precision.train_autocast():
        net(torch.rand(2, 3, 9, 9))
    return seen


def test_cpu_bf16_training_runs_trainable_depthwise_convolutions_in_fp32() -> None:
    bf16 = Precision("bf16", "cpu", channels_last=True)
    assert dtypes(block(), bf16) == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert dtypes(block(frozen_depthwise=True), bf16) == [torch.bfloat16] * 3


def test_fp32_training_autocast_is_plain_fp32() -> None:
    fp32 = Precision("fp32", "cpu", channels_last=False)
    assert dtypes(block(), fp32) == [torch.float32] * 3


def test_training_gradients_match_fp32() -> None:
    x = torch.rand(4, 3, 9, 9)
    nets = [block(), block()]
    contexts = (
        Precision("bf16", "cpu", channels_last=True).train_autocast,
        Precision("fp32", "cpu", channels_last=False).train_autocast,
    )
    for net, context in zip(nets, contexts, strict=True):
        with context():
            out = net(x)
        out.float().square().mean().backward()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert a.grad is not None and a.grad.dtype == torch.float32
        assert torch.allclose(a.grad, b.grad, rtol=0.05, atol=1e-3)

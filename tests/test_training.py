"""The Trainer: its steps compose into an epoch, and the loop reports each epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msc_detector.backbones import create_backbone
from msc_detector.data import ArraySource, ResizedImages
from msc_detector.runtime import Precision, Runtime
from msc_detector.training import TrainConfig, Trainer, fine_tune

FP32_CPU = Runtime(torch.device("cpu"), Precision("fp32", "cpu", channels_last=False))
CONFIG = TrainConfig(
    loss="msc", epochs=2, batch_size=4, lr=1e-2, weight_decay=0.0, temperature=0.25,
    min_crop_area=0.2, seed=0,
)  # fmt: skip


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("efficientnet_lite0", weights=None).model


def images() -> ResizedImages:
    data = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    return ResizedImages(ArraySource(data, True), 32, "bicubic", cache_bytes=2**30)


def trainer(net: torch.nn.Module) -> Trainer:
    center = np.full(1280, 0.01, np.float32)
    return Trainer(net, net, center, CONFIG, 32, (0.5,) * 3, (0.5,) * 3, FP32_CPU)


def test_an_epoch_is_views_then_loss_then_step() -> None:
    batches = list(images().batches(4, drop_last=True))
    whole, by_hand = network(), network()
    trainer(whole).run_epoch(batches)
    steps = trainer(by_hand)
    for batch in batches:
        steps.step(steps.loss(*steps.views(batch)))
    for (name, a), b in zip(whole.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_fine_tune_reports_every_epoch_and_changes_only_trainable_parameters() -> None:
    net = network()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    seen: list[tuple[int, float]] = []
    history = fine_tune(
        net, images(), np.zeros(1280, np.float32), CONFIG, image_size=32, mean=(0.5,) * 3,
        std=(0.5,) * 3, runtime=FP32_CPU, on_epoch=lambda e, loss: seen.append((e, loss)),
    )  # fmt: skip
    assert [h["epoch"] for h in history] == [1, 2] == [e for e, _ in seen]
    assert [h["loss"] for h in history] == [loss for _, loss in seen]
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable


def test_a_network_without_trainable_parameters_is_refused() -> None:
    net = network().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        trainer(net)

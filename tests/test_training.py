"""Embedding in cache-sized passes on the CPU gives the embeddings of one pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msc_detector.training as training
from msc_detector.runtime import Precision


def test_cpu_passes_embed_like_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batches = [torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8) for n in (7, 3)]
    fp32 = Precision("fp32", "cpu", channels_last=False)
    cpu = torch.device("cpu")

    def embed() -> list:
        return list(training.iter_embeddings(model, batches, lambda b: b / 255, cpu, fp32))

    monkeypatch.setattr(training, "_CPU_EMBED_PIXELS", 10**9)
    whole = embed()
    monkeypatch.setattr(training, "_CPU_EMBED_PIXELS", 2 * 12 * 12)  # passes of 2 images
    parts = embed()
    assert [p.shape for p in parts] == [(7, 8), (3, 8)]
    for a, b in zip(whole, parts, strict=True):
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6)

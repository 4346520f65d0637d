"""The Embedder: cache-sized CPU passes, joined views, and a cache that is never state."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
from torch import nn

import msc_detector.embedding as embedding
from msc_detector.backbones import create_backbone
from msc_detector.data import ArraySource
from msc_detector.embedding import Embedder, View, join_views
from msc_detector.runtime import Precision, Runtime

FP32_CPU = Runtime(torch.device("cpu"), Precision("fp32", "cpu", channels_last=False))


def tiny_embedder(flip_average: bool = False, views: int = 1) -> Embedder:
    built = create_backbone("efficientnet_lite0", weights=None)
    interpolations = ["bicubic", "nearest"][:views]
    return Embedder(
        [View(how, built.model) for how in interpolations],
        built.spec,
        image_size=32,
        crop_pct=1.0,
        flip_average=flip_average,
        runtime=FP32_CPU,
    )


@pytest.fixture
def source() -> ArraySource:
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), channels_last=True)


def test_cpu_passes_embed_like_one_pass(source, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = tiny_embedder()
    monkeypatch.setattr(embedding, "_CPU_EMBED_PIXELS", 10**9)
    whole = list(embedder.embed(source, batch_size=7))
    monkeypatch.setattr(embedding, "_CPU_EMBED_PIXELS", 2 * 32 * 32)  # passes of 2 images
    parts = list(embedder.embed(source, batch_size=7))
    assert [p.shape for p in parts] == [(7, 1280), (3, 1280)]
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_views_are_joined_in_order_with_unit_norm(source) -> None:
    two = tiny_embedder(views=2)
    joined = two.embed_all(source, batch_size=4)
    parts = [two.embed_all(source, batch_size=4, views=[i]) for i in (0, 1)]
    assert two.dim == joined.shape[1] == 2 * 1280
    np.testing.assert_allclose(joined, join_views(parts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)


def test_the_folding_cache_is_not_pickled_and_serves_concurrent_first_calls(source) -> None:
    embedder = tiny_embedder()
    expected = embedder.embed_all(source, batch_size=5)
    assert len(embedder._folded) == 1
    fresh = pickle.loads(pickle.dumps(embedder))
    assert fresh._folded == {}
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(fresh.embed_all(source, batch_size=5)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(fresh._folded) == 1
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)
    assert copy.copy(embedder)._folded == {}


def test_flip_average_is_the_normalised_mean_with_the_mirror(source) -> None:
    flipped = tiny_embedder(flip_average=True)
    plain = copy.copy(flipped)
    plain.flip_average = False
    mirrored = ArraySource(np.ascontiguousarray(source.data[:, :, ::-1]), channels_last=True)
    expected = plain.embed_all(source, 4) + plain.embed_all(mirrored, 4)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(flipped.embed_all(source, 4), expected, atol=1e-5)


def test_embedding_records_no_gradient() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    built = create_backbone("efficientnet_lite0", weights=None)
    embedder = Embedder([View("bilinear", model)], built.spec, 16, 1.0, False, FP32_CPU)
    batch = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    (out,) = list(embedder.embed_resized(0, [batch]))
    assert out.shape == (3, 4) and out.dtype == np.float32
    assert all(p.grad is None for p in model.parameters())

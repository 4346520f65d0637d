"""Greedy k-centre selection against a naive loop, and the streaming coreset's budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msc_detector.coreset import StreamingCoreset, greedy_k_center


def naive_k_center(x: np.ndarray, k: int, first: int) -> list[int]:
    """Greedy k-centre by the definition: each pick is the point farthest from the picks."""
    picks = [first]
    while len(picks) < k:
        nearest = [min(float(np.sum((p - x[j]) ** 2)) for j in picks) for p in x]
        for j in picks:
            nearest[j] = -1.0
        picks.append(int(np.argmax(nearest)))
    return picks


def covering_radius(x: np.ndarray, picks: np.ndarray) -> float:
    d = ((x[:, None, :] - x[None, picks, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(axis=1).max()))


def test_greedy_k_center_matches_the_naive_loop() -> None:
    x = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    generator = torch.Generator().manual_seed(3)
    first = int(torch.randint(60, (1,), generator=torch.Generator().manual_seed(3)))
    picks = greedy_k_center(torch.from_numpy(x), 12, generator)
    assert picks.tolist() == naive_k_center(x.astype(np.float64), 12, first)


def test_greedy_k_center_covers_better_than_random_picks() -> None:
    rng = np.random.default_rng(1)
    # A dense cluster and four far, mutually distant points: random picks miss them.
    far = 20 * np.concatenate([np.eye(4), -np.eye(4)[:1]])
    x = np.concatenate([rng.normal(size=(300, 4)), far]).astype(np.float32)
    picks = greedy_k_center(torch.from_numpy(x), 20, torch.Generator().manual_seed(0)).numpy()
    assert len(set(picks.tolist())) == 20
    random_picks = rng.choice(len(x), 20, replace=False)
    assert covering_radius(x, picks) < covering_radius(x, random_picks)
    assert set(range(300, 305)) <= set(picks.tolist())  # every outlier is covered by itself


def test_greedy_k_center_keeps_everything_when_k_is_large() -> None:
    x = torch.randn(7, 3)
    assert greedy_k_center(x, 10, torch.Generator()).tolist() == list(range(7))


def test_duplicates_are_never_picked_twice() -> None:
    x = torch.zeros(10, 3)
    picks = greedy_k_center(x, 4, torch.Generator().manual_seed(0))
    assert len(set(picks.tolist())) == 4


@pytest.mark.parametrize(("total", "memory", "block"), [(1000, 100, 64), (1000, 5000, 64)])
def test_streaming_coreset_keeps_exactly_its_budget_with_the_tags(total, memory, block) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(total, 200)).astype(np.float32)  # wider than the projection
    coreset = StreamingCoreset(total, memory, seed=0, block=block, projection_dim=16)
    for start in range(0, total, 37):  # uneven pieces
        rows = np.arange(start, min(start + 37, total))
        coreset.add(torch.from_numpy(x[rows]), np.stack([rows, rows * 2], axis=1))
    vectors, tags = coreset.result()
    assert len(vectors) == len(tags) == min(total, memory)
    assert len(set(tags[:, 0].tolist())) == len(tags)
    np.testing.assert_array_equal(tags[:, 1], tags[:, 0] * 2)
    np.testing.assert_array_equal(vectors.numpy(), x[tags[:, 0]])  # originals, not projections


def test_streaming_coreset_is_reproducible_and_checks_the_count() -> None:
    x = torch.randn(300, 8)
    runs = []
    for _ in range(2):
        coreset = StreamingCoreset(300, 30, seed=5, block=100)
        coreset.add(x, np.arange(300)[:, None])
        runs.append(coreset.result()[1][:, 0].tolist())
    assert runs[0] == runs[1]
    short = StreamingCoreset(400, 30, seed=5)
    short.add(x, np.arange(300)[:, None])
    with pytest.raises(RuntimeError, match="300 vectors were added; 400"):
        short.result()

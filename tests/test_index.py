"""The Faiss index against brute force, leave-self-out, chunking and pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from msc_detector.index import KNNIndex


@pytest.fixture
def vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)


def brute(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def test_search_matches_brute_force(vectors) -> None:
    queries = np.random.default_rng(1).normal(size=(7, 8)).astype(np.float32)
    d, i = KNNIndex().fit(vectors).search(queries, 3)
    bd, bi = brute(queries, vectors, 3)
    np.testing.assert_allclose(d, bd, rtol=1e-4)
    np.testing.assert_array_equal(i, bi)


def test_chunked_search_equals_one_search(vectors) -> None:
    a = KNNIndex(chunk_size=3).fit(vectors).search(vectors, 4)
    b = KNNIndex().fit(vectors).search(vectors, 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_leave_self_out_never_returns_self(vectors) -> None:
    d, i = KNNIndex().fit(vectors).search_leave_self_out(2)
    assert d.shape == i.shape == (50, 2)
    assert not (i == np.arange(50)[:, None]).any()
    full_d, full_i = brute(vectors, vectors, 3)
    np.testing.assert_array_equal(i, full_i[:, 1:])
    np.testing.assert_allclose(d, full_d[:, 1:], rtol=1e-4, atol=1e-6)


def test_leave_self_out_with_exact_duplicates_keeps_the_twin() -> None:
    base = np.array([[0, 0], [0, 0], [5, 5], [9, 9]], np.float32)
    d, i = KNNIndex().fit(base).search_leave_self_out(1)
    assert i[0, 0] == 1 and i[1, 0] == 0  # each duplicate finds the other at distance 0
    assert d[0, 0] == 0 and d[1, 0] == 0


def test_too_many_neighbours_is_an_error(vectors) -> None:
    index = KNNIndex().fit(vectors[:3])
    with pytest.raises(ValueError, match="k=4"):
        index.search(vectors, 4)
    with pytest.raises(ValueError, match="at least 4"):
        index.search_leave_self_out(3)


def test_vectors_return_what_was_indexed(vectors) -> None:
    index = KNNIndex().fit(vectors)
    np.testing.assert_array_equal(index.vectors(), vectors)
    with pytest.raises(RuntimeError, match="empty"):
        KNNIndex().vectors()


def test_pickle_and_vectors_round_trip(vectors) -> None:
    index = KNNIndex(chunk_size=5).fit(vectors)
    for copy in (pickle.loads(pickle.dumps(index)), KNNIndex().fit(index.vectors())):
        assert copy.ntotal == 50 and copy.dim == 8
        np.testing.assert_array_equal(copy.search(vectors, 2)[1], index.search(vectors, 2)[1])

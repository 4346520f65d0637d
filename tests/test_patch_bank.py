"""The patch bank's searches: the exact block scan, and the inverted lists' upper bounds."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from msc_detector.patch_bank import BankScan, InvertedLists


def _bank(m: int = 2048, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, dim)).astype(np.float32), rng.integers(0, 30, m)


def _exact(vectors: np.ndarray, queries: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    squared = ((queries[:, None, :] - vectors[None]) ** 2).sum(-1)
    if skip is not None:
        squared[skip] = np.inf
    return squared.min(axis=1)


def test_bounds_lie_above_the_nearest_distance_and_often_meet_it() -> None:
    vectors, owners = _bank()
    queries = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    bound = InvertedLists(vectors, owners, 16, 2).nearest_bound(queries)
    exact = _exact(vectors, queries)
    assert bound.dtype == np.float32 and bound.shape == (300,)
    assert (bound >= exact - 1e-4 * np.maximum(exact, 1)).all()
    assert np.isclose(bound, exact, rtol=1e-5).mean() > 0.3  # a near list holds the nearest


def test_probing_every_list_gives_the_exact_nearest_distance() -> None:
    vectors, owners = _bank()
    queries = np.random.default_rng(2).standard_normal((50, 16)).astype(np.float32)
    bound = InvertedLists(vectors, owners, 8, 8).nearest_bound(queries)
    np.testing.assert_allclose(bound, _exact(vectors, queries), rtol=1e-4)


def test_leave_one_image_out_skips_the_query_images_own_vectors() -> None:
    vectors, owners = _bank()
    queries, query_owners = vectors[:40] + 0.01, owners[:40]
    lists = InvertedLists(vectors, owners, 8, 8)
    skip = owners[None, :] == query_owners[:, None]
    got = lists.nearest_bound(queries, query_owners)
    np.testing.assert_allclose(got, _exact(vectors, queries, skip), rtol=1e-4)
    assert (got > 1.0).all()  # not the query's own vector, 0.0001 away


def test_a_query_whose_lists_hold_only_its_own_image_is_unbounded() -> None:
    vectors = np.concatenate([np.zeros((64, 4)), np.full((64, 4), 100.0)]).astype(np.float32)
    vectors += np.random.default_rng(3).standard_normal(vectors.shape).astype(np.float32)
    owners = np.repeat([0, 1], 64)
    lists = InvertedLists(vectors, owners, 2, 1)
    got = lists.nearest_bound(vectors[:2], owners[:2])
    assert np.isinf(got).all()


def test_a_pickled_copy_gives_the_same_bounds() -> None:
    vectors, owners = _bank()
    queries = np.random.default_rng(4).standard_normal((60, 16)).astype(np.float32)
    lists = InvertedLists(vectors, owners, 16, 2)
    copy = pickle.loads(pickle.dumps(lists))
    np.testing.assert_array_equal(copy.nearest_bound(queries), lists.nearest_bound(queries))
    np.testing.assert_array_equal(
        copy.nearest_bound(queries, owners[:60]), lists.nearest_bound(queries, owners[:60])
    )


@pytest.mark.parametrize("leave_out", [False, True])
def test_the_scan_finds_the_nearest_vector_across_blocks_of_bank_and_queries(
    leave_out, monkeypatch
) -> None:
    monkeypatch.setattr(BankScan, "_BANK_BLOCK", 300)  # 2048 = 6 full blocks and a part
    monkeypatch.setattr(BankScan, "_QUERY_BLOCK", 64)
    vectors, owners = _bank()
    queries = np.random.default_rng(5).standard_normal((150, 16)).astype(np.float32)
    query_owners = owners[:150] if leave_out else None
    squared = ((queries[:, None, :] - vectors[None]) ** 2).sum(-1)
    if leave_out:
        squared[owners[None, :] == query_owners[:, None]] = np.inf
    got, found = BankScan(vectors, owners).nearest(queries, query_owners)
    assert got.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_array_equal(found, squared.argmin(axis=1))
    np.testing.assert_allclose(got, squared.min(axis=1), rtol=1e-5)


def test_the_scan_gives_a_vector_its_own_distance_exactly_zero() -> None:
    vectors = np.random.default_rng(6).normal(30.0, 1.0, (500, 64)).astype(np.float32)
    got, found = BankScan(vectors, np.arange(500)).nearest(vectors[:20])
    assert found.tolist() == list(range(20)) and (got == 0).all()  # no rounding residue


def test_a_scan_query_whose_image_owns_the_whole_bank_is_unbounded() -> None:
    vectors, _ = _bank(m=40)
    got, _ = BankScan(vectors, np.zeros(40)).nearest(vectors[:3], np.zeros(3))
    assert np.isinf(got).all()


def test_the_scan_hands_out_its_bank_read_only() -> None:
    vectors, owners = _bank(m=64)
    scan = BankScan(vectors, owners)
    np.testing.assert_array_equal(scan.vectors(), vectors)
    with pytest.raises(ValueError, match="read-only"):
        scan.vectors()[0, 0] = 1.0
    np.testing.assert_array_equal(scan.vectors(), vectors)  # the bank is as it was


def test_the_scan_keeps_a_copy_of_the_bank_it_was_given(recwarn) -> None:
    vectors, owners = _bank(m=64)
    given = vectors.copy()
    given.flags.writeable = False  # as a loaded model file's arrays can be
    BankScan(given, owners)
    assert not recwarn.list  # torch warns about tensors over read-only arrays
    writable = vectors.copy()
    scan = BankScan(writable, owners)
    writable[:] = 0.0  # the caller's array changes later
    np.testing.assert_array_equal(scan.vectors(), vectors)

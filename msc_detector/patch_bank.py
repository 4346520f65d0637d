"""The patch bank: normal training patches, searched by matrix products on the CPU.

A :class:`PatchIndex` holds the patches a fit kept, each with the training image it
came from and its place in the feature grid, for leave-one-image-out searches and
explanations. Its searches compare a block of queries with a block of the bank in one
matrix product and take the minimum, the patches of a query's own image masked out in
the same step. On a CPU this beat Faiss's exact flat search at every batch size on an
Intel Xeon (by 3.5x for a map's thousands of patches), and from tens to hundreds of
queries at a time on an AMD EPYC, where Faiss was as fast from thousands on
(``benchmarks/patch_search.py``).

:class:`BankScan` searches the whole bank exactly. :class:`InvertedLists` groups it by
the nearest of a few k-means centroids and compares each query with the patches of its
``probes`` nearest lists only: the distance to the closest patch found there bounds the
nearest distance from above, at a fraction of the cost. The bounded patch search
(:meth:`msc_detector.model.PatchScorer.anomalies`) starts from those bounds.

Distances are compared as ``|q|^2 + |b|^2 - 2 q.b`` in float32, as Faiss's flat search
compares them; the exact search computes its nearest's distance again directly.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

__all__ = ["BankScan", "InvertedLists", "PatchIndex"]

# k-means over the bank: iterations and seed (fixed, so a bank always gets the same lists).
_KMEANS_ITERATIONS = 10
_KMEANS_SEED = 1234


def _partial_distances(
    queries: torch.Tensor,
    matrix: torch.Tensor,
    norms: torch.Tensor,
    owners: torch.Tensor,
    query_owners: torch.Tensor | None,
) -> torch.Tensor:
    """``|b|^2 - 2 q.b`` per query and bank column; ``inf`` on the query's own image."""
    partial = torch.addmm(norms, queries, matrix, alpha=-2)
    if query_owners is not None:
        partial.masked_fill_(query_owners[:, None] == owners, float("inf"))
    return partial


def _as_queries(
    queries: np.ndarray, query_owners: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    if query_owners is None:
        return q, None
    return q, torch.from_numpy(np.asarray(query_owners, dtype=np.int64))


class BankScan:
    """Exact nearest-neighbour search of a bank, one block of queries and of the bank at a time.

    Parameters
    ----------
    vectors : ndarray of shape (m, d)
    owners : ndarray of shape (m,)
        The training image of each vector, for leave-one-image-out searches.
    """

    # Bank vectors and queries per matrix product: the product (4 MiB of float32 at most)
    # stays in cache, which made the scan faster than larger blocks did.
    _BANK_BLOCK = 2048
    _QUERY_BLOCK = 512

    def __init__(self, vectors: np.ndarray, owners: np.ndarray) -> None:
        # A copy of its own: the caller's array may change later, or be read-only.
        self.bank = torch.from_numpy(np.array(vectors, dtype=np.float32, order="C"))
        self.norms = (self.bank * self.bank).sum(dim=1)
        self.owners = torch.from_numpy(np.asarray(owners, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.norms)

    def vectors(self) -> np.ndarray:
        """Return the bank, ``(m, d)`` float32: a read-only view, not a copy."""
        view = self.bank.numpy().view()
        view.flags.writeable = False
        return view

    def nearest(
        self, queries: np.ndarray, query_owners: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Squared distance to, and position of, each query's nearest bank vector.

        The nearest is found from distances in the expanded form; its distance is then
        computed again directly, which keeps a small one exact (a vector against itself
        is 0). With ``query_owners``, vectors of the query's own image are skipped:
        ``inf`` (at position 0) where the bank holds only those.

        Returns
        -------
        squared : ndarray of shape (q,), float32
        indices : ndarray of shape (q,), int64
        """
        q, q_owners = _as_queries(queries, query_owners)
        squared = torch.empty(len(q))
        indices = torch.empty(len(q), dtype=torch.int64)
        for first in range(0, len(q), self._QUERY_BLOCK):
            rows = slice(first, first + self._QUERY_BLOCK)
            block_owners = None if q_owners is None else q_owners[rows]
            squared[rows], indices[rows] = self._nearest_block(q[rows], block_owners)
        found = torch.isfinite(squared)
        squared[found] = ((q[found] - self.bank[indices[found]]) ** 2).sum(dim=1)
        return squared.numpy(), indices.numpy()

    def _nearest_block(
        self, q: torch.Tensor, q_owners: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        best = torch.full((len(q),), float("inf"))
        found = torch.zeros(len(q), dtype=torch.int64)
        for first in range(0, len(self), self._BANK_BLOCK):
            rows = slice(first, first + self._BANK_BLOCK)
            partial = _partial_distances(
                q, self.bank[rows].T, self.norms[rows], self.owners[rows], q_owners
            )
            values, where = partial.min(dim=1)
            closer = values < best
            best = torch.where(closer, values, best)
            found = torch.where(closer, where + first, found)
        return best, found


class InvertedLists:
    """A bank of vectors grouped by their nearest of ``n_lists`` k-means centroids.

    Parameters
    ----------
    vectors : ndarray of shape (m, d)
        The bank.
    owners : ndarray of shape (m,)
        The training image of each vector, for leave-one-image-out bounds.
    n_lists : int
        How many centroids (lists); at most ``m``.
    probes : int
        Lists compared with each query: its nearest centroids'.
    """

    def __init__(self, vectors: np.ndarray, owners: np.ndarray, n_lists: int, probes: int) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        kmeans = faiss.Kmeans(dim, n_lists, niter=_KMEANS_ITERATIONS, seed=_KMEANS_SEED)
        kmeans.train(vectors)
        self.centroids = faiss.IndexFlatL2(dim)
        self.centroids.add(np.asarray(kmeans.centroids, dtype=np.float32))
        self.probes = min(int(probes), n_lists)
        assigned = self.centroids.search(vectors, 1)[1][:, 0]
        order = np.argsort(assigned, kind="stable")
        ends = np.cumsum(np.bincount(assigned, minlength=n_lists)).tolist()
        bank = torch.from_numpy(vectors[order])
        bank_owners = torch.from_numpy(np.asarray(owners, dtype=np.int64)[order])
        norms = (bank * bank).sum(dim=1)
        # Per list: its vectors transposed (d, size), their squared norms, their owners.
        self.lists = [
            (bank[start:end].T.contiguous(), norms[start:end], bank_owners[start:end])
            for start, end in zip([0, *ends[:-1]], ends, strict=True)
        ]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # the centroids' Faiss index pickles as its vectors
        state["centroids"] = self.centroids.reconstruct_n(0, self.centroids.ntotal)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        centroids = state.pop("centroids")
        self.__dict__.update(state)
        self.centroids = faiss.IndexFlatL2(centroids.shape[1])
        self.centroids.add(centroids)

    def nearest_bound(
        self, queries: np.ndarray, query_owners: np.ndarray | None = None
    ) -> np.ndarray:
        """Squared distance of each query to the nearest vector of its probed lists.

        With ``query_owners``, vectors of the query's own image are skipped; ``inf``
        where the probed lists hold only those.

        Returns
        -------
        ndarray of shape (q,), float32
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        probed = self.centroids.search(queries, self.probes)[1].reshape(-1)
        order = np.argsort(probed, kind="stable")
        rows_by_list = torch.from_numpy(order // self.probes)
        counts = np.bincount(probed, minlength=len(self.lists)).tolist()
        q, q_owners = _as_queries(queries, query_owners)
        q_norms = (q * q).sum(dim=1)
        # Per (query, probed list) pair, in list order: min over the list of |b|^2 - 2 q.b.
        pair_best = torch.full((len(rows_by_list),), float("inf"))
        start = 0
        for (matrix, norms, owners), count in zip(self.lists, counts, strict=True):
            rows, pairs = rows_by_list[start : start + count], slice(start, start + count)
            start += count
            if not count or not matrix.shape[1]:
                continue
            block_owners = None if q_owners is None else q_owners[rows]
            partial = _partial_distances(q[rows], matrix, norms, owners, block_owners)
            pair_best[pairs] = partial.amin(dim=1)
        best = torch.full((len(q),), float("inf")).scatter_reduce_(
            0, rows_by_list, pair_best, "amin"
        )
        return (best + q_norms).numpy()


class PatchIndex:
    """Patch embeddings of training images with their owners, under exact L2 search.

    Parameters
    ----------
    vectors : ndarray of shape (m, d)
        The patch embeddings.
    owners : ndarray of shape (m,)
        Index of the training image each patch comes from.
    positions : ndarray of shape (m, 2)
        Row and column of each patch in its image's feature grid.
    grid : tuple of int
        ``(h, w)``, the feature grid of every image.
    baseline : ndarray of shape (h, w), optional
        The typical distance from a normal patch at each grid position to the nearest
        patch of another image: what a distance there is measured against. Zeros when
        not given.

    Attributes
    ----------
    scan : BankScan
        Exact search.
    coarse : InvertedLists or None
        The same patches in inverted lists, built from them (never stored), for
        :meth:`nearest_bound`; ``None`` for a bank under 1,024 patches.
    owners, positions : ndarray, int64
    grid : tuple of int
    baseline : ndarray of shape (h, w), float32
    """

    # The coarse lists: about this many patches per list, these lists probed per query,
    # none below this many lists (a small bank is searched exactly, cheaply).
    _PATCHES_PER_LIST = 128
    _PROBES = 3
    _MIN_LISTS = 8

    def __init__(
        self,
        vectors: np.ndarray,
        owners: np.ndarray,
        positions: np.ndarray,
        grid: tuple[int, int],
        baseline: np.ndarray | None = None,
    ) -> None:
        self.owners = np.ascontiguousarray(owners, dtype=np.int64)
        self.positions = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1, 2)
        self.grid = (int(grid[0]), int(grid[1]))
        self.baseline = np.zeros(self.grid, np.float32)
        if baseline is not None:
            self.baseline = np.ascontiguousarray(baseline, dtype=np.float32).reshape(self.grid)
        if vectors.ndim != 2 or not len(self.owners) == len(self.positions) == len(vectors):
            raise ValueError("A patch index needs one owner and one position per vector.")
        self.scan = BankScan(vectors, self.owners)
        lists = len(self.owners) // self._PATCHES_PER_LIST
        self.coarse: InvertedLists | None = None
        if lists >= self._MIN_LISTS:
            self.coarse = InvertedLists(vectors, self.owners, lists, self._PROBES)

    def __len__(self) -> int:
        return len(self.owners)

    def vectors(self) -> np.ndarray:
        """Return the indexed patch embeddings, ``(m, d)`` float32 (read-only)."""
        return self.scan.vectors()

    def nearest(
        self, queries: np.ndarray, query_owners: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Squared distance to, and position in the index of, each query's nearest patch.

        With ``query_owners`` (the training image each query comes from), patches of the
        query's own image are skipped; a query whose image owns every indexed patch gets
        its nearest own patch.

        Returns
        -------
        distances : ndarray of shape (q,), float32
        indices : ndarray of shape (q,), int64
        """
        squared, found = self.scan.nearest(queries, query_owners)
        if query_owners is not None and (alone := ~np.isfinite(squared)).any():
            squared[alone], found[alone] = self.scan.nearest(np.asarray(queries)[alone])
        return squared, found

    def nearest_bound(
        self, queries: np.ndarray, query_owners: np.ndarray | None = None
    ) -> np.ndarray:
        """Squared distance to *a* near bank patch: never below the nearest's, mostly equal.

        The coarse lists (:class:`InvertedLists`, a few probed) find a bank patch close
        to each query at a fraction of an exact search's cost; its distance bounds the
        nearest distance from above. A bank too small for them is searched exactly. With
        ``query_owners``, patches of the query's own image are skipped (``inf`` where
        the probed lists hold only those).

        Returns
        -------
        ndarray of shape (q,), float32
        """
        if self.coarse is None:
            return self.nearest(queries, query_owners)[0]
        return self.coarse.nearest_bound(queries, query_owners)

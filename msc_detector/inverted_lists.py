"""Cheap upper bounds on nearest-neighbour distances, from inverted lists and matrix products.

The bounded patch search (:meth:`msc_detector.model.PatchScorer.anomalies`) needs, for
every patch of an image, the distance to *some* close bank patch: that distance bounds
the distance to the nearest one from above. :class:`InvertedLists` groups the bank by
the nearest of a few k-means centroids and compares each query with the patches of its
``probes`` nearest lists only. All the queries that probe one list are compared with it
in one matrix product, which on a CPU is faster than scanning the list once per query
(what Faiss's inverted-file index does); ``benchmarks/patch_search.py`` measures it.

Distances are computed as ``|q|^2 + |b|^2 - 2 q.b`` in float32, as Faiss's exact flat
search computes them, so a bound is as exact as the exact search it stands in for.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

__all__ = ["InvertedLists"]

# k-means over the bank: iterations and seed (fixed, so a bank always gets the same lists).
_KMEANS_ITERATIONS = 10
_KMEANS_SEED = 1234


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
        q = torch.from_numpy(queries)
        q_norms = (q * q).sum(dim=1)
        q_owners = None
        if query_owners is not None:
            q_owners = torch.from_numpy(np.asarray(query_owners, dtype=np.int64))
        # Per (query, probed list) pair, in list order: min over the list of |b|^2 - 2 q.b.
        pair_best = torch.full((len(rows_by_list),), float("inf"))
        start = 0
        for (matrix, norms, owners), count in zip(self.lists, counts, strict=True):
            rows, pairs = rows_by_list[start : start + count], slice(start, start + count)
            start += count
            if not count or not matrix.shape[1]:
                continue
            partial = torch.addmm(norms, q[rows], matrix, alpha=-2)
            if q_owners is not None:
                partial.masked_fill_(q_owners[rows, None] == owners, float("inf"))
            pair_best[pairs] = partial.amin(dim=1)
        best = torch.full((len(q),), float("inf")).scatter_reduce_(
            0, rows_by_list, pair_best, "amin"
        )
        return (best + q_norms).numpy()

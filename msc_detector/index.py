"""A small wrapper around an exact Faiss L2 index: build, chunked search, leave-self-out.

:class:`PatchIndex` adds, per indexed patch, the training image it came from and its
place in the feature grid, for leave-one-image-out searches and explanations.

The index lives on the CPU. Searches move it to a GPU only when ``faiss-gpu`` is
installed and a GPU is asked for; pickling goes through ``faiss.serialize_index``.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

__all__ = ["KNNIndex", "PatchIndex"]


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class KNNIndex:
    """Exact nearest neighbours under squared L2 distance.

    Parameters
    ----------
    chunk_size : int, default=16384
        Number of queries searched at once, which bounds the memory of a search.
    use_gpu : bool, default=False
        Search on GPU 0 when Faiss was built with GPU support.

    Attributes
    ----------
    index : faiss.Index or None
        The CPU index after :meth:`fit`.
    """

    def __init__(self, chunk_size: int = 16384, use_gpu: bool = False) -> None:
        self.chunk_size = chunk_size
        self.use_gpu = use_gpu
        self.index: Any = None
        self._search_index: Any = None

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Dimension of the indexed vectors."""
        return int(self.index.d)

    def fit(self, vectors: np.ndarray) -> KNNIndex:
        """Index ``vectors`` of shape ``(n, d)``."""
        vectors = _as_float32(vectors)
        index = faiss.IndexFlatL2(vectors.shape[1])
        index.add(vectors)
        self.index = index
        self._search_index = None
        return self

    def vectors(self) -> np.ndarray:
        """Return the indexed vectors, ``(ntotal, dim)`` float32, in the order added."""
        if self.index is None:
            raise RuntimeError("The index is empty; call fit first.")
        return self.index.reconstruct_n(0, self.ntotal)

    def _searcher(self) -> Any:
        if self._search_index is None:
            self._search_index = self.index
            if self.use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus():
                self._gpu_resources = faiss.StandardGpuResources()
                self._search_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        return self._search_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return squared distances and indices of the ``k`` nearest indexed vectors.

        Parameters
        ----------
        queries : ndarray of shape (m, d)
        k : int

        Returns
        -------
        distances : ndarray of shape (m, k), float32
            Squared L2 distances, ascending.
        indices : ndarray of shape (m, k), int64
        """
        if self.index is None:
            raise RuntimeError("The index is empty; call fit first.")
        if k > self.ntotal:
            raise ValueError(f"k={k} exceeds the {self.ntotal} indexed vectors.")
        queries = _as_float32(queries)
        searcher = self._searcher()
        dists, idx = [], []
        for start in range(0, len(queries), self.chunk_size):
            d, i = searcher.search(queries[start : start + self.chunk_size], k)
            dists.append(d)
            idx.append(i)
        if not dists:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate(dists), np.concatenate(idx)

    def search_leave_self_out(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of each indexed vector among the *other* indexed vectors.

        Queries ``k + 1`` neighbours and removes the vector itself; where exact
        duplicates hide the self match, the farthest neighbour is dropped instead.

        Returns
        -------
        distances, indices : ndarray of shape (n, k)
        """
        if k + 1 > self.ntotal:
            raise ValueError(f"Leave-self-out with k={k} needs at least {k + 1} indexed vectors.")
        dists, idx = self.search(self.vectors(), k + 1)
        is_self = idx == np.arange(len(idx))[:, None]
        # Rows without a self match drop their last (farthest) column.
        is_self[~is_self.any(axis=1), -1] = True
        # If several columns claim self (impossible) keep only the first.
        keep = ~is_self
        return dists[keep].reshape(-1, k), idx[keep].reshape(-1, k)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "chunk_size": self.chunk_size,
            "use_gpu": self.use_gpu,
            "index": None,
        }
        if self.index is not None:
            state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.chunk_size = state["chunk_size"]
        self.use_gpu = state["use_gpu"]
        blob = state["index"]
        self.index = None if blob is None else faiss.deserialize_index(np.asarray(blob))
        self._search_index = None


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
    index : KNNIndex
    owners, positions : ndarray, int64
    grid : tuple of int
    baseline : ndarray of shape (h, w), float32
    """

    # Neighbours fetched first by a leave-one-image-out search; doubled where needed.
    _FIRST_K = 16

    def __init__(
        self,
        vectors: np.ndarray,
        owners: np.ndarray,
        positions: np.ndarray,
        grid: tuple[int, int],
        baseline: np.ndarray | None = None,
    ) -> None:
        self.index = KNNIndex().fit(vectors)
        self.owners = np.ascontiguousarray(owners, dtype=np.int64)
        self.positions = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1, 2)
        self.grid = (int(grid[0]), int(grid[1]))
        self.baseline = np.zeros(self.grid, np.float32)
        if baseline is not None:
            self.baseline = np.ascontiguousarray(baseline, dtype=np.float32).reshape(self.grid)
        if not len(self.owners) == len(self.positions) == self.index.ntotal:
            raise ValueError("A patch index needs one owner and one position per vector.")

    def __len__(self) -> int:
        return self.index.ntotal

    def vectors(self) -> np.ndarray:
        """Return the indexed patch embeddings, ``(m, d)`` float32."""
        return self.index.vectors()

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared distance to, and position in the index of, each query's nearest patch.

        Returns
        -------
        distances : ndarray of shape (q,), float32
        indices : ndarray of shape (q,), int64
        """
        dists, idx = self.index.search(queries, 1)
        return dists[:, 0], idx[:, 0]

    def nearest_other_image(
        self, queries: np.ndarray, query_owners: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`nearest`, among the patches of images other than each query's own.

        A query whose image owns every indexed patch gets its nearest own patch.

        Parameters
        ----------
        queries : ndarray of shape (q, d)
        query_owners : ndarray of shape (q,)
            The training image each query comes from.
        """
        query_owners = np.asarray(query_owners, dtype=np.int64)
        dists = np.empty(len(queries), np.float32)
        found = np.empty(len(queries), np.int64)
        todo = np.arange(len(queries))
        k = min(self._FIRST_K, len(self))
        while len(todo):
            d, i = self.index.search(queries[todo], k)
            other = self.owners[i] != query_owners[todo, None]
            hit = other.any(axis=1)
            first = other.argmax(axis=1)
            rows = np.flatnonzero(hit)
            dists[todo[rows]] = d[rows, first[rows]]
            found[todo[rows]] = i[rows, first[rows]]
            todo = todo[~hit]
            if k == len(self) and len(todo):  # only own patches: the nearest of those
                dists[todo], found[todo] = d[~hit, 0], i[~hit, 0]
                break
            k = min(2 * k, len(self))
        return dists, found

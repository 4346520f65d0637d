"""A small wrapper around an exact Faiss L2 index: build, chunked search, leave-self-out.

The index lives on the CPU. Searches move it to a GPU only when ``faiss-gpu`` is
installed and a GPU is asked for; pickling goes through ``faiss.serialize_index``.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

__all__ = ["KNNIndex"]


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

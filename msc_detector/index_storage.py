"""Faiss indexes as plain arrays checked before Faiss sees them, and a guard for Faiss bytes.

Faiss's own reader (``faiss.deserialize_index``) is C++ written for files one made oneself:
bytes that claim huge sizes make it allocate gigabytes or raise ``std::bad_alloc``. So a
fitted index is taken apart into numpy arrays (:func:`arrays_of`), and rebuilt
(:func:`build`) through Faiss's Python API only after every array has been checked against
a :class:`Layout`: dtype, shape, ranges, each id exactly once, graph links that stay in
their level, finite floats. A crafted file can at worst be refused with a ``ValueError``
that names the array.

:func:`check_serialized_sizes` guards the older path, which keeps handing
``faiss.serialize_index`` bytes to Faiss: it walks the bytes of the structures this package
builds and refuses any count larger than the bytes that follow it, before Faiss reads them.

The layouts and their arrays are listed in the docstring of
:class:`msc_detector.index.KNNIndex`, which stores and loads indexes through this module.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

__all__ = ["STORABLE_TEXT", "STRUCTURES", "Layout", "arrays_of", "build"]
__all__ += ["check_serialized_sizes", "check_structures"]

#: The structures that have a plain-array form.
STRUCTURES = ("flat", "ivf", "ivfpq", "ivfsq", "hnsw")
#: What :func:`check_serialized_sizes` walks, in words (for messages).
STORABLE_TEXT = (
    "flat, PQ, SQ, IVF (Flat, PQ, SQ) and HNSW (Flat, PQ, SQ) indexes, under PCA, OPQ, "
    "random-rotation, L2norm or centring transforms and Flat refinements"
)
# Scalar quantizer names of factory strings (SQ<name>) -> (Faiss type, trained floats per d).
_SQ = {
    "4": ("QT_4bit", 2),
    "6": ("QT_6bit", 2),
    "8": ("QT_8bit", 2),
    "fp16": ("QT_fp16", 0),
    "bf16": ("QT_bf16", 0),
}
# The classic scalar quantizers, whose bytes hold nothing beyond the fields walked here.
_SQ_TYPES = (
    "QT_8bit", "QT_4bit", "QT_8bit_uniform", "QT_4bit_uniform", "QT_fp16", "QT_8bit_direct",
    "QT_6bit", "QT_bf16", "QT_8bit_direct_signed",
)  # fmt: skip
_MAX_DIM = 2**20  # Faiss's own bound on an index's width
_MAX_NODES = 2**31 - 1  # HNSW links are int32
_NODE_CHUNK = 65536  # nodes whose links are checked at once (bounds the temporaries)


@dataclass(frozen=True)
class Layout:
    """The structure of an index, which fixes the names, dtypes and shapes of its arrays.

    Parameters
    ----------
    structure : {"flat", "ivf", "ivfpq", "ivfsq", "hnsw"}
    dim, ntotal : int
        Width and number of the indexed vectors.
    nlist : int, default=0
        Inverted lists (IVF structures).
    pq_m, pq_nbits : int, default=0
        Sub-quantizers and bits per code of ``ivfpq``.
    sq : str, default=""
        The scalar quantizer of ``ivfsq``: ``"4"``, ``"6"``, ``"8"``, ``"fp16"`` or ``"bf16"``.
    M : int, default=0
        Links per node and level of ``hnsw`` (``2 M`` on level 0).
    """

    structure: str
    dim: int
    ntotal: int
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    sq: str = ""
    M: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.structure in STRUCTURES, f"structure in {STRUCTURES}"),
            (1 <= self.dim <= _MAX_DIM, f"dim in [1, {_MAX_DIM}]"),
            (1 <= self.ntotal <= 2**40, "ntotal in [1, 2**40]"),
        ]
        if self.structure in ("ivf", "ivfpq", "ivfsq"):
            checks.append((1 <= self.nlist <= min(self.ntotal, 2**24), "nlist in [1, ntotal]"))
        if self.structure == "ivfpq":
            checks.append((1 <= self.pq_nbits <= 16, "pq_nbits in [1, 16]"))
            checks.append((1 <= self.pq_m <= self.dim, "pq_m in [1, dim]"))
            checks.append((self.pq_m >= 1 and self.dim % self.pq_m == 0, "pq_m dividing dim"))
        if self.structure == "ivfsq":
            checks.append((self.sq in _SQ, f"sq in {tuple(_SQ)}"))
        if self.structure == "hnsw":
            checks.append((2 <= self.M <= 256, "M in [2, 256]"))
            checks.append((self.ntotal <= _MAX_NODES, f"ntotal at most {_MAX_NODES}"))
        for ok, what in checks:
            if not ok:
                raise ValueError(f"The index layout {self} is invalid: it needs {what}.")

    def factory_string(self) -> str:
        """Return the Faiss ``index_factory`` string of an empty index of this layout."""
        return {
            "flat": "Flat",
            "ivf": f"IVF{self.nlist},Flat",
            "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}",
            "ivfsq": f"IVF{self.nlist},SQ{self.sq}",
            "hnsw": f"HNSW{self.M},Flat",
        }[self.structure]


# ---------------------------------------------------------------------- taking apart


def _layout_of(index: Any) -> Layout:
    """Return the layout of a fitted Faiss index, or a ValueError for other structures."""
    index = faiss.downcast_index(index)
    name = type(index).__name__
    if index.metric_type != faiss.METRIC_L2:
        raise ValueError(f"Only L2 indexes have a plain-array form; the {name} is not L2.")
    dim, ntotal = int(index.d), int(index.ntotal)
    if type(index) in (faiss.IndexFlatL2, faiss.IndexFlat):
        return Layout("flat", dim, ntotal)
    if type(index) is faiss.IndexHNSWFlat:
        cum = faiss.vector_to_array(index.hnsw.cum_nneighbor_per_level)
        return Layout("hnsw", dim, ntotal, M=int(cum[1]) // 2)
    if type(index) in (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer):
        quantizer = faiss.downcast_index(index.quantizer)
        if type(quantizer) not in (faiss.IndexFlatL2, faiss.IndexFlat):
            raise ValueError(
                f"Only IVF indexes with a flat coarse quantizer have a plain-array form; "
                f"this one has a {type(quantizer).__name__}."
            )
        nlist = int(index.nlist)
        if type(index) is faiss.IndexIVFFlat:
            return Layout("ivf", dim, ntotal, nlist)
        if type(index) is faiss.IndexIVFPQ:
            return Layout("ivfpq", dim, ntotal, nlist, int(index.pq.M), int(index.pq.nbits))
        qtypes = {getattr(faiss.ScalarQuantizer, q): sq for sq, (q, _) in _SQ.items()}
        if index.sq.qtype in qtypes:
            return Layout("ivfsq", dim, ntotal, nlist, sq=qtypes[index.sq.qtype])
    raise ValueError(
        f"The Faiss {name} has no plain-array form; the structures that have one are "
        "IndexFlatL2, IndexIVFFlat, IndexIVFPQ, IndexIVFScalarQuantizer (SQ4, SQ6, SQ8, "
        "SQfp16, SQbf16) over a flat quantizer, and IndexHNSWFlat."
    )


def _lists_of(ivf: Any, code_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the list sizes, the ids in list order and the codes by id of an IVF index."""
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(lst) for lst in range(ivf.nlist)], np.int64)
    ids = np.empty(int(sizes.sum()), np.int64)
    codes = np.empty((len(ids), code_size), np.uint8)
    start = 0
    for lst in np.flatnonzero(sizes):
        n = int(sizes[lst])
        own = faiss.rev_swig_ptr(invlists.get_ids(int(lst)), n).copy()
        ids[start : start + n] = own
        codes[own] = faiss.rev_swig_ptr(invlists.get_codes(int(lst)), n * code_size).reshape(
            n, code_size
        )
        start += n
    return sizes, ids, codes


def arrays_of(index: Any) -> tuple[Layout, dict[str, np.ndarray]]:
    """Take a fitted Faiss index apart into its layout and plain arrays (module docstring).

    Raises
    ------
    ValueError
        For a structure that has no plain-array form.
    """
    layout = _layout_of(index)
    index = faiss.downcast_index(index)
    if layout.structure == "flat":
        return layout, {"vectors": index.reconstruct_n(0, layout.ntotal)}
    if layout.structure == "hnsw":
        hnsw = index.hnsw
        return layout, {
            "vectors": index.storage.reconstruct_n(0, layout.ntotal),
            "levels": faiss.vector_to_array(hnsw.levels).astype(np.int32),
            "offsets": faiss.vector_to_array(hnsw.offsets).astype(np.int64),
            "neighbors": faiss.vector_to_array(hnsw.neighbors).astype(np.int32),
            "entry_point": np.array([hnsw.entry_point], np.int32),
            "max_level": np.array([hnsw.max_level], np.int32),
        }
    sizes, ids, codes = _lists_of(index, int(index.code_size))
    quantizer = faiss.downcast_index(index.quantizer)
    arrays = {
        "centroids": quantizer.reconstruct_n(0, layout.nlist),
        "list_sizes": sizes,
        "ids": ids,
    }
    if layout.structure == "ivf":
        return layout, {**arrays, "vectors": codes.view(np.float32)}
    if layout.structure == "ivfpq":
        pq = index.pq
        shape = (layout.pq_m, 2**layout.pq_nbits, layout.dim // layout.pq_m)
        arrays["pq_centroids"] = faiss.vector_to_array(pq.centroids).reshape(shape)
    else:
        arrays["sq_trained"] = faiss.vector_to_array(index.sq.trained).astype(np.float32)
    return layout, {**arrays, "codes": codes, "by_residual": np.array([index.by_residual])}


# ---------------------------------------------------------------------- checking


def _names(layout: Layout) -> tuple[str, ...]:
    return {
        "flat": ("vectors",),
        "ivf": ("centroids", "list_sizes", "ids", "vectors"),
        "ivfpq": ("centroids", "list_sizes", "ids", "pq_centroids", "codes", "by_residual"),
        "ivfsq": ("centroids", "list_sizes", "ids", "sq_trained", "codes", "by_residual"),
        "hnsw": ("vectors", "levels", "offsets", "neighbors", "entry_point", "max_level"),
    }[layout.structure]


class _Arrays:
    """The arrays of one layout, each handed out only after its dtype and shape are checked."""

    def __init__(self, arrays: Mapping[str, Any], layout: Layout) -> None:
        expected = set(_names(layout))
        if missing := sorted(expected - set(arrays)):
            raise ValueError(f"The {layout.structure} index arrays lack {', '.join(missing)}.")
        if extra := sorted(set(arrays) - expected):
            raise ValueError(
                f"The {layout.structure} index arrays have unexpected entries "
                f"{', '.join(extra)}; it has {', '.join(sorted(expected))}."
            )
        self._arrays = arrays

    def get(self, name: str, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
        """Return array ``name``; ``None`` in ``shape`` accepts any length on that axis."""
        array = self._arrays[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(
                f"Index array {name!r} must be a numpy array; got {type(array).__name__}."
            )
        if array.dtype != np.dtype(dtype):
            raise ValueError(f"Index array {name!r} must be {np.dtype(dtype)}; got {array.dtype}.")
        fits = array.ndim == len(shape) and all(
            want is None or got == want for got, want in zip(array.shape, shape, strict=False)
        )
        if not fits:
            wanted = tuple("any" if want is None else want for want in shape)
            raise ValueError(f"Index array {name!r} must have shape {wanted}; got {array.shape}.")
        return np.ascontiguousarray(array)

    def floats(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = self.get(name, np.float32, shape)
        if not np.isfinite(array).all():
            raise ValueError(f"Index array {name!r} holds values that are not finite.")
        return array

    def flag(self, name: str) -> bool:
        return bool(self.get(name, np.bool_, (1,))[0])


def _check_lists(arrays: _Arrays, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Return the checked list sizes and ids of an IVF layout."""
    sizes = arrays.get("list_sizes", np.int64, (layout.nlist,))
    if ((sizes < 0) | (sizes > layout.ntotal)).any():  # also keeps the sum from wrapping
        raise ValueError(f"Index array 'list_sizes' holds sizes outside [0, {layout.ntotal}].")
    if int(sizes.sum()) != layout.ntotal:
        raise ValueError(
            f"Index array 'list_sizes' must sum to ntotal={layout.ntotal}; got {int(sizes.sum())}."
        )
    ids = arrays.get("ids", np.int64, (layout.ntotal,))
    if ((ids < 0) | (ids >= layout.ntotal)).any():
        raise ValueError(f"Index array 'ids' holds ids outside [0, {layout.ntotal}).")
    if (np.bincount(ids, minlength=layout.ntotal) != 1).any():
        raise ValueError("Index array 'ids' must hold every id exactly once; some repeat.")
    return sizes, ids


def _check_codes(arrays: _Arrays, layout: Layout, code_size: int) -> np.ndarray:
    codes = arrays.get("codes", np.uint8, (layout.ntotal, code_size))
    if layout.sq in ("fp16", "bf16"):  # codes are half floats: they must decode finite
        halves = codes.view(np.uint16)
        exponent = 0x7C00 if layout.sq == "fp16" else 0x7F80
        if ((halves & exponent) == exponent).any():
            raise ValueError("Index array 'codes' holds half floats that are not finite.")
    return codes


def _check_graph(
    levels: np.ndarray,
    offsets: np.ndarray,
    neighbors: np.ndarray,
    cum: np.ndarray,
    entry_point: int,
    max_level: int,
) -> None:
    """Check an HNSW graph against the links per level ``cum`` of its ``M`` (ValueError)."""
    n = len(levels)
    top = len(cum) - 1
    if ((levels < 1) | (levels > top)).any():
        raise ValueError(f"Index array 'levels' must hold levels in [1, {top}].")
    if offsets[0] != 0 or (np.diff(offsets) != cum[levels]).any():
        raise ValueError(
            "Index array 'offsets' must start at 0 and grow by each node's link count "
            "(fixed by its levels and M)."
        )
    if len(neighbors) != offsets[-1]:
        raise ValueError(f"Index array 'neighbors' must have shape ({int(offsets[-1])},).")
    if ((neighbors < -1) | (neighbors >= n)).any():
        raise ValueError(f"Index array 'neighbors' holds ids outside [-1, {n}).")
    for start in range(0, n, _NODE_CHUNK):  # a link at level L must lead to a node on L
        stop = min(n, start + _NODE_CHUNK)
        first, last = int(offsets[start]), int(offsets[stop])
        slots = np.arange(first, last) - np.repeat(
            offsets[start:stop], np.diff(offsets[start : stop + 1])
        )
        level = np.searchsorted(cum, slots, side="right") - 1
        links = neighbors[first:last]
        linked = links >= 0
        if (levels[links[linked]] <= level[linked]).any():
            raise ValueError("Index array 'neighbors' links nodes on levels they do not have.")
    if max_level != int(levels.max()) - 1:
        raise ValueError(
            f"Index array 'max_level' must be max(levels) - 1 = {int(levels.max()) - 1}."
        )
    if not (0 <= entry_point < n and levels[entry_point] == max_level + 1):
        raise ValueError("Index array 'entry_point' must be a node on the top level.")


# ---------------------------------------------------------------------- rebuilding


def build(layout: Layout, arrays: Mapping[str, Any]) -> Any:
    """Check ``arrays`` against ``layout`` and rebuild the Faiss index from them.

    Nothing reaches Faiss before every array has been checked, and Faiss allocates only
    what the checked arrays hold. Search defaults (``nprobe``, ``efSearch``) are Faiss's:
    the caller sets them.

    Raises
    ------
    ValueError
        Naming the array and what is wrong with it.
    """
    checked = _Arrays(arrays, layout)
    n, d = layout.ntotal, layout.dim
    if layout.structure == "flat":
        flat = faiss.index_factory(d, "Flat", faiss.METRIC_L2)  # an IndexFlat, as fit builds
        flat.add(checked.floats("vectors", (n, d)))
        return flat
    if layout.structure == "hnsw":
        return _build_hnsw(layout, checked)
    centroids = checked.floats("centroids", (layout.nlist, d))
    sizes, ids = _check_lists(checked, layout)
    extra: dict[str, np.ndarray] = {}
    if layout.structure == "ivfpq":
        shape = (layout.pq_m, 2**layout.pq_nbits, d // layout.pq_m)
        extra["pq"] = checked.floats("pq_centroids", shape)
    if layout.structure == "ivfsq":
        extra["sq"] = checked.floats("sq_trained", (_SQ[layout.sq][1] * d,))
    by_residual = checked.flag("by_residual") if layout.structure != "ivf" else False
    index: Any = faiss.index_factory(d, layout.factory_string(), faiss.METRIC_L2)
    code_size = int(index.code_size)
    if layout.structure == "ivf":
        codes = checked.floats("vectors", (n, d)).view(np.uint8)
    else:
        codes = _check_codes(checked, layout, code_size)
    faiss.downcast_index(index.quantizer).add(centroids)
    if layout.structure == "ivfpq":
        faiss.copy_array_to_vector(extra["pq"].ravel(), index.pq.centroids)
    if layout.structure == "ivfsq":
        faiss.copy_array_to_vector(extra["sq"], index.sq.trained)
    if layout.structure != "ivf":
        index.by_residual = by_residual
    index.is_trained = True
    invlists, start = index.invlists, 0
    for lst in np.flatnonzero(sizes):
        own = np.ascontiguousarray(ids[start : start + sizes[lst]])
        rows = np.ascontiguousarray(codes[own])
        invlists.add_entries(int(lst), len(own), faiss.swig_ptr(own), faiss.swig_ptr(rows))
        start += len(own)
    index.ntotal = n
    if layout.structure == "ivfpq" and by_residual:
        index.precompute_table()  # as Faiss's reader does; the table is not stored
    return index


def _build_hnsw(layout: Layout, checked: _Arrays) -> Any:
    n, d = layout.ntotal, layout.dim
    vectors = checked.floats("vectors", (n, d))
    levels = checked.get("levels", np.int32, (n,))
    offsets = checked.get("offsets", np.int64, (n + 1,))
    neighbors = checked.get("neighbors", np.int32, (None,))
    entry_point = int(checked.get("entry_point", np.int32, (1,))[0])
    max_level = int(checked.get("max_level", np.int32, (1,))[0])
    index = faiss.IndexHNSWFlat(d, layout.M)  # empty: fixes the links per level of M
    cum = faiss.vector_to_array(index.hnsw.cum_nneighbor_per_level).astype(np.int64)
    _check_graph(levels, offsets, neighbors, cum, entry_point, max_level)
    index.storage.add(vectors)
    hnsw: Any = index.hnsw
    faiss.copy_array_to_vector(levels, hnsw.levels)
    faiss.copy_array_to_vector(offsets.astype(np.uint64), hnsw.offsets)
    faiss.copy_array_to_vector(neighbors, hnsw.neighbors)
    hnsw.entry_point, hnsw.max_level = entry_point, max_level
    index.ntotal = n
    return index


# ---------------------------------------------------------------------- Faiss bytes


class _Walk:
    """A cursor over ``faiss.serialize_index`` bytes that refuses what they cannot hold.

    With ``structures_only``, counts that disagree are let through (an index not yet
    trained has no centroids for its ``nlist``); unknown structures and counts beyond
    the bytes are still refused.
    """

    def __init__(self, data: memoryview, structures_only: bool = False) -> None:
        self.data = data
        self.pos = 0
        self.structures_only = structures_only

    @classmethod
    def over(cls, blob: bytes | np.ndarray, structures_only: bool = False) -> _Walk:
        """Return a cursor at the start of ``blob``: bytes, or a uint8 array of any shape."""
        data = np.frombuffer(blob, np.uint8) if isinstance(blob, bytes) else blob
        return cls(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1).data, structures_only)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or size > self.left:
            raise ValueError(
                f"The Faiss index bytes claim {what} of {size} bytes at byte {self.pos}, but "
                f"only {self.left} bytes follow."
            )
        view = self.data[self.pos : self.pos + size]
        self.pos += size
        return view

    def scalar(self, code: str, what: str) -> Any:
        return struct.unpack_from("<" + code, self.take(struct.calcsize(code), what))[0]

    def fourcc(self) -> str:
        return bytes(self.take(4, "a structure tag")).decode("latin-1")

    def vector(self, itemsize: int, what: str) -> int:
        """Skip a length-prefixed vector of items of ``itemsize`` bytes; return its length."""
        count = self.scalar("Q", f"the length of {what}")
        if count > self.left // itemsize:
            raise ValueError(
                f"The Faiss index bytes claim {what} of {count} items of {itemsize} bytes at "
                f"byte {self.pos}, but only {self.left} bytes follow."
            )
        self.take(count * itemsize, what)
        return int(count)

    def values(self, dtype: str, what: str) -> np.ndarray:
        """Read a length-prefixed vector of ``dtype`` items."""
        start = self.pos + 8
        count = self.vector(np.dtype(dtype).itemsize, what)
        return np.frombuffer(self.data, dtype, count, start)

    def require(self, ok: bool, what: str) -> None:
        if not ok and not self.structures_only:
            raise ValueError(
                f"The Faiss index bytes are inconsistent near byte {self.pos}: {what}."
            )


def check_serialized_sizes(blob: bytes | np.ndarray) -> None:
    """Refuse ``faiss.serialize_index`` bytes that claim more than they hold.

    Walks the structures this package builds (flat, IVF-Flat, IVF-PQ, IVF-SQ, PQ, SQ and
    HNSW indexes, pre-transforms such as PCA and refinements) and raises a ``ValueError``
    when a count or a length is larger than the bytes after it, when counts disagree
    (``nlist`` and the quantizer's size, list sizes and ``ntotal``, an HNSW graph and its
    offsets), on a structure it does not know, or on bytes left over. Passing it does not
    make the bytes trustworthy; it bounds what Faiss's reader allocates by their size.
    """
    walk = _Walk.over(blob)
    _walk_index(walk, 0)
    walk.require(walk.left == 0, f"{walk.left} bytes follow the index")


def check_structures(blob: bytes | np.ndarray) -> None:
    """Refuse the bytes of an index, trained or not, that hold a structure not walked here.

    An index whose bytes fail this could be fitted but never loaded back from a model
    file or a pickle; :func:`check_serialized_sizes` would refuse them.
    """
    _walk_index(_Walk.over(blob, structures_only=True), 0)


def _walk_header(walk: _Walk) -> tuple[int, int]:
    d = walk.scalar("i", "the width")
    ntotal = walk.scalar("q", "the size")
    walk.require(0 <= d <= _MAX_DIM and ntotal >= 0, f"width {d} or size {ntotal} out of range")
    walk.take(17, "the header")  # two unused int64, is_trained
    if walk.scalar("i", "the metric") > 1:
        walk.take(4, "the metric argument")
    return d, ntotal


def _walk_index(walk: _Walk, depth: int) -> tuple[int, int] | None:
    """Walk one index; return its width and size (None for a missing one)."""
    walk.require(depth < 8, "indexes nested more than 8 deep")
    tag = walk.fourcc()
    if tag == "null":
        return None
    if tag in ("IxF2", "IxFl"):
        d, n = _walk_header(walk)
        walk.require(walk.vector(4, "the flat vectors") == n * d, "flat vectors != size x width")
        return d, n
    if tag == "IxSQ":
        d, n = _walk_header(walk)
        code_size = _walk_sq(walk, d)
        walk.require(walk.vector(1, "the codes") == n * code_size, "codes != size x code size")
        return d, n
    if tag == "IxPq":
        d, n = _walk_header(walk)
        code_size = _walk_pq(walk, d)
        walk.require(walk.vector(1, "the codes") == n * code_size, "codes != size x code size")
        walk.take(9, "the search settings")
        return d, n
    if tag in ("IwFl", "IwPQ", "IwSq", "IwSQ"):
        return _walk_ivf(walk, tag, depth)
    if tag == "IxPT":
        d, n = _walk_header(walk)
        chain = walk.scalar("i", "the number of transforms")
        walk.require(0 <= chain <= 8, f"{chain} transforms")
        for _ in range(chain):
            _walk_transform(walk)
        inner = _walk_index(walk, depth + 1)
        walk.require(inner is not None and inner[1] == n, "the transformed index's size")
        return d, n
    if tag == "IxRF":
        d, n = _walk_header(walk)
        parts = [_walk_index(walk, depth + 1) for _ in range(2)]
        walk.require(all(p is not None and p[1] == n for p in parts), "the refined sizes")
        k_factor = walk.scalar("f", "k_factor")
        walk.require(math.isfinite(k_factor) and 1 <= k_factor <= 1000, "k_factor")
        return d, n
    if tag in ("IHNf", "IHNs", "IHNp"):
        d, n = _walk_header(walk)
        _walk_hnsw(walk, n)
        storage = _walk_index(walk, depth + 1)
        walk.require(storage == (d, n), "the HNSW storage's width or size")
        return d, n
    raise ValueError(
        f"The Faiss index bytes hold a structure {tag!r} whose sizes cannot be checked "
        "before Faiss reads them, so they are not read."
    )


def _walk_ivf(walk: _Walk, tag: str, depth: int) -> tuple[int, int]:
    d, n = _walk_header(walk)
    nlist = walk.scalar("Q", "nlist")
    walk.take(8, "nprobe")
    quantizer = _walk_index(walk, depth + 1)
    walk.require(quantizer == (d, nlist), "nlist differs from the quantizer's size")
    kind = walk.scalar("B", "the direct map type")
    walk.require(kind in (0, 1, 2), f"direct map type {kind}")
    walk.vector(8, "the direct map")
    if kind == 2:
        walk.vector(16, "the direct map's hash table")
    if tag == "IwFl":
        code_size = 4 * d
    elif tag == "IwPQ":
        walk.take(1, "by_residual")
        code_size = walk.scalar("Q", "the code size")
        walk.require(code_size == _walk_pq(walk, d), "the code size")
    else:
        code_size = _walk_sq(walk, d)
        walk.require(walk.scalar("Q", "the code size") == code_size, "the code size")
        if tag == "IwSq":
            walk.take(1, "by_residual")
    _walk_lists(walk, nlist, code_size, n)
    return d, n


def _walk_lists(walk: _Walk, nlist: int, code_size: int, ntotal: int) -> None:
    tag = walk.fourcc()
    walk.require(tag == "ilar", f"inverted lists of type {tag!r}")
    walk.require(walk.scalar("Q", "nlist") == nlist, "the inverted lists' nlist")
    walk.require(walk.scalar("Q", "the code size") == code_size, "the lists' code size")
    kind = walk.fourcc()
    walk.require(kind in ("full", "sprs"), f"list sizes of type {kind!r}")
    sizes = walk.values("<u8", "the list sizes")
    if kind == "full":
        walk.require(len(sizes) == nlist, "one size per list")
    else:
        lists = sizes[::2]
        walk.require(
            len(sizes) % 2 == 0
            and bool((lists < nlist).all())
            and len(np.unique(lists)) == len(lists),
            "sparse list sizes",
        )
        sizes = sizes[1::2]
    per_entry = code_size + 8  # a code and an id
    walk.require(bool((sizes <= walk.left // per_entry).all()), "a list larger than the bytes")
    total = int(sizes.sum(dtype=np.float64))  # exact: each size is below 2**40
    walk.require(total == ntotal, f"the lists hold {total} entries, not {ntotal}")
    walk.take(total * per_entry, "the inverted lists")


def _walk_pq(walk: _Walk, d: int) -> int:
    """Walk a product quantizer; return its code size."""
    pq_d, m, nbits = (walk.scalar("Q", what) for what in ("the PQ width", "pq_m", "pq_nbits"))
    walk.require(pq_d == d and 1 <= m <= d and d % m == 0 and 1 <= nbits <= 24, "the PQ sizes")
    walk.require(walk.vector(4, "the PQ centroids") == d * 2**nbits, "the PQ centroids")
    return (m * nbits + 7) // 8


def _walk_sq(walk: _Walk, d: int) -> int:
    """Walk a scalar quantizer; return its code size."""
    qtype = walk.scalar("i", "the quantizer type")
    known = {getattr(faiss.ScalarQuantizer, name) for name in _SQ_TYPES}
    walk.require(qtype in known, f"scalar quantizer type {qtype}")
    walk.take(8, "the range statistic")
    walk.require(walk.scalar("Q", "the SQ width") == d, "the SQ width")
    code_size = walk.scalar("Q", "the SQ code size")
    walk.require(code_size == faiss.ScalarQuantizer(d, qtype).code_size, "the SQ code size")
    walk.require(walk.vector(4, "the SQ training") <= 2 * d, "the SQ training")
    return int(code_size)


def _walk_transform(walk: _Walk) -> None:
    tag = walk.fourcc()
    if tag in ("Pcam", "PcAm", "PCAm", "rrot", "LTra", "Viqm"):
        if tag in ("Pcam", "PcAm", "PCAm"):
            walk.take(8 if tag == "Pcam" else 4, "the PCA settings")
            walk.take(1, "random_rotation")
            if tag != "PCAm":
                walk.take(4, "balanced_bins")
            for what in ("the PCA mean", "the eigenvalues", "the PCA matrix"):
                walk.vector(4, what)
        if tag == "Viqm":
            walk.take(8, "the ITQ settings")
        walk.take(1, "have_bias")
        a = walk.vector(4, "the matrix")
        b = walk.vector(4, "the bias")
    elif tag == "RmDT":
        walk.vector(4, "the dimension map")
    elif tag == "VNrm":
        walk.take(4, "the norm")
    elif tag == "VCnt":
        walk.vector(4, "the mean")
    else:
        raise ValueError(
            f"The Faiss index bytes hold a transform {tag!r} whose sizes cannot be checked "
            "before Faiss reads them, so they are not read."
        )
    d_in, d_out = walk.scalar("i", "d_in"), walk.scalar("i", "d_out")
    walk.take(1, "is_trained")
    walk.require(0 <= d_in <= _MAX_DIM and 0 <= d_out <= _MAX_DIM, "the transform's widths")
    if tag in ("Pcam", "PcAm", "PCAm", "rrot", "LTra", "Viqm"):
        walk.require(a == d_in * d_out and b in (0, d_out), "the transform's matrix")


def _walk_hnsw(walk: _Walk, n: int) -> None:
    probas = walk.vector(8, "the level probabilities")
    cum = walk.values("<i4", "the links per level").astype(np.int64)
    walk.require(
        len(cum) == probas + 1 and cum[0] == 0 and bool((np.diff(cum) >= 0).all()),
        "the links per level",
    )
    levels = walk.values("<i4", "the levels")
    offsets = walk.values("<u8", "the offsets")
    walk.require(len(levels) == n and len(offsets) == n + 1, "levels or offsets != size")
    walk.require(bool((offsets <= 2**62).all()), "offsets out of range")
    neighbors = walk.values("<i4", "the links")
    entry_point, max_level = walk.scalar("i", "the entry point"), walk.scalar("i", "max_level")
    walk.take(12, "the HNSW settings")  # efConstruction, efSearch, an unused int
    if n:
        _check_graph(levels, offsets.astype(np.int64), neighbors, cum, entry_point, max_level)

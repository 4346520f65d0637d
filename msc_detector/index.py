"""Faiss kNN indexes under squared L2: build in chunks, search, leave-self-out, serialise.

An :class:`IndexSpec` names the index (``"flat"``, ``"ivf"``, ``"ivfpq"``, ``"hnsw"`` or a
Faiss ``index_factory`` string) and its build and search settings; a :class:`KNNIndex`
builds it from one array or from chunks, so a bank larger than memory as float32 can be
indexed in a compressed form. The fitted index lives on the CPU. Search settings
(``nprobe``, ``efSearch``) are passed to each search as Faiss search parameters, so a
search never changes the fitted index. Searches move a copy to a GPU only when
``faiss-gpu`` is installed and a GPU is asked for; pickling goes through
``faiss.serialize_index``. For files, :meth:`KNNIndex.to_arrays` and
:meth:`KNNIndex.from_arrays` store an index as plain arrays that are checked before Faiss
sees them (:mod:`msc_detector.index_storage`), and :func:`check_serialized_sizes` guards
``faiss.serialize_index`` bytes before Faiss's reader parses them.

The patch bank has its own search (:class:`msc_detector.patch_bank.PatchIndex`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from msc_detector import index_storage
from msc_detector.index_kinds import (
    ARRAY_KINDS_TEXT,
    FACTORY_LAYOUTS,
    INDEX_KINDS,
    has_plain_form,
)
from msc_detector.index_storage import Layout, check_serialized_sizes

__all__ = ["INDEX_KINDS", "IndexSpec", "KNNIndex", "check_serialized_sizes"]

logger = logging.getLogger(__name__)

_SEARCH_KEYS = ("nprobe", "efSearch")
# The settings each kind reads; a factory string reads train_size and the search settings
# that its index has (checked when it is built).
_KEYS = {
    "flat": (),
    "ivf": ("nlist", "train_size", "nprobe"),
    "ivfpq": ("nlist", "pq_m", "pq_nbits", "train_size", "nprobe"),
    "hnsw": ("M", "efConstruction", "efSearch"),
    "factory": ("train_size", *_SEARCH_KEYS),
}
_ALL_KEYS = ("nlist", "pq_m", "pq_nbits", "M", "efConstruction", "train_size", *_SEARCH_KEYS)
_KINDS_TEXT = (
    "'flat', 'ivf', 'ivfpq', 'hnsw' or a Faiss index_factory string such as 'IVF256,Flat'"
)
_EF_SEARCH, _EF_CONSTRUCTION = 64, 40  # HNSW defaults, also for factory strings
# The range of each setting, checked before Faiss sees a value: Faiss allocates from some
# (a search queue of efSearch entries: 2**31 - 1 ends in std::bad_alloc), crashes on
# others (M=1) and overflows on values beyond 64 bits. The bounds leave room far beyond
# useful values: efSearch=256 finds 94 % of the true neighbours among 1M vectors
# (benchmarks/README.md), M above 64 and nlist above 2**20 are past Faiss's own guidance.
# Limits that depend on the index (nprobe <= nlist, nlist and 2**pq_nbits <= training
# vectors, pq_m divides the width) are checked where the index is built or searched.
_BOUNDS = {
    "nlist": (1, 2**24),
    "nprobe": (1, 2**24),
    "train_size": (1, 2**40),
    "pq_m": (1, 2**16),
    "pq_nbits": (1, 16),
    "M": (2, 256),
    "efConstruction": (1, 2**16),
    "efSearch": (1, 2**16),
}
_MISSING = -1  # the id Faiss gives where it found fewer than k neighbours
_faiss: Any = faiss  # Faiss's type stubs lack the search-parameter classes


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_setting(key: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is an int within the bounds of setting ``key``."""
    low, high = _BOUNDS[key]
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not (is_int and low <= value <= high):
        raise ValueError(
            f"index_params[{key!r}] must be an int in [{low}, {high}]; got {value!r}."
        )


@dataclass(frozen=True)
class IndexSpec:
    """What index to build and how to search it.

    Parameters
    ----------
    kind : str, default="flat"
        ``"flat"`` (exact), ``"ivf"`` (inverted lists of full vectors), ``"ivfpq"``
        (inverted lists of product-quantised codes), ``"hnsw"`` (a neighbour graph of full
        vectors), or any Faiss ``index_factory`` string (L2 metric).
    params : dict, default={}
        Build settings ``nlist``, ``train_size``, ``pq_m``, ``pq_nbits``, ``M``,
        ``efConstruction`` and search settings ``nprobe``, ``efSearch``, only those the
        kind reads; the rest default from the bank size (:meth:`resolve`). Each is an
        int in a range: ``nlist`` and ``nprobe`` in [1, 2**24], ``train_size`` in
        [1, 2**40], ``pq_m`` in [1, 2**16], ``pq_nbits`` in [1, 16], ``M`` in [2, 256],
        ``efConstruction`` and ``efSearch`` in [1, 2**16]; building also needs
        ``nprobe <= nlist``, at least ``nlist`` and ``2**pq_nbits`` training vectors and
        ``pq_m`` dividing the width.
    """

    kind: str = "flat"
    params: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind.strip():
            raise ValueError(f"index must be {_KINDS_TEXT}; got {self.kind!r}.")
        if not isinstance(self.params, Mapping):
            raise ValueError(
                "index_params must be a dict of settings or None; got "
                f"{type(self.params).__name__}."
            )
        for key, value in self.params.items():
            if key not in _ALL_KEYS:
                raise ValueError(
                    f"index_params has the unknown setting {key!r}; the settings are "
                    f"{', '.join(_ALL_KEYS)}."
                )
            if key not in _KEYS[self.family]:
                raise ValueError(
                    f"index_params[{key!r}] does not apply to index={self.kind!r}, which reads "
                    f"{', '.join(_KEYS[self.family]) or 'no settings'}. Remove it."
                )
            _check_setting(key, value)

    @property
    def family(self) -> str:
        """The kind, or ``"factory"`` for a Faiss factory string."""
        return self.kind if self.kind in INDEX_KINDS else "factory"

    @property
    def exact(self) -> bool:
        """Whether searches are exact (the flat index)."""
        return self.kind == "flat"

    @property
    def has_plain_form(self) -> bool:
        """Whether :meth:`KNNIndex.to_arrays` can store this kind (model files then do)."""
        return has_plain_form(self.kind)

    @property
    def trains(self) -> bool:
        """Whether building needs a training sample (all kinds but flat and hnsw)."""
        return self.family in ("ivf", "ivfpq", "factory")

    def search_settings(self) -> dict[str, int]:
        """Return the search settings given in ``params`` (``nprobe``, ``efSearch``)."""
        return {k: int(v) for k, v in self.params.items() if k in _SEARCH_KEYS}

    def resolve(self, n: int, dim: int) -> dict[str, int]:
        """Every setting the kind reads, for ``n`` vectors of ``dim`` floats.

        Defaults: ``nlist = 4 sqrt(n)`` (at most ``n / 39``, at least 1);
        ``train_size = min(n, max(20000, 40 nlist))``; ``nprobe = ceil(sqrt(nlist))``;
        ``pq_m`` the largest divisor of ``dim`` up to ``dim / 16`` (16 floats per byte
        of code); ``pq_nbits = 8`` (fewer below 39 training vectors per code word); ``M = 32``,
        ``efConstruction = 40``, ``efSearch = 64``.
        """
        p = dict(self.params)
        out: dict[str, int] = {}
        family = self.family
        if family in ("ivf", "ivfpq"):
            out["nlist"] = p.get("nlist", max(1, min(round(4 * math.sqrt(n)), n // 39)))
            out["nprobe"] = p.get("nprobe", math.ceil(math.sqrt(out["nlist"])))
        if self.trains:
            default_train = max(20_000, 40 * out.get("nlist", 0))
            out["train_size"] = min(n, p.get("train_size", default_train))
        if family == "ivfpq":
            out["pq_m"] = p.get(
                "pq_m", max(m for m in range(1, max(1, dim // 16) + 1) if dim % m == 0)
            )
            out["pq_nbits"] = p.get(
                "pq_nbits", max(1, min(8, int(math.log2(max(out["train_size"] / 39, 2)))))
            )
        if family == "hnsw":
            out.update(M=32, efConstruction=_EF_CONSTRUCTION, efSearch=_EF_SEARCH)
            out.update({k: v for k, v in p.items() if k in out})
        if family == "factory":
            out.update(self.search_settings())
        return out

    def factory_string(self, n: int, dim: int) -> str:
        """Return the Faiss ``index_factory`` string of this spec for ``n`` vectors of ``dim``."""
        s = self.resolve(n, dim)
        return {
            "flat": "Flat",
            "ivf": f"IVF{s.get('nlist')},Flat",
            "ivfpq": f"IVF{s.get('nlist')},PQ{s.get('pq_m')}x{s.get('pq_nbits')}",
            "hnsw": f"HNSW{s.get('M')},Flat",
        }.get(self.family, self.kind)

    def check(self, n: int, dim: int) -> None:
        """Raise a ``ValueError`` saying what to change if Faiss cannot build this spec."""
        _new_index(self, n, dim)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"kind": str, "params": {str: int}}``."""
        return {"kind": self.kind, "params": {k: int(v) for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexSpec:
        """Inverse of :meth:`to_dict` (validates like the constructor)."""
        return cls(str(data["kind"]), dict(data.get("params") or {}))


def _new_index(spec: IndexSpec, n: int, dim: int) -> Any:
    """Build an empty Faiss index for ``spec``; a ``ValueError`` says what to change."""
    string = spec.factory_string(n, dim)
    settings = spec.resolve(n, dim)
    if spec.family == "ivfpq" and dim % settings["pq_m"]:
        raise ValueError(
            f"index_params['pq_m']={settings['pq_m']} must divide the embedding width {dim}."
        )
    if spec.family == "ivfpq" and 2 ** settings["pq_nbits"] > settings["train_size"]:
        raise ValueError(
            f"index_params['pq_nbits']={settings['pq_nbits']} needs at least "
            f"2**pq_nbits = {2 ** settings['pq_nbits']} training vectors; there are "
            f"{settings['train_size']}. Lower pq_nbits or raise train_size."
        )
    try:
        index = faiss.index_factory(dim, string, faiss.METRIC_L2)
    except RuntimeError as exc:
        reason = _faiss_reason(exc)
        raise ValueError(
            f"index={spec.kind!r} gives the Faiss index_factory string {string!r}, which Faiss "
            f"cannot build for {dim}-dimensional embeddings ({reason}). Use {_KINDS_TEXT}."
        ) from exc
    if spec.family == "factory" and index.metric_type != faiss.METRIC_L2:
        raise ValueError(f"index={spec.kind!r} must use the L2 metric; drop its metric option.")
    knobs = _knobs(index, n)
    if unusable := [key for key in spec.search_settings() if key not in knobs]:
        raise ValueError(
            f"index_params[{unusable[0]!r}] does not apply to index={spec.kind!r}, whose Faiss "
            f"index reads {', '.join(knobs) or 'no search settings'}. Remove it."
        )
    _check_structure(spec, index, settings.get("train_size", n))
    if not spec.has_plain_form:  # stored as Faiss's bytes, which must be read back
        try:
            index_storage.check_structures(faiss.serialize_index(index))
        except ValueError as exc:
            raise ValueError(
                f"index={spec.kind!r} makes a Faiss {type(faiss.downcast_index(index)).__name__}"
                f", which a model file or a pickle of the detector could not load back: {exc} "
                f"Use {_KINDS_TEXT} built from {index_storage.STORABLE_TEXT}."
            ) from exc
    _set_search_defaults(index, settings)
    return index


def _faiss_reason(exc: RuntimeError) -> str:
    """Return the reason in a Faiss error, without the C++ function and file that raised it."""
    last = str(exc).strip().splitlines()[-1]
    return last.rsplit(" failed: ", 1)[-1].rsplit("Error: ", 1)[-1]


def _check_structure(spec: IndexSpec, index: Any, train_size: int) -> None:
    """Check the limits that depend on the built index (nlist, nprobe, a factory's M)."""
    if "nprobe" in _knobs(index, 0):
        nlist = int(faiss.extract_index_ivf(index).nlist)
        if nlist > train_size:
            raise ValueError(
                f"index={spec.kind!r} has nlist={nlist} lists, which need at least {nlist} "
                f"training vectors; there are {train_size}. Lower nlist or raise train_size."
            )
        nprobe = spec.params.get("nprobe", 1)
        if nprobe > nlist:
            raise ValueError(
                f"index_params['nprobe'] must be in [1, {nlist}], the nlist of "
                f"index={spec.kind!r}; got {nprobe}."
            )
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        cum = faiss.vector_to_array(hnsw.hnsw.cum_nneighbor_per_level)
        m = int(cum[1]) // 2 if len(cum) > 1 else 1  # level 0 keeps 2 M links; none at M=1
        low, high = _BOUNDS["M"]
        if not low <= m <= high:
            raise ValueError(f"index={spec.kind!r} has an HNSW M outside [{low}, {high}].")


def _set_search_defaults(index: Any, settings: Mapping[str, int]) -> None:
    """Store the search defaults in ``index``; per-search settings override them."""
    if "nprobe" in _knobs(index, 0):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = settings.get("nprobe", math.ceil(math.sqrt(ivf.nlist)))
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = settings.get("efSearch", _EF_SEARCH)
        hnsw.hnsw.efConstruction = settings.get("efConstruction", _EF_CONSTRUCTION)


def _layout(spec: IndexSpec, ntotal: int, dim: int) -> Layout:
    """Return the plain-array layout of ``spec`` for ``ntotal`` vectors of ``dim``."""
    if spec.family != "factory":
        s = spec.resolve(ntotal, dim)
        return Layout(
            {"flat": "flat", "ivf": "ivf", "ivfpq": "ivfpq", "hnsw": "hnsw"}[spec.family],
            dim,
            ntotal,
            nlist=s.get("nlist", 0),
            pq_m=s.get("pq_m", 0),
            pq_nbits=s.get("pq_nbits", 0),
            M=s.get("M", 0),
        )
    for pattern, structure in FACTORY_LAYOUTS:
        if match := pattern.fullmatch(spec.kind):
            found = match.groupdict()
            numbers = {k: int(v) for k, v in found.items() if k != "sq" and v is not None}
            if structure == "ivfpq":
                numbers.setdefault("pq_nbits", 8)  # Faiss's default for PQ<m>
            return Layout(structure, dim, ntotal, sq=found.get("sq") or "", **numbers)
    raise ValueError(
        f"index={spec.kind!r} has no plain-array form; the kinds that have one are "
        f"{ARRAY_KINDS_TEXT}."
    )


def _unwrap(index: Any) -> Any:
    """Return the index a pre-transform or refinement wraps, else the index itself."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _unwrap(index.index)
    if isinstance(index, faiss.IndexRefine):
        return _unwrap(index.base_index)
    return index


def _hnsw_of(index: Any) -> Any:
    """Return the HNSW index in ``index`` (itself or an IVF's quantizer), or None."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        inner = faiss.downcast_index(inner.quantizer)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _knobs(index: Any, ntotal: int) -> dict[str, tuple[int, int]]:
    """Search settings ``index`` reads: name -> (current value, value that searches widest)."""
    knobs = {}
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        knobs["nprobe"] = (int(inner.nprobe), int(inner.nlist))
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        knobs["efSearch"] = (int(hnsw.hnsw.efSearch), max(int(hnsw.ntotal), ntotal, 1))
    return knobs


def _search_parameters(index: Any, settings: Mapping[str, int]) -> Any:
    """Build Faiss per-search parameters that apply ``settings`` to ``index``, or None."""
    if not settings:
        return None
    index = faiss.downcast_index(index)
    params: Any = None
    if isinstance(index, faiss.IndexPreTransform):
        params = _faiss.SearchParametersPreTransform()
        params.index_params = _search_parameters(index.index, settings)
        params.referenced_objects = [params.index_params]  # Faiss keeps a raw pointer
    elif isinstance(index, faiss.IndexRefine):
        params = _faiss.IndexRefineSearchParameters()
        params.base_index_params = _search_parameters(index.base_index, settings)
        params.k_factor = index.k_factor
        params.referenced_objects = [params.base_index_params]
    elif isinstance(index, faiss.IndexIVF):
        params = _faiss.SearchParametersIVF()
        params.nprobe = int(settings.get("nprobe", index.nprobe))
        params.quantizer_params = _search_parameters(index.quantizer, settings)
        params.referenced_objects = [params.quantizer_params]
    elif isinstance(index, faiss.IndexHNSW):
        params = _faiss.SearchParametersHNSW()
        params.efSearch = int(settings.get("efSearch", index.hnsw.efSearch))
    return params


class KNNIndex:
    """Nearest neighbours under squared L2 distance, exact or approximate.

    Parameters
    ----------
    spec : IndexSpec or None, default=None
        The index to build; ``None``: the exact flat index.
    chunk_size : int, default=16384
        Vectors searched (and added) at once, which bounds the memory of a search.
    seed : int, default=0
        Seeds the draw of the training sample.

    Attributes
    ----------
    index : faiss.Index or None
        The CPU index after :meth:`fit`.

    Notes
    -----
    **Plain arrays.** :meth:`to_arrays` gives the fitted index as numpy arrays and
    :meth:`from_arrays` rebuilds it, search results equal, after checking every array
    against the layout that the spec fixes, so a model file never hands Faiss's C++
    reader anything. Names, dtypes and shapes, for ``n`` vectors of width ``d`` (ids are
    positions in the order added; "by id": row ``i`` belongs to id ``i``):

    - ``"flat"`` (also ``"Flat"``): ``vectors`` float32 ``(n, d)``.
    - ``"ivf"``, ``"ivfpq"`` and the factory strings ``"IVF<nlist>,Flat"``,
      ``"IVF<nlist>,PQ<m>x<nbits>"``, ``"IVF<nlist>,SQ<4|6|8|fp16|bf16>"``:
      ``centroids`` float32 ``(nlist, d)`` (the coarse quantizer);
      ``list_sizes`` int64 ``(nlist,)``, summing to ``n``;
      ``ids`` int64 ``(n,)``, the inverted lists one after another, each in the order
      it is searched, every id in ``[0, n)`` exactly once. Then, for IVF-Flat,
      ``vectors`` float32 ``(n, d)`` by id; for IVF-PQ, ``pq_centroids`` float32
      ``(pq_m, 2**pq_nbits, d / pq_m)``, ``codes`` uint8
      ``(n, ceil(pq_m * pq_nbits / 8))`` by id and ``by_residual`` bool ``(1,)``
      (whether codes encode the residual to the list's centroid; Faiss's default,
      True); for IVF-SQ, ``sq_trained`` float32 (``(2 d,)`` for SQ4, SQ6, SQ8, ``(0,)``
      for SQfp16, SQbf16), ``codes`` uint8 ``(n, code_size)`` by id and
      ``by_residual`` bool ``(1,)``.
    - ``"hnsw"`` (also ``"HNSW<M>,Flat"``): ``vectors`` float32 ``(n, d)`` by id;
      ``levels`` int32 ``(n,)``, each node's number of levels, in [1, the levels of
      ``M``]; ``offsets`` int64 ``(n + 1,)``, where each node's links start in
      ``neighbors``, from 0, growing by the link count that ``levels[i]`` and ``M`` fix;
      ``neighbors`` int32 ``(offsets[n],)``, ids in ``[-1, n)`` (-1: no link), a link on
      level ``L`` only to a node that has level ``L``; ``entry_point`` int32 ``(1,)``,
      a node on the top level; ``max_level`` int32 ``(1,)``, ``max(levels) - 1``.

    Floats must be finite. Other kinds (pre-transforms, refinements, other quantizers)
    have no plain-array form: :meth:`to_arrays` refuses them with a ``ValueError``.
    """

    def __init__(
        self,
        spec: IndexSpec | None = None,
        chunk_size: int = 16384,
        seed: int = 0,
    ) -> None:
        self.spec = IndexSpec() if spec is None else spec
        self.chunk_size = chunk_size
        self.seed = seed
        self.index: Any = None
        self._search_index: Any = None
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Dimension of the indexed vectors."""
        return int(self.index.d)

    @property
    def faiss_class(self) -> str:
        """Name of the Faiss index class, such as ``"IndexIVFFlat"``."""
        return type(faiss.downcast_index(self.index)).__name__

    # ------------------------------------------------------------------ building

    def fit(
        self, vectors: np.ndarray | Iterable[np.ndarray], total: int | None = None
    ) -> KNNIndex:
        """Index one ``(n, d)`` array, or chunks of it without joining them.

        Parameters
        ----------
        vectors : ndarray of shape (n, d), or iterable of such arrays
            The vectors, in the order their ids follow. An iterable must give the same
            chunks each time it is iterated: approximate kinds read it once to count
            (unless ``total`` is given), once to draw the training sample and once to add.
        total : int, optional
            Number of vectors in ``vectors`` when it is an iterable, which saves a pass.

        Returns
        -------
        self : KNNIndex
        """
        if isinstance(vectors, np.ndarray):
            array = _as_float32(vectors)
            if array.ndim != 2:
                raise ValueError(f"vectors must be 2-D (n, d); got shape {array.shape}.")
            chunks: Iterable[np.ndarray] = [
                array[s : s + self.chunk_size] for s in range(0, len(array), self.chunk_size)
            ]
            total = len(array)
            if self.spec.exact:
                chunks = [array]  # one add: the flat index copies it once
        else:
            chunks = vectors
            if iter(chunks) is chunks:
                raise TypeError(
                    "vectors must be an array or an iterable that can be read more than once "
                    "(a list, or an object whose __iter__ starts again); got a one-pass iterator."
                )
        if total is None:
            total = sum(len(chunk) for chunk in chunks)
        first = next((c for c in chunks if len(c)), None)
        if first is None or total < 1:
            raise ValueError("There are no vectors to index.")
        dim = int(np.shape(first)[1])
        index = _new_index(self.spec, total, dim)
        if not index.is_trained:
            train_size = self.spec.resolve(total, dim)["train_size"]
            sample = _sample(chunks, train_size, self.seed)
            try:
                index.train(sample)
            except RuntimeError as exc:  # a factory string's transform or quantizer
                reason = _faiss_reason(exc)
                raise ValueError(
                    f"Faiss cannot train index={self.spec.kind!r} on {len(sample)} vectors of "
                    f"width {dim} ({reason}). Give it fewer centroids or output dimensions, "
                    "or more training images."
                ) from exc
        _keep_ids(index)
        added = 0
        for chunk in chunks:
            chunk = _as_float32(chunk)
            if chunk.ndim != 2 or chunk.shape[1] != dim:
                raise ValueError(f"Every chunk must have shape (m, {dim}); got {chunk.shape}.")
            try:
                index.add(chunk)
            except RuntimeError as exc:
                raise ValueError(
                    f"Faiss cannot add vectors to index={self.spec.kind!r} "
                    f"({_faiss_reason(exc)}). Use {_KINDS_TEXT}."
                ) from exc
            added += len(chunk)
        if added != total:
            raise ValueError(f"The chunks hold {added} vectors, not total={total}.")
        self.index = index
        self._search_index = None
        return self

    def vectors(self) -> np.ndarray:
        """Return the indexed vectors, ``(ntotal, dim)`` float32, in the order added.

        Exact for flat, IVF and HNSW indexes; a PQ index gives back its decoded codes.
        """
        if self.index is None:
            raise RuntimeError("The index is empty; call fit first.")
        try:
            return self.index.reconstruct_n(0, self.ntotal)
        except RuntimeError as exc:
            raise RuntimeError(
                f"The Faiss index {self.faiss_class} cannot give back its vectors."
            ) from exc

    # ------------------------------------------------------------------ searching

    def _searcher(self, gpu: bool) -> Any:
        """Return the index to search: the fitted one, or its GPU copy (made once)."""
        if not (gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus()):
            return self.index
        with self._lock:
            if self._search_index is None:
                self._search_index = self.index
                try:
                    self._gpu_resources = faiss.StandardGpuResources()
                    self._search_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
                except RuntimeError as exc:  # e.g. HNSW, or a PQ size the GPU lacks
                    logger.info("Searching %s on the CPU: %s", self.faiss_class, exc)
            return self._search_index

    def check_settings(self, settings: Mapping[str, int] | None) -> dict[str, int]:
        """Validate ``settings`` against the fitted index; return its search settings.

        ``None`` means none. Every value must lie in its range (:class:`IndexSpec`),
        ``nprobe`` at most the fitted ``nlist``. Build settings are checked and left
        out: they apply to the next build.
        """
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ValueError(f"index_params must be a dict or None; got {settings!r}.")
        knobs = _knobs(self.index, self.ntotal)
        for key, value in settings.items():
            if key not in _ALL_KEYS:
                raise ValueError(
                    f"index_params has the unknown setting {key!r}; the settings are "
                    f"{', '.join(_ALL_KEYS)}."
                )
            if key in _SEARCH_KEYS and key not in knobs:
                raise ValueError(
                    f"index_params[{key!r}] does not apply to the fitted {self.faiss_class}, "
                    f"which reads {', '.join(knobs) or 'no search settings'}. Remove it."
                )
            _check_setting(key, value)
            if key == "nprobe" and value > knobs[key][1]:
                raise ValueError(
                    f"index_params['nprobe'] must be in [1, {knobs[key][1]}], the nlist of the "
                    f"fitted {self.faiss_class}; got {value!r}."
                )
        return {k: int(v) for k, v in settings.items() if k in _SEARCH_KEYS}

    def search(
        self,
        queries: np.ndarray,
        k: int,
        settings: Mapping[str, int] | None = None,
        gpu: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return squared distances and indices of the ``k`` nearest indexed vectors.

        Parameters
        ----------
        queries : ndarray of shape (m, d)
        k : int
        settings : dict, optional
            ``nprobe`` and ``efSearch`` for this search instead of the fitted ones. Where an
            approximate search finds fewer than ``k`` neighbours, those queries are
            searched again more widely, so every row is complete.
        gpu : bool, default=False
            Search a GPU copy of a flat or IVF index on GPU 0 where Faiss has GPU
            support (other indexes, and machines without one, search on the CPU).

        Returns
        -------
        distances : ndarray of shape (m, k), float32
            Squared L2 distances, ascending (estimated from codes by PQ indexes).
        indices : ndarray of shape (m, k), int64
        """
        if self.index is None:
            raise RuntimeError("The index is empty; call fit first.")
        if k > self.ntotal:
            raise ValueError(f"k={k} exceeds the {self.ntotal} indexed vectors.")
        settings = self.check_settings(settings)
        queries = _as_float32(queries)
        dists, idx = [], []
        for start in range(0, len(queries), self.chunk_size):
            chunk = queries[start : start + self.chunk_size]
            d, i = self._search_complete(chunk, k, settings, gpu)
            dists.append(d)
            idx.append(i)
        if not dists:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate(dists), np.concatenate(idx)

    def _search_once(
        self, queries: np.ndarray, k: int, settings: Mapping[str, int], gpu: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        params = _search_parameters(self.index, settings)
        searcher = self._searcher(gpu)
        if params is None:
            return searcher.search(queries, k)
        return searcher.search(queries, k, params=params)

    def _search_complete(
        self,
        queries: np.ndarray,
        k: int,
        settings: Mapping[str, int],
        gpu: bool,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search, then search again more widely the rows with fewer than ``k`` results.

        With ``exclude`` (an id per query), that id is removed from the query's row.
        """
        knobs = _knobs(self.index, self.ntotal)
        current = {name: settings.get(name, value) for name, (value, _) in knobs.items()}
        extra = 0 if exclude is None else 1
        want = min(k + extra, self.ntotal)
        out_d = np.empty((len(queries), k), np.float32)
        out_i = np.empty((len(queries), k), np.int64)
        todo = np.arange(len(queries))
        while True:
            d, i = self._search_once(queries[todo], want, current, gpu)
            valid = i != _MISSING
            if exclude is not None:
                valid &= i != exclude[todo, None]
            full = valid.sum(axis=1) >= k
            rows = np.flatnonzero(full)
            # The first k valid columns of each full row, in their order.
            keep = np.argsort(~valid[rows], axis=1, kind="stable")[:, :k]
            out_d[todo[rows]] = np.take_along_axis(d[rows], keep, axis=1)
            out_i[todo[rows]] = np.take_along_axis(i[rows], keep, axis=1)
            todo = todo[~full]
            if not len(todo):
                return out_d, out_i
            wider = {name: min(limit, 4 * current[name]) for name, (_, limit) in knobs.items()}
            if wider != current:  # probe more lists, visit more graph nodes
                current = wider
            elif want < self.ntotal:  # a self match hidden behind duplicates: more results
                want = min(2 * want, self.ntotal)
            else:
                raise RuntimeError(
                    f"The {self.faiss_class} index returned fewer than {k} neighbours for "
                    f"{len(todo)} queries even at its widest search settings."
                )

    def search_leave_self_out(
        self,
        k: int,
        queries: np.ndarray | None = None,
        settings: Mapping[str, int] | None = None,
        gpu: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of each indexed vector among the *other* indexed vectors.

        Searches ``k + 1`` neighbours and removes the vector's own id; a row is never
        given itself. Where exact duplicates hide the self match, the farthest
        neighbour is dropped instead; where an approximate search misses neighbours,
        the row is searched again more widely.

        Parameters
        ----------
        k : int
        queries : ndarray of shape (ntotal, d), optional
            The indexed vectors in order, where the caller has them (exact also for PQ
            indexes); default: :meth:`vectors`.
        settings, gpu
            As in :meth:`search`.

        Returns
        -------
        distances, indices : ndarray of shape (ntotal, k)
        """
        if k + 1 > self.ntotal:
            raise ValueError(f"Leave-self-out with k={k} needs at least {k + 1} indexed vectors.")
        settings = self.check_settings(settings)
        queries = self.vectors() if queries is None else _as_float32(queries)
        if len(queries) != self.ntotal:
            raise ValueError(f"queries must hold the {self.ntotal} indexed vectors in order.")
        own = np.arange(self.ntotal, dtype=np.int64)
        dists, idx = [], []
        for start in range(0, self.ntotal, self.chunk_size):
            stop = start + self.chunk_size
            d, i = self._search_complete(queries[start:stop], k, settings, gpu, own[start:stop])
            dists.append(d)
            idx.append(i)
        return np.concatenate(dists), np.concatenate(idx)

    # ------------------------------------------------------------------ storing

    def describe(self) -> dict[str, Any]:
        """Return the spec, Faiss class, width and size, for a model file's metadata."""
        return {
            **self.spec.to_dict(),
            "faiss_class": self.faiss_class,
            "dim": self.dim,
            "ntotal": self.ntotal,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the fitted index as plain arrays (the class docstring lists them).

        Raises
        ------
        ValueError
            For an index kind without a plain-array form (such as ``"PCA8,HNSW8,Flat"``).
        """
        if self.index is None:
            raise RuntimeError("The index is empty; call fit first.")
        expected = _layout(self.spec, self.ntotal, self.dim)
        layout, arrays = index_storage.arrays_of(self.index)
        if layout != expected:
            raise ValueError(
                f"The fitted {self.faiss_class} has the layout {layout}, not the {expected} "
                f"of index={self.spec.kind!r}."
            )
        return arrays

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        spec: IndexSpec,
        dim: int,
        ntotal: int,
        chunk_size: int = 16384,
        seed: int = 0,
    ) -> KNNIndex:
        """Rebuild the index of :meth:`to_arrays`, checking every array before Faiss sees it.

        Parameters
        ----------
        arrays : dict of str to ndarray
            What :meth:`to_arrays` returned (the class docstring lists the names, dtypes
            and shapes for each kind); nothing more, nothing less.
        spec : IndexSpec
            The spec the index was fitted with: it fixes the layout (``nlist``, ``pq_m``,
            ``pq_nbits``, ``M``) and the search defaults.
        dim, ntotal : int
            Width and number of the indexed vectors.
        chunk_size, seed
            As in the constructor.

        Raises
        ------
        ValueError
            Naming the array and its problem: a missing or unexpected array, a dtype, a
            shape, a size or id out of range, an id missing or repeated, a graph link to a
            level the node lacks, a float that is not finite; or a kind without a
            plain-array form.
        """
        index = index_storage.build(_layout(spec, ntotal, dim), arrays)
        _set_search_defaults(index, spec.resolve(ntotal, dim))
        _keep_ids(index)
        knn = cls(spec, chunk_size, seed)
        knn.index = index
        return knn

    def to_bytes(self) -> np.ndarray:
        """Return the fitted index as ``faiss.serialize_index`` bytes (a uint8 array)."""
        return faiss.serialize_index(self.index)

    @classmethod
    def from_bytes(
        cls, blob: np.ndarray, spec: IndexSpec, faiss_class: str, dim: int, ntotal: int
    ) -> KNNIndex:
        """Rebuild from :meth:`to_bytes`; check the class, width and size it must have.

        The bytes pass :func:`check_serialized_sizes` before Faiss's reader sees them,
        and the search defaults stored in them are replaced by those of ``spec``.
        """
        knn = cls(spec)
        check_serialized_sizes(blob)
        try:
            knn.index = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        except RuntimeError as exc:
            raise ValueError(f"the Faiss index bytes do not parse ({exc}).") from exc
        found = (knn.faiss_class, int(knn.index.d), knn.ntotal)
        if found[0] == "IndexRefineFlat" and faiss_class == "IndexRefine":
            found = (faiss_class, *found[1:])  # how Faiss reads back a Flat refinement
        if found != (faiss_class, dim, ntotal):
            raise ValueError(
                f"the Faiss index is a {found[0]} of {found[2]} vectors of width {found[1]}; "
                f"expected a {faiss_class} of {ntotal} vectors of width {dim}."
            )
        _set_search_defaults(knn.index, spec.resolve(ntotal, dim))
        return knn

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "spec": self.spec.to_dict(),
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "index": None,
        }
        if self.index is not None:
            state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = IndexSpec.from_dict(state["spec"])
        self.chunk_size = state["chunk_size"]
        self.seed = state["seed"]
        blob = state["index"]
        self.index = None if blob is None else faiss.deserialize_index(np.asarray(blob))
        self._search_index = None
        self._lock = threading.Lock()


def _keep_ids(index: Any) -> None:
    """Let an IVF index give back vectors by id (a direct map: 8 bytes per vector)."""
    with contextlib.suppress(RuntimeError):  # no inverted lists
        faiss.extract_index_ivf(index).make_direct_map()


def _sample(chunks: Iterable[np.ndarray], size: int, seed: int) -> np.ndarray:
    """Draw a uniform sample of ``size`` vectors from ``chunks``, in their order, in one pass.

    Every vector draws a uniform key from one seeded stream and the ``size`` smallest
    keys win, so the sample does not depend on how the vectors are chunked.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    positions = np.empty(0, np.int64)
    kept = np.empty((0, 0), np.float32)
    seen = 0
    for chunk in chunks:
        chunk = _as_float32(chunk)
        new_keys = rng.random(len(chunk))
        take = np.argsort(new_keys, kind="stable")[:size]
        keys = np.concatenate([keys, new_keys[take]])
        positions = np.concatenate([positions, seen + take])
        kept = chunk[take] if not len(kept) else np.concatenate([kept, chunk[take]])
        seen += len(chunk)
        if len(keys) > size:
            best = np.argpartition(keys, size - 1)[:size]
            keys, positions, kept = keys[best], positions[best], kept[best]
    return np.ascontiguousarray(kept[np.argsort(positions)])

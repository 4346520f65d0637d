"""Approximate indexes as plain arrays, and the size guard on Faiss bytes, against forgeries."""

from __future__ import annotations

import functools
import resource
import struct
from collections.abc import Callable

import faiss
import numpy as np
import pytest

from msc_detector import index as index_module
from msc_detector.index import IndexSpec, KNNIndex, check_serialized_sizes


def clustered(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d)) * 4
    return (centres[rng.integers(8, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


BASE, QUERIES = clustered(), clustered(60, seed=1)
# kind -> (build settings, a narrow and a wide search, the names and dtypes of its arrays)
IVF_ARRAYS = {"centroids": "float32", "list_sizes": "int64", "ids": "int64"}
CODED = {"codes": "uint8", "by_residual": "bool"}
HNSW_ARRAYS = {
    "vectors": "float32",
    "levels": "int32",
    "offsets": "int64",
    "neighbors": "int32",
    "entry_point": "int32",
    "max_level": "int32",
}
KINDS = {
    "flat": ({}, [{}], {"vectors": "float32"}),
    "ivf": ({"nlist": 8}, [{"nprobe": 1}, {"nprobe": 8}], {**IVF_ARRAYS, "vectors": "float32"}),
    "ivfpq": (
        {"nlist": 4, "pq_m": 4, "pq_nbits": 5},
        [{"nprobe": 1}, {"nprobe": 4}],
        {**IVF_ARRAYS, "pq_centroids": "float32", **CODED},
    ),
    "hnsw": ({"M": 4}, [{"efSearch": 2}, {"efSearch": 200}], HNSW_ARRAYS),
    "IVF8,SQ8": ({}, [{"nprobe": 2}], {**IVF_ARRAYS, "sq_trained": "float32", **CODED}),
    "IVF8,SQfp16": ({}, [{"nprobe": 2}], {**IVF_ARRAYS, "sq_trained": "float32", **CODED}),
    "IVF8,PQ2x4": ({}, [{"nprobe": 2}], {**IVF_ARRAYS, "pq_centroids": "float32", **CODED}),
    "HNSW6,Flat": ({}, [{"efSearch": 3}], HNSW_ARRAYS),
}


@functools.cache
def fitted(kind: str) -> KNNIndex:
    """The index of ``kind`` over ``BASE``, built once (tests copy what they change)."""
    return KNNIndex(IndexSpec(kind, KINDS[kind][0])).fit(BASE)


def rebuilt(index: KNNIndex, arrays: dict[str, np.ndarray]) -> KNNIndex:
    return KNNIndex.from_arrays(arrays, index.spec, index.dim, index.ntotal)


@pytest.mark.parametrize("kind", list(KINDS))
def test_plain_arrays_rebuild_an_index_that_searches_exactly_like_the_original(kind) -> None:
    index = fitted(kind)
    arrays = index.to_arrays()
    assert {name: a.dtype.name for name, a in arrays.items()} == KINDS[kind][2]
    copy = rebuilt(index, arrays)
    assert copy.faiss_class == index.faiss_class and copy.spec == index.spec
    for settings in [None, *KINDS[kind][1]]:
        for got, want in zip(
            copy.search(QUERIES, 7, settings), index.search(QUERIES, 7, settings), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(
        copy.search_leave_self_out(3), index.search_leave_self_out(3), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(copy.vectors(), index.vectors())
    # The same Faiss structure, down to the search defaults: it serialises to the same bytes.
    assert copy.to_bytes().tobytes() == index.to_bytes().tobytes()


def test_the_arrays_have_the_documented_shapes() -> None:
    ivfpq, hnsw = fitted("ivfpq").to_arrays(), fitted("hnsw").to_arrays()
    shapes = {name: a.shape for name, a in ivfpq.items()}
    assert shapes == {
        "centroids": (4, 8),
        "list_sizes": (4,),
        "ids": (400,),
        "pq_centroids": (4, 32, 2),
        "codes": (400, 3),  # 4 codes of 5 bits
        "by_residual": (1,),
    }
    assert ivfpq["list_sizes"].sum() == 400 and sorted(ivfpq["ids"]) == list(range(400))
    assert hnsw["offsets"].shape == (401,) and hnsw["neighbors"].shape == (hnsw["offsets"][-1],)
    assert hnsw["max_level"][0] == hnsw["levels"].max() - 1


@pytest.mark.parametrize("kind", ["PCA4,IVF4,Flat", "IVF4_HNSW8,Flat", "HNSW8_SQ8"])
def test_kinds_without_a_plain_array_form_are_refused(kind) -> None:
    index = KNNIndex(IndexSpec(kind)).fit(BASE)
    with pytest.raises(ValueError, match=f"index='{kind}' has no plain-array form"):
        index.to_arrays()
    with pytest.raises(ValueError, match="has no plain-array form; the kinds that have one"):
        KNNIndex.from_arrays(fitted("ivf").to_arrays(), IndexSpec(kind), 8, 400)


def edit(name: str, change: Callable[[np.ndarray], object]) -> Callable[[dict], dict]:
    """A forgery: ``change`` a copy of array ``name`` in place, or replace it by its result."""

    def forge(arrays: dict) -> dict:
        array = arrays[name].copy()
        result = change(array)
        return {**arrays, name: array if result is None else result}

    return forge


def upper_link_to_a_ground_node(arrays: dict) -> dict:
    """Point a link on level 1 at a node that has only level 0."""
    levels, offsets, neighbors = arrays["levels"], arrays["offsets"], arrays["neighbors"].copy()
    node = int(np.flatnonzero(levels >= 2)[0])
    ground = int(np.flatnonzero(levels == 1)[0])
    neighbors[offsets[node] + 8] = ground  # level 0 holds 2 M = 8 links, level 1 follows
    return {**arrays, "neighbors": neighbors}


FORGERIES = {
    "ivf": [
        (lambda a: {k: v for k, v in a.items() if k != "ids"}, "arrays lack ids"),
        (lambda a: {**a, "extra": a["ids"]}, "unexpected entries extra"),
        (edit("ids", lambda x: x.astype(np.float64)), "'ids' must be int64; got float64"),
        (edit("ids", lambda x: x[:-1]), r"'ids' must have shape \(400,\); got \(399,\)"),
        (edit("ids", lambda x: x.__setitem__(0, 10**12)), r"ids outside \[0, 400\)"),
        (edit("ids", lambda x: x.__setitem__(1, x[0])), "every id exactly once"),
        (edit("list_sizes", lambda x: x.__setitem__(0, 2**40)), r"sizes outside \[0, 400\]"),
        (edit("list_sizes", lambda x: x.__setitem__(0, -1)), r"sizes outside \[0, 400\]"),
        (edit("list_sizes", lambda x: x.__setitem__(0, x[0] + 1)), "must sum to ntotal=400"),
        (edit("centroids", lambda x: x.__setitem__((0, 0), np.nan)), "'centroids' holds values"),
        (edit("centroids", lambda x: x[:-1]), r"'centroids' must have shape \(8, 8\)"),
        (edit("vectors", lambda x: x.__setitem__((3, 3), np.inf)), "'vectors' holds values"),
    ],
    "ivfpq": [
        (
            edit("pq_centroids", lambda x: x[:, :16]),
            r"'pq_centroids' must have shape \(4, 32, 2\)",
        ),
        (edit("codes", lambda x: x[:, :2]), r"'codes' must have shape \(400, 3\)"),
        (edit("by_residual", lambda x: x.astype(np.uint8)), "'by_residual' must be bool"),
    ],
    "IVF8,SQfp16": [(edit("codes", lambda x: x.fill(255)), "half floats that are not finite")],
    "hnsw": [
        (edit("neighbors", lambda x: x.__setitem__(5, 400)), r"ids outside \[-1, 400\)"),
        (edit("neighbors", lambda x: x.__setitem__(5, -2)), r"ids outside \[-1, 400\)"),
        (edit("neighbors", lambda x: x[:-1]), r"'neighbors' must have shape \("),
        (edit("levels", lambda x: x.__setitem__(0, 0)), r"'levels' must hold levels in \[1, "),
        (edit("levels", lambda x: x.__setitem__(0, 10**6)), r"'levels' must hold levels in \[1, "),
        (edit("offsets", lambda x: x.__setitem__(1, x[1] + 1)), "'offsets' must start at 0"),
        (edit("entry_point", lambda x: x.fill(-5)), "'entry_point' must be a node on the top"),
        (edit("max_level", lambda x: x.fill(30)), "'max_level' must be max"),
        (upper_link_to_a_ground_node, "links nodes on levels they do not have"),
    ],
}
CASES = [(kind, *case) for kind, cases in FORGERIES.items() for case in cases]


@pytest.mark.parametrize(
    ("kind", "forge", "problem"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_forged_arrays_are_refused_with_the_array_named(kind, forge, problem) -> None:
    index = fitted(kind)
    with pytest.raises(ValueError, match=problem):
        rebuilt(index, forge(index.to_arrays()))


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (IndexSpec("ivf", {"nlist": 2**24}), r"needs nlist in \[1, ntotal\]"),
        (IndexSpec("IVF99999999999,Flat"), r"needs nlist in \[1, ntotal\]"),
        (IndexSpec("IVF8,PQ4x60"), r"needs pq_nbits in \[1, 16\]"),
        (IndexSpec("IVF16,Flat"), r"'centroids' must have shape \(16, 8\); got \(8, 8\)"),
    ],
)
def test_a_spec_that_disagrees_with_the_arrays_is_refused_before_faiss_allocates(
    spec, problem
) -> None:
    with pytest.raises(ValueError, match=problem):
        KNNIndex.from_arrays(fitted("ivf").to_arrays(), spec, 8, 400)


# ------------------------------------------------------------------ Faiss bytes


def serialized(kind: str) -> bytearray:
    return bytearray(fitted(kind).to_bytes().tobytes())


def put(blob: bytearray, offset: int, value: int) -> bytearray:
    struct.pack_into("<Q", blob, offset, value)
    return blob


HEADER = 4 + 33  # a tag and an index header (d, ntotal, two unused, is_trained, metric)


def hnsw_links_length(blob: bytearray) -> int:
    """Offset of the length of an IndexHNSWFlat's links."""
    offset = HEADER
    for itemsize in (8, 4, 4, 8):  # level probabilities, links per level, levels, offsets
        offset += 8 + itemsize * struct.unpack_from("<Q", blob, offset)[0]
    return offset


def first_list_size(blob: bytearray) -> int:
    """Offset of the first list size in an IVF index's inverted lists ("full" sizes)."""
    start = blob.index(b"ilar")
    assert blob[start + 20 : start + 24] == b"full"
    return start + 32


FORGED_BYTES = {
    # The quantizer's vectors claim 2**28 floats: Faiss allocated 1 GiB, then failed.
    "quantizer-vectors": (
        lambda: put(serialized("ivf"), HEADER + 16 + HEADER, 2**28),
        "claim the flat vectors of 268435456 items of 4 bytes",
    ),
    "nlist": (lambda: put(serialized("ivf"), HEADER, 2**40), "nlist differs from the quantizer"),
    "list-size": (
        lambda: put((b := serialized("ivfpq")), first_list_size(b), 2**40),
        "a list larger than the bytes",
    ),
    "hnsw-links": (
        lambda: put((b := serialized("hnsw")), hnsw_links_length(b), 2**30),
        "claim the links of 1073741824 items",
    ),
    "hnsw-levels": (
        lambda: put(serialized("hnsw"), HEADER, 2**61),
        "claim the level probabilities of 2305843009213693952 items",
    ),
    "truncated": (
        lambda: serialized("ivf")[:-1],
        "lists of 16000 bytes .* only 15999 bytes follow",
    ),
    "trailing": (lambda: serialized("ivf") + b"\0", "1 bytes follow the index"),
    "unknown-structure": (
        lambda: bytearray(b"IwXX") + serialized("ivf")[4:],
        "structure 'IwXX' whose sizes cannot be checked",
    ),
}


@pytest.mark.parametrize("forgery", list(FORGED_BYTES))
def test_forged_faiss_bytes_are_refused_before_faiss_reads_them(forgery, monkeypatch) -> None:
    make, problem = FORGED_BYTES[forgery]
    blob = np.frombuffer(bytes(make()), np.uint8)

    def refuse(*args: object) -> None:
        raise AssertionError("Faiss's reader was handed unchecked bytes")

    monkeypatch.setattr(index_module.faiss, "deserialize_index", refuse)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=problem):
        KNNIndex.from_bytes(blob, IndexSpec(), "IndexIVFFlat", 8, 400)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB


@pytest.mark.parametrize(
    "kind",
    [
        *("ivf", "ivfpq", "hnsw", "IVF8,SQ8", "PCA4,IVF4,Flat", "IVF4,Flat,RFlat"),
        *("HNSW8_PQ2x4", "IVF4,Flat,Refine(Flat)", "OPQ2,IVF4,PQ2x4", "L2norm,HNSW8,SQ8"),
    ],
)
def test_faiss_bytes_of_every_buildable_kind_pass_the_size_check(kind) -> None:
    index = fitted(kind) if kind in KINDS else KNNIndex(IndexSpec(kind)).fit(BASE)
    check_serialized_sizes(index.to_bytes())
    check_serialized_sizes(index.to_bytes().tobytes())
    info = index.describe()
    loaded = KNNIndex.from_bytes(
        index.to_bytes(), index.spec, info["faiss_class"], info["dim"], info["ntotal"]
    )
    np.testing.assert_array_equal(loaded.search(QUERIES, 5)[1], index.search(QUERIES, 5)[1])


def test_sparse_inverted_lists_pass_the_size_check_and_forged_ones_do_not() -> None:
    """Faiss stores lists as (list, size) pairs when at most half of them hold vectors."""
    quantizer = faiss.IndexFlatL2(8)
    index = faiss.IndexIVFFlat(quantizer, 8, 16)
    index.train(BASE)
    index.add(BASE[np.argsort(index.quantizer.search(BASE, 1)[1][:, 0], kind="stable")][:5])
    blob = bytearray(faiss.serialize_index(index).tobytes())
    start = blob.index(b"ilar")
    assert blob[start + 20 : start + 24] == b"sprs"
    check_serialized_sizes(bytes(blob))
    with pytest.raises(ValueError, match="sparse list sizes"):
        check_serialized_sizes(bytes(put(blob, start + 32, 16)))  # list 16 of 16


def test_search_defaults_stored_in_faiss_bytes_give_way_to_the_spec() -> None:
    index = KNNIndex(IndexSpec("hnsw", {"M": 4})).fit(BASE)
    index.index.hnsw.efSearch = 2**31 - 1  # a forged default: every search would fail
    loaded = KNNIndex.from_bytes(index.to_bytes(), index.spec, "IndexHNSWFlat", 8, 400)
    assert loaded.index.hnsw.efSearch == 64
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 64
    np.testing.assert_array_equal(
        loaded.search(QUERIES, 3)[1], fitted("hnsw").search(QUERIES, 3)[1]
    )

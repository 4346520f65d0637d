"""The Faiss index against brute force, leave-self-out, chunking and pickling."""

from __future__ import annotations

import json
import pickle

import faiss
import numpy as np
import pytest

from msc_detector.index import IndexSpec, KNNIndex


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


# ------------------------------------------------------------ approximate kinds


def clustered(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    """Vectors in a few clusters, where inverted lists have something to find."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d)) * 4
    return (centres[rng.integers(8, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


# Settings under which each kind searches (near) exhaustively.
WIDE = {
    "ivf": ({"nlist": 8}, {"nprobe": 8}),
    "ivfpq": ({"nlist": 4, "pq_m": 8, "pq_nbits": 6}, {"nprobe": 4}),
    "hnsw": ({"M": 8}, {"efSearch": 400}),
    "IVF8,Flat": ({}, {"nprobe": 8}),
    "PCA8,HNSW8,Flat": ({}, {"efSearch": 400}),
}


@pytest.mark.parametrize("kind", list(WIDE))
def test_approximate_kinds_find_the_true_neighbours_when_searched_widely(kind) -> None:
    base, queries = clustered(), clustered(50, seed=1)
    build, search = WIDE[kind]
    index = KNNIndex(IndexSpec(kind, {**build, **search})).fit(base)
    d, i = index.search(queries, 5)
    bd, bi = brute(queries, base, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i, bi, strict=True)])
    if kind == "ivfpq":  # codes: distances are estimates, neighbours mostly right
        assert recall >= 0.8
        np.testing.assert_allclose(d, bd, rtol=0.2)
    else:
        assert recall >= 0.99
        np.testing.assert_allclose(d[i == bi], bd[i == bi], rtol=1e-4)


def test_search_settings_apply_per_search_without_changing_the_index() -> None:
    base, queries = clustered(), clustered(50, seed=1)
    index = KNNIndex(IndexSpec("ivf", {"nlist": 16, "nprobe": 1})).fit(base)
    before = faiss.serialize_index(index.index).tobytes()
    narrow = index.search(queries, 10)
    wide = index.search(queries, 10, {"nprobe": 16})
    assert faiss.serialize_index(index.index).tobytes() == before
    np.testing.assert_array_equal(wide[1], brute(queries, base, 10)[1])
    assert not np.array_equal(narrow[1], wide[1])  # one list of 16 misses neighbours
    np.testing.assert_array_equal(index.search(queries, 10)[1], narrow[1])


def test_rows_an_approximate_search_leaves_short_are_completed() -> None:
    """One probed list of about 25 vectors cannot give 40 neighbours: search wider."""
    base = clustered(200)
    index = KNNIndex(IndexSpec("ivf", {"nlist": 8, "nprobe": 1})).fit(base)
    d, i = index.search(base[:20], 40)
    assert (i >= 0).all() and np.isfinite(d).all()
    assert (np.diff(d, axis=1) >= 0).all()
    assert all(len(set(row)) == 40 for row in i)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("ivf", {"nlist": 16, "nprobe": 1}),
        ("ivfpq", {"nlist": 16, "nprobe": 1, "pq_m": 4, "pq_nbits": 4}),
        ("hnsw", {"M": 4, "efSearch": 1}),
    ],
)
def test_leave_self_out_never_returns_self_with_duplicates_and_misses(kind, params) -> None:
    base = np.repeat(clustered(60), 3, axis=0)  # every vector three times
    index = KNNIndex(IndexSpec(kind, params)).fit(base)
    d, i = index.search_leave_self_out(4)
    own = np.arange(len(base))[:, None]
    assert d.shape == i.shape == (180, 4)
    assert not (i == own).any()
    assert (i >= 0).all() and np.isfinite(d).all()
    assert all(len(set(row)) == 4 for row in i)
    if kind != "ivfpq":  # full vectors: each vector's two twins come first, at distance 0
        wide = {"nprobe": 16} if kind == "ivf" else {"efSearch": 180}
        d, i = index.search_leave_self_out(2, settings=wide)
        np.testing.assert_array_equal(np.sort(i, axis=1) // 3, np.repeat(own // 3, 2, axis=1))
        np.testing.assert_array_equal(d, 0)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "IVF8,SQ8"])
def test_building_from_chunks_equals_building_from_one_array(kind) -> None:
    base = clustered(500)
    params = {"train_size": 300, **({"pq_nbits": 4} if kind == "ivfpq" else {})}
    spec = IndexSpec(kind, {} if kind == "flat" else params)
    whole = KNNIndex(spec, chunk_size=128).fit(base)
    chunks = [base[:7], base[7:300], base[300:301], base[301:]]
    parts = KNNIndex(spec, chunk_size=128).fit(chunks)
    counted = KNNIndex(spec).fit(tuple(chunks), total=500)
    for built in (parts, counted):
        assert built.ntotal == 500
        np.testing.assert_array_equal(built.vectors(), whole.vectors())
        for got, want in zip(built.search(base, 5), whole.search(base, 5), strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_one_pass_iterator_and_wrong_chunks_are_refused() -> None:
    base = clustered(100)
    with pytest.raises(TypeError, match="more than once"):
        KNNIndex(IndexSpec("ivf", {"nlist": 2})).fit(iter([base]))
    with pytest.raises(ValueError, match=r"shape \(m, 8\)"):
        KNNIndex().fit([base, base[:, :4]])
    with pytest.raises(ValueError, match="not total=99"):
        KNNIndex(IndexSpec("ivf", {"nlist": 2})).fit([base], total=99)
    with pytest.raises(ValueError, match="no vectors"):
        KNNIndex().fit([])


def test_the_training_sample_is_bounded_and_seeded(monkeypatch) -> None:
    base = clustered(500)
    seen: list[np.ndarray] = []
    train = faiss.IndexIVFFlat.train
    monkeypatch.setattr(
        faiss.IndexIVFFlat, "train", lambda self, x: seen.append(x) or train(self, x)
    )
    spec = IndexSpec("ivf", {"nlist": 4, "train_size": 120})
    KNNIndex(spec, seed=1).fit(base)
    KNNIndex(spec, seed=1).fit([base[:250], base[250:]])
    KNNIndex(spec, seed=2).fit(base)
    assert [len(x) for x in seen] == [120, 120, 120]
    np.testing.assert_array_equal(seen[0], seen[1])
    assert not np.array_equal(seen[0], seen[2])
    assert {tuple(row) for row in seen[0]} <= {tuple(row) for row in base}


@pytest.mark.parametrize(
    ("kind", "params", "problem"),
    [
        ("IVFx,Flat", {}, "cannot build"),
        ("", {}, "index must be"),
        ("ivf", {"nprob": 4}, "unknown setting 'nprob'"),
        ("hnsw", {"nlist": 4}, r"'nlist'\] does not apply to index='hnsw'"),
        ("flat", {"nprobe": 4}, "reads no settings"),
        ("ivf", {"nlist": 0}, r"must be an int in \[1, 16777216\]; got 0"),
        ("ivf", {"nlist": True}, r"must be an int in \[1, 16777216\]; got True"),
        ("ivfpq", {"pq_m": 3}, "must divide the embedding width 8"),
        ("HNSW8,Flat", {"nprobe": 2}, "reads efSearch"),
        ("IDMap,Flat", {}, "IndexIDMap, which a model file or a pickle"),  # before add()
    ],
)
def test_bad_specs_say_what_to_change(kind, params, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        KNNIndex(IndexSpec(kind, params)).fit(clustered(100))


def test_search_settings_are_checked_against_the_fitted_index() -> None:
    index = KNNIndex(IndexSpec("hnsw", {"M": 4})).fit(clustered(100))
    with pytest.raises(ValueError, match=r"'nprobe'\] does not apply to the fitted IndexHNSWFlat"):
        index.search(clustered(3), 2, {"nprobe": 2})
    with pytest.raises(ValueError, match=r"must be an int in \[1, 65536\]; got -1"):
        index.search(clustered(3), 2, {"efSearch": -1})
    with pytest.raises(ValueError, match="unknown setting"):
        index.check_settings({"ef": 3})
    assert index.check_settings({"M": 8, "efSearch": 3}) == {"efSearch": 3}  # build: next fit


@pytest.mark.parametrize(
    ("kind", "settings", "problem"),
    [
        ("hnsw", {"efSearch": 2**31 - 1}, r"'efSearch'\] must be an int in \[1, 65536\]"),
        ("hnsw", {"efSearch": 2**31}, r"'efSearch'\] must be an int in \[1, 65536\]"),
        ("ivf", {"nprobe": 2**63}, r"'nprobe'\] must be an int in \[1, 16777216\]"),
        ("ivf", {"nprobe": 17}, r"'nprobe'\] must be in \[1, 16\], the nlist of the fitted"),
        ("ivf", {"nlist": 2**63}, r"'nlist'\] must be an int in \[1, 16777216\]"),
    ],
    ids=["efSearch-2**31-1", "efSearch-2**31", "nprobe-2**63", "nprobe-above-nlist", "nlist"],
)
def test_extreme_search_settings_are_refused_with_their_bounds(kind, settings, problem) -> None:
    index = KNNIndex(IndexSpec(kind, {"nlist": 16} if kind == "ivf" else {"M": 4})).fit(
        clustered(100)
    )
    with pytest.raises(ValueError, match=problem):
        index.search(clustered(3), 2, settings)
    np.testing.assert_array_equal(
        index.search(clustered(3), 2)[1], index.search(clustered(3), 2)[1]
    )


@pytest.mark.parametrize(
    ("kind", "params", "problem"),
    [
        ("hnsw", {"M": 1}, r"'M'\] must be an int in \[2, 256\]; got 1"),  # Faiss crashes
        ("HNSW1", {}, r"HNSW M outside \[2, 256\]"),
        ("hnsw", {"efConstruction": 2**31}, r"'efConstruction'\] must be an int in \[1, 65536\]"),
        ("ivf", {"nlist": 101}, "nlist=101 lists, which need at least 101 training vectors"),
        ("ivf", {"nlist": 8, "train_size": 5}, "need at least 8 training vectors; there are 5"),
        ("IVF200,Flat", {}, "need at least 200 training vectors; there are 100"),
        ("ivf", {"nlist": 4, "nprobe": 5}, r"'nprobe'\] must be in \[1, 4\], the nlist of"),
        ("IVF4,Flat", {"nprobe": 5}, r"'nprobe'\] must be in \[1, 4\], the nlist of"),
        ("ivfpq", {"nlist": 1, "pq_nbits": 17}, r"'pq_nbits'\] must be an int in \[1, 16\]"),
        ("ivfpq", {"nlist": 1, "pq_nbits": 7}, "needs at least 2\\*\\*pq_nbits = 128 training"),
        ("ivfpq", {"train_size": 2**63}, r"'train_size'\] must be an int in \[1, 1099511627776\]"),
        ("OPQ2,IVF4,PQ2", {}, r"cannot train index='OPQ2,IVF4,PQ2' on 100 vectors .*\(Number"),
        ("IVF4,PQ2x4fs", {}, "IndexIVFPQFastScan, which a model file or a pickle of the"),
        ("LSH", {}, "IndexLSH, which a model file or a pickle of the detector could not"),
    ],
    ids=[
        "M-1",
        "factory-HNSW1",
        "efConstruction-2**31",
        "nlist-above-n",
        "nlist-above-train_size",
        "factory-nlist-above-n",
        "nprobe-above-nlist",
        "factory-nprobe-above-nlist",
        "pq_nbits-17",
        "pq_nbits-above-train_size",
        "train_size-2**63",
        "factory-too-few-to-train",
        "factory-fast-scan-not-storable",
        "factory-lsh-not-storable",
    ],
)
def test_extreme_build_settings_are_refused_before_faiss_sees_them(kind, params, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        KNNIndex(IndexSpec(kind, params)).fit(clustered(100))


def test_defaults_scale_with_the_bank() -> None:
    small, large = IndexSpec("ivfpq").resolve(500, 1280), IndexSpec("ivfpq").resolve(10**6, 1280)
    assert small["nlist"] == 12 and large["nlist"] == 4000  # 4 sqrt(n), at most n / 39
    assert large["nprobe"] == 64 and large["train_size"] == 160_000
    assert large["pq_m"] == 80 and large["pq_nbits"] == 8 and small["pq_nbits"] == 3
    assert IndexSpec("ivfpq").resolve(10**6, 1000)["pq_m"] == 50  # a divisor of the width
    assert IndexSpec("hnsw", {"efSearch": 128}).resolve(10, 8) == {
        "M": 32,
        "efConstruction": 40,
        "efSearch": 128,
    }


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw", "PCA4,IVF4,Flat"])
def test_approximate_indexes_pickle_and_serialise_with_their_settings(kind) -> None:
    base = clustered(300)
    params = {"pq_nbits": 4} if kind == "ivfpq" else {}
    index = KNNIndex(IndexSpec(kind, params)).fit(base)
    info = index.describe()
    restored = KNNIndex.from_bytes(
        index.to_bytes(), index.spec, info["faiss_class"], info["dim"], info["ntotal"]
    )
    for copy in (pickle.loads(pickle.dumps(index)), restored):
        assert copy.spec == index.spec and copy.faiss_class == index.faiss_class
        for got, want in zip(copy.search(base, 3), index.search(base, 3), strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="expected a IndexFlat"):
        KNNIndex.from_bytes(index.to_bytes(), index.spec, "IndexFlat", 8, 300)
    with pytest.raises(ValueError, match="of 299 vectors"):
        KNNIndex.from_bytes(index.to_bytes(), index.spec, info["faiss_class"], 8, 299)


def test_the_index_benchmark_measures_a_tiny_bank(tmp_path, monkeypatch) -> None:
    """A smoke run of benchmarks/index.py, so that the script cannot rot."""
    from benchmarks import index as bench

    monkeypatch.setattr(bench, "SCRATCH", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert sum(map(len, bench.Bank(700))) == 700
    norms = np.linalg.norm(np.concatenate(list(bench.Bank(700))), axis=1)
    np.testing.assert_allclose(norms, 1, rtol=1e-5)
    flat = bench.run_case("flat", 700)
    ivf = bench.run_case("ivf", 700)
    assert flat["searches"][0]["recall_at_10"] == 1.0
    assert ivf["settings"]["nlist"] == 17 and len(ivf["searches"]) == 2
    assert 0 < ivf["searches"][1]["recall_at_1"] <= 1
    for case in (flat, ivf):
        (tmp_path / f"index_bank_{case['kind']}_700.json").write_text(json.dumps(case))
    assert "| 700 | ivf | nlist=17" in bench.render()

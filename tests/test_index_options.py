"""MSCDetector's index= and index_params=: fit, score, pickle, save, load, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from conftest import write_model

from msc_detector import ModelFileError, MSCDetector, persistence

# No fine-tuning: the embeddings depend on random_state only, the same for every index.
FAST = {"weights": None, "image_size": 32, "loss": None, "batch_size": 8, "random_state": 0}
FAST["image_score"] = "global"  # the kNN index is under test
KINDS = {
    "ivf": ({"nlist": 4}, "IndexIVFFlat"),
    "ivfpq": ({"nlist": 2, "pq_m": 16, "pq_nbits": 3}, "IndexIVFPQ"),
    "hnsw": ({"M": 8}, "IndexHNSWFlat"),
    "IVF4,SQ8": ({"nprobe": 2}, "IndexIVFScalarQuantizer"),
    "PCA32,Flat": ({}, "IndexPreTransform"),  # no plain-array form: stored as Faiss bytes
}


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def flat(X) -> MSCDetector:
    return MSCDetector(**FAST).fit(X)


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_approximate_index_fits_scores_pickles_saves_and_loads(kind, X, flat, tmp_path):
    params, faiss_class = KINDS[kind]
    det = MSCDetector(index=kind, index_params=params, **FAST).fit(X)
    assert det.index_.faiss_class == faiss_class and det.index_.ntotal == 40
    scores = det.score_samples(X[:12])
    # Leave-self-out: no image is its own neighbour; the training scores use the index.
    dist, idx = det.kneighbors()
    assert not (idx == np.arange(40)[:, None]).any() and (idx >= 0).all()
    if kind in ("ivf", "hnsw"):  # full vectors: kneighbors gives the fit's distances
        np.testing.assert_allclose(det.train_scores_, -(dist**2).sum(axis=1), rtol=1e-4)
    agreement = np.corrcoef(scores, flat.score_samples(X[:12]))[0, 1]
    assert agreement > (0.5 if kind == "ivfpq" else 0.9)  # 3-bit codes of 40 vectors: crude
    det.save(tmp_path / "m.msc")
    arrays = safetensors.numpy.load(members_of(tmp_path / "m.msc")["arrays.safetensors"])
    assert "index_vectors" not in arrays
    stored = {name for name in arrays if name.startswith("index")}
    if det.index_.spec.has_plain_form:  # Faiss's reader never sees the file's bytes
        assert stored == {"index." + name for name in det.index_.to_arrays()}
    else:
        assert stored == {"index_faiss"}
    info = persistence.inspect(tmp_path / "m.msc")
    assert info["format_version"] == 6 and info["index"]["faiss_class"] == faiss_class
    if kind == "hnsw":  # inspect reads the arrays' description without Faiss
        code = (
            "import sys, msc_detector; msc_detector.inspect(sys.argv[1]); "
            "print(sorted(m for m in ('faiss', 'torch') if m in sys.modules))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "m.msc")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert done.stdout.strip() == "[]"
    assert info["index"] == {"kind": kind, "params": params, "faiss_class": faiss_class} | {
        "dim": det.index_.dim,
        "ntotal": 40,
    }
    for copy in (MSCDetector.load(tmp_path / "m.msc"), pickle.loads(pickle.dumps(det))):
        assert copy.get_params()["index"] == kind and copy.index_.spec == det.index_.spec
        np.testing.assert_array_equal(copy.score_samples(X[:12]), scores)
        np.testing.assert_array_equal(copy.kneighbors()[1], idx)


def test_ivf_searched_exhaustively_scores_like_the_flat_index(X, flat):
    det = MSCDetector(index="ivf", index_params={"nlist": 8, "nprobe": 8}, **FAST).fit(X)
    np.testing.assert_allclose(det.score_samples(X[:8]), flat.score_samples(X[:8]), rtol=1e-5)
    np.testing.assert_allclose(det.train_scores_, flat.train_scores_, rtol=1e-5)
    assert det.offset_ == pytest.approx(flat.offset_, rel=1e-5)


def same_state(det: MSCDetector) -> dict:
    """The estimator's attributes, each by identity, and the fitted arrays' bytes."""
    return {
        name: (id(value), value.tobytes() if isinstance(value, np.ndarray) else None)
        for name, value in vars(det).items()
    }


def test_set_params_changes_nprobe_without_refitting_and_scoring_writes_nothing(X, flat):
    det = MSCDetector(index="ivf", index_params={"nlist": 8, "nprobe": 1}, **FAST).fit(X)
    queries = np.random.default_rng(5).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    index_bytes = det.index_.to_bytes().tobytes()
    before = same_state(det)
    narrow = det.score_samples(queries)
    det.kneighbors()
    assert same_state(det) == before
    det.set_params(index_params={"nlist": 8, "nprobe": 8})
    wide = det.score_samples(queries)
    assert not np.allclose(narrow, wide)  # one list of eight misses neighbours
    np.testing.assert_allclose(wide, flat.score_samples(queries), rtol=1e-5)
    assert (narrow <= wide + 1e-6).all()  # a narrower search finds neighbours no nearer
    assert det.index_.to_bytes().tobytes() == index_bytes
    train_scores = det.train_scores_.copy()
    det.set_params(index_params={"nprobe": 8})  # build settings may go: they are fit's
    np.testing.assert_array_equal(det.score_samples(queries), wide)
    np.testing.assert_array_equal(det.train_scores_, train_scores)


def test_search_settings_set_after_fit_are_checked_at_scoring(X):
    det = MSCDetector(index="hnsw", index_params={"M": 8}, **FAST).fit(X)
    det.set_params(index_params={"nprobe": 4})
    with pytest.raises(ValueError, match=r"'nprobe'\] does not apply to the fitted IndexHNSW"):
        det.score_samples(X[:2])
    det.set_params(index_params={"efSearch": 0})
    with pytest.raises(ValueError, match=r"must be an int in \[1, 65536\]; got 0"):
        det.kneighbors()
    det.set_params(index_params={"efSearch": 2**31 - 1})  # was std::bad_alloc in Faiss
    with pytest.raises(ValueError, match=r"'efSearch'\] must be an int in \[1, 65536\]"):
        det.score_samples(X[:2])
    det.set_params(index_params={"efsearch": 16})
    with pytest.raises(ValueError, match="unknown setting 'efsearch'"):
        det.score_samples(X[:2])
    det.set_params(index_params=[("efSearch", 16)])
    for search in (lambda: det.score_samples(X[:2]), det.kneighbors):
        with pytest.raises(ValueError, match=r"index_params must be a dict or None; got \["):
            search()
    det.set_params(index_params={"efSearch": 2})
    assert det.score_samples(X[:2]).shape == (2,)


@pytest.mark.parametrize(
    ("index", "params", "problem"),
    [
        ("IVFx,Flat", None, "Faiss cannot build for 1280-dimensional embeddings"),
        ("ivf", {"nprob": 4}, "unknown setting 'nprob'"),
        ("hnsw", {"nlist": 4}, r"'nlist'\] does not apply to index='hnsw'"),
        ("ivf", {"nlist": 0}, r"must be an int in \[1, 16777216\]"),
        ("ivfpq", {"pq_m": 3}, "must divide the embedding width 1280"),
        ("NSG8,Flat", None, "could not load back"),  # it would fit, then never load
    ],
)
def test_bad_index_options_fail_before_any_embedding(X, index, params, problem, monkeypatch):
    from msc_detector.embedding import Embedder

    def refuse(*args, **kwargs):
        raise AssertionError("embedded before checking the index")

    monkeypatch.setattr(Embedder, "run", refuse)  # every network call goes through it
    det = MSCDetector(index=index, index_params=params, **FAST)
    with pytest.raises(ValueError, match=problem):
        det.fit(X)
    with pytest.raises(ValueError, match="index_params"):
        MSCDetector(index_params=[("nprobe", 2)], **FAST).fit(X)


def test_a_flat_model_file_keeps_vectors_and_format_2_files_still_load(flat, X, tmp_path):
    flat.save(tmp_path / "m.msc")
    members = members_of(tmp_path / "m.msc")
    arrays = safetensors.numpy.load(members["arrays.safetensors"])
    assert "index_vectors" in arrays and "index_faiss" not in arrays
    metadata = json.loads(members["metadata.json"])
    assert metadata["index"]["kind"] == "flat"
    # Format 2 wrote no index description, no patch bank and none of their parameters.
    del metadata["index"]
    for name in ("index", "index_params", "patch_memory", "patch_stages", "image_score"):
        del metadata["params"][name]
    for name in ("patch_stages_", "image_score_", "score_scales_", "crop_mode_"):
        del metadata["fitted"][name]
    del metadata["params"]["crop_mode"]
    old_arrays = {k: v for k, v in arrays.items() if not k.startswith("patch_")}
    changed = {
        "metadata.json": json.dumps(metadata).encode(),
        "arrays.safetensors": safetensors.numpy.save(old_arrays),
    }
    write_model(tmp_path / "v2.msc", {**members, **changed}, 2)
    old = MSCDetector.load(tmp_path / "v2.msc")
    assert old.index == "flat" and old.index_.spec.exact
    np.testing.assert_array_equal(old.score_samples(X[:8]), flat.score_samples(X[:8]))


@pytest.fixture(scope="module")
def ivf(X) -> MSCDetector:
    return MSCDetector(index="ivf", index_params={"nlist": 4}, **FAST).fit(X)


def test_forged_plain_index_arrays_are_refused_before_faiss_sees_them(ivf, X, tmp_path):
    ivf.save(tmp_path / "m.msc")
    members = members_of(tmp_path / "m.msc")
    arrays = safetensors.numpy.load(members["arrays.safetensors"])

    def load(changed: dict[str, np.ndarray | None]) -> MSCDetector:
        forged = {k: v for k, v in {**arrays, **changed}.items() if v is not None}
        blob = safetensors.numpy.save(forged)
        write_model(tmp_path / "bad.msc", {**members, "arrays.safetensors": blob}, 5)
        return MSCDetector.load(tmp_path / "bad.msc")

    np.testing.assert_array_equal(load({}).score_samples(X[:4]), ivf.score_samples(X[:4]))
    sizes = arrays["index.list_sizes"].copy()
    sizes[0] += 2**40  # a list that claims a terabyte of codes
    with pytest.raises(ModelFileError, match="list_sizes"):
        load({"index.list_sizes": sizes})
    ids = arrays["index.ids"].copy()
    ids[0] = ids[1]  # one vector listed twice, another never
    with pytest.raises(ModelFileError, match="ids"):
        load({"index.ids": ids})
    with pytest.raises(ModelFileError, match="centroids"):
        load({"index.centroids": np.full_like(arrays["index.centroids"], np.nan)})
    # The Faiss bytes of format 4 in a format-5 file: refused, not parsed.
    with pytest.raises(ModelFileError, match="lacks the arrays of its 'ivf' index"):
        load(
            {k: None for k in arrays if k.startswith("index.")}
            | {"index_faiss": ivf.index_.to_bytes()}
        )


def test_a_format_4_faiss_index_is_size_checked_before_faiss_reads_it(ivf, X, tmp_path):
    ivf.save(tmp_path / "m.msc")
    members = members_of(tmp_path / "m.msc")
    arrays = {  # as format 4 stored it: Faiss's bytes
        k: v
        for k, v in safetensors.numpy.load(members["arrays.safetensors"]).items()
        if not k.startswith("index.")
    }
    arrays["index_faiss"] = ivf.index_.to_bytes()
    metadata = json.loads(members["metadata.json"])

    def variant(blob: np.ndarray, index: dict) -> Path:
        path = tmp_path / "bad.msc"
        changed = {
            "arrays.safetensors": safetensors.numpy.save({**arrays, "index_faiss": blob}),
            "metadata.json": json.dumps({**metadata, "index": index}).encode(),
        }
        write_model(path, {**members, **changed}, 4)
        return path

    blob, index = arrays["index_faiss"], metadata["index"]
    old = MSCDetector.load(variant(blob, index))
    np.testing.assert_array_equal(old.score_samples(X[:4]), ivf.score_samples(X[:4]))
    with pytest.raises(ModelFileError, match="expected a IndexHNSWFlat"):
        MSCDetector.load(variant(blob, {**index, "faiss_class": "IndexHNSWFlat"}))
    with pytest.raises(ModelFileError, match="only 2 bytes follow"):  # checked before Faiss
        MSCDetector.load(variant(blob[:100], index))
    forged = blob.copy()  # the quantizer claims 2**28 centroid floats: Faiss allocated 1 GiB
    forged[90:98] = np.frombuffer(np.uint64(2**28).tobytes(), np.uint8)
    with pytest.raises(ModelFileError, match="claim the flat vectors of 268435456 items"):
        MSCDetector.load(variant(forged, index))
    with pytest.raises(ModelFileError, match="describes an index of 39 vectors"):
        persistence.inspect(variant(blob, {**index, "ntotal": 39}))
    with pytest.raises(ModelFileError, match="'index'"):
        persistence.inspect(variant(blob, {**index, "kind": 3}))
    with pytest.raises(ModelFileError, match="index_vectors"):
        persistence.inspect(variant(blob, {**index, "kind": "flat"}))

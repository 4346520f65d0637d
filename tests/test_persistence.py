"""Model files: round trips, verification without torch, corruption, tampering, atomicity."""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError

import msc_detector
from msc_detector import ModelFileError, MSCDetector, persistence

MEMBERS = ("manifest.json", "metadata.json", "arrays.safetensors", "networks.safetensors")
FAST = {"weights": None, "image_size": 32, "epochs": 1, "batch_size": 8, "random_state": 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[MSCDetector, Path, np.ndarray]:
    """A fitted detector, its model file and its training images (fitted once)."""
    X = np.random.default_rng(0).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    detector = MSCDetector(**FAST).fit(X)
    path = tmp_path_factory.mktemp("model") / "detector.msc"
    detector.save(path)
    return detector, path, X


@pytest.fixture
def saved(model, tmp_path: Path) -> Path:
    """A private copy of the model file, free to damage."""
    copy_path = tmp_path / "detector.msc"
    copy_path.write_bytes(model[1].read_bytes())
    return copy_path


@pytest.fixture(params=["read", "inspect"])
def reader(request) -> Callable[[Path], object]:
    """Both entry points must refuse a damaged file (MSCDetector.load calls read)."""
    return persistence.read if request.param == "read" else msc_detector.inspect


# ------------------------------------------------------------------ helpers


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def manifest_for(members: dict[str, bytes], version: int = persistence.FORMAT_VERSION) -> bytes:
    listed = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in members.items()
        if name != "manifest.json"
    }
    manifest = {"format": "msc-detector-model", "format_version": version, "members": listed}
    return json.dumps(manifest).encode()


def write_members(
    path: Path,
    members: dict[str, bytes],
    refresh_manifest: bool = True,
    compression: int = zipfile.ZIP_STORED,
) -> None:
    """Write a zip like save does; with refresh_manifest, the checksums match the content."""
    members = dict(members)
    if refresh_manifest:
        members["manifest.json"] = manifest_for(members)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def edit_metadata(path: Path, edit: Callable[[dict], None]) -> None:
    """Change metadata.json and re-checksum, as a careful tamperer would."""
    members = read_members(path)
    metadata = json.loads(members["metadata.json"])
    edit(metadata)
    members["metadata.json"] = json.dumps(metadata).encode()
    write_members(path, members)


def edit_safetensors(path: Path, member: str, edit: Callable[[dict], dict]) -> None:
    """Change the tensors of a safetensors member and re-checksum."""
    module = safetensors.torch if member == "networks.safetensors" else safetensors.numpy
    members = read_members(path)
    members[member] = module.save(edit(module.load(members[member])))
    write_members(path, members)


def member_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with path.open("rb") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_len + extra_len


def central_directory(data: bytes) -> tuple[int, int]:
    """Offset of the central directory and of the end-of-central-directory record."""
    end = data.rindex(b"PK\x05\x06")
    return struct.unpack("<I", data[end + 16 : end + 20])[0], end


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


class Payload:
    """Unpickling this calls open(marker, "w"): it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=4)


# --------------------------------------------------------------- round trips


def test_round_trip_in_a_fresh_process_gives_identical_scores(model, tmp_path: Path) -> None:
    detector, path, X = model
    data, out = tmp_path / "x.npy", tmp_path / "scores.npy"
    np.save(data, X)
    run_python(f"""
        import warnings
        import numpy as np
        from msc_detector import MSCDetector
        warnings.simplefilter("error")
        det = MSCDetector.load({str(path)!r})
        np.save({str(out)!r}, det.score_samples(np.load({str(data)!r})))
    """)
    np.testing.assert_array_equal(np.load(out), detector.score_samples(X))


def test_round_trip_restores_parameters_and_every_fitted_attribute(model) -> None:
    detector, path, X = model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = MSCDetector.load(path, device="cpu")
    assert loaded.get_params() == detector.get_params()
    cache = {"_compute_backbone"}  # a cache some versions keep, rebuilt on demand
    assert set(vars(loaded)) - cache == set(vars(detector)) - cache
    assert loaded.model_.state()[0] == detector.model_.state()[0]  # every fitted scalar
    assert set(detector.model_.state()[0]) | {"offset_"} == set(persistence.FITTED)
    assert loaded.offset_ == detector.offset_
    assert loaded.backbone_spec_ == detector.backbone_spec_
    assert loaded.device_ == torch.device("cpu")
    np.testing.assert_array_equal(loaded.center_, detector.center_)
    np.testing.assert_array_equal(loaded.train_scores_, detector.train_scores_)
    np.testing.assert_array_equal(loaded.index_.vectors(), detector.index_.vectors())
    assert loaded.center_.dtype == np.float32
    assert loaded.train_scores_.dtype == np.float64
    assert [p.requires_grad for p in loaded.backbone_.parameters()] == [
        p.requires_grad for p in detector.backbone_.parameters()
    ]
    assert not loaded.backbone_.training
    np.testing.assert_array_equal(loaded.predict(X), detector.predict(X))
    np.testing.assert_array_equal(loaded.kneighbors()[1], detector.kneighbors()[1])


def test_encode_and_decode_round_trip_without_a_file(model) -> None:
    """The pickle path: the same encoder, no archive, no manifest."""
    detector = model[0]
    members = persistence.encode(detector)
    assert list(members) == list(MEMBERS[1:])
    decoded = persistence.decode(members, "pickle")
    assert decoded.fitted == json.loads(members["metadata.json"])["fitted"]
    assert decoded.fitted["device_"] == "cpu"
    assert decoded.parts.spec == detector.backbone_spec_
    assert decoded.parts.pretrained is None
    np.testing.assert_array_equal(decoded.parts.index.vectors(), detector.index_.vectors())
    state = decoded.parts.backbone.state_dict()
    for key, value in detector.backbone_.state_dict().items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0)
    with pytest.raises(ModelFileError, match=r"pickle is not a usable.*missing member"):
        persistence.decode({}, "pickle")


def test_saving_twice_overwrites_and_leaves_no_temporary_file(model, tmp_path: Path) -> None:
    detector = model[0]
    path = tmp_path / "model.bin"  # any name works
    path.write_bytes(b"old content")
    os.chmod(path, 0o600)
    detector.save(str(path))
    detector.save(path)
    assert os.listdir(tmp_path) == ["model.bin"]
    assert path.stat().st_mode & 0o777 == 0o600  # the replaced file's permissions are kept
    assert persistence.read(str(path)).fitted["n_train_"] == detector.n_train_


def test_saving_through_a_symlink_writes_its_target(model, tmp_path: Path) -> None:
    target, link = tmp_path / "target.msc", tmp_path / "link.msc"
    target.write_bytes(b"old")
    link.symlink_to(target)
    model[0].save(link)
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["link.msc", "target.msc"]
    assert msc_detector.inspect(target)["fitted"]["n_train_"] == 24


def test_joblib_and_pickle_keep_working(model) -> None:
    detector, _, X = model
    restored = pickle.loads(pickle.dumps(detector))
    np.testing.assert_array_equal(restored.score_samples(X), detector.score_samples(X))


def test_saving_an_unfitted_detector_raises_not_fitted(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        MSCDetector().save(tmp_path / "x.msc")
    assert os.listdir(tmp_path) == []


def test_epoch_callback_is_dropped_with_a_warning(model, tmp_path: Path) -> None:
    detector = copy.copy(model[0]).set_params(epoch_callback=lambda epoch, det: None)
    with pytest.warns(UserWarning, match="epoch_callback cannot be stored"):
        detector.save(tmp_path / "x.msc")
    loaded = MSCDetector.load(tmp_path / "x.msc")
    assert loaded.epoch_callback is None
    assert loaded.get_params()["random_state"] == FAST["random_state"]


def test_parameters_are_encoded_as_json() -> None:
    params = {
        "weights": Path("/models/w.pth"),
        "device": torch.device("cuda", 1),
        "n_neighbors": np.int64(3),
        "lr": np.float32(0.5),
        "loss": None,
        "random_state": np.random.RandomState(0),
        "epoch_callback": print,
    }
    encoded, dropped = persistence.codec.json_params(params)
    assert encoded == {
        "weights": "/models/w.pth",
        "device": "cuda:1",
        "n_neighbors": 3,
        "lr": 0.5,
        "loss": None,
        "random_state": None,
        "epoch_callback": None,
    }
    assert dropped == ["random_state", "epoch_callback"]
    json.dumps(encoded)


# ------------------------------------------------------------------ inspect


def test_inspect_verifies_without_importing_torch(model) -> None:
    path = model[1]
    out = run_python(f"""
        import json, sys
        import msc_detector
        info = msc_detector.inspect({str(path)!r})
        heavy = sorted(m for m in ("torch", "timm", "faiss", "sklearn", "msc_detector.estimator")
                       if m in sys.modules)
        print(json.dumps({{"heavy": heavy, "info": info}}))
    """)
    result = json.loads(out)
    assert result["heavy"] == []
    assert result["info"]["fitted"]["n_train_"] == 24
    assert result["info"]["format_version"] == persistence.FORMAT_VERSION == 6


def test_inspect_returns_the_metadata(model) -> None:
    detector, path, _ = model
    info = msc_detector.inspect(path)
    assert info["format"] == "msc-detector-model"
    assert info["estimator"] == "msc_detector.estimator.MSCDetector"
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["msc_detector"] == msc_detector.__version__
    assert set(info["versions"]) >= {"torch", "timm", "faiss", "scikit-learn", "numpy"}
    assert info["params"]["image_size"] == 32
    assert "epoch_callback" in info["params"]
    assert info["backbone_spec"] == json.loads(json.dumps(detector.backbone_spec_.to_dict()))
    assert set(info["fitted"]) == set(persistence.FITTED)
    assert info["fitted"]["offset_"] == detector.offset_
    assert info["fitted"]["device_"] == "cpu"
    assert info["fitted"]["precision_"] == detector.precision_.name
    members = read_members(path)
    assert list(members) == list(MEMBERS)
    for name, entry in info["members"].items():
        assert entry == {
            "size": len(members[name]),
            "sha256": hashlib.sha256(members[name]).hexdigest(),
        }


def test_the_file_holds_the_index_vectors_and_prefixed_networks(model) -> None:
    detector, path, _ = model
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    members = read_members(path)
    arrays = safetensors.numpy.load(members["arrays.safetensors"])
    patches = ["patch_baseline", "patch_grid", "patch_owners", "patch_positions", "patch_vectors"]
    assert sorted(arrays) == ["center_", "index_vectors", *patches, "train_scores_"]
    np.testing.assert_array_equal(arrays["index_vectors"], detector.index_.vectors())
    np.testing.assert_array_equal(arrays["patch_vectors"], detector.patch_bank_.vectors())
    keys = safetensors.torch.load(members["networks.safetensors"])
    assert keys and all(key.startswith("backbone.") for key in keys)


def test_import_of_the_package_is_lazy() -> None:
    out = run_python("""
        import sys
        import msc_detector
        print("torch" in sys.modules, msc_detector.__version__)
        from msc_detector import MSCDetector
        print("torch" in sys.modules, MSCDetector.__module__, "MSCDetector" in dir(msc_detector))
    """)
    assert out.split() == [
        "False",
        msc_detector.__version__,
        "True",
        "msc_detector.estimator",
        "True",
    ]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        msc_detector.nope  # noqa: B018


# --------------------------------------------------------- damaged files


def test_truncated_file(saved: Path, reader) -> None:
    data = saved.read_bytes()
    for size in (len(data) // 2, len(data) - 10):
        saved.write_bytes(data[:size])
        with pytest.raises(ModelFileError, match="truncated or damaged") as info:
            reader(saved)
        assert str(saved) in str(info.value)


def test_flipped_byte_in_a_member(saved: Path, reader) -> None:
    offset = member_data_offset(saved, "networks.safetensors") + 100_000
    data = bytearray(saved.read_bytes())
    data[offset] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"'networks\.safetensors' is corrupted"):
        reader(saved)


def test_every_flipped_bit_in_the_central_directory_is_a_model_file_error(tmp_path: Path) -> None:
    """zipfile raises many exception types on damage; readers turn each into ModelFileError."""
    path = tmp_path / "small.msc"
    payload = {name: name.encode() * 3 for name in MEMBERS[1:]}
    write_members(path, {"manifest.json": b"", **payload})
    data = path.read_bytes()
    start, end = central_directory(data)
    for offset in range(start, end + 22):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            try:
                _, _, members = persistence.container.verified_members(path)
            except ModelFileError:
                continue
            assert members == payload, (offset, bit)  # a harmless bit, e.g. of a timestamp


@pytest.mark.parametrize("field", ["directory offset", "local header offset"])
def test_a_flipped_offset_in_the_central_directory(saved: Path, reader, field: str) -> None:
    data = bytearray(saved.read_bytes())
    start, end = central_directory(bytes(data))
    offset = end + 16 if field == "directory offset" else start + 42  # first entry's
    data[offset + 2] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="not a usable model file"):
        reader(saved)


def test_altered_member_with_a_valid_crc_fails_the_checksum(saved: Path, reader) -> None:
    members = read_members(saved)
    original = members["metadata.json"]
    members["metadata.json"] = original.replace(b'"offset_": -', b'"offset_": +')
    assert members["metadata.json"] != original  # same size, valid CRC, stale manifest
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"'metadata\.json' does not match its SHA-256"):
        reader(saved)


def test_a_member_whose_size_differs_from_the_manifest(saved: Path, reader) -> None:
    members = read_members(saved)
    members["metadata.json"] = json.dumps(json.loads(members["metadata.json"])).encode()
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"'metadata\.json' has \d+ bytes, not \d+"):
        reader(saved)


def test_invalid_json_with_matching_checksums(saved: Path, reader) -> None:
    members = read_members(saved)
    members["metadata.json"] = members["metadata.json"][:-2]
    write_members(saved, members)
    with pytest.raises(ModelFileError, match=r"metadata\.json is not valid"):
        reader(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["fitted"].update(offset_="-0.1"), r"\['offset_'\] must be a finite number"),
        (lambda m: m["fitted"].update(offset_=float("nan")), "offset_'] must be a finite"),
        (lambda m: m["fitted"].update(flip_average_="yes"), "flip_average_'] must be a boolean"),
        (lambda m: m["fitted"].update(nearest_view_=1), "nearest_view_'] must be a boolean"),
        (lambda m: m["fitted"].update(image_size_=8), r"image_size_'\] must be an int in"),
        (lambda m: m["fitted"].update(device_="gpu0"), "device_'] must be a device"),
        (lambda m: m["fitted"].update(precision_="fp8"), "precision_'] must be fp32"),
        (lambda m: m["fitted"].update(history_=[{"loss": "x"}]), "history_'] must be a list"),
        (lambda m: m["fitted"].pop("crop_pct_"), r"\['fitted'\] must be an object with the keys"),
        (lambda m: m["fitted"].update(extra_=1), r"\['fitted'\] must be an object with the keys"),
        (lambda m: m.update(params=[1]), r"\['params'\] must be an object of nulls"),
        (lambda m: m["params"].update(n_neighbors=[[3]]), r"\['params'\] must be an object"),
        (lambda m: m["versions"].update(torch=2), r"\['versions'\] must be an object of strings"),
        (lambda m: m.pop("created"), r"metadata\.json must be an object with the keys"),
        (lambda m: m["backbone_spec"].update(num_features=0), "positive integer num_features"),
    ],
)
def test_metadata_of_the_wrong_shape(saved: Path, reader, edit, message: str) -> None:
    edit_metadata(saved, edit)
    with pytest.raises(ModelFileError, match=message):
        reader(saved)


def test_an_invalid_backbone_spec_is_refused(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["backbone_spec"].pop("preprocess"))
    with pytest.raises(ModelFileError, match="invalid backbone_spec"):
        persistence.read(saved)


def test_a_metadata_member_over_its_size_limit(saved: Path, reader) -> None:
    members = read_members(saved)
    limit = persistence.schema.LIMITS["metadata.json"]
    members["metadata.json"] += b" " * (limit + 1 - len(members["metadata.json"]))
    write_members(saved, members)
    with pytest.raises(ModelFileError, match=rf"'metadata\.json' declares more than {limit}"):
        reader(saved)
    with pytest.raises(ModelFileError, match=r"metadata\.json has \d+ bytes, over its limit"):
        persistence.decode({**members}, "pickle")


def test_a_history_over_its_length_limit(saved: Path, reader) -> None:
    edit_metadata(saved, lambda m: m["fitted"].update(history_=[{}] * 100_001))
    with pytest.raises(ModelFileError, match="history_'] must be a list of at most 100000"):
        reader(saved)


def test_oversized_members_are_refused_before_reading(saved: Path, reader, monkeypatch) -> None:
    monkeypatch.setitem(persistence.schema.LIMITS, "metadata.json", 100)
    monkeypatch.setattr(
        persistence.container, "_read", lambda *a, **k: pytest.fail("a member was read")
    )
    with pytest.raises(ModelFileError, match=r"'metadata\.json' declares more than 100 bytes"):
        reader(saved)


def test_missing_member(saved: Path, reader) -> None:
    members = read_members(saved)
    del members["networks.safetensors"]
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"missing member 'networks\.safetensors'"):
        reader(saved)


def test_unexpected_member(saved: Path, reader) -> None:
    members = read_members(saved)
    members["data.pkl"] = b"anything"
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"unexpected member 'data\.pkl'"):
        reader(saved)


def test_compressed_members_are_refused(saved: Path, reader) -> None:
    # A deflated member can declare a size the archive cannot hold: a zip bomb.
    write_members(saved, read_members(saved), compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelFileError, match="is compressed or encrypted"):
        reader(saved)


def test_duplicate_members_are_refused(saved: Path, reader) -> None:
    members = read_members(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(saved, "a") as archive:
            archive.writestr("metadata.json", members["metadata.json"])
    with pytest.raises(ModelFileError, match="appears more than once"):
        reader(saved)


@pytest.mark.parametrize(
    "content", [b"", b"model weights, honest", b"\x89PNG\r\n\x1a\n" + bytes(100)]
)
def test_files_that_are_not_zip_archives(saved: Path, reader, content: bytes) -> None:
    saved.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a zip archive"):
        reader(saved)


def test_a_directory_and_a_missing_file(tmp_path: Path, reader) -> None:
    with pytest.raises(ModelFileError, match="it is a directory"):
        reader(tmp_path)
    with pytest.raises(FileNotFoundError):
        reader(tmp_path / "nothing.msc")


def test_newer_format_version_is_refused(saved: Path, reader) -> None:
    members = read_members(saved)
    members["extra-in-the-new-format.bin"] = b"..."
    members["manifest.json"] = manifest_for(members, version=persistence.FORMAT_VERSION + 1)
    write_members(saved, members, refresh_manifest=False)
    newer = persistence.FORMAT_VERSION + 1
    with pytest.raises(ModelFileError, match=f"format {newer}, written by a newer msc-detector"):
        reader(saved)


def test_the_development_format_1_is_refused_with_a_message_to_refit(saved: Path, reader) -> None:
    members = {  # the layout of format 1
        "manifest.json": b"",
        "metadata.json": b"{}",
        "arrays.safetensors": b"",
        "index.faiss": b"IxF2",
        "backbone.safetensors": b"",
    }
    members["manifest.json"] = manifest_for(members, version=1)
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"development version .* before 0\.1\.0") as info:
        reader(saved)
    assert "Fit the detector again and save it" in str(info.value)


def test_a_foreign_manifest_is_refused(saved: Path, reader) -> None:
    members = read_members(saved)
    members["manifest.json"] = b'{"format": "something-else", "format_version": 1}'
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match="format 'something-else'"):
        reader(saved)


@pytest.mark.parametrize(
    "entry", [{"size": 1}, {"size": -1, "sha256": "0" * 64}, {"size": 1, "sha256": "A" * 64}]
)
def test_a_manifest_of_the_wrong_shape_is_refused(saved: Path, reader, entry: dict) -> None:
    members = read_members(saved)
    manifest = json.loads(members["manifest.json"])
    manifest["members"]["arrays.safetensors"] = entry
    members["manifest.json"] = json.dumps(manifest).encode()
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"manifest\.json\['members'\] must be"):
        reader(saved)


def test_arrays_that_disagree_with_the_metadata(saved: Path, reader) -> None:
    edit_metadata(saved, lambda m: m["fitted"].update(n_train_=23))
    with pytest.raises(ModelFileError, match=r"arrays\.safetensors holds .*'train_scores_'"):
        reader(saved)


def test_index_vectors_of_the_wrong_width_for_the_views(saved: Path, reader) -> None:
    edit_metadata(saved, lambda m: m["fitted"].update(nearest_view_=True))  # one view stored
    with pytest.raises(ModelFileError, match=r"arrays\.safetensors holds .*'index_vectors'"):
        reader(saved)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("patch_positions", lambda a: a[:, :1], r"'patch_positions' as int64 \(\d+, 1\)"),
        ("patch_baseline", lambda a: a.astype(np.float64), "'patch_baseline' as float64"),
        ("patch_owners", lambda a: a + 1000, "patch owners or positions outside their range"),
    ],
)
def test_patch_arrays_that_disagree_with_the_metadata(saved: Path, reader, name, change, message):
    def edit(arrays: dict) -> dict:
        return {**arrays, name: np.ascontiguousarray(change(arrays[name]))}

    edit_safetensors(saved, "arrays.safetensors", edit)
    with pytest.raises(ModelFileError, match=message):
        reader(saved)


def test_metadata_without_an_index_is_only_read_in_format_2(saved: Path, reader) -> None:
    edit_metadata(saved, lambda m: m.pop("index"))
    with pytest.raises(ModelFileError, match=r"metadata\.json must be an object with the keys"):
        reader(saved)


def test_arrays_with_non_finite_values(saved: Path, reader) -> None:
    def poison(arrays: dict) -> dict:
        center = arrays["center_"].copy()
        center[0] = np.nan
        return {**arrays, "center_": center}

    edit_safetensors(saved, "arrays.safetensors", poison)
    with pytest.raises(ModelFileError, match=r"non-finite values in \['center_'\]"):
        reader(saved)


@pytest.fixture(scope="module")
def fitted_on_files(tmp_path_factory) -> tuple[MSCDetector, list[str]]:
    folder = tmp_path_factory.mktemp("train files")
    X = np.random.default_rng(5).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    paths = [str(folder / f"näme {i}.png") for i in range(len(X))]
    for path, image in zip(paths, X, strict=True):
        Image.fromarray(image).save(path)
    return MSCDetector(**FAST).fit(paths), paths


def test_training_paths_round_trip_through_files_and_pickles(fitted_on_files, tmp_path) -> None:
    detector, paths = fitted_on_files
    assert detector.train_paths_ == paths
    detector.save(tmp_path / "files.msc")
    assert MSCDetector.load(tmp_path / "files.msc").train_paths_ == paths
    assert pickle.loads(pickle.dumps(detector)).train_paths_ == paths


def test_training_paths_of_the_wrong_count_are_refused(fitted_on_files, tmp_path, reader):
    detector, _ = fitted_on_files
    detector.save(tmp_path / "files.msc")

    def drop_one(arrays: dict) -> dict:
        joined = arrays["train_paths"].tobytes()
        return {**arrays, "train_paths": np.frombuffer(joined.split(b"\0", 1)[1], np.uint8)}

    edit_safetensors(tmp_path / "files.msc", "arrays.safetensors", drop_one)
    with pytest.raises(ModelFileError, match="train_paths that do not hold 6 paths"):
        reader(tmp_path / "files.msc")


def test_an_architecture_that_needs_a_download_is_refused(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["backbone_spec"].update(architecture="hf-hub:someone/model"))
    with pytest.raises(ModelFileError, match="without downloading"):
        persistence.read(saved)


def test_weights_that_do_not_fit_the_architecture(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["backbone_spec"].update(architecture="resnet18"))
    with pytest.raises(ModelFileError, match="do not fit 'resnet18'"):
        persistence.read(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: {**t, "other.weight": torch.zeros(1)},
            "keys outside backbone. and pretrained.",
        ),
        (lambda t: {"pretrained." + k[9:]: v for k, v in t.items()}, "do not fit"),  # no backbone
    ],
)
def test_networks_with_stray_keys_or_no_backbone(saved: Path, edit, message: str) -> None:
    edit_safetensors(saved, "networks.safetensors", edit)
    with pytest.raises(ModelFileError, match=message):
        persistence.read(saved)


@pytest.fixture(scope="module")
def two_networks(tmp_path_factory) -> tuple[MSCDetector, Path, np.ndarray]:
    """A fitted detector with the nearest view (two networks), its file and images."""
    X = np.random.default_rng(2).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    detector = MSCDetector(**FAST).fit(X)  # 16-pixel images at 32: the view is on
    path = tmp_path_factory.mktemp("views") / "views.msc"
    detector.save(path)
    return detector, path, X


def test_a_nearest_view_model_round_trips(two_networks) -> None:
    detector, path, X = two_networks
    assert detector.nearest_view_ and detector.index_.dim == 2 * detector.center_.shape[0]
    assert detector.pretrained_backbone_ is not None
    keys = safetensors.torch.load(read_members(path)["networks.safetensors"])
    assert any(key.startswith("pretrained.") for key in keys)
    loaded = MSCDetector.load(path, device="cpu")
    assert loaded.nearest_view_ is True and loaded.pretrained_backbone_ is not None
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))


def test_invalid_parameters_are_refused(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["params"].update(n_neighbors=-3))
    with pytest.raises(ModelFileError, match="invalid parameters"):
        MSCDetector.load(saved)


# ------------------------------------------------------------------ pickles


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The crafted pickle really runs code when unpickled: the tests below mean something."""
    marker = tmp_path / "ran"
    pickle.loads(malicious_pickle(marker)).close()
    assert marker.exists()


def test_a_malicious_pickle_disguised_as_a_model_file_runs_nothing(
    saved: Path, reader, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    saved.write_bytes(malicious_pickle(marker))
    with pytest.raises(ModelFileError, match="it is a pickle"):
        reader(saved)
    assert not marker.exists()


def test_a_joblib_dump_renamed_to_msc_is_refused(model, tmp_path: Path, reader) -> None:
    path = tmp_path / "detector.msc"
    joblib.dump(model[0], path)
    with pytest.raises(ModelFileError, match="it is a pickle"):
        reader(path)


def test_a_torch_style_zip_with_a_pickle_inside_runs_nothing(tmp_path: Path, reader) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "detector.msc"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", malicious_pickle(marker))
        archive.writestr("archive/version", b"3\n")
    with pytest.raises(ModelFileError, match="unexpected member"):
        reader(path)
    assert not marker.exists()


@pytest.mark.parametrize("member", ["networks.safetensors", "arrays.safetensors", "metadata.json"])
def test_a_pickle_swapped_in_with_matching_checksums_runs_nothing(
    saved: Path, tmp_path: Path, member: str
) -> None:
    marker = tmp_path / "pwned"
    members = read_members(saved)
    members[member] = malicious_pickle(marker)
    write_members(saved, members)  # checksums match: only the content gives it away
    with pytest.raises(ModelFileError, match=member.replace(".", r"\.") + " is not valid"):
        persistence.read(saved)
    assert not marker.exists()


# -------------------------------------------------------------- atomicity


@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_an_interrupted_save_keeps_the_previous_file(
    model, saved: Path, monkeypatch, failure: BaseException
) -> None:
    before = saved.read_bytes()
    write = zipfile.ZipFile.writestr
    calls = []

    def failing_write(self, info, data, *args, **kwargs):
        calls.append(info)
        if len(calls) == 3:  # mid-file: two members are already written
            raise failure
        return write(self, info, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_write)
    with pytest.raises(type(failure)):
        model[0].save(saved)
    assert len(calls) == 3
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_a_failed_rename_keeps_the_previous_file(model, saved: Path, monkeypatch) -> None:
    before = saved.read_bytes()

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(persistence.os, "replace", failing_replace)
    with pytest.raises(OSError, match="I/O error"):
        model[0].save(saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_a_failed_first_save_leaves_nothing(model, tmp_path: Path, monkeypatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(persistence.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        model[0].save(tmp_path / "new.msc")
    assert os.listdir(tmp_path) == []


def test_the_new_file_is_synced_before_the_rename(model, tmp_path: Path, monkeypatch) -> None:
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(persistence.os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(
        persistence.os, "replace", lambda a, b: events.append("replace") or replace(a, b)
    )
    model[0].save(tmp_path / "new.msc")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the directory


# -------------------------------------------------- versions and devices


def test_other_library_versions_warn(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["versions"].update(torch="1.0.0", timm="0.1.0"))
    with pytest.warns(UserWarning, match=r"torch 1\.0\.0 \(now .*timm 0\.1\.0"):
        loaded = persistence.read(saved)
    assert loaded.fitted["n_train_"] == 24


def test_a_different_local_build_label_does_not_warn(saved: Path) -> None:
    release = torch.__version__.split("+")[0]
    edit_metadata(saved, lambda m: m["versions"].update(torch=release + "+cu999"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        persistence.read(saved)


def test_a_cuda_fitted_model_lands_on_the_cpu_with_a_warning(
    model, saved: Path, monkeypatch
) -> None:
    detector, _, X = model
    edit_metadata(saved, lambda m: m["fitted"].update(device_="cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="fitted on cuda:0.*loaded on the CPU"):
        loaded = MSCDetector.load(saved)
    assert loaded.device_ == torch.device("cpu")
    # The precision parameter ("auto") is resolved for this CPU, as at fit time here.
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit device is the user's choice: no warning
        assert MSCDetector.load(saved, device="cpu").device_ == torch.device("cpu")


def test_an_unavailable_explicit_device_is_refused(saved: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        MSCDetector.load(saved, device="cuda")


def test_model_file_error_is_a_value_error() -> None:
    assert issubclass(ModelFileError, ValueError)
    assert msc_detector.ModelFileError is persistence.ModelFileError


# ---------------------------------------------------- preprocessing and module backbones


def test_a_preprocess_override_round_trips_through_a_model_file(tmp_path: Path) -> None:
    X = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    unnormalised = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    detector = MSCDetector(**{**FAST, "epochs": 0}, preprocess=unnormalised).fit(X)
    detector.save(tmp_path / "d.msc")
    params = msc_detector.inspect(tmp_path / "d.msc")["params"]
    assert params["preprocess"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped
        loaded = MSCDetector.load(tmp_path / "d.msc")
    assert loaded.get_params() == detector.get_params()
    assert loaded.backbone_spec_ == detector.backbone_spec_
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))


def test_preprocess_is_encoded_as_json() -> None:
    from msc_detector.backbones import PreprocessConfig

    config = PreprocessConfig(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", 0.875)
    params = {
        "config": config,
        "partial": {"mean": np.array([0.5, 0.5, 0.5]), "input_size": np.int64(64)},
        "strange": {"mean": object()},
    }
    encoded, dropped = persistence.codec.json_params(params)
    assert encoded == {
        "config": {
            "input_size": 224,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "interpolation": "bilinear",
            "crop_pct": 0.875,
        },
        "partial": {"mean": [0.5, 0.5, 0.5], "input_size": 64},
        "strange": None,
    }
    assert dropped == ["strange"]
    json.dumps(encoded)


@pytest.mark.parametrize("value", [{"a": {"b": 1}}, {"a": ["x"]}, {"a": list(range(17))}])
def test_params_that_nest_deeper_are_refused(saved: Path, reader, value: dict) -> None:
    edit_metadata(saved, lambda m: m["params"].update(preprocess=value))
    with pytest.raises(ModelFileError, match=r"params'\] must be an object of nulls"):
        reader(saved)


def module_detector() -> tuple[MSCDetector, np.ndarray]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    X = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    pre = {"input_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    params = {k: v for k, v in FAST.items() if k != "weights"}
    return MSCDetector(module, preprocess=pre, **params).fit(X), X


def test_a_module_detector_is_not_saved_and_the_error_names_joblib(tmp_path: Path) -> None:
    detector, X = module_detector()
    with pytest.raises(ValueError, match=r"torch\.nn\.Module.*cannot be saved.*joblib\.dump"):
        detector.save(tmp_path / "d.msc")
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary file
    with pytest.raises(ValueError, match="cannot be saved"):
        persistence.encode(detector)
    members = persistence.encode(detector, networks=False)
    assert list(members) == ["metadata.json", "arrays.safetensors"]
    decoded = persistence.decode(members, "pickle", networks=(detector.backbone_, None))
    assert decoded.parts.backbone is detector.backbone_ and decoded.parts.spec.is_module
    with pytest.raises(ModelFileError, match=r"missing member 'networks\.safetensors'"):
        persistence.decode(members, "pickle")  # without the modules, nothing to build
    restored = joblib.load(io.BytesIO(pickled(detector)))
    np.testing.assert_array_equal(restored.score_samples(X), detector.score_samples(X))


def pickled(detector: MSCDetector) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(detector, buffer)
    return buffer.getvalue()

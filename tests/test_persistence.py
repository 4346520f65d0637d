"""Model files: round trips, verification without torch, corruption, tampering, atomicity."""

from __future__ import annotations

import copy
import errno
import hashlib
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
import safetensors.torch
import torch
from sklearn.exceptions import NotFittedError

import msc_detector
from msc_detector import ModelFileError, MSCDetector, persistence

MEMBERS = ("manifest.json", "metadata.json", "arrays.safetensors", "index.faiss")
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


# ------------------------------------------------------------------ helpers


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_members(
    path: Path,
    members: dict[str, bytes],
    refresh_manifest: bool = True,
    compression: int = zipfile.ZIP_STORED,
) -> None:
    """Write a zip like save does; with refresh_manifest, the checksums match the content."""
    members = dict(members)
    if refresh_manifest:
        manifest = json.loads(members["manifest.json"])
        manifest["members"] = {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in members.items()
            if name != "manifest.json"
        }
        members["manifest.json"] = json.dumps(manifest).encode()
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


def member_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with path.open("rb") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_len + extra_len


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
    cache = {"_compute_backbone"}  # the folded view of backbone_, rebuilt on demand
    assert set(vars(loaded)) - cache == set(vars(detector)) - cache
    assert loaded.offset_ == detector.offset_
    assert loaded.image_size_ == detector.image_size_
    assert loaded.crop_pct_ == detector.crop_pct_
    assert loaded.flip_average_ is detector.flip_average_ is True
    assert loaded.n_train_ == detector.n_train_
    assert loaded.history_ == detector.history_
    assert loaded.backbone_spec_ == detector.backbone_spec_
    assert loaded.weights_source_ == detector.weights_source_
    assert loaded.precision_ == detector.precision_
    assert loaded.device_ == torch.device("cpu")
    np.testing.assert_array_equal(loaded.center_, detector.center_)
    np.testing.assert_array_equal(loaded.train_scores_, detector.train_scores_)
    assert loaded.center_.dtype == np.float32
    assert loaded.train_scores_.dtype == np.float64
    assert loaded.index_.ntotal == detector.index_.ntotal
    assert [p.requires_grad for p in loaded.backbone_.parameters()] == [
        p.requires_grad for p in detector.backbone_.parameters()
    ]
    assert not loaded.backbone_.training
    np.testing.assert_array_equal(loaded.predict(X), detector.predict(X))
    np.testing.assert_array_equal(loaded.kneighbors()[1], detector.kneighbors()[1])


def test_saving_twice_overwrites_and_leaves_no_temporary_file(model, tmp_path: Path) -> None:
    detector = model[0]
    path = tmp_path / "model.bin"  # any name works
    path.write_bytes(b"old content")
    detector.save(str(path))
    detector.save(path)
    assert os.listdir(tmp_path) == ["model.bin"]
    assert MSCDetector.load(str(path)).n_train_ == detector.n_train_


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
    encoded, dropped = persistence._json_params(params)
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
    assert result["info"]["format_version"] == persistence.FORMAT_VERSION


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
    assert info["fitted"]["offset_"] == detector.offset_
    assert info["fitted"]["device_"] == "cpu"
    assert info["fitted"]["precision_"] == detector.precision_.name
    assert info["index"] == {
        "type": "IndexFlatL2",
        "dim": detector.backbone_spec_.num_features,
        "ntotal": 24,
        "chunk_size": detector.index_.chunk_size,
        "use_gpu": False,
    }
    members = read_members(path)
    assert list(members) == [*MEMBERS, "backbone.safetensors"]
    for name, entry in info["members"].items():
        assert entry == {
            "size": len(members[name]),
            "sha256": hashlib.sha256(members[name]).hexdigest(),
        }


def test_members_are_stored_uncompressed(model) -> None:
    with zipfile.ZipFile(model[1]) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


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


@pytest.fixture(params=["load", "inspect"])
def reader(request) -> Callable[[Path], object]:
    """Both entry points must refuse a damaged file."""
    return MSCDetector.load if request.param == "load" else msc_detector.inspect


def test_truncated_file(saved: Path, reader) -> None:
    data = saved.read_bytes()
    for size in (len(data) // 2, len(data) - 10):
        saved.write_bytes(data[:size])
        with pytest.raises(ModelFileError, match="truncated or damaged") as info:
            reader(saved)
        assert str(saved) in str(info.value)


def test_flipped_byte_in_a_member(saved: Path, reader) -> None:
    offset = member_data_offset(saved, "backbone.safetensors") + 100_000
    data = bytearray(saved.read_bytes())
    data[offset] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"'backbone\.safetensors' is corrupted"):
        reader(saved)


def test_altered_member_with_a_valid_crc_fails_the_checksum(saved: Path, reader) -> None:
    members = read_members(saved)
    original = members["metadata.json"]
    members["metadata.json"] = original.replace(b'"offset_": -', b'"offset_": +')
    assert members["metadata.json"] != original  # same size, valid CRC, stale manifest
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"'metadata\.json' is corrupted or was altered"):
        reader(saved)


def test_a_member_whose_size_differs_from_the_manifest(saved: Path, reader) -> None:
    members = read_members(saved)
    members["metadata.json"] = json.dumps(json.loads(members["metadata.json"])).encode()
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"'metadata\.json' has \d+ bytes but the manifest"):
        reader(saved)


def test_invalid_json_with_matching_checksums(saved: Path, reader) -> None:
    members = read_members(saved)
    members["metadata.json"] = members["metadata.json"][:-2]
    write_members(saved, members)
    with pytest.raises(ModelFileError, match=r"metadata\.json is not valid JSON"):
        reader(saved)


def test_metadata_of_the_wrong_shape(saved: Path, reader) -> None:
    edit_metadata(saved, lambda m: m["fitted"].update(offset_="-0.1"))
    with pytest.raises(ModelFileError, match="offset_ must be a number"):
        reader(saved)


def test_missing_member(saved: Path, reader) -> None:
    members = read_members(saved)
    del members["index.faiss"]
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"missing member 'index\.faiss'"):
        reader(saved)


def test_unexpected_member(saved: Path, reader) -> None:
    members = read_members(saved)
    members["data.pkl"] = b"anything"
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match=r"unexpected member 'data\.pkl'"):
        reader(saved)


@pytest.mark.parametrize("name", ["../../escape.json", "/etc/evil", "sub/../../x"])
def test_zip_slip_names_are_refused(saved: Path, reader, name: str) -> None:
    members = read_members(saved)
    members[name] = b"{}"
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match="escapes the archive"):
        reader(saved)


def test_compressed_members_are_refused(saved: Path, reader) -> None:
    # A deflated member can declare a size the archive cannot hold: a zip bomb.
    write_members(saved, read_members(saved), compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelFileError, match="is compressed"):
        reader(saved)


def test_oversized_members_are_refused_before_reading(saved: Path, reader, monkeypatch) -> None:
    monkeypatch.setitem(persistence._JSON_LIMITS, "metadata.json", 100)
    monkeypatch.setattr(
        persistence, "_read_member", lambda *a, **k: pytest.fail("a member was read")
    )
    with pytest.raises(ModelFileError, match=r"'metadata\.json' declares .* more than the 100"):
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
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"model weights, honest", "not a zip archive"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a zip archive"),
    ],
)
def test_files_that_are_not_zip_archives(saved: Path, reader, content, message) -> None:
    saved.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        reader(saved)


def test_newer_format_version_is_refused(saved: Path, reader) -> None:
    members = read_members(saved)
    manifest = json.loads(members["manifest.json"])
    manifest["format_version"] = persistence.FORMAT_VERSION + 1
    members["manifest.json"] = json.dumps(manifest).encode()
    members["extra-in-the-new-format.bin"] = b"..."
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match="format 2, written by a newer msc-detector"):
        reader(saved)


def test_a_foreign_manifest_is_refused(saved: Path, reader) -> None:
    members = read_members(saved)
    members["manifest.json"] = b'{"format": "something-else", "format_version": 1}'
    write_members(saved, members, refresh_manifest=False)
    with pytest.raises(ModelFileError, match="format 'something-else'"):
        reader(saved)


def test_an_index_header_that_disagrees_with_the_metadata(saved: Path, reader) -> None:
    members = read_members(saved)
    index = bytearray(members["index.faiss"])
    index[8:16] = struct.pack("<q", 2**40)  # ntotal: Faiss would try to allocate it
    members["index.faiss"] = bytes(index)
    write_members(saved, members)
    with pytest.raises(ModelFileError, match=r"index\.faiss is not the serialised L2 index"):
        reader(saved)


def test_arrays_that_disagree_with_the_metadata(saved: Path, reader) -> None:
    def shrink(metadata: dict) -> None:
        metadata["fitted"]["n_train_"] = metadata["index"]["ntotal"] = 23

    edit_metadata(saved, shrink)
    with pytest.raises(ModelFileError, match=r"arrays\.safetensors holds"):
        reader(saved)


def test_an_architecture_that_needs_a_download_is_refused(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["backbone_spec"].update(architecture="hf-hub:someone/model"))
    with pytest.raises(ModelFileError, match="without downloading"):
        MSCDetector.load(saved)


def test_weights_that_do_not_fit_the_architecture(saved: Path) -> None:
    edit_metadata(saved, lambda m: m["backbone_spec"].update(architecture="resnet18"))
    with pytest.raises(ModelFileError, match="do not fit 'resnet18'"):
        MSCDetector.load(saved)


def test_files_from_before_flip_average_score_as_they_were_saved(tmp_path: Path) -> None:
    X = np.random.default_rng(1).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    detector = MSCDetector(**FAST, flip_average=False, nearest_view=False).fit(X)
    path = tmp_path / "old.msc"
    detector.save(path)

    def strip(metadata: dict) -> None:  # what a file of the first version holds
        del metadata["params"]["flip_average"], metadata["fitted"]["flip_average_"]
        del metadata["params"]["nearest_view"], metadata["fitted"]["nearest_view_"]

    edit_metadata(path, strip)
    loaded = MSCDetector.load(path, device="cpu")
    assert loaded.flip_average is False and loaded.flip_average_ is False
    assert loaded.nearest_view is False and loaded.nearest_view_ is False
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))


@pytest.mark.parametrize("key", ["flip_average_", "nearest_view_"])
def test_a_view_flag_that_is_not_a_boolean_is_refused(saved: Path, reader, key: str) -> None:
    edit_metadata(saved, lambda m: m["fitted"].update({key: "yes"}))
    with pytest.raises(ModelFileError, match=f"{key} must be a boolean"):
        reader(saved)


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
    loaded = MSCDetector.load(path, device="cpu")
    assert loaded.nearest_view_ is True and loaded.pretrained_backbone_ is not None
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))


def edit_networks(path: Path, edit: Callable[[dict], dict]) -> None:
    """Change the tensors of backbone.safetensors and re-checksum."""
    members = read_members(path)
    tensors = safetensors.torch.load(members["backbone.safetensors"])
    members["backbone.safetensors"] = safetensors.torch.save(edit(tensors))
    write_members(path, members)


def test_a_file_without_the_pretrained_network_embeds_both_views_with_one(
    two_networks, tmp_path: Path
) -> None:
    detector, path, X = two_networks
    old = tmp_path / "old.msc"  # as written before the pretrained network was kept
    old.write_bytes(path.read_bytes())
    edit_networks(old, lambda t: {k: v for k, v in t.items() if not k.startswith("pretrained.")})
    loaded = MSCDetector.load(old, device="cpu")
    assert loaded.nearest_view_ is True and loaded.pretrained_backbone_ is None
    one_network = copy.copy(detector)
    one_network.pretrained_backbone_ = None
    np.testing.assert_array_equal(loaded.score_samples(X), one_network.score_samples(X))


def test_a_pretrained_network_without_the_nearest_view_is_refused(saved: Path) -> None:
    edit_networks(saved, lambda t: {**t, **{"pretrained." + k: v.clone() for k, v in t.items()}})
    with pytest.raises(ModelFileError, match="holds a pretrained network"):
        MSCDetector.load(saved, device="cpu")


def test_an_index_of_the_wrong_width_for_the_views_is_refused(saved: Path, reader) -> None:
    edit_metadata(saved, lambda m: m["fitted"].update(nearest_view_=True))  # index is 1 view
    with pytest.raises(ModelFileError, match=r"twice that with fitted\.nearest_view_"):
        reader(saved)


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


@pytest.mark.parametrize("member", ["backbone.safetensors", "arrays.safetensors", "index.faiss"])
def test_a_pickle_swapped_in_with_matching_checksums_runs_nothing(
    saved: Path, reader, tmp_path: Path, member: str
) -> None:
    marker = tmp_path / "pwned"
    members = read_members(saved)
    members[member] = malicious_pickle(marker)
    write_members(saved, members)  # checksums match: only the content gives it away
    with pytest.raises(ModelFileError, match=member.replace(".", r"\.")):
        reader(saved)
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
        loaded = MSCDetector.load(saved)
    assert loaded.n_train_ == 24


def test_a_different_local_build_label_does_not_warn(saved: Path) -> None:
    release = torch.__version__.split("+")[0]
    edit_metadata(saved, lambda m: m["versions"].update(torch=release + "+cu999"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MSCDetector.load(saved)


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
    assert loaded.precision_.device_type == "cpu"
    # The precision parameter ("auto") is resolved for this CPU, as at fit time here.
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit device is the user's choice: no warning
        assert MSCDetector.load(saved, device="cpu").device_ == torch.device("cpu")


def test_an_unavailable_explicit_device_is_refused(saved: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        MSCDetector.load(saved, device="cuda")


def test_model_file_error_is_a_value_error() -> None:
    assert issubclass(ModelFileError, ValueError)
    assert msc_detector.ModelFileError is persistence.ModelFileError

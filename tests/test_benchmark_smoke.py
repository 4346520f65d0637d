"""Tiny runs of the benchmark scripts, so that they cannot rot (no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import compare, one_class
from msc_detector import MSCDetector


def test_one_class_digits_two_classes_resumes(tmp_path: Path, capsys) -> None:
    argv = [
        "--dataset",
        "digits",
        "--classes",
        "0",
        "1",
        "--train-size",
        "30",
        "--test-size",
        "120",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--weights",
        "none",
        "--per-epoch",
        "--results-dir",
        str(tmp_path),
        "--name",
        "smoke",
    ]
    result = one_class.run(argv)
    assert set(result["classes"]) == {"0", "1"}
    row = result["classes"]["0"]
    assert 0.0 <= row["roc_auc"] <= 1.0 and row["n_train"] == 30
    assert list(row["roc_auc_per_epoch"]) == ["0", "1"]
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["mean_roc_auc"] == pytest.approx(result["mean_roc_auc"])
    assert "torch" in saved["machine"]
    assert saved["command"].startswith("python -m benchmarks.one_class --dataset digits ")
    # no --loss: the detector's own default is what gets measured
    assert saved["settings"]["params"]["loss"] == str(MSCDetector().loss)
    assert "| **mean** |" in (tmp_path / "smoke.md").read_text()
    capsys.readouterr()
    again = one_class.run(argv)  # every class is done: nothing is refitted
    assert again["classes"] == result["classes"]
    assert "class 0:" not in capsys.readouterr().out

    compare.main([str(tmp_path / "smoke.json"), "--name", "cmp", "--results-dir", str(tmp_path)])
    assert (tmp_path / "cmp_per_epoch.png").stat().st_size > 0
    assert "| **mean** |" in (tmp_path / "cmp.md").read_text()


def test_resume_keeps_the_first_machine_and_marks_classes_fitted_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base = ["--dataset", "digits", "--train-size", "20", "--test-size", "60", "--loss", "none"]
    base += ["--image-size", "32", "--weights", "none", "--results-dir", str(tmp_path)]
    base += ["--name", "mixed"]
    one_class.run([*base, "--classes", "0"])
    first = json.loads((tmp_path / "mixed.json").read_text())
    written = (tmp_path / "mixed.json").stat().st_mtime_ns

    one_class.run([*base, "--classes", "0"])  # nothing new: the files are left alone
    assert (tmp_path / "mixed.json").stat().st_mtime_ns == written

    elsewhere = {**first["machine"], "torch_threads": 99}
    monkeypatch.setattr(one_class, "machine", lambda: elsewhere)
    one_class.run([*base, "--classes", "0", "1"])
    saved = json.loads((tmp_path / "mixed.json").read_text())
    assert saved["machine"] == first["machine"] and saved["command"] == first["command"]
    assert "machine" not in saved["classes"]["0"]
    assert saved["classes"]["1"]["machine"]["torch_threads"] == 99
    assert saved["classes"]["1"]["command"].endswith("--classes 0 1")
    assert '"torch_threads": 99' in (tmp_path / "mixed.md").read_text()
    capsys.readouterr()


def test_missing_cifar_is_skipped_with_a_message(tmp_path: Path, capsys) -> None:
    assert one_class.run(["--dataset", "cifar10", "--data-root", str(tmp_path)]) == {}
    assert "cannot be downloaded here" in capsys.readouterr().out


def test_options_given_reach_the_detector_and_the_rest_stay_its_defaults() -> None:
    given = one_class.detector_params(
        one_class.parse_args(["--flip-average", "off", "--image-size", "288", "--loss", "none"])
    )
    assert given["flip_average"] is False and given["image_size"] == 288 and given["loss"] is None
    assert "flip_average" not in one_class.detector_params(one_class.parse_args([]))
    for option, value in (("on", True), ("auto", "auto")):
        args = one_class.parse_args(["--flip-average", option, "--nearest-view", option])
        assert one_class.detector_params(args)["flip_average"] == value
        assert one_class.detector_params(args)["nearest_view"] == value


@pytest.fixture(scope="module")
def opencv_digits() -> None:
    """OpenCV's digits.png must be here: scripts/install.sh installs it (opencv-doc)."""
    from msc_detector.datasets import load_opencv_digits

    try:
        load_opencv_digits()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} Run `bash scripts/install.sh`, which installs it.")


def test_opencv_digits_split_is_stratified_halves(opencv_digits: None) -> None:
    x_tr, y_tr, x_te, y_te = one_class.load_dataset("opencv-digits", None)
    assert x_tr.shape == (2500, 20, 20) and x_te.shape == (2500, 20, 20)
    assert x_tr.dtype == np.uint8
    assert np.bincount(y_tr).tolist() == [250] * 10 and np.bincount(y_te).tolist() == [250] * 10
    again = one_class.load_dataset("opencv-digits", None)  # the split is fixed
    np.testing.assert_array_equal(again[0], x_tr)


def test_one_class_opencv_digits_one_class(opencv_digits: None, tmp_path: Path) -> None:
    argv = ["--dataset", "opencv-digits", "--classes", "3", "--train-size", "20"]
    argv += ["--test-size", "100", "--image-size", "32", "--epochs", "1", "--weights", "none"]
    result = one_class.run([*argv, "--results-dir", str(tmp_path), "--name", "ocv"])
    assert list(result["classes"]) == ["3"]
    row = result["classes"]["3"]
    assert row["n_train"] == 20 and 0.0 <= row["roc_auc"] <= 1.0
    assert result["settings"]["dataset"] == "opencv-digits"
    assert result["settings"]["test_size"] == 100


def test_missing_opencv_digits_says_which_package(tmp_path: Path, capsys) -> None:
    argv = ["--dataset", "opencv-digits", "--data-root", str(tmp_path)]
    assert one_class.run([*argv, "--results-dir", str(tmp_path)]) == {}
    assert "apt-get install opencv-doc" in capsys.readouterr().out


def test_score_rules_evaluates_every_rule_and_renders_the_means() -> None:
    from benchmarks import score_rules

    rng = np.random.default_rng(0)
    arrays = {
        "global_train": rng.normal(size=30),
        "patch_train": rng.normal(size=30),
        "global_test": np.r_[rng.normal(size=10), rng.normal(3, 1, size=10)],
        "patch_test": np.r_[rng.normal(size=10), rng.normal(size=10)],
        "is_anomaly": np.arange(20) >= 10,
    }
    row = score_rules.evaluate(arrays)
    assert set(row) == set(score_rules.RULES)
    assert row["global"] > 90 and 20 < row["patch"] < 80  # only the global evidence differs
    table = score_rules.render({"defects:brick": row, "digits:0": row}, "cmd")
    assert "| sum of robust z |" in table and "semantic mean" in table


def test_verdict_cost_measures_a_tiny_detector() -> None:
    from benchmarks import verdict_cost

    train, test = verdict_cost.crops(6, 32, 0), verdict_cost.crops(4, 32, 1)
    tiny = {"weights": None, "image_size": 32, "epochs": 0, "batch_size": 4, "patch_memory": 20}
    det, row = verdict_cost.fitted(tiny, train)
    wall, cpu = verdict_cost.scoring_times(det, test)
    assert row["image_score"] == "combined" and row["fit_seconds"] > 0
    assert wall > 0 and cpu > 0


def test_set_constants_sets_a_library_constant_and_names_a_missing_one(monkeypatch) -> None:
    from benchmarks.constants import set_constants
    from msc_detector import coreset

    monkeypatch.setattr(coreset, "PROJECTION_DIM", coreset.PROJECTION_DIM)  # restored after
    applied = set_constants(["msc_detector.coreset.PROJECTION_DIM=64"])
    assert applied == {"msc_detector.coreset.PROJECTION_DIM": 64}
    assert coreset.StreamingCoreset(10, 5, seed=0).projection_dim == 64
    with pytest.raises(SystemExit, match="no constant 'PROJECTION'"):
        set_constants(["msc_detector.coreset.PROJECTION=64"])
    with pytest.raises(SystemExit, match=r"package\.module\.NAME=VALUE"):
        set_constants(["PROJECTION_DIM"])
    with pytest.raises(SystemExit, match="'sixty' is not a JSON value"):
        set_constants(["msc_detector.coreset.PROJECTION_DIM=sixty"])
    assert coreset.PROJECTION_DIM == 64  # a refused item changes nothing


def test_patch_search_baseline_rows_compare_bounds_with_exact_distances() -> None:
    from benchmarks import patch_search, verdict_cost
    from msc_detector import MSCDetector

    train = verdict_cost.crops(6, 32, 0)
    tiny = {"weights": None, "image_size": 32, "epochs": 0, "batch_size": 4}
    det = MSCDetector(**tiny, patch_memory=20).fit(train)
    row = patch_search.baseline_rows(det, train)
    assert row["baseline_images"] == 6  # fewer images than the sample: all of them
    # a bank this small has no coarse lists: its bounds are the exact distances
    assert row["equal_share"] == 1.0 and row["baseline_mean_relative_difference"] == 0.0
    patches = torch.randn(300, det.patch_bank_.vectors().shape[1])
    rows = patch_search.exact_search_rows(det.patch_bank_, patches)
    assert [r["queries_per_search"] for r in rows] == list(patch_search.EXACT_BATCHES)
    assert all(r["same_patch_share"] == 1.0 and r["scan_ms_per_1000"] > 0 for r in rows)


def test_score_rules_reuses_cached_arrays_only_from_the_same_library(
    tmp_path, monkeypatch
) -> None:
    from benchmarks import score_rules
    from msc_detector import MSCDetector

    monkeypatch.setattr(score_rules, "CACHE", tmp_path)
    fits: list[int] = []
    fit = MSCDetector.fit
    monkeypatch.setattr(MSCDetector, "fit", lambda self, X, *a: fits.append(1) or fit(self, X))
    tiny = {"weights": None, "image_size": 32, "epochs": 0, "batch_size": 16, "patch_memory": 20}
    first = score_rules.components("lfw", tiny)
    again = score_rules.components("lfw", tiny)
    assert len(fits) == 1  # the second call read the cache
    np.testing.assert_array_equal(again["patch_test"], first["patch_test"])
    monkeypatch.setattr(score_rules, "library_digest", lambda: "another version")
    score_rules.components("lfw", tiny)
    assert len(fits) == 2  # a changed library fits again


def test_crop_modes_draws_defects_on_one_third_and_measures_a_tiny_detector() -> None:
    from benchmarks import crop_modes

    train, test, third = crop_modes.strips("brick")
    assert train.shape == (150, 64, 192) and test.shape == (120, 64, 192, 3)
    assert (third == -1).sum() == 60 and all((third == t).sum() == 20 for t in range(3))
    tile = crop_modes.TILE
    for i in np.flatnonzero(third >= 0):
        for other in set(range(3)) - {int(third[i])}:  # untouched, still grey
            part = test[i, :, other * tile : (other + 1) * tile].astype(int)
            assert (part == part[..., :1]).all()
    tiny = {"weights": None, "image_size": 32, "epochs": 0, "batch_size": 16, "patch_memory": 20}
    found = crop_modes.measure(train[:8], test[:4], "center", 0, **tiny)
    assert found["scores"].shape == (4,) and found["fit_s"] > 0
    row = {"set": "strips:brick", "crop_mode": "center", "roc_auc": 50.0, "fit_s": 1.0}
    table = crop_modes.render({"command": "cmd", "rows": [{**row, "score_s": 1.0}]})
    assert "| strips:brick | center | 50.00 |" in table and "**strips mean**" in table


def test_large_photos_scores_in_a_fresh_process_and_renders(tmp_path) -> None:
    from benchmarks import large_photos
    from msc_detector import MSCDetector

    paths = large_photos.write_photos(tmp_path, 2, 80, 60)
    tiny = {"weights": None, "image_size": 32, "epochs": 0, "batch_size": 4, "patch_memory": 20}
    MSCDetector(**tiny).fit(paths * 2).save(tmp_path / "m.msc")
    found = large_photos.score(tmp_path / "m.msc", paths, [])
    assert len(found["scores"]) == 2 and found["peak_rss_mb"] > 0
    rows = [{"setting": "streamed", "seconds": 1.0, "peak_rss_mb": 100.0}]
    settings = {"photos": 2, "width": 80, "height": 60}
    result = {"command": "cmd", "settings": settings, "same_scores": True, "rows": rows}
    assert "| streamed | 100 | 1.0 | 500 |" in large_photos.render(result)


def test_false_alarms_tiles_do_not_overlap_and_a_tiny_detector_is_counted() -> None:
    from benchmarks import false_alarms

    train, test, is_anomaly = false_alarms.tiles("grass")
    assert train.shape == (60, 48, 48) and test.shape == (40, 48, 48, 3)
    assert is_anomaly.sum() == 20 and not is_anomaly[:20].any()
    normal = test[:20, ..., 0]
    assert not (normal[:, None] == train[None]).all(axis=(2, 3)).any()  # no tile twice
    assert (test[20:] != test[20:, ..., :1]).any()  # the defects are in colour
    tiny = {"weights": None, "image_size": 32, "epochs": 0, "batch_size": 16, "patch_memory": 20}
    row = false_alarms.measure("tiles:grass", **tiny)
    assert (row["n_train"], row["n_normal"], row["n_anomalies"]) == (60, 20, 20)
    for key in ("normal_flagged", "normal_below_1pct", "anomalies_flagged"):
        assert 0 <= row[key] <= 1 and row[key] * 20 == round(row[key] * 20)
    table = false_alarms.render({"tiles:grass": row}, "cmd", {})
    assert "| tiles:grass | 60 | 20 |" in table

"""A tiny run of ``benchmarks.speed``: both sides measured and reported, no timings asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import speed

SIDE_FIELDS = {
    "precision",
    "fit_seconds",
    "train_views_per_second",
    "embed_images_per_second",
    "score_1_seconds_median",
    "score_n_seconds",
    "peak_rss_mb",
    "roc_auc",
    "embed_gflop_per_image",
    "train_gflop_per_view",
    "embed_gflops",
    "peak_matmul_gflops",
    "embed_fraction_of_peak",
}


@pytest.fixture(scope="module")
def fashion_mnist() -> None:
    from msc_detector.datasets import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_both_sides_are_measured_reported_and_reused(
    fashion_mnist: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *("--train-size", "40", "--test-size", "100", "--image-size", "32"),
        *("--epochs", "1", "--batch-size", "16", "--weights", "none"),
        *("--score-n", "120", "--embed-n", "50", "--latency-reps", "2"),
        *("--peak-seconds", "0.05", "--threads", "1", "--device", "cpu"),
        *("--results-dir", str(tmp_path), "--out-name", "smoke"),
    ]
    report = speed.main(argv)

    assert set(report["sides"]) == {"ours", "plain"}
    saved = json.loads((tmp_path / "smoke.json").read_text())
    for side in ("ours", "plain"):
        metrics = saved["sides"][side]["metrics"]
        assert set(metrics) >= SIDE_FIELDS, SIDE_FIELDS - set(metrics)
        assert 0.0 <= metrics["roc_auc"] <= 1.0
        assert metrics["score_n_images"] == 120
        assert metrics["train_views"] == 2 * 32  # 40 images, batches of 16, last dropped
        assert (tmp_path / f"smoke_{side}.json").exists()
        assert saved["sides"][side]["n_train"] == 40
        assert "torch" in saved["sides"][side]["machine"]
    assert saved["sides"]["plain"]["metrics"]["precision"] == "fp32"
    assert saved["settings"]["source_size"] is None
    # ours keeps the detector's flip_average and nearest_view, and says what they were
    ours_metrics = saved["sides"]["ours"]["metrics"]
    assert ours_metrics["embed_views_per_image"] == (1 + ours_metrics["flip_average"]) * (
        1 + ours_metrics["nearest_view"]
    )
    assert saved["sides"]["plain"]["metrics"]["embed_views_per_image"] == 1
    # A depthwise backward costs about two forwards, not ``groups`` times more.
    ours = saved["sides"]["ours"]["metrics"]
    assert 1.5 < ours["train_gflop_per_view"] / ours["embed_gflop_per_image"] < 3.0
    summary = saved["summary"]
    assert set(summary) >= {"fit_speedup", "score_n_speedup", "roc_auc_difference_points"}
    assert set(summary["targets"]) == {
        "fit_speedup_at_least_3x",
        "score_speedup_at_least_3x",
        "roc_auc_within_0.3_points",
    }
    table = (tmp_path / "smoke.md").read_text()
    assert "| fit speed-up |" in table and "| ROC-AUC (%) |" in table
    assert saved["command"].startswith("python -m benchmarks.speed --train-size 40 ")

    capsys.readouterr()
    again = speed.main(argv)  # both sides are done with these settings: nothing is rerun
    assert "reusing" in capsys.readouterr().out
    assert again["summary"] == report["summary"]


def test_source_size_resizes_both_sides_images_once_and_is_recorded(fashion_mnist: None) -> None:
    argv = ["--source-size", "64", "--train-size", "5", "--test-size", "7", "--weights", "none"]
    settings = speed.resolve_settings(speed.parse_args(argv))
    assert settings["source_size"] == 64
    train, test, is_normal = speed.load_data(settings)
    assert train.shape == (5, 64, 64) and test.shape == (7, 64, 64)
    assert train.dtype == test.dtype == np.uint8 and is_normal.shape == (7,)
    original, _, _ = speed.load_data({**settings, "source_size": None})
    assert original.shape == (5, 28, 28)
    np.testing.assert_array_equal(train, speed.resize_images(original, 64))

"""The msc-detector side of ``benchmarks.peers`` on tiny data (the peers' venv is not needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import peers
from msc_detector import MSCDetector

pytest.importorskip("defect_synthesis")
pytest.importorskip("cv2")


def test_our_side_is_measured_written_resumed_and_tabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *("--sets", "brick", "--crop-size", "64", "--texture-train", "8"),
        *("--texture-good", "4", "--per-defect", "1"),
        *("--tools", "msc-default", "lof", "pyod"),
        *("--param", "image_size=32", "--param", "weights=null", "--param", "batch_size=4"),
        *("--peers-python", str(tmp_path / "no-venv" / "python")),
        *("--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path), "--in-process"),
    ]
    combined = peers.main(argv)
    assert "skip pyod on brick: no peers environment" in capsys.readouterr().out
    by_tool = {r["tool"]: r for r in combined["results"]}
    assert set(by_tool) == {"msc-default", "lof"}
    rows = by_tool["msc-default"]["rows"]  # the default's verdict and the two scores it joins
    assert set(rows) == {"default (combined)", "image_score=global", "image_score=patch"}
    default = rows["default (combined)"]
    for key in ("image_roc_auc", "pixel_roc_auc", "pro_30", "fit_cpu_seconds", "peak_rss_mb"):
        assert key in default, key
    assert set(default["image_roc_auc_per_defect"]) == {"scratch", "crack", "stain", "pit", "burn"}
    assert "pixel_roc_auc" not in by_tool["lof"]["rows"][""]  # no maps without patches
    written = tmp_path / "peers" / "msc-default__brick.json"
    assert json.loads(written.read_text())["command"].startswith("python -m benchmarks.peers")
    table = (tmp_path / "peers.md").read_text()
    default_score = MSCDetector().image_score  # the label names the default score
    assert f"| msc-detector default ({default_score}) |" in table and "PRO@30% %" in table

    stamp = written.stat().st_mtime_ns
    peers.main(argv)  # every pair is done: nothing is refitted
    assert written.stat().st_mtime_ns == stamp


def test_anomalib_extractor_gets_our_lite0_weights_strictly_and_our_features(
    tmp_path: Path,
) -> None:
    """The mapping the anomalib worker uses, against a stand-in for its timm extractor."""
    import timm

    class Extractor(torch.nn.Module):  # what anomalib's TimmFeatureExtractor holds and returns
        def __init__(self) -> None:
            super().__init__()
            self.feature_extractor = timm.create_model(
                "tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)
            )

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return dict(
                zip(peers.anomalib_layers("lite0"), self.feature_extractor(x), strict=True)
            )

    args = peers.parse_args(["--work-dir", str(tmp_path)])
    weights = peers.prepare_weights(args, "lite0")
    check = peers.load_our_weights(Extractor(), weights)
    assert check["tensors_loaded"] > 250 and check["tensors_left_out"] >= 0
    assert max(check["max_relative_feature_difference"].values()) < 1e-5

"""Anomaly maps: where a surface differs from the normal ones it was fitted on.

The detector is fitted on 150 defect-free crops of scikit-image's ``brick`` photo (the
data of ``benchmarks/defects.py``: training crops from the top of the photo, test crops
from the rows below, with procedural defects from ``defect-synthesis`` and their exact
masks). ``anomaly_map`` then scores every patch of a test crop by its distance to the
nearest normal training patch, and ``image_score="patch"`` scores the whole crop by the
map's maximum.

The figure, ``docs/_static/anomaly_map.png``, shows for one crop of each defect kind the
crop, its map as heat over it, and the true defect mask. Run it from the repository root
with ``python examples/anomaly_map.py`` (about a minute on two CPU cores); it needs the
``bench`` extra (scikit-image, OpenCV, matplotlib) and ``defect-synthesis``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_auc_score

from msc_detector import MSCDetector

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmark's data lives beside the package, in benchmarks/
from benchmarks import defects, pro  # noqa: E402

TEXTURE = "brick"
OUT = ROOT / "docs" / "_static" / "anomaly_map.png"


def main() -> None:
    data = defects.build(TEXTURE)  # 150 training crops; 75 good and 75 defective test crops
    detector = MSCDetector(image_score="patch", random_state=0).fit(data.train)
    maps = detector.anomaly_map(data.test)  # (n, 128, 128), higher = more anomalous
    scores = -detector.score_samples(data.test)  # the maps' maxima
    print(f"image ROC-AUC {roc_auc_score(data.labels, scores):.3f}")
    print(f"pixel ROC-AUC {pro.pixel_roc_auc(maps, data.masks):.3f}")
    print(f"PRO up to 30% false positives {pro.pro_auc(maps, data.masks):.3f}")

    # One shared colour scale: the median of all maps (a normal patch) to their top.
    low, high = np.median(maps), np.percentile(maps, 99.9)
    shown = [np.flatnonzero(data.kinds == kind)[0] for kind in defects.DEFECTS]
    fig, axes = plt.subplots(3, len(shown), figsize=(2.2 * len(shown), 6.9))
    for col, i in enumerate(shown):
        heat = np.clip((maps[i] - low) / (high - low), 0, 1)
        axes[0, col].imshow(data.test[i], cmap="gray", vmin=0, vmax=255)
        axes[0, col].set_title(f"{data.kinds[i]}, score {scores[i]:.2f}", fontsize=9)
        axes[1, col].imshow(data.test[i], cmap="gray", vmin=0, vmax=255)
        axes[1, col].imshow(heat, cmap="inferno", alpha=0.15 + 0.65 * heat, vmin=0, vmax=1)
        axes[2, col].imshow(data.masks[i], cmap="gray", vmin=0, vmax=1)
    for row, label in enumerate(("test crop", "anomaly map", "true mask")):
        axes[row, 0].set_ylabel(label)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=80)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

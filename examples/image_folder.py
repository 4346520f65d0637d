"""Score a folder of image files.

``MSCDetector`` accepts a list of file paths (``str`` or ``pathlib.Path``) wherever it
accepts an array. Files are decoded batch by batch while the detector works, so a
folder far larger than memory can be fitted and scored.

For a self-contained demo the script first writes Fashion-MNIST images as PNG files to
a temporary folder (``train/`` holds only sneakers, ``test/`` a mix of classes), then
fits on ``train/`` and ranks the files in ``test/`` from most to least anomalous.
Without Fashion-MNIST, scikit-learn's digits are used.

Run it with ``python examples/image_folder.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from msc_detector import MSCDetector
from msc_detector.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist


def load_images() -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Return uint8 images, labels, class names and the normal class."""
    try:
        images, labels = load_fashion_mnist("test")
        names = [c.replace("/", "-").replace(" ", "-") for c in FASHION_MNIST_CLASSES]
        return images, labels, names, 7  # 7: "Sneaker"
    except FileNotFoundError:
        print("Fashion-MNIST is not installed; using scikit-learn's digits instead.")
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        return images, digits.target, [str(d) for d in range(10)], 7  # the digit 7


def write_pngs(folder: Path, images: np.ndarray, names: list[str]) -> None:
    """Write each 2-D uint8 image to ``folder/<name>.png`` (8-bit grayscale)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        Image.fromarray(image).save(folder / f"{name}.png")


def main() -> None:
    images, labels, classes, normal = load_images()
    rng = np.random.default_rng(0)
    normal_idx = rng.permutation(np.flatnonzero(labels == normal))
    train_idx = normal_idx[: min(300, len(normal_idx) // 2)]
    rest = np.setdiff1d(np.arange(len(labels)), train_idx)
    test_idx = rng.choice(rest, size=min(500, len(rest)), replace=False)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pngs(root / "train", images[train_idx], [f"{i:05d}" for i in train_idx])
        # The class name in the file name is only for reading the results.
        write_pngs(
            root / "test", images[test_idx], [f"{i:05d}_{classes[labels[i]]}" for i in test_idx]
        )

        train_files = sorted((root / "train").glob("*.png"))
        test_files = sorted((root / "test").glob("*.png"))
        print(
            f"{len(train_files)} training files of class {classes[normal]!r} and "
            f"{len(test_files)} test files in {root}"
        )

        # image_size=96 keeps the example fast on a CPU; the default is the backbone's
        # own 224 px. num_workers=0 decodes in this process (the files are tiny).
        detector = MSCDetector(image_size=96, epochs=1, num_workers=0, random_state=0)
        start = time.perf_counter()
        detector.fit(train_files)
        print(f"fitted in {time.perf_counter() - start:.1f} s")

        scores = detector.decision_function(test_files)
        is_normal = np.array([f.stem.endswith(f"_{classes[normal]}") for f in test_files])
        print(f"ROC-AUC on the test folder: {roc_auc_score(is_normal, scores):.4f}")

        order = np.argsort(scores)
        print("most anomalous files:")
        for i in order[:5]:
            print(f"  {test_files[i].name:<28} decision {scores[i]:+.4f}")
        print("most normal files:")
        for i in order[::-1][:5]:
            print(f"  {test_files[i].name:<28} decision {scores[i]:+.4f}")
        flagged = [f.name for f, s in zip(test_files, scores, strict=True) if s < 0]
        print(f"{len(flagged)} of {len(test_files)} files predicted anomalous (-1)")


if __name__ == "__main__":
    main()

"""From two folders of images to an HTML report with the ``msc-detector`` command line.

The script writes two folders of PNG files from Fashion-MNIST: ``normal/`` holds 300
sneakers, ``new/good/`` 100 more sneakers and ``new/bad/`` 50 images of the other
classes, plus one damaged file. It then runs, and prints, the three commands:

    msc-detector fit normal -o model.msc
    msc-detector score model.msc new -o scores.csv
    msc-detector report model.msc --good new/good --bad new/bad -o report.html

(``report model.msc new -o report.html`` works too; ``--good``/``--bad`` add the ROC
and precision-recall curves.) Open ``report.html`` in a browser. Without
Fashion-MNIST, scikit-learn's digits are used (the 7s are normal).

Run it with ``python examples/command_line.py [FOLDER]`` (FOLDER defaults to
``msc-demo``; about two minutes on two CPU cores). The fit uses ``--image-size 96``
to be quick; without it the backbone's own 224 pixels are used.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

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
        return images, digits.target, [str(d) for d in range(10)], 7


def write_folders(root: Path) -> None:
    images, labels, classes, normal = load_images()
    rng = np.random.default_rng(0)
    sneakers = rng.permutation(np.flatnonzero(labels == normal))
    others = rng.permutation(np.flatnonzero(labels != normal))
    n_train = min(300, len(sneakers) * 2 // 3)
    parts = {
        "normal": sneakers[:n_train],
        "new/good": sneakers[n_train : n_train + 100],
        "new/bad": others[:50],
    }
    for folder, indices in parts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in indices:
            name = f"{classes[labels[i]]}_{i:05d}.png"
            Image.fromarray(images[i]).save(root / folder / name)
    (root / "new" / "bad" / "damaged.png").write_bytes(b"not really a PNG")
    print(f"wrote {sum(map(len, parts.values()))} images to {root}/normal and {root}/new")


def run(*args: str, cwd: Path) -> None:
    """Run ``msc-detector ARGS`` (as ``python -m msc_detector``) in ``cwd``."""
    print(f"\n$ msc-detector {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "msc_detector", *args], cwd=cwd, check=True)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "msc-demo").resolve()
    write_folders(root)
    run("fit", "normal", "-o", "model.msc", "--image-size", "96", "--random-state", "0", cwd=root)
    run("score", "model.msc", "new", "-o", "scores.csv", cwd=root)
    run(
        "report", "model.msc", "--good", "new/good", "--bad", "new/bad", "-o", "report.html",
        cwd=root,
    )  # fmt: skip
    print(f"\nOpen {root / 'report.html'} in a browser.")


if __name__ == "__main__":
    main()

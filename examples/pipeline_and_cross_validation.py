"""MSCDetector in a scikit-learn Pipeline, evaluated with cross_val_score.

scikit-learn's digits come as a table: one row of 64 pixel values (0-16) per image.
A ``FunctionTransformer`` turns the rows back into 8x8 images for the detector, so the
whole ``Pipeline`` takes the table as it is.

One-class evaluation needs a cross-validation splitter of its own: an anomaly detector
must be trained on normal images only, while each test fold holds both normal images
and anomalies. ``NormalOnlyKFold`` below does that. Targets follow the detector's
convention: ``y = 1`` for normal images and ``y = 0`` for anomalies, so that
``scoring="roc_auc"`` on ``decision_function`` (higher = more normal) is right.

Run it with ``python examples/pipeline_and_cross_validation.py`` (about two minutes on
two CPU cores).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from msc_detector import MSCDetector


class NormalOnlyKFold:
    """Stratified K-fold whose training folds keep only the normal samples.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds.
    normal_label : int, default=1
        Value of ``y`` that marks normal samples.
    random_state : int or None, default=0
        Seed of the shuffled stratified split.
    """

    def __init__(self, n_splits: int = 5, normal_label: int = 1, random_state: int | None = 0):
        self.n_splits = n_splits
        self.normal_label = normal_label
        self.random_state = random_state

    def split(
        self, X: Any, y: np.ndarray, groups: Any = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (train, test) index arrays; train holds normal samples only."""
        y = np.asarray(y)
        folds = StratifiedKFold(self.n_splits, shuffle=True, random_state=self.random_state)
        for train, test in folds.split(np.zeros(len(y)), y):
            yield train[y[train] == self.normal_label], test

    def get_n_splits(self, X: Any = None, y: Any = None, groups: Any = None) -> int:
        """Return the number of folds."""
        return self.n_splits


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """Turn digits rows (n, 64) with values 0-16 into float images (n, 8, 8) in [0, 1]."""
    return np.asarray(rows, dtype=np.float32).reshape(-1, 8, 8) / 16.0


def main() -> None:
    X, digit = load_digits(return_X_y=True)  # X: (1797, 64), values 0-16
    normal_digit = 8  # one of the harder digits to tell from the others
    y = (digit == normal_digit).astype(int)  # 1 = normal, 0 = anomaly
    print(f"digits: {len(X)} images, {y.sum()} of them normal (the digit {normal_digit})")

    cv = NormalOnlyKFold(n_splits=5)
    splits = list(cv.split(X, y))
    assert all(y[train].all() for train, _ in splits)  # training folds: normal images only
    train, test = splits[0]
    print(
        f"each fold trains on ~{len(train)} normal images and tests on ~{len(test)} images "
        f"(~{int(y[test].sum())} normal)"
    )

    for loss in (None, "msc"):
        pipeline = make_pipeline(
            FunctionTransformer(rows_to_images),
            # image_size=64 keeps the example fast on a CPU (the 8x8 digits gain nothing
            # from the backbone's own 224 px); batch_size=32 suits ~140 training images.
            MSCDetector(loss=loss, image_size=64, batch_size=32, random_state=0),
        )
        start = time.perf_counter()
        scores = cross_val_score(pipeline, X, y, cv=cv, scoring="roc_auc")
        seconds = time.perf_counter() - start
        label = "no fine-tuning (kNN on pretrained features)" if loss is None else f"loss={loss!r}"
        print(
            f"{label}: ROC-AUC per fold {np.round(scores, 4).tolist()}, "
            f"mean {scores.mean():.4f} ({seconds:.0f} s)"
        )

    # The fitted pipeline is used like any outlier detector: fit on normal rows only.
    pipeline.fit(X[y == 1][:100])
    print("predict on the first 10 rows:", pipeline.predict(X[:10]).tolist())
    print("their digits:               ", digit[:10].tolist())


if __name__ == "__main__":
    main()

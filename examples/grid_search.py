"""Tune ``epochs`` and ``n_neighbors`` with GridSearchCV on one-class folds.

Each candidate is trained on normal images only and scored by ROC-AUC on held-out
folds that hold both normal images (``y = 1``) and anomalies (``y = 0``), with the
normal-only splitter shown in ``pipeline_and_cross_validation.py``.

``GridSearchCV(refit=True)`` would refit the winner on *all* the data it was given,
anomalies included. So the search runs with ``refit=False`` and the best parameters
are then fitted on the normal images alone.

The data are scikit-learn's digits (8x8 images): the digit 3 is normal. Run it with
``python examples/grid_search.py`` (two to three minutes on two CPU cores).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

from msc_detector import MSCDetector


def normal_only_folds(
    y: np.ndarray, n_splits: int = 3, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield stratified (train, test) index pairs whose train part is normal (y == 1) only."""
    folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(np.zeros(len(y)), y):
        yield train[y[train] == 1], test


def main() -> None:
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (n, 8, 8) uint8
    y = (digits.target == 3).astype(int)  # 1 = normal (the digit 3), 0 = anomaly
    X_dev, X_holdout, y_dev, y_holdout = train_test_split(
        images, y, test_size=0.3, stratify=y, random_state=0
    )

    # image_size=64: small inputs keep the 12 fits of this search fast on a CPU.
    base = MSCDetector(image_size=64, batch_size=32, random_state=0)
    grid = {"epochs": [0, 2], "n_neighbors": [1, 5]}
    search = GridSearchCV(
        base,
        grid,
        scoring="roc_auc",
        cv=list(normal_only_folds(y_dev)),  # a list of (train, test) pairs works as cv
        refit=False,
    )
    start = time.perf_counter()
    search.fit(X_dev, y_dev)
    print(
        f"grid search: {len(search.cv_results_['params'])} candidates x 3 folds "
        f"in {time.perf_counter() - start:.0f} s"
    )
    for params, mean, std in zip(
        search.cv_results_["params"],
        search.cv_results_["mean_test_score"],
        search.cv_results_["std_test_score"],
        strict=True,
    ):
        print(f"  {params}: ROC-AUC {mean:.4f} +/- {std:.4f}")
    print(f"best: {search.best_params_} (ROC-AUC {search.best_score_:.4f})")

    # Refit the best parameters on the normal development images only, then check the
    # choice on a hold-out set the search never saw.
    best = clone(base).set_params(**search.best_params_).fit(X_dev[y_dev == 1])
    holdout_auc = roc_auc_score(y_holdout, best.decision_function(X_holdout))
    print(f"hold-out ROC-AUC of the refitted best detector: {holdout_auc:.4f}")


if __name__ == "__main__":
    main()

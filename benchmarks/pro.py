"""Localisation metrics of anomaly maps: pixel-level ROC-AUC and per-region overlap (PRO).

PRO is the MVTec AD measure (Bergmann et al., IJCV 2021). For a threshold ``t``, a
ground-truth region (a connected component of a defect mask, 8-connected) is covered by
the share of its pixels whose map value is at least ``t``; PRO(t) is that share averaged
over all regions of all images, so a small defect counts as much as a large one. The
false-positive rate FPR(t) is the share of defect-free pixels at or above ``t``. The
score is the area under PRO against FPR for FPR in ``[0, max_fpr]``, divided by
``max_fpr``: 1 is perfect, a map of random values gets ``max_fpr / 2``.

The curve is computed exactly, at every distinct map value: a defect pixel of region
``C`` adds ``1 / (n_regions * |C|)`` to PRO once the threshold passes it, so one sort of
all pixels gives the whole curve.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["pixel_roc_auc", "pro_auc", "pro_curve", "truncated_area"]

_EIGHT = np.ones((3, 3), dtype=bool)


def _check(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks).astype(bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(
            f"maps and masks must both be (n, H, W); got {maps.shape} and {masks.shape}"
        )
    return maps, masks


def pixel_roc_auc(maps: np.ndarray, masks: np.ndarray) -> float:
    """ROC-AUC of the map values over all pixels, defect pixels being the positives."""
    maps, masks = _check(maps, masks)
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at every distinct map value, from the highest threshold down.

    Parameters
    ----------
    maps : ndarray of shape (n, H, W)
        Anomaly maps: higher is more anomalous.
    masks : ndarray of shape (n, H, W)
        True (or non-zero) on defect pixels.

    Returns
    -------
    fpr, pro : ndarray
        Both start at 0 (a threshold above every value) and end at 1.
    """
    maps, masks = _check(maps, masks)
    weights = np.zeros(maps.shape, np.float64)
    regions: list[tuple[int, np.ndarray]] = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=_EIGHT)
        for label in range(1, count + 1):
            regions.append((i, labelled == label))
    if not regions:
        raise ValueError("PRO needs at least one defect pixel in masks")
    normal = ~masks
    if not normal.any():
        raise ValueError("PRO needs at least one defect-free pixel in masks")
    for i, region in regions:
        weights[i][region] = 1.0 / (len(regions) * region.sum())
    values = maps.ravel()
    order = np.argsort(-values, kind="stable")
    pro = np.cumsum(weights.ravel()[order])
    fpr = np.cumsum(normal.ravel()[order]) / normal.sum()
    # One point per distinct value: the last pixel of each run of ties.
    last = np.flatnonzero(np.diff(values[order], append=-np.inf) != 0)
    return np.concatenate([[0.0], fpr[last]]), np.concatenate([[0.0], pro[last]])


def truncated_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[0, x_max]``, divided by ``x_max``.

    ``x`` must be non-decreasing from 0; the curve is interpolated linearly at ``x_max``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        after = int(keep.sum())  # first point beyond x_max
        x0, x1, y0, y1 = x[after - 1], x[after], y[after - 1], y[after]
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
        xs = np.append(xs, x_max)
    return float(np.trapezoid(ys, xs) / x_max)


def pro_auc(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (MVTec's AU-PRO at 30%).

    Parameters
    ----------
    maps : ndarray of shape (n, H, W)
        Anomaly maps: higher is more anomalous.
    masks : ndarray of shape (n, H, W)
        True (or non-zero) on defect pixels.
    max_fpr : float, default=0.3
        Largest false-positive rate integrated over.

    Returns
    -------
    float in [0, 1]
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}")
    fpr, pro = pro_curve(maps, masks)
    return truncated_area(fpr, pro, max_fpr)

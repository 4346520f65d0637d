"""How well scores separate labelled anomalies: curves, and thresholds worth choosing.

The positive class is the anomaly. An image is flagged when its score (``score_samples``,
higher is more normal) is *below* the threshold, exactly as ``predict`` returns -1 where
``score_samples - offset_ < 0``. Candidate thresholds lie halfway between consecutive
distinct scores, so each flags a well-defined set of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Curves", "OperatingPoint", "candidate_points", "curves", "operating_point"]

RECALL_TARGETS = (0.9, 0.95, 0.99, 1.0)
FALSE_ALARM_TARGETS = (0.01, 0.05)


@dataclass
class OperatingPoint:
    """What a threshold does to the labelled images.

    Attributes
    ----------
    names : list of str
        Why this threshold is listed (several reasons may share one threshold).
    threshold : float
        Images scoring below it are flagged as anomalies.
    flagged : int
        Labelled images flagged.
    precision : float
        Share of flagged images that are anomalies (NaN when none is flagged).
    recall : float
        Share of anomalies flagged.
    false_positive_rate : float
        Share of normal images flagged.
    f1 : float
        Harmonic mean of precision and recall (0 when either is 0 or undefined).
    """

    names: list[str]
    threshold: float
    flagged: int
    precision: float
    recall: float
    false_positive_rate: float
    f1: float


def _point(
    names: list[str], threshold: float, tp: int, fp: int, pos: int, neg: int
) -> OperatingPoint:
    flagged = tp + fp
    precision = tp / flagged if flagged else math.nan
    recall = tp / pos if pos else math.nan
    fpr = fp / neg if neg else math.nan
    f1 = 2 * tp / (flagged + pos) if flagged + pos else 0.0
    return OperatingPoint(names, float(threshold), flagged, precision, recall, fpr, f1)


def operating_point(
    scores: np.ndarray, is_anomaly: np.ndarray, threshold: float, name: str
) -> OperatingPoint:
    """Return the effect of flagging the images whose score is below ``threshold``."""
    flagged = scores < threshold
    tp = int(np.sum(flagged & is_anomaly))
    fp = int(np.sum(flagged & ~is_anomaly))
    return _point([name], threshold, tp, fp, int(is_anomaly.sum()), int((~is_anomaly).sum()))


def candidate_points(
    scores: np.ndarray, is_anomaly: np.ndarray, model_threshold: float, model_name: str
) -> list[OperatingPoint]:
    """Return thresholds a user may want, with their precision and recall, lowest first.

    The model's own threshold; the best F1; the lowest thresholds that catch 90%, 95%,
    99% and all of the anomalies; the highest that flag at most 1% and 5% of the normal
    images. Reasons that pick the same threshold share a row, which names only the
    strongest recall and false-alarm claims (100% rather than 99% as well).

    Parameters
    ----------
    scores : ndarray of shape (n,)
        ``score_samples`` of labelled images.
    is_anomaly : ndarray of shape (n,), bool
    model_threshold : float
        The threshold in use (``offset_``).
    model_name : str
        How to name that row.
    """
    scores = np.asarray(scores, float)
    is_anomaly = np.asarray(is_anomaly, bool)
    pos, neg = int(is_anomaly.sum()), int((~is_anomaly).sum())
    rows = [operating_point(scores, is_anomaly, model_threshold, model_name)]
    if len(scores) == 0:
        return rows
    unique, inverse = np.unique(scores, return_inverse=True)
    # Flagging every image that scores <= unique[j]: the cumulative counts up to j.
    tps = np.cumsum(np.bincount(inverse, weights=is_anomaly, minlength=len(unique)))
    fps = np.cumsum(np.bincount(inverse, weights=~is_anomaly, minlength=len(unique)))
    # The next distinct score up, or just above the highest: a threshold that flags
    # exactly those; halfway to it where the halfway point differs from the score.
    above = np.append(unique[1:], np.nextafter(unique[-1], np.inf))
    halfway = (unique + above) / 2
    thresholds = np.where(halfway > unique, halfway, above)
    picks: dict[int, list[str]] = {}
    if pos:
        recall = tps / pos
        f1 = 2 * tps / (tps + fps + pos)
        picks.setdefault(int(np.argmax(f1)), []).append("best F1")
        caught: set[int] = set()
        for target in sorted(RECALL_TARGETS, reverse=True):  # a row keeps the strongest claim
            j = int(np.argmax(recall >= target - 1e-12))
            if j not in caught:
                caught.add(j)
                picks.setdefault(j, []).append(f"catches {target:.0%} of anomalies")
    if neg:
        fpr = fps / neg
        bounded: set[int] = set()
        for target in sorted(FALSE_ALARM_TARGETS):
            allowed = np.flatnonzero(fpr <= target + 1e-12)
            if allowed.size and int(allowed[-1]) not in bounded:
                bounded.add(int(allowed[-1]))
                picks.setdefault(int(allowed[-1]), []).append(
                    f"flags at most {target:.0%} of normal images"
                )
    for j, names in picks.items():
        point = _point(names, thresholds[j], int(tps[j]), int(fps[j]), pos, neg)
        if point.threshold == rows[0].threshold:
            rows[0].names += names
        else:
            rows.append(point)
    return sorted(rows, key=lambda row: row.threshold)


@dataclass
class Curves:
    """ROC and precision-recall curves of the anomaly class.

    Attributes
    ----------
    fpr, tpr : ndarray
        ROC curve: share of normal images and of anomalies flagged, per threshold.
    roc_auc : float
    recall, precision : ndarray
        Precision-recall curve.
    average_precision : float
    prevalence : float
        Share of anomalies among the labelled images: the precision of chance.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    roc_auc: float
    recall: np.ndarray
    precision: np.ndarray
    average_precision: float
    prevalence: float


def curves(scores: np.ndarray, is_anomaly: np.ndarray) -> Curves | None:
    """Return the ROC and precision-recall curves, or ``None`` without both classes."""
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    is_anomaly = np.asarray(is_anomaly, bool)
    if is_anomaly.all() or not is_anomaly.any():
        return None
    anomaly_score = -np.asarray(scores, float)
    fpr, tpr, _ = roc_curve(is_anomaly, anomaly_score)
    precision, recall, _ = precision_recall_curve(is_anomaly, anomaly_score)
    return Curves(
        fpr=fpr,
        tpr=tpr,
        roc_auc=float(roc_auc_score(is_anomaly, anomaly_score)),
        recall=recall,
        precision=precision,
        average_precision=float(average_precision_score(is_anomaly, anomaly_score)),
        prevalence=float(is_anomaly.mean()),
    )

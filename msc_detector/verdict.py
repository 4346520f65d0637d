"""One image score from two kinds of evidence: the only place the image-score mode is decided.

A fitted model measures two anomalies per image: the **global** one, the summed squared
distance of its embedding to the nearest training embeddings ("this is not a shirt"),
and the **patch** one, the maximum of its anomaly map ("this part has a scratch"). The
two live on unrelated scales. A :class:`ScoreRule` puts each on the scale of its own
leave-self-out training values, ``z = (anomaly - location) / scale``, and joins them;
``score_samples`` is minus the result, so higher is more normal. The rule also keeps
the leave-self-out training scores it gives, from which ``offset_`` and the false-alarm
level of a score (:meth:`ScoreRule.false_alarm_rate`) are read.

No torch or scikit-learn here: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["IMAGE_SCORES", "MEANINGS", "ScoreRule"]

#: ``image_score`` values: which evidence a score uses and how it is joined.
IMAGE_SCORES = ("combined", "global", "patch")
#: What ``score_samples`` is under each ``image_score``, in words, for readers of reports.
MEANINGS = {
    "global": "minus the summed squared distance from its embedding to those of its nearest "
    "normal training images",
    "patch": "minus the peak of its anomaly map: how far its most unusual patch lies from "
    "the nearest normal training patch, beyond the typical distance at that place",
    "combined": "minus the sum of two anomalies, each counted in spreads of the training "
    "images' own values: the whole image's (the summed squared distance from its "
    "embedding to those of its nearest normal training images) and its most unusual "
    "patch's (the peak of its anomaly map)",
}
# The scaled median absolute deviation estimates a normal distribution's sigma.
_MAD_TO_SIGMA = 1.4826


def _robust_location_scale(anomaly: np.ndarray) -> tuple[float, float]:
    """Median and scaled median absolute deviation; the standard deviation where that is 0."""
    median = float(np.median(anomaly))
    scale = _MAD_TO_SIGMA * float(np.median(np.abs(anomaly - median)))
    if not (scale > 0 and np.isfinite(scale)):
        scale = float(np.std(anomaly))
    return median, scale if scale > 0 and np.isfinite(scale) else 1.0


@dataclass(eq=False)
class ScoreRule:
    """How an image's global and patch anomalies become its ``score_samples``.

    Parameters
    ----------
    mode : {"combined", "global", "patch"}
        ``"global"``: minus the global anomaly. ``"patch"``: minus the patch anomaly.
        ``"combined"``: minus the sum of the two calibrated anomalies, so strong
        evidence of either kind, or weaker evidence of both, makes an image suspicious.
    locations, scales : tuple of float
        Calibration of the global and the patch anomaly: ``z = (a - location) / scale``.
    train_scores : ndarray of shape (n_train,), float64
        The rule's score of each training image from its leave-self-out anomalies.
    """

    mode: str
    locations: tuple[float, float] = (0.0, 0.0)
    scales: tuple[float, float] = (1.0, 1.0)
    train_scores: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}; got {self.mode!r}.")
        self.locations = (float(self.locations[0]), float(self.locations[1]))
        self.scales = (float(self.scales[0]), float(self.scales[1]))
        self.train_scores = np.asarray(self.train_scores, dtype=np.float64)

    @property
    def uses_global(self) -> bool:
        """Whether the score needs the global kNN search."""
        return self.mode != "patch"

    @property
    def uses_patch(self) -> bool:
        """Whether the score needs the patch bank."""
        return self.mode != "global"

    @classmethod
    def calibrate(
        cls, mode: str, global_train: np.ndarray | None, patch_train: np.ndarray | None
    ) -> ScoreRule:
        """Fit a rule to the leave-self-out anomalies of the training images.

        Parameters
        ----------
        mode : str
            See the class.
        global_train, patch_train : ndarray of shape (n_train,) or None
            Leave-self-out anomalies (higher = more anomalous); ``None`` where the
            mode does not use that evidence.
        """
        locations, scales = (0.0, 0.0), (1.0, 1.0)
        if mode == "combined":
            assert global_train is not None and patch_train is not None
            (lg, sg), (lp, sp) = map(_robust_location_scale, (global_train, patch_train))
            locations, scales = (lg, lp), (sg, sp)
        rule = cls(mode, locations, scales)
        rule.train_scores = rule.scores(global_train, patch_train)
        return rule

    def scores(
        self, global_anomaly: np.ndarray | None, patch_anomaly: np.ndarray | None
    ) -> np.ndarray:
        """``score_samples`` from the anomalies (higher = more normal), float64."""
        if self.mode == "global":
            assert global_anomaly is not None
            return -np.asarray(global_anomaly, dtype=np.float64)
        if self.mode == "patch":
            assert patch_anomaly is not None
            return -np.asarray(patch_anomaly, dtype=np.float64)
        assert global_anomaly is not None and patch_anomaly is not None
        z_global = (np.asarray(global_anomaly, np.float64) - self.locations[0]) / self.scales[0]
        z_patch = (np.asarray(patch_anomaly, np.float64) - self.locations[1]) / self.scales[1]
        return -(z_global + z_patch)

    def false_alarm_rate(self, scores: np.ndarray) -> np.ndarray:
        """Share of the training images whose leave-self-out score is as low or lower.

        The empirical chance that a normal image looks at least this anomalous: a
        threshold of ``t`` on it flags about ``t`` of normal images. Values are
        ``(count + 1) / (n_train + 1)``, so never 0.
        """
        ordered = np.sort(self.train_scores)
        at_or_below = np.searchsorted(ordered, np.asarray(scores, np.float64), side="right")
        return (at_or_below + 1) / (len(ordered) + 1)

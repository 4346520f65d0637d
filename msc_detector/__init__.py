"""msc-detector: Mean-Shifted Contrastive anomaly detection as a scikit-learn estimator."""

from msc_detector.estimator import MSCDetector

__version__ = "0.1.0"

__all__ = ["MSCDetector", "__version__"]

"""msc-detector: Mean-Shifted Contrastive anomaly detection as a scikit-learn estimator.

``MSCDetector`` is imported on first use, so that ``import msc_detector`` stays light:
``msc_detector.inspect(path)`` verifies a model file without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from msc_detector._version import __version__
from msc_detector.persistence import ModelFileError, inspect

if TYPE_CHECKING:
    from msc_detector.estimator import MSCDetector

__all__ = ["MSCDetector", "ModelFileError", "__version__", "inspect"]


def __getattr__(name: str) -> Any:
    if name == "MSCDetector":
        from msc_detector.estimator import MSCDetector

        globals()["MSCDetector"] = MSCDetector  # later look-ups skip this hook
        return MSCDetector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"MSCDetector"})

"""Shared fixtures: tiny synthetic images and a fast detector configuration."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

# A randomly initialised EfficientNet-Lite0 at 32 px fits 24 images in about a second.
# The global score: most contract tests check the kNN score itself; tests/test_model.py
# and the image-score tests check the default "combined" score.
FAST = {
    "weights": None,
    "image_size": 32,
    "epochs": 1,
    "batch_size": 8,
    "random_state": 0,
    "image_score": "global",
}


@pytest.fixture
def fast_params() -> dict:
    return dict(FAST)


@pytest.fixture
def images() -> np.ndarray:
    """24 random RGB uint8 images, channels-last."""
    return np.random.default_rng(0).integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def blob_images() -> tuple[np.ndarray, np.ndarray]:
    """Normal images (smooth dark blobs) and anomalies (bright noise), separable by any net."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    normal = []
    for _ in range(30):
        cy, cx = rng.uniform(10, 22, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        normal.append(np.repeat((blob * 120)[..., None], 3, axis=2))
    anomalies = rng.integers(0, 256, size=(10, 32, 32, 3))
    return np.asarray(normal, np.uint8), anomalies.astype(np.uint8)


# The preprocessing a module backbone needs, for small_module's 32-pixel inputs.
MODULE_PRE = {"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def small_module(width: int = 16) -> torch.nn.Module:
    """A headless network of torch's own layers (so it unpickles anywhere), with a BatchNorm."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, width, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )


def write_model(path: Path, members: dict[str, bytes], version: int) -> None:
    """Write payload members as a model file of ``version``, with a manifest that matches."""
    from msc_detector import persistence

    listed = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in members.items()
        if name != "manifest.json"
    }
    manifest = {"format": "msc-detector-model", "format_version": version, "members": listed}
    members = {**members, "manifest.json": json.dumps(manifest).encode()}
    with zipfile.ZipFile(path, "w") as archive:
        for name in persistence.MEMBERS:
            archive.writestr(name, members[name])

"""Inputs a demanding user or an attacker sends (issue 17): threads, odd files, bad weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from msc_detector import MSCDetector


def _png_files(folder: Path, n: int = 10, side: int = 32) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        from PIL import Image

        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_threads_scoring_file_paths_agree_with_one_thread(tmp_path: Path) -> None:
    paths = _png_files(tmp_path)
    detector = MSCDetector(
        weights=None, image_size=32, epochs=0, batch_size=4, num_workers=2, random_state=0
    ).fit(paths)
    expected = detector.score_samples(paths)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(6):
            results = list(pool.map(lambda _: detector.score_samples(paths), range(4)))
            for scores in results:
                np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

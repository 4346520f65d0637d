"""``msc_detector.table.score_table``: the rows the command line, Dask and Spark write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

from msc_detector import MSCDetector
from msc_detector.table import score_table


def files(folder: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{seed}_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    "options",
    [
        {"image_score": "combined", "patch_memory": 64},
        {"image_score": "patch", "patch_memory": 64},
        {"index": "ivf", "index_params": {"nlist": 4, "nprobe": 1}, "patch_memory": None},
    ],
    ids=["combined", "patch", "ivf"],
)
def test_rows_score_as_score_samples_does(tmp_path: Path, options: dict) -> None:
    train, test = files(tmp_path, 24, seed=0), files(tmp_path, 10, seed=1)
    detector = MSCDetector(**{**FAST, **options}).fit(train)
    if "index_params" in options:  # a search setting changed after fit is honoured too
        detector.set_params(index_params={"nlist": 4, "nprobe": 4})
    rows = score_table(detector, [*test, str(tmp_path / "missing.png")], neighbors=2)
    np.testing.assert_allclose(rows["score"][:10], detector.score_samples(test), rtol=1e-6)
    distances, indices = detector.kneighbors(test, n_neighbors=2)
    np.testing.assert_array_equal(
        rows[["neighbor_1", "neighbor_2"]][:10].to_numpy(), np.asarray(train)[indices]
    )
    np.testing.assert_allclose(rows["neighbor_1_distance"][:10], distances[:, 0], rtol=1e-5)
    assert (rows["label"][:10] == np.where(detector.predict(test) < 0, "anomaly", "normal")).all()
    assert rows["error"].iloc[10] == "no such file" and np.isnan(rows["score"].iloc[10])
    assert list(rows.index) == list(range(11))

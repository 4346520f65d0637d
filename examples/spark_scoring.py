"""Score image files with Apache Spark: ``mapInPandas`` with a broadcast detector.

Offline, on a local two-slot Spark (``pip install pyspark``; it needs Java 17+)::

    python examples/spark_scoring.py

The detector is broadcast once: each Spark Python worker unpickles it on its first
batch and keeps it while the worker lives (Spark reuses Python workers by default).
Each batch of paths is scored by :func:`msc_detector.table.score_table`, which reads
the files on the worker and reports an unreadable file in its row.
"""

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from msc_detector import MSCDetector
from msc_detector.datasets import load_fashion_mnist

SCHEMA = (
    "position long, path string, score double, decision double, label string, "
    "false_alarm_rate double, error string"
)


def make_scorer(broadcast, threads: int = 1):
    """The function ``mapInPandas`` runs on every batch of ``(position, path)`` rows."""

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        from msc_detector.table import score_table

        torch.set_num_threads(threads)  # one Spark task slot, one core
        detector = broadcast.value  # unpickled once per Python worker
        for batch in batches:
            rows = score_table(detector, batch["path"].tolist())
            rows.insert(0, "position", batch["position"].to_numpy())
            yield rows.reset_index(drop=True)

    return score


def main() -> None:
    from pyspark.sql import SparkSession

    images = load_fashion_mnist("test")[0]
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp(prefix="msc-spark-"))
    paths = []
    for i in rng.choice(len(images), size=400, replace=False):
        path = folder / f"{i:05d}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(str(path))
    (folder / "broken.png").write_bytes(b"not an image")
    paths.append(str(folder / "broken.png"))

    detector = MSCDetector(image_size=64, loss=None, random_state=0, device="cpu")
    detector.fit(load_fashion_mnist("train")[0][:300])  # the first 300 training images

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    try:
        broadcast = spark.sparkContext.broadcast(detector)
        files = spark.createDataFrame(
            pd.DataFrame({"position": np.arange(len(paths)), "path": paths})
        ).repartition(4)
        rows = files.mapInPandas(make_scorer(broadcast), SCHEMA).toPandas()
    finally:
        spark.stop()
    rows = rows.sort_values("position").set_index("position")
    print(rows.head())
    print(rows[rows["error"].notna()][["path", "error"]])
    good = rows["error"].isna().to_numpy()
    in_process = detector.score_samples([p for p, ok in zip(paths, good, strict=True) if ok])
    gap = np.abs(rows["score"].to_numpy()[good] - in_process).max()
    print("largest difference to in-process scoring:", gap)


if __name__ == "__main__":
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    main()

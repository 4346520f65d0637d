"""Score image files on a Dask cluster with ``msc_detector.dask``.

The script writes 2,000 Fashion-MNIST test images as PNG files to a temporary folder
(scikit-learn's digits without Fashion-MNIST), adds a damaged file and a missing one,
fits a detector on 300 sneakers, and scores every file on a local two-process Dask
cluster: first as a Dask DataFrame gathered here, then written as Parquet by the
workers. On a real cluster, replace ``LocalCluster(...)`` by the scheduler's address,
``Client("tcp://scheduler:8786")``; the files must have the same paths on every worker.

Needs the ``dask`` extra (``pip install 'msc-detector[dask]'``). Run it with
``python examples/dask_scoring.py`` (about a minute on two CPU cores). Dask starts its
workers as new Python processes that import this file, so the work sits under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import dask
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster
from PIL import Image
from sklearn.datasets import load_digits

from msc_detector import MSCDetector
from msc_detector.dask import score_files, score_to_parquet
from msc_detector.datasets import load_fashion_mnist


def load_images() -> tuple[np.ndarray, np.ndarray, int]:
    """Return uint8 images, labels and the normal class."""
    try:
        images, labels = load_fashion_mnist("test")
        return images, labels, 7  # 7: "Sneaker"
    except FileNotFoundError:
        print("Fashion-MNIST is not installed; using scikit-learn's digits instead.")
        digits = load_digits()
        return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target, 7


def main() -> None:
    images, labels, normal = load_images()
    rng = np.random.default_rng(0)
    train = rng.permutation(np.flatnonzero(labels == normal))[:300]
    rest = np.setdiff1d(np.arange(len(labels)), train)
    test = rng.choice(rest, size=min(2000, len(rest)), replace=False)
    detector = MSCDetector(image_size=64, random_state=0).fit(images[train])
    print(f"fitted on {len(train)} normal images; threshold offset_ = {detector.offset_:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = []
        for i in test:
            path = folder / f"{i:05d}_class{labels[i]}.png"
            Image.fromarray(images[i]).save(path)
            paths.append(str(path))
        (folder / "damaged.png").write_bytes(b"\x89PNG not really")
        paths += [str(folder / "damaged.png"), str(folder / "missing.png")]

        with (
            # Dask sets MALLOC_TRIM_THRESHOLD_ in its worker processes, which slows
            # scoring on the CPU (see docs/scaling.rst); start them without it.
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
            LocalCluster(
                n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            # Lazy: the detector goes to the workers now, the files are read on compute.
            frame = score_files(detector, paths, client=client, partition_size=500)
            print(f"{len(paths)} files in {frame.npartitions} tasks")
            rows = frame.compute()

            out = Path(tmp) / "scores"
            score_to_parquet(detector, paths, out, client=client, partition_size=500)
            written = pd.read_parquet(out)
            assert written.equals(rows)
            print(f"wrote {len(list(out.iterdir()))} Parquet files to {out}")

    scored = rows[rows["error"].isna()]
    normal_rows = scored["path"].str.endswith(f"_class{normal}.png")
    print(f"{(scored['label'] == 'anomaly').sum()} of {len(scored)} files flagged as anomalies")
    print(f"mean score, normal class: {scored['score'][normal_rows].mean():.4f}")
    print(f"mean score, other classes: {scored['score'][~normal_rows].mean():.4f}")
    print("could not be scored:")
    for row in rows[rows["error"].notna()].itertuples():
        print(f"  {Path(row.path).name}: {row.error}")


if __name__ == "__main__":
    main()

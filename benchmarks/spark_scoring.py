"""Scoring image files on a local two-slot Spark with ``mapInPandas`` and a broadcast detector.

The same files, detector and machine as :mod:`benchmarks.dask_scoring` (it writes them:
run that first, or this writes them the same way), so that the two engines compare: the
Spark side runs ``examples/spark_scoring.py``'s scorer (``torch`` with one thread per
task slot) on ``local[2]``, twice on one session (*cold*: fresh Python workers, whose
imports and the detector's unpickling count; *warm*: the same workers again). Its
scores are compared with the in-process scores that ``benchmarks.dask_scoring`` saved.
Needs ``pip install pyspark`` and Java 17+ (not project dependencies). Timings need a
quiet machine: ``flock /tmp/msc-heavy.lock python -m benchmarks.spark_scoring``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.dask_scoring import RESULTS, PeakRSS, _children, image_files, model_file


def _scorer() -> Any:
    """``make_scorer`` from examples/spark_scoring.py (the recipe the docs show)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "spark_scoring.py"
    spec = importlib.util.spec_from_file_location("spark_scoring_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(paths: list[str], model: Path, partitions: int) -> dict[str, Any]:
    import pandas as pd
    from pyspark.sql import SparkSession

    from msc_detector import MSCDetector

    example = _scorer()
    detector = MSCDetector.load(model, device="cpu")
    start = time.perf_counter()
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    startup = time.perf_counter() - start
    runs: dict[str, Any] = {"startup_seconds": startup}
    try:
        broadcast = spark.sparkContext.broadcast(detector)
        files = spark.createDataFrame(
            pd.DataFrame({"position": np.arange(len(paths)), "path": paths})
        ).repartition(partitions)
        files = files.cache()
        files.count()
        for name in ("cold", "warm"):
            monitor = PeakRSS(_children)
            with monitor.running():
                t0 = time.perf_counter()
                rows = files.mapInPandas(example.make_scorer(broadcast), example.SCHEMA)
                table = rows.toPandas()
                seconds = time.perf_counter() - t0
            table = table.sort_values("position")
            assert table["error"].isna().all() and list(table["path"]) == paths
            peaks = dict(monitor.peak_mb)
            runs[name] = {
                "seconds": seconds,
                "files_per_second": len(paths) / seconds,
                "peak_rss_mb_driver": peaks.pop("main"),
                "peak_rss_mb_children": sorted(peaks.values(), reverse=True)[:4],
                "scores": table["score"].to_numpy(),
            }
    finally:
        spark.stop()
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-files", type=int, default=50_000)
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--partitions", type=int, default=24)
    p.add_argument("--data-dir", default="/tmp/msc-dask-bench")
    p.add_argument("--out-name", default="spark_scoring")
    args = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    data_dir = Path(args.data_dir)
    settings = {"image_size": args.image_size, "train_size": args.train_size}
    paths = image_files(data_dir, args.n_files)
    model = model_file(data_dir, settings)
    runs = run(paths, model, args.partitions)
    reference = data_dir / f"{args.n_files}_inprocess_scores.npy"
    gap = None
    if reference.exists():
        gap = float(np.abs(runs["warm"]["scores"] - np.load(reference)).max())
    for name in ("cold", "warm"):
        runs[name].pop("scores")
    report = {
        "command": "python -m benchmarks.spark_scoring " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "cpu_count": os.cpu_count()},
        "runs": runs,
        "largest_difference_to_in_process": gap,
    }
    lines = [
        f"# Scoring {args.n_files:,} image files on a local Spark (`local[2]`, mapInPandas)",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {os.cpu_count()} cores, no GPU. Files, detector and in-process reference: "
        "those of `benchmarks.dask_scoring` (Lite0 at image_size=64, loss=None). "
        f"{args.partitions} partitions, one torch thread per task slot.",
        "",
        "| run | seconds | files/s | peak RSS driver (MB) | peak RSS largest children (MB) |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("cold", "warm"):
        r = runs[name]
        children = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb_children"])
        lines.append(
            f"| Spark local[2], {name} | {r['seconds']:.1f} | {r['files_per_second']:.0f} | "
            f"{r['peak_rss_mb_driver']:.0f} | {children} |"
        )
    lines += [
        "",
        f"Session start-up: {runs['startup_seconds']:.1f} s, not included. Children: the JVM "
        "and the Python workers. Largest score difference to in-process `score_samples`: "
        f"{gap if gap is None else f'{gap:.2e}'}.",
    ]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out_name}.md").write_text(text)
    (RESULTS / f"{args.out_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()

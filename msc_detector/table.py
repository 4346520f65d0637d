"""Scores of image files as a pandas table: the unit of work of every scale-out engine.

:func:`score_table` scores a list of files with a fitted detector and returns one row per
file, an unreadable file with its error in its row. :mod:`msc_detector.dask` runs it per
partition on a Dask cluster; Spark's ``mapInPandas`` can run it per batch (see the
"Scaling out" guide). It needs pandas (the ``dask`` extra installs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from msc_detector import files as scoring

if TYPE_CHECKING:
    import pandas as pd

    from msc_detector.estimator import MSCDetector

__all__ = ["score_table", "table_columns"]


def table_columns(neighbors: int, train_paths: bool) -> dict[str, Any]:
    """Column names and pandas dtypes of :func:`score_table`'s rows.

    Parameters
    ----------
    neighbors : int
        Nearest training images listed per file.
    train_paths : bool
        Whether the detector was fitted on files (neighbours are paths) or on arrays
        (neighbours are positions).
    """
    columns: dict[str, Any] = {"path": "str", "score": "float64", "decision": "float64"}
    columns["label"] = "str"
    columns["false_alarm_rate"] = "float64"
    for j in range(1, neighbors + 1):
        columns[f"neighbor_{j}"] = "str" if train_paths else "Int64"
        columns[f"neighbor_{j}_distance"] = "float64"
    columns["error"] = "str"
    return columns


def score_table(
    detector: MSCDetector,
    paths: list[str],
    neighbors: int = 0,
    chunk_size: int = scoring.CHUNK_SIZE,
    start: int = 0,
) -> pd.DataFrame:
    """Score image files; one row per file, in order.

    Parameters
    ----------
    detector : MSCDetector
        A fitted detector; it is not changed.
    paths : list of str
        Image files. A missing or unreadable file gets an error in its row.
    neighbors : int, default=0
        Nearest training images to list per file (at most the training set size).
    chunk_size : int, default=256
        Files read and embedded at a time: bounds memory.
    start : int, default=0
        Position of the first file in a larger input: the index starts there.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``position``; columns ``path``, ``score`` (``score_samples``),
        ``decision`` (``score - offset_``), ``label`` (``"anomaly"`` where
        ``decision < 0``, else ``"normal"``; missing for a failed file),
        ``false_alarm_rate`` (:meth:`~msc_detector.MSCDetector.false_alarm_rate`),
        ``neighbor_<j>`` and ``neighbor_<j>_distance``, and ``error`` (why a file could
        not be scored, else missing).
    """
    import pandas as pd

    k = min(int(neighbors), int(detector.n_train_))
    chunk = _join(list(scoring.score_files(detector, paths, k, chunk_size, progress=False)), k)
    failed = np.array([error is not None for error in chunk.errors], dtype=bool)
    decision = chunk.scores - float(detector.offset_)
    label = np.where(decision < 0, "anomaly", "normal").astype(object)
    label[failed] = None
    data: dict[str, Any] = {
        "path": chunk.paths,
        "score": chunk.scores,
        "decision": decision,
        "label": label,
        "false_alarm_rate": chunk.false_alarm_rates,
    }
    train_paths = detector.train_paths_
    for j in range(k):
        index = chunk.neighbors[:, j]
        if train_paths is None:
            positions = pd.array(index, dtype="Int64")
            positions[failed] = pd.NA
            data[f"neighbor_{j + 1}"] = positions
        else:
            data[f"neighbor_{j + 1}"] = [
                None if bad else train_paths[i] for i, bad in zip(index, failed, strict=True)
            ]
        data[f"neighbor_{j + 1}_distance"] = chunk.distances[:, j].astype(np.float64)
    data["error"] = chunk.errors
    n = len(chunk.paths)
    frame = pd.DataFrame(data, index=pd.RangeIndex(start, start + n, name="position"))
    return frame.astype(table_columns(k, train_paths is not None))


def _join(chunks: list[scoring.Chunk], neighbors: int) -> scoring.Chunk:
    """One chunk holding the rows of ``chunks`` in order."""
    if not chunks:
        empty = np.empty((0, neighbors))
        return scoring.Chunk([], np.empty(0), np.empty(0), empty.astype(np.int64), empty, [])
    return scoring.Chunk(
        [path for chunk in chunks for path in chunk.paths],
        np.concatenate([chunk.scores for chunk in chunks]),
        np.concatenate([chunk.false_alarm_rates for chunk in chunks]),
        np.concatenate([chunk.neighbors for chunk in chunks]),
        np.concatenate([chunk.distances for chunk in chunks]),
        [error for chunk in chunks for error in chunk.errors],
    )

"""Score image files on a Dask cluster: one row per file, each file read where it is scored.

:func:`score_files` splits the paths into partitions of ``partition_size`` files and
returns a lazy Dask DataFrame with one row per path, in input order. Each partition is
one task: a worker reads its files and scores them ``chunk_size`` at a time (the same
code as ``msc-detector score``: an unreadable file gets an error in its row, not a
failed job). :func:`score_to_parquet` writes the rows as Parquet from the workers.

The detector travels to the cluster once: it is serialised once on the client and
scattered to every worker, and each worker process loads it on its first task and keeps
it for the rest (a worker that joins later, or replaces a dead one, fetches it from a
peer). A detector whose network is a timm architecture travels as a model file (see
:mod:`msc_detector.persistence`), so it can land on each worker's own device; one with a
module backbone travels as a pickle and lands by the unpickling rule.

If a worker dies, the scheduler runs its lost partitions again elsewhere; a partition's
rows come from one run only, so every path is scored exactly once in the result.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:
    import dask.dataframe as dd
    import distributed
    import pandas as pd
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"msc_detector.dask needs Dask, distributed and pandas ({exc}); install them with "
        "pip install 'msc-detector[dask]'."
    ) from exc

import numpy as np

from msc_detector import files as scoring
from msc_detector import persistence
from msc_detector.table import score_table, table_columns

if TYPE_CHECKING:
    import torch

    from msc_detector.estimator import MSCDetector

__all__ = ["PARTITION_SIZE", "score_files", "score_to_parquet"]

logger = logging.getLogger(__name__)

#: Files per task: what a worker scores (and re-scores, if it dies) in one go.
PARTITION_SIZE = 2048


class _Shipment:
    """A fitted detector as bytes, loaded once in each process that scores with it.

    Parameters
    ----------
    kind : {"model", "pickle"}
        A model file's bytes (loaded with ``MSCDetector.load``) or a pickle.
    data : bytes
    device : str
        Where a model file lands: ``"auto"`` picks each worker's best device.
    """

    def __init__(self, kind: str, data: bytes, device: str) -> None:
        self.kind = kind
        self.data = data
        self.device = device
        self._detector: MSCDetector | None = None
        self._lock = threading.Lock()

    def detector(self) -> MSCDetector:
        """Return the detector, loaded on the first call in this process (thread-safe)."""
        with self._lock:
            if self._detector is None:
                self._detector = _load(self.kind, self.data, self.device)
            return self._detector

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": self.data, "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.kind, self.data, self.device = state["kind"], state["data"], state["device"]
        self._detector = None
        self._lock = threading.Lock()


def _pack(detector: MSCDetector, device: str | torch.device) -> _Shipment:
    """Serialise ``detector`` once, as a model file where it has one, else as a pickle."""
    device = str(device)
    if detector.backbone_spec_.is_module:  # an AttributeError if it is not fitted
        if device != "auto":
            raise ValueError(
                f"device={device!r} applies to detectors with a timm backbone; a detector with "
                "a module backbone is pickled and lands where unpickling puts it (the device "
                "it was fitted on where a worker has it, else the CPU). Pass device='auto'."
            )
        return _Shipment("pickle", pickle.dumps(detector, protocol=5), device)
    with warnings.catch_warnings():
        # An epoch_callback cannot be stored: scoring does not need it.
        warnings.simplefilter("ignore", UserWarning)
        return _Shipment("model", persistence.dumps(detector), device)


def _load(kind: str, data: bytes, device: str) -> MSCDetector:
    """Rebuild a shipped detector in this process."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        logger.warning(
            "This worker runs with MALLOC_TRIM_THRESHOLD_=%s (Dask's default), which slows "
            "scoring on the CPU (see msc-detector's docs, 'Scoring on a Dask cluster'); start "
            "workers with the Dask config distributed.nanny.pre-spawn-environ."
            "MALLOC_TRIM_THRESHOLD_ set to null.",
            os.environ["MALLOC_TRIM_THRESHOLD_"],
        )
    if kind == "pickle":
        detector: MSCDetector = pickle.loads(data)
        return detector
    from msc_detector.estimator import MSCDetector
    from msc_detector.runtime import resolve_device

    return MSCDetector.load(data, device=resolve_device(device))


def _score_partition(
    paths: list[str], start: int, shipment: _Shipment, neighbors: int, chunk_size: int
) -> pd.DataFrame:
    """Score one partition of files on a worker (the task)."""
    return score_table(shipment.detector(), paths, neighbors, chunk_size, start)


def _as_paths(paths: Any) -> list[str]:
    """Return the file paths as a new list of str; ``paths`` itself is not changed."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(
            f"paths must be a sequence of image file paths, not one path ({paths!r}); "
            "wrap it in a list."
        )
    if isinstance(paths, dd.Series | dd.DataFrame):
        raise TypeError(
            "paths must be an in-memory sequence of file paths, not a Dask collection; "
            "compute it first (a list of a million paths is about 100 MB)."
        )
    try:
        return [os.fspath(path) for path in paths]
    except TypeError as exc:
        raise TypeError(f"paths must be a sequence of str or path-like file paths: {exc}") from exc


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def _client(client: distributed.Client | None) -> distributed.Client:
    if client is not None:
        return client
    try:
        return distributed.default_client()
    except ValueError:
        raise ValueError(
            "No Dask client: pass client=, or create one first, e.g. "
            "distributed.Client(distributed.LocalCluster()) or Client('tcp://scheduler:8786')."
        ) from None


def score_files(
    detector: MSCDetector,
    paths: Sequence[str | os.PathLike[str]],
    *,
    client: distributed.Client | None = None,
    partition_size: int = PARTITION_SIZE,
    chunk_size: int = scoring.CHUNK_SIZE,
    neighbors: int = 0,
    device: str | torch.device = "auto",
) -> dd.DataFrame:
    """Score image files on a Dask cluster; one row per path, in input order.

    Nothing is scored until the result is computed (``frame.compute()``,
    ``client.compute(frame)``, ``frame.to_parquet(...)``); the detector is sent to the
    workers at once, and computing the frame more than once reuses it.

    Parameters
    ----------
    detector : MSCDetector
        A fitted detector; it is not changed. Set ``n_neighbors`` or ``offset_`` on it
        before the call: the workers score with a copy made here.
    paths : sequence of str or path-like
        Image files, as the workers see them (a shared file system or a mount with the
        same paths on every worker). Missing and unreadable files get an error.
    client : distributed.Client, optional
        The cluster to score on; by default the current client.
    partition_size : int, default=2048
        Files per task. A worker holds one task's paths and rows at a time; a dead
        worker's tasks are scored again, so smaller partitions lose less work and
        spread it more evenly, larger ones make fewer tasks to schedule.
    chunk_size : int, default=256
        Files read and embedded at a time within a task: bounds a worker's image
        memory (with the detector's ``batch_size``).
    neighbors : int, default=0
        Nearest training images to list per file (at most the training set size), as
        ``neighbor_<j>`` (a training file's path, or its position where the detector
        was fitted on arrays) and ``neighbor_<j>_distance`` columns.
    device : str or torch.device, default="auto"
        Where each worker runs the network: ``"auto"`` picks that worker's GPU where it
        has one (CUDA, then MPS), else its CPU. Any other device must exist on every
        worker. Applies to timm backbones; a module backbone needs ``"auto"`` and runs
        where unpickling lands it (the device it was fitted on, else the CPU).

    Returns
    -------
    dask.dataframe.DataFrame
        Indexed by ``position`` in ``paths``, with the columns ``path``, ``score``
        (``score_samples``: higher is more normal), ``decision`` (``score - offset_``),
        ``label`` (``"anomaly"`` where ``decision < 0``, else ``"normal"``), the
        neighbour columns, and ``error``: why the file could not be scored (score and
        decision NaN, label missing), else missing.

    Raises
    ------
    TypeError
        If ``paths`` is one path or not a sequence of paths.
    ValueError
        If ``paths`` is empty, a size is not a positive integer, there is no client, or
        ``device`` is set for a module backbone.
    AttributeError
        If the detector is not fitted.
    """
    files = _as_paths(paths)
    if not files:
        raise ValueError("paths is empty: there are no image files to score.")
    step = _positive("partition_size", partition_size)
    chunk = _positive("chunk_size", chunk_size)
    if isinstance(neighbors, bool) or not isinstance(neighbors, int | np.integer) or neighbors < 0:
        raise ValueError(f"neighbors must be a non-negative integer; got {neighbors!r}.")
    active = _client(client)
    shipment = _pack(detector, device)
    k = min(int(neighbors), int(detector.n_train_))
    # One copy per worker, loaded on its first task; the frame holds the future.
    shipped = active.scatter(shipment, broadcast=True, hash=False)
    starts = list(range(0, len(files), step))
    columns = table_columns(k, detector.train_paths_ is not None)
    meta = pd.DataFrame(
        {name: pd.Series([], dtype=dtype) for name, dtype in columns.items()},
        index=pd.RangeIndex(0, name="position"),
    )
    return dd.from_map(
        _score_partition,
        [files[start : start + step] for start in starts],
        starts,
        args=[shipped, k, chunk],
        meta=meta,
        divisions=(*starts, len(files) - 1),
        label="msc-score",
        enforce_metadata=False,
    )


def score_to_parquet(
    detector: MSCDetector,
    paths: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    client: distributed.Client | None = None,
    **options: Any,
) -> None:
    """Score image files on a Dask cluster and write the rows to a Parquet dataset.

    Each task writes its own file, ``part.000000.parquet`` and on, in the folder
    ``output`` from its worker, so the rows never gather in one process; a task run
    again after a worker died rewrites its file. ``pandas.read_parquet(output)`` (or
    ``dask.dataframe.read_parquet``) reads them back in input order, with the
    ``position`` index.

    Parameters
    ----------
    detector : MSCDetector
        A fitted detector.
    paths : sequence of str or path-like
        Image files, as the workers see them.
    output : str or path-like
        A folder that every worker can write to (created if missing; files of the same
        names in it are replaced).
    client : distributed.Client, optional
        The cluster to score on; by default the current client.
    **options
        ``partition_size``, ``chunk_size``, ``neighbors`` and ``device``, as in
        :func:`score_files`.
    """
    active = _client(client)
    frame = score_files(detector, paths, client=active, **options)
    write = frame.to_parquet(os.fspath(output), name_function=_part_name, compute=False)
    active.compute(write).result()


def _part_name(i: int) -> str:
    """File name of partition ``i``: zero-padded, so that name order is input order."""
    return f"part.{i:06d}.parquet"

"""Score image files in chunks with a fitted detector, a file that cannot be read in its row.

The library's file scoring: the command line (``msc-detector score`` and ``report``),
:func:`msc_detector.table.score_table` (Dask, Spark) all call :func:`score_files`.

The detector raises one ``ValueError`` for a whole batch when one file in it cannot be
decoded. Here every file is first checked cheaply (it exists, and PIL can identify and
verify it); the rest are scored a chunk at a time, and where a chunk still fails (a file
that passes the check but does not decode, such as a truncated JPEG), its files are
scored one by one so that only the bad one gets an error. Only one chunk of images and
embeddings is held at a time. Each file is decoded and run through the network once for
its score, its nearest training images and (where asked) its anomaly map
(:meth:`MSCDetector.explain <msc_detector.MSCDetector.explain>`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from msc_detector.model import MapSource

__all__ = ["Chunk", "check_readable", "score_files"]

#: Files embedded per chunk: bounds memory, and is how often rows are written.
CHUNK_SIZE = 256


@dataclass
class Chunk:
    """Scores of consecutive files; the arrays hold NaN and -1 where ``errors`` has a message.

    Attributes
    ----------
    paths : list of str
    scores : ndarray of shape (n,), float64
        ``score_samples`` of each file: higher is more normal.
    false_alarm_rates : ndarray of shape (n,), float64
        ``false_alarm_rate`` of each file: the share of training images scoring as low
        or lower.
    neighbors : ndarray of shape (n, k), int64
        Positions in the training set of the nearest training images, nearest first.
    distances : ndarray of shape (n, k), float32
        Euclidean distances between embeddings, as ``kneighbors`` returns them.
    errors : list of str or None
        Why a file could not be scored, else ``None``.
    map_sources : list of MapSource or None
        What each file's anomaly map is made from, where maps were asked for (``None``
        for a failed file): small, so a caller keeps those it will show and makes
        their maps with ``detector.model_.image_map``.
    """

    paths: list[str]
    scores: np.ndarray
    false_alarm_rates: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    errors: list[str | None]
    map_sources: list[MapSource | None] = field(default_factory=list)


def check_readable(path: str) -> str | None:
    """Return why PIL cannot read the image file ``path``, or ``None`` if it looks readable.

    Reads the header and, for formats with checksums (PNG), verifies the data; it does
    not decode the pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the detector decides
            with Image.open(path) as image:
                image.verify()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a folder, not an image file"
    except Image.DecompressionBombError as exc:
        return f"refused as a possible decompression bomb: {exc}"
    except Exception as exc:  # PIL raises many types for damaged files, SyntaxError among them
        return f"cannot read the image: {exc}"
    return None


def _score_chunk(detector: Any, paths: Sequence[str], k: int, maps: bool) -> Chunk:
    n = len(paths)
    chunk = Chunk(
        list(paths),
        np.full(n, np.nan),
        np.full(n, np.nan),
        np.full((n, k), -1, np.int64),
        np.full((n, k), np.nan, np.float32),
        [check_readable(path) for path in paths],
        [None] * n if maps else [],
    )
    todo = [i for i, error in enumerate(chunk.errors) if error is None]
    if not todo:
        return chunk
    try:
        results = [(todo, detector.explain([paths[i] for i in todo], k, maps))]
    except ValueError:  # a file that passed the check does not decode: find it
        results = []
        for i in todo:
            try:
                results.append(([i], detector.explain([paths[i]], k, maps)))
            except ValueError as exc:
                chunk.errors[i] = str(exc)
    for rows, found in results:
        chunk.scores[rows] = found.scores
        chunk.false_alarm_rates[rows] = found.false_alarm_rates
        if k:
            chunk.neighbors[rows] = found.indices
            chunk.distances[rows] = found.distances
        for j, i in enumerate(rows if maps else []):
            chunk.map_sources[i] = found.map_sources[j]
    return chunk


def score_files(
    detector: Any,
    paths: Sequence[str],
    n_neighbors: int,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
    maps: bool = False,
) -> Iterator[Chunk]:
    """Score image files a chunk at a time, in order.

    Parameters
    ----------
    detector : MSCDetector
        A fitted detector.
    paths : sequence of str
        Image files; missing and unreadable ones get an error instead of a score.
    n_neighbors : int
        Nearest training images to return per file (at most the training set size).
    chunk_size : int, default=256
        Files embedded at a time.
    progress : bool, default=True
        Show a progress bar over the files on stderr.
    maps : bool, default=False
        Also give what each file's anomaly map is made from (needs a patch bank).

    Yields
    ------
    Chunk
        The results of up to ``chunk_size`` consecutive files.
    """
    from tqdm.auto import tqdm

    k = min(int(n_neighbors), int(detector.n_train_))
    step = max(int(chunk_size), 1)
    with tqdm(total=len(paths), desc="scoring", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), step):
            part = paths[start : start + step]
            yield _score_chunk(detector, part, k, maps)
            bar.update(len(part))

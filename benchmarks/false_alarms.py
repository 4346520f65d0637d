"""How many new *normal* images the default threshold flags, against what it promises.

``offset_`` is the ``contamination`` quantile (0.1) of the training images' leave-self-out
scores, so about 10 % of new normal images like the training ones should be predicted
``-1``; ``false_alarm_rate(X) < 0.01`` should flag about 1 %. This benchmark fits the
default detector (seed 0) on each set and counts, among the set's normal test images,
the share flagged each way; the share of its anomalies flagged at ``offset_`` is given
for context. The sets are those of :mod:`benchmarks.score_rules`, where they are
described, plus one:

* ``tiles:<texture>``: a texture photo cut into 48-pixel tiles that do not overlap,
  shuffled and split 60 for training and 20 normal tiles for testing, with 20 more
  tiles given a procedural defect; training and test tiles share their rows but no
  pixel. The ``defects:`` and ``photo:`` sets instead take overlapping training crops
  from the top rows and test crops from the bottom rows; ``scene:`` from anywhere.

Results go to ``benchmarks/results/<name>.json`` and ``.md`` after every set; a re-run
with the same name skips the sets already measured.

Example
-------
::

    python -m benchmarks.false_alarms --name false_alarms
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import numpy as np

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results

SETS = (
    "fashion-mnist:0",
    "fashion-mnist:6",
    "digits:3",
    "lfw",
    "defects:grass",
    "defects:gravel",
    "photo:fruits",
    "scene:fruits",
    "tiles:grass",
    "tiles:gravel",
)
TILE, TILE_TRAIN, TILE_TEST = 48, 60, 20


def tiles(texture: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, test, is_anomaly)`` from non-overlapping tiles of a texture photo."""
    from benchmarks.defects import DEFECTS, add_defect, photo

    image = photo(texture)
    rows, cols = image.shape[0] // TILE, image.shape[1] // TILE
    grid = image[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE)
    cut = grid.transpose(0, 2, 1, 3).reshape(-1, TILE, TILE)
    order = np.random.default_rng(0).permutation(len(cut))
    train = cut[order[:TILE_TRAIN]]
    test = np.repeat(cut[order[TILE_TRAIN : TILE_TRAIN + 2 * TILE_TEST], ..., None], 3, axis=3)
    for i in range(TILE_TEST, 2 * TILE_TEST):
        test[i], _ = add_defect(test[i, ..., 0], DEFECTS[i % len(DEFECTS)], seed=i)
    return train, test, np.arange(2 * TILE_TEST) >= TILE_TEST


def measure(name: str, **params: Any) -> dict[str, Any]:
    """Fit the detector (the default, or with ``params``) on one set; the shares flagged."""
    from benchmarks.score_rules import load_set
    from msc_detector import MSCDetector

    kind, _, which = name.partition(":")
    train, test, is_anomaly = tiles(which) if kind == "tiles" else load_set(name)
    start = time.perf_counter()
    det = MSCDetector(**{"random_state": 0, **params}).fit(train)
    fit_seconds = time.perf_counter() - start
    flagged = det.predict(test) == -1
    rare = det.false_alarm_rate(test) < 0.01
    normal = ~is_anomaly
    return {
        "n_train": len(train),
        "n_normal": int(normal.sum()),
        "n_anomalies": int(is_anomaly.sum()),
        "normal_flagged": float(flagged[normal].mean()),
        "normal_below_1pct": float(rare[normal].mean()),
        "anomalies_flagged": float(flagged[is_anomaly].mean()),
        "fit_seconds": fit_seconds,
    }


def render(rows: dict[str, dict[str, Any]], command: str, info: dict[str, Any]) -> str:
    lines = [
        "# False alarms on new normal images, default detector",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {json.dumps(info)}",
        "",
        "Share of each set's normal test images flagged at ``offset_`` (promised: about "
        "10 %) and with ``false_alarm_rate < 0.01`` (promised: about 1 %); the share of "
        "its anomalies flagged at ``offset_`` for context.",
        "",
        "| set | train | normal test | flagged at offset_ % | false_alarm_rate < 0.01 % "
        "| anomalies flagged % |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['n_train']} | {row['n_normal']} | "
            f"{100 * row['normal_flagged']:.1f} | {100 * row['normal_below_1pct']:.1f} | "
            f"{100 * row['anomalies_flagged']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS))
    p.add_argument("--name", default="false_alarms")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.false_alarms", *(argv or sys.argv[1:])])
    path = RESULTS / f"{args.name}.json"
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
    info = machine()
    for name in args.sets:
        if name not in rows:
            rows[name] = measure(name)
            print(name, rows[name], flush=True)
        out = {"command": command, "machine": info, "rows": rows}
        write_results(path, out, render(rows, command, info))
    table = render(rows, command, info)
    print(table)
    return {"command": command, "machine": info, "rows": rows}


if __name__ == "__main__":
    run()

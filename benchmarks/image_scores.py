"""Global, patch and combined image scores on one-class sets (which default to keep).

For each chosen class of a data set (see :mod:`benchmarks.one_class`), one detector is
fitted with ``image_score="combined"`` on the class's training images and the test set
is scored. One fit gives all three scores exactly: the global score from ``kneighbors``
(minus the summed squared distances), and the patch score from
``combined = global / s_g + patch / s_p`` with ``score_scales_ = (s_g, s_p)``.
Results go to ``benchmarks/results/<name>.json`` and ``.md`` after every class; a re-run
with the same name and settings skips finished classes.

Examples
--------
::

    python -m benchmarks.image_scores --dataset digits --classes 0 1 2 3 4 \\
        --test-size 400 --name image_scores_digits
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.machine_info import machine
from benchmarks.one_class import DATASETS, load_dataset
from benchmarks.output import RESULTS, write_results
from msc_detector import MSCDetector

SCORES = ("global", "patch", "combined")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--classes", type=int, nargs="*", default=None)
    p.add_argument("--test-size", type=int, default=None, help="random test subset")
    p.add_argument("--train-size", type=int, default=None, help="training images per class")
    p.add_argument("--patch-memory", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="image_scores")
    p.add_argument("--results-dir", default=str(RESULTS))
    return p.parse_args(argv)


def three_scores(
    det: MSCDetector, X: np.ndarray, combined: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Anomaly scores (higher = more anomalous) of a detector fitted with "combined".

    ``combined``: ``det.score_samples(X)`` where the caller has it already (timed).
    """
    combined = det.score_samples(X) if combined is None else combined
    distances, _ = det.kneighbors(X)
    glob = (distances.astype(np.float64) ** 2).sum(axis=1)
    patch = patch_anomaly(det, combined, glob)
    return {"global": glob, "patch": patch, "combined": -combined}


def patch_anomaly(det: MSCDetector, combined: np.ndarray, glob: np.ndarray) -> np.ndarray:
    """The patch anomaly behind ``combined`` scores, given the global anomaly ``glob``.

    ``combined = -((glob - l_g) / s_g + (patch - l_p) / s_p)`` with ``score_locations_``
    ``(l_g, l_p)`` and ``score_scales_`` ``(s_g, s_p)``.
    """
    (l_g, l_p), (s_g, s_p) = det.score_locations_, det.score_scales_
    return l_p + s_p * (-combined - (glob - l_g) / s_g)


def _first(images: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A random subset of ``size`` training images (all of them for ``None``), in order."""
    if size is None or size >= len(images):
        return images
    return images[np.sort(np.random.default_rng(seed).permutation(len(images))[:size])]


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = load_dataset(args.dataset, args.data_root)
    if args.test_size is not None and args.test_size < len(x_test):
        keep = np.random.default_rng(args.seed).choice(len(x_test), args.test_size, replace=False)
        x_test, y_test = x_test[keep], y_test[keep]
    classes = sorted(set(y_train.tolist())) if args.classes is None else args.classes
    settings = {
        "dataset": args.dataset,
        "test_size": len(x_test),
        "patch_memory": args.patch_memory,
        "seed": args.seed,
    }
    if args.train_size is not None:  # results without the option keep their settings
        settings["train_size"] = args.train_size
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    result: dict[str, Any] = {"settings": settings, "classes": {}}
    if path.exists() and json.loads(path.read_text()).get("settings") == settings:
        result = json.loads(path.read_text())
    result["command"] = shlex.join(["python", "-m", "benchmarks.image_scores", *sys.argv[1:]])
    result["machine"] = machine()
    for label in classes:
        if str(label) in result["classes"]:
            continue
        start = time.perf_counter()
        det = MSCDetector(
            random_state=args.seed, patch_memory=args.patch_memory, image_score="combined"
        ).fit(_first(x_train[y_train == label], args.train_size, args.seed))
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        scores = three_scores(det, x_test)
        score_seconds = time.perf_counter() - start
        anomalous = (y_test != label).astype(int)
        row = {name: float(roc_auc_score(anomalous, scores[name])) for name in SCORES}
        row |= {"fit_seconds": fit_seconds, "score_seconds": score_seconds}
        result["classes"][str(label)] = row
        print(label, {k: round(100 * row[k], 2) for k in SCORES}, flush=True)
        write_results(path, result, render(result))
    table = render(result)
    print(table)
    return result


def render(result: dict[str, Any]) -> str:
    rows = result["classes"]
    lines = [
        f"# {result['settings']['dataset']}: image ROC-AUC % by image score",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Settings: {json.dumps(result['settings'])}; detector defaults otherwise "
        "(fitted with image_score='combined'; all three scores from one fit).",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        "| class | global | patch | combined | fit s | score s |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        cells = [f"{100 * row[name]:.2f}" for name in SCORES]
        timing = [f"{row['fit_seconds']:.0f}", f"{row['score_seconds']:.0f}"]
        lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(timing)} |")
    if rows:
        means = [f"**{100 * np.mean([r[name] for r in rows.values()]):.2f}**" for name in SCORES]
        lines.append(f"| **mean** | {' | '.join(means)} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()

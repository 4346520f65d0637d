"""Non-square images: squashed whole into the network's square, or cut to its centre.

``crop_mode="squash"`` (the default) resizes a non-square image whole to the square the
network takes; ``"center"`` keeps its aspect ratio and cuts it to its centre square, so
the ends of its longer side are never seen. Two kinds of non-square set measure what
each costs, with the default detector otherwise (seed 0):

* **surface strips**, "this part has a small scratch": 64 x 192 strips of
  :mod:`benchmarks.defects`' texture photos (training strips from the top 60% of the
  rows, test strips from the rest), half of the test strips with one procedural defect
  drawn on one of their three 64 x 64 thirds. The image ROC-AUC is reported over all
  test strips and separately for defects on an end third (outside the centre square)
  and on the middle third;
* **objects in a wide frame**, "this is not a shirt": Fashion-MNIST items centred on a
  black 28 x 56 canvas (one class normal, :data:`FASHION_TRAIN` training items, a
  fixed sample of :data:`FASHION_TEST` test items): the case that favours the centre
  crop, which sees the whole item undistorted, while squashing halves its width.

The table goes to ``benchmarks/results/<name>.md`` and ``.json``.

Examples
--------
::

    python -m benchmarks.crop_modes --name crop_modes
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import zlib
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results

MODES = ("squash", "center")
TEXTURES = ("brick", "grass", "gravel")
FASHION_CLASSES = (0, 2, 6)
FASHION_TRAIN, FASHION_TEST = 500, 1000
TILE = 64  # a strip is three tiles side by side
N_TRAIN, N_GOOD, N_PER_THIRD = 150, 60, 20


def strips(texture: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training strips, test strips and, per test strip, the third holding its defect.

    Returns ``(train, test, third)``: ``third`` is -1 for a good strip, else 0, 1 or 2.
    """
    from benchmarks.defects import DEFECTS, add_defect, photo

    image = photo(texture)
    split = round(image.shape[0] * 0.6)
    key = zlib.crc32(texture.encode())
    rng = np.random.default_rng([seed, key])

    def cut(n: int, top: int, bottom: int) -> np.ndarray:
        ys = rng.integers(top, bottom - TILE + 1, n)
        xs = rng.integers(0, image.shape[1] - 3 * TILE + 1, n)
        corners = zip(ys, xs, strict=True)
        return np.stack([image[y : y + TILE, x : x + 3 * TILE] for y, x in corners])

    train = cut(N_TRAIN, 0, split)
    grey = cut(N_GOOD + 3 * N_PER_THIRD, split, image.shape[0])
    test = np.repeat(grey[..., None], 3, axis=3)
    third = np.array([-1] * N_GOOD + [t for t in range(3) for _ in range(N_PER_THIRD)])
    for i in range(N_GOOD, len(test)):
        cols = slice(third[i] * TILE, (third[i] + 1) * TILE)
        kind = DEFECTS[i % len(DEFECTS)]
        test[i, :, cols], _ = add_defect(grey[i, :, cols], kind, seed=key * 4096 + i)
    return train, test, third


def framed_fashion(label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items of one class (normal) and a test sample, centred on a 28 x 56 black canvas."""
    from benchmarks.one_class import load_dataset

    x_train, y_train, x_test, y_test = load_dataset("fashion-mnist", None)
    train = x_train[y_train == label]
    train = train[np.sort(np.random.default_rng(0).permutation(len(train))[:FASHION_TRAIN])]
    keep = np.random.default_rng(0).choice(len(x_test), FASHION_TEST, replace=False)

    def frame(items: np.ndarray) -> np.ndarray:
        canvas = np.zeros((len(items), 28, 56), np.uint8)
        canvas[:, :, 14:42] = items
        return canvas

    return frame(train), frame(x_test[keep]), y_test[keep] != label


def _auc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    return 100.0 * float(roc_auc_score(is_anomaly, -scores))


def measure(
    train: np.ndarray, test: np.ndarray, mode: str, seed: int, **params: Any
) -> dict[str, Any]:
    """Fit the detector (the default, or ``params``) with ``crop_mode=mode``; score ``test``."""
    from msc_detector import MSCDetector

    start = time.perf_counter()
    detector = MSCDetector(**params, crop_mode=mode, random_state=seed).fit(train)
    fitted = time.perf_counter()
    scores = detector.score_samples(test)
    return {
        "scores": scores,
        "fit_s": fitted - start,
        "score_s": time.perf_counter() - fitted,
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", default="crop_modes")
    parser.add_argument("--textures", nargs="*", default=list(TEXTURES))
    parser.add_argument("--fashion-classes", nargs="*", type=int, default=list(FASHION_CLASSES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.crop_modes " + shlex.join(given)
    rows: list[dict[str, Any]] = []
    for texture in args.textures:
        train, test, third = strips(texture, args.seed)
        for mode in MODES:
            found = measure(train, test, mode, args.seed)
            scores, good = found["scores"], third < 0
            row = {"set": f"strips:{texture}", "crop_mode": mode, "roc_auc": _auc(~good, scores)}
            for part, thirds in (("ends", (0, 2)), ("middle", (1,))):
                chosen = good | np.isin(third, thirds)
                row[f"roc_auc_{part}"] = _auc(~good[chosen], scores[chosen])
            rows.append({**row, "fit_s": found["fit_s"], "score_s": found["score_s"]})
            print(rows[-1], flush=True)
    for label in args.fashion_classes:
        train, test, is_anomaly = framed_fashion(label)
        for mode in MODES:
            found = measure(train, test, mode, args.seed)
            row = {"set": f"framed-fashion:{label}", "crop_mode": mode}
            row["roc_auc"] = _auc(is_anomaly, found["scores"])
            rows.append({**row, "fit_s": found["fit_s"], "score_s": found["score_s"]})
            print(rows[-1], flush=True)
    result = {"command": command, "machine": machine(), "rows": rows}
    table = render(result)
    print(table)
    write_results(RESULTS / f"{args.name}.json", result, table)
    return result


def render(result: dict[str, Any]) -> str:
    """The results as a Markdown table, with the command that made them."""

    def pct(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        "# Non-square images: crop_mode",
        "",
        f"Command: `{result['command']}`",
        "",
        "Image ROC-AUC % of the default detector (seed 0) with each `crop_mode`. Strips: "
        "64 x 192 texture strips, a defect on one third of half the test strips; 'ends' "
        "counts the good strips against those with a defect on an end third (outside the "
        "centre square), 'middle' against those with one on the middle third. Framed "
        "Fashion-MNIST: items centred on a 28 x 56 black canvas.",
        "",
        "| set | crop_mode | ROC-AUC % | ends | middle | fit s | scoring s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['set']} | {row['crop_mode']} | {pct(row['roc_auc'])} | "
            f"{pct(row.get('roc_auc_ends'))} | {pct(row.get('roc_auc_middle'))} | "
            f"{row['fit_s']:.1f} | {row['score_s']:.1f} |"
        )
    for prefix in ("strips", "framed-fashion"):
        for mode in MODES:
            values = [
                r["roc_auc"]
                for r in result["rows"]
                if r["set"].startswith(prefix) and r["crop_mode"] == mode
            ]
            if values:
                lines.append(f"| **{prefix} mean** | {mode} | **{np.mean(values):.2f}** | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()

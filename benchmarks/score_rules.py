"""Candidate rules for one image score from the global and the patch evidence.

For each set, one detector is fitted (``image_score="combined"``, seed 0) and four
arrays are kept: the leave-self-out global and patch anomaly scores of the training
images, and the global and patch anomaly scores of the test images (higher = more
anomalous; the global score is the summed squared distance to the nearest training
embeddings, the patch score the maximum of the anomaly map). Each candidate rule then
turns them into one test score, with the training scores as its only calibration, and
its ROC-AUC is reported per set and averaged over the two kinds of set:

* **semantic** sets, "this is not a shirt": one class of Fashion-MNIST (a subset at a
  stated budget), scikit-learn's digits, OpenCV's digits and scikit-image's faces
  against its non-faces;
* **surface** sets, "this part has a small scratch": :mod:`benchmarks.defects`'
  textures, and 160-pixel crops of OpenCV's sample photos with the same procedural
  defects: ``photo:`` takes training crops from the top 60% of the rows and test crops
  from the rest (as the textures do), ``scene:`` takes both from anywhere in the photo
  (new random positions for the test crops).

The arrays go to ``benchmarks/results/score_rules/<set>.npz``, with a digest of the
library's source: a re-run reuses them while the library is unchanged (new rules cost
no fit) and fits again after any change to it. The table goes to
``benchmarks/results/<name>.md`` and ``.json``.

Examples
--------
::

    python -m benchmarks.score_rules --sets defects:brick defects:grass defects:gravel \\
        photo:starry_night photo:building fashion-mnist:0 fashion-mnist:6 digits:2 lfw
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.constants import add_constant_option, set_constants
from benchmarks.image_scores import patch_anomaly
from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results

CACHE = RESULTS / "score_rules"
PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")
SURFACE = ("defects", "photo", "scene")
FASHION_TRAIN, FASHION_TEST = 500, 1000


def _robust(train: np.ndarray) -> tuple[float, float]:
    """Median and scaled median absolute deviation (a normal's sigma), never 0."""
    median = float(np.median(train))
    mad = 1.4826 * float(np.median(np.abs(train - median)))
    return median, mad if mad > 0 else max(float(np.std(train)), 1e-12)


def _tail(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Minus log of the share of training scores at or above each test score (+1 smoothing)."""
    ordered = np.sort(train)
    above = len(ordered) - np.searchsorted(ordered, test, side="left")
    return -np.log((above + 1) / (len(ordered) + 1))


def _z(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    median, scale = _robust(train)
    return (test - median) / scale


def _tail_z(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Scaled by the training scores' upper tail: median to 95th percentile."""
    median = float(np.median(train))
    return (test - median) / max(float(np.quantile(train, 0.95)) - median, 1e-12)


def _log_z(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Robust z of the logarithms (distances are positive and skewed)."""
    return _z(np.log(np.maximum(train, 1e-12)), np.log(np.maximum(test, 1e-12)))


def _std(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    return (test - train.mean()) / max(float(train.std()), 1e-12)


Rule = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: rule name -> f(global train, patch train, global test, patch test) -> test anomaly score
RULES: dict[str, Rule] = {
    "global": lambda gt, pt, g, p: g,
    "patch": lambda gt, pt, g, p: p,
    "sum of std-scaled (today's combined)": lambda gt, pt, g, p: g / gt.std() + p / pt.std(),
    "sum of z (mean, std)": lambda gt, pt, g, p: _std(gt, g) + _std(pt, p),
    "max of z (mean, std)": lambda gt, pt, g, p: np.maximum(_std(gt, g), _std(pt, p)),
    "sum of robust z": lambda gt, pt, g, p: _z(gt, g) + _z(pt, p),
    "max of robust z": lambda gt, pt, g, p: np.maximum(_z(gt, g), _z(pt, p)),
    "sum of tail-scaled z (median, 95th pct.)": lambda gt, pt, g, p: (
        _tail_z(gt, g) + _tail_z(pt, p)
    ),
    "sum of robust z of logs": lambda gt, pt, g, p: _log_z(gt, g) + _log_z(pt, p),
    "log-sum-exp of robust z": lambda gt, pt, g, p: np.logaddexp(_z(gt, g), _z(pt, p)),
    "sum of tail -log p": lambda gt, pt, g, p: _tail(gt, g) + _tail(pt, p),
    "max of tail -log p": lambda gt, pt, g, p: np.maximum(_tail(gt, g), _tail(pt, p)),
}


def _photo(stem: str) -> np.ndarray:
    from PIL import Image

    matches = sorted(PHOTOS.glob(f"{stem}.*"))
    if not matches:
        raise SystemExit(f"no photo {stem!r} in {PHOTOS}")
    return np.asarray(Image.open(matches[0]).convert("L"), dtype=np.uint8)


def _scene(stem: str, size: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """150 training crops and 150 test crops (half with a defect) from anywhere in a photo."""
    from benchmarks.defects import DEFECTS, add_defect

    image = _photo(stem)
    rng = np.random.default_rng([0, len(stem)])

    def crops(n: int) -> np.ndarray:
        ys = rng.integers(0, image.shape[0] - size + 1, n)
        xs = rng.integers(0, image.shape[1] - size + 1, n)
        return np.stack([image[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])

    train, test_crops = crops(150), crops(150)
    test = np.repeat(test_crops[..., None], 3, axis=3)
    is_anomaly = np.arange(150) >= 75
    for i in range(75, 150):
        test[i], _ = add_defect(test_crops[i], DEFECTS[i % len(DEFECTS)], seed=i)
    return train, test, is_anomaly


def load_set(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, test, is_anomaly)`` of a set named ``kind[:which]``."""
    kind, _, which = name.partition(":")
    if kind in SURFACE:
        from benchmarks.defects import build

        if kind == "defects":
            data = build(which)
        elif kind == "photo":
            data = build(which, _photo(which), size=160)
        else:
            return _scene(which)
        return data.train, data.test, data.labels.astype(bool)
    if kind == "lfw":
        import skimage.data

        faces = np.asarray(skimage.data.lfw_subset())  # 100 faces, then 100 non-faces
        images = np.round(faces * 255).astype(np.uint8)
        order = np.random.default_rng(0).permutation(100)
        train = images[order[:50]]
        test = np.concatenate([images[order[50:]], images[100:]])
        return train, test, np.arange(len(test)) >= 50
    from benchmarks.one_class import load_dataset

    x_train, y_train, x_test, y_test = load_dataset(kind, None)
    label = int(which)
    train = x_train[y_train == label]
    if kind == "fashion-mnist":
        rng = np.random.default_rng(0)
        train = train[np.sort(rng.permutation(len(train))[:FASHION_TRAIN])]
        keep = np.random.default_rng(0).choice(len(x_test), FASHION_TEST, replace=False)
        x_test, y_test = x_test[keep], y_test[keep]
    return train, x_test, y_test != label


def library_digest() -> str:
    """SHA-256 of the ``msc_detector`` package's Python source, file names included."""
    import msc_detector

    package = Path(msc_detector.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cache(params: dict[str, Any]) -> Path:
    """The folder of the cached arrays of the detectors fitted with ``params``."""
    if not params:
        return CACHE
    return CACHE / "_".join(f"{key}-{value}" for key, value in sorted(params.items()))


def components(name: str, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The four score arrays of a set and its labels, from the cache or one fit.

    ``params`` are given to the detector beside ``random_state=0``; each set of them
    has its own cache folder.
    """
    params = dict(params or {})
    folder = _cache(params)
    path = folder / f"{name.replace(':', '_')}.npz"
    library = library_digest()
    if path.exists():
        cached = dict(np.load(path))
        if str(cached.pop("library", "")) == library:  # fitted by this very library
            return cached
        print(f"{name}: cached arrays from another version of the library; fitting again")
    from msc_detector import MSCDetector

    train, test, is_anomaly = load_set(name)
    start = time.perf_counter()
    detector_params = {k: v for k, v in params.items() if k != "coreset_block" and "." not in k}
    det = MSCDetector(random_state=0, **{"image_score": "combined", **detector_params}).fit(train)
    fit_seconds = time.perf_counter() - start
    sq, _ = det.index_.search_leave_self_out(det.n_neighbors)
    global_train = sq.sum(axis=1, dtype=np.float64)
    patch_train = patch_anomaly(det, det.train_scores_, global_train)
    combined = det.score_samples(test)
    distances, _ = det.kneighbors(test)
    global_test = (distances.astype(np.float64) ** 2).sum(axis=1)
    patch_test = patch_anomaly(det, combined, global_test)
    arrays = {
        "global_train": global_train,
        "patch_train": patch_train,
        "global_test": global_test,
        "patch_test": patch_test,
        "is_anomaly": is_anomaly,
        "fit_seconds": np.float64(fit_seconds),
    }
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays, library=np.str_(library))
    return arrays


def evaluate(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """ROC-AUC % of every rule on one set."""
    parts = [arrays[k] for k in ("global_train", "patch_train", "global_test", "patch_test")]
    return {
        rule: 100 * float(roc_auc_score(arrays["is_anomaly"], score(*parts)))
        for rule, score in RULES.items()
    }


def render(rows: dict[str, dict[str, float]], command: str) -> str:
    names = list(rows)
    lines = [
        "# Image-score rules: ROC-AUC % per set",
        "",
        f"Command: `{command}`",
        "",
        "Each set: one fit of the detector (the default, with any parameters the command "
        "gives) with `image_score='combined'` (seed 0); "
        "every rule is calibrated on the leave-self-out training scores only.",
        "",
        "| rule | " + " | ".join(names) + " | semantic mean | surface mean | mean of both |",
        "|---" * (len(names) + 4) + "|",
    ]
    surface = [n for n in names if n.partition(":")[0] in SURFACE]
    semantic = [n for n in names if n not in surface]
    for rule in RULES:
        cells = [f"{rows[n][rule]:.2f}" for n in names]
        sem = np.mean([rows[n][rule] for n in semantic]) if semantic else np.nan
        sur = np.mean([rows[n][rule] for n in surface]) if surface else np.nan
        both = np.nanmean([sem, sur])
        means = f"{sem:.2f} | {sur:.2f} | {both:.2f}"
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {means} |")
    return "\n".join(lines) + "\n"


def _parse_param(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--params takes KEY=VALUE; got {item!r}")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", nargs="+", required=True, help="kind:which, e.g. defects:grass")
    p.add_argument("--name", default="score_rules")
    p.add_argument(
        "--params",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="detector parameters (JSON values, else strings), e.g. patch_memory=4096",
    )
    p.add_argument(
        "--coreset-block",
        type=int,
        default=None,
        help="candidates per greedy coreset selection (msc_detector.coreset.BLOCK)",
    )
    add_constant_option(p, "its own cache folder")
    args = p.parse_args(argv)
    params = dict(_parse_param(item) for item in args.params)
    params |= set_constants(args.constant)  # dotted names: they name the cache folder
    if args.coreset_block is not None:
        from msc_detector import coreset

        coreset.BLOCK = args.coreset_block
        params["coreset_block"] = args.coreset_block  # names the cache folder
    command = shlex.join(["python", "-m", "benchmarks.score_rules", *(argv or sys.argv[1:])])
    rows: dict[str, dict[str, float]] = {}
    for name in args.sets:
        rows[name] = evaluate(components(name, params))
        print(name, {k: round(v, 2) for k, v in rows[name].items()}, flush=True)
    table = render(rows, command)
    out = {"command": command, "params": params, "machine": machine(), "rows": rows}
    write_results(RESULTS / f"{args.name}.json", out, table)
    print(table)
    return out


if __name__ == "__main__":
    run()

"""Scoring variants on fine-tuned detectors: test-time flips, whitening, mirrored index.

For each chosen Fashion-MNIST class this fits the detector (the defaults unless
options say otherwise) on that class's training images, embeds the training and test
images and their left-right mirrors with the public ``transform``, and scores the test
set with:

* ``plain``: the detector's own score (kNN on its normalised embeddings);
* ``hflip``: the normalised mean of an image's and its mirror's embedding;
* ``mirror index``: plain queries against an index of the training images and
  their mirrors;
* ``white a=<alpha>``: embeddings centred on the training mean and scaled along
  the training principal axes by ``(eigenvalue + shrink * mean eigenvalue) ** -alpha``
  (``alpha=0.5`` is a shrunk Mahalanobis kNN), with and without ``hflip``.

Embeddings are cached per class under ``--cache-dir`` so that a stopped run resumes
and new variants cost no embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.machine_info import machine
from benchmarks.one_class import RESULTS, load_dataset
from msc_detector import MSCDetector
from msc_detector.index import KNNIndex

CACHE = Path(__file__).resolve().parent / ".cache" / "fitted_variants"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_scores(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Normality scores: minus the summed squared distances to the ``k`` nearest."""
    dists, _ = KNNIndex().fit(train).search(queries, k)
    return -dists.sum(axis=1, dtype=np.float64)


def whitener(train: np.ndarray, alpha: float, shrink: float) -> Callable[[np.ndarray], np.ndarray]:
    """Centre on the training mean and scale the principal axes by shrunk eigenvalues."""
    mean = train.mean(axis=0)
    cov = np.cov((train - mean).T.astype(np.float64))
    vals, vecs = np.linalg.eigh(cov)
    vals = np.clip(vals, 0, None)
    scale = (vals + shrink * vals.mean()) ** -alpha
    proj = (vecs * scale).astype(np.float32)
    return lambda x: (x - mean) @ proj


def embeddings(
    args: argparse.Namespace, cls: int, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray
) -> dict[str, Any]:
    """Fit one class's detector; embed its training and the test images, and mirrors."""
    path = Path(args.cache_dir) / f"{args.name}_class{cls}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {key: cached[key] for key in cached.files}
    normal = x_tr[y_tr == cls]
    # Raw embeddings of each image and its mirror; the averages are formed here.
    params: dict[str, Any] = {
        "random_state": args.seed,
        "flip_average": False,
        "nearest_view": False,
    }
    if args.backbone:
        params["backbone"] = args.backbone
    if args.image_size:
        params["image_size"] = args.image_size
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.lr is not None:
        params["lr"] = args.lr
    if args.frozen_stages is not None:
        params["frozen_stages"] = args.frozen_stages
    start = time.perf_counter()
    det = MSCDetector(**params).fit(normal)
    fit_s = time.perf_counter() - start
    out: dict[str, Any] = {"fit_s": np.float64(fit_s)}
    for split, images in (("train", normal), ("test", x_te)):
        out[split] = det.transform(images)
        out[split + "_mirror"] = det.transform(np.ascontiguousarray(images[:, :, ::-1]))
    print(
        f"class {cls}: fit {fit_s:.0f} s, embedded in {time.perf_counter() - start - fit_s:.0f} s",
        flush=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def variants(e: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Test-set scores of every variant."""
    tr, te = e["train"], e["test"]
    tr_f = _normalise(tr + e["train_mirror"])
    te_f = _normalise(te + e["test_mirror"])
    out = {
        "plain": knn_scores(tr, te, k),
        "hflip": knn_scores(tr_f, te_f, k),
        "mirror index": knn_scores(np.vstack([tr, e["train_mirror"]]), te, k),
    }
    for alpha in (0.25, 0.5):
        for shrink in (0.1, 1.0):
            w = whitener(tr, alpha, shrink)
            out[f"white a={alpha} s={shrink}"] = knn_scores(w(tr), w(te), k)
            wf = whitener(tr_f, alpha, shrink)
            out[f"hflip white a={alpha} s={shrink}"] = knn_scores(wf(tr_f), wf(te_f), k)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--backbone", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--frozen-stages", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-neighbors", type=int, default=2)
    p.add_argument("--name", default="fitted_variants")
    p.add_argument("--cache-dir", default=str(CACHE))
    p.add_argument("--results-dir", default=str(RESULTS / "tuning"))
    args = p.parse_args(argv)
    x_tr, y_tr, x_te, y_te = load_dataset("fashion-mnist", None)
    table: dict[str, dict[int, float]] = {}
    fit_s: dict[int, float] = {}
    for cls in args.classes:
        e = embeddings(args, cls, x_tr, y_tr, x_te)
        fit_s[cls] = float(e["fit_s"])
        for name, scores in variants(e, args.n_neighbors).items():
            table.setdefault(name, {})[cls] = 100 * roc_auc_score(y_te == cls, scores)
        line = "  ".join(f"{n}={v[cls]:.2f}" for n, v in table.items())
        print(f"class {cls}: {line}", flush=True)
    header = "| variant | " + " | ".join(str(c) for c in args.classes) + " | mean |"
    rows = [header, "|---" * (len(args.classes) + 2) + "|"]
    for name, per in table.items():
        vals = [per[c] for c in args.classes]
        rows.append(
            f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {np.mean(vals):.2f} |"
        )
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks.fitted_variants", *given])
    text = "\n".join(
        [f"# {args.name}", "", f"`{command}`", "", *rows, "", f"fit seconds: {fit_s}", ""]
    )
    print(text)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(
        json.dumps(
            {"command": command, "auc": table, "fit_s": fit_s, "machine": machine()}, indent=1
        )
    )


if __name__ == "__main__":
    main()

"""How far do pretrained features go? kNN scoring variants on the one-class protocol.

The detector's score is a kNN distance between embeddings, so the ceiling of any
fine-tuning recipe is set by the features it starts from. This script embeds a data
set's training and test images (and their left-right mirrors) with the public
``MSCDetector(loss=None).transform`` for each chosen backbone and image size, then
scores every class as ``one_class.py`` does (sum of squared distances to the
``--n-neighbors`` nearest training embeddings, ROC-AUC per class and its mean) with:

* ``<setting>``: the embeddings as the detector computes them;
* ``<setting> hflip``: the normalised mean of an image's and its mirror's embedding
  (test-time flip augmentation, applied to the training images too);
* ``<first> + <other>``: the concatenated embeddings of the first setting and each
  other one, and of all settings together (a kNN ensemble: the squared distances add).

Embeddings are cached per setting under ``--cache-dir`` (not committed; about 700 MB a
setting for Fashion-MNIST), so a stopped run resumes where it was and new combinations
cost no embedding. Results go to ``<results-dir>/<name>.json`` and ``.md``.

Example (about 35 minutes on the 2-core CPU)::

    python benchmarks/feature_variants.py --settings efficientnet_lite0:224 \\
        efficientnet_lite0:112 efficientnet_lite1:none efficientnet_lite2:none
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from machine_info import machine
from one_class import DATASETS, RESULTS, DatasetMissing, load_dataset
from sklearn.metrics import roc_auc_score

from msc_detector import MSCDetector

CACHE = Path(__file__).resolve().parent / ".cache"


def parse_setting(text: str) -> tuple[str, int | None]:
    """``"backbone:size"`` -> ``(backbone, size)``; size ``none`` is the backbone's own."""
    backbone, _, size = text.partition(":")
    if not backbone or size.lower() in ("", "none"):
        return backbone, None
    return backbone, int(size)


def embed_setting(
    setting: str, splits: dict[str, np.ndarray], weights: str | None, cache_dir: Path
) -> dict[str, np.ndarray]:
    """Embeddings of every split and its mirror for one setting, cached on disk."""
    path = cache_dir / f"{setting.replace(':', '_')}.npz"
    if path.exists():
        with np.load(path) as cached:
            if set(cached.files) == {f"{s}{m}" for s in splits for m in ("", "_mirror")}:
                return {key: cached[key] for key in cached.files}
    backbone, size = parse_setting(setting)
    first = next(iter(splits.values()))
    detector = MSCDetector(backbone, weights=weights, loss=None, image_size=size)
    detector.fit(first[:16])  # only the network and preprocessing are used
    out: dict[str, np.ndarray] = {}
    for split, images in splits.items():
        for suffix, view in (("", images), ("_mirror", np.ascontiguousarray(images[:, :, ::-1]))):
            start = time.perf_counter()
            out[split + suffix] = detector.transform(view)
            rate = len(view) / (time.perf_counter() - start)
            print(
                f"{setting} ({detector.image_size_} px) {split}{suffix}: {rate:.0f} img/s",
                flush=True,
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_scores(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Normality scores: minus the summed squared distances to the ``k`` nearest."""
    index = faiss.IndexFlatL2(train.shape[1])
    index.add(np.ascontiguousarray(train, dtype=np.float32))
    dists, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return -dists.sum(axis=1, dtype=np.float64)


def variants(
    embeddings: dict[str, dict[str, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scored feature set: ``name -> (train features, test features)``.

    The ensembles pair the first setting with each other one, then join all settings.
    """
    plain = {s: (_normalise(e["train"]), _normalise(e["test"])) for s, e in embeddings.items()}
    out = dict(plain)
    for setting, e in embeddings.items():
        out[f"{setting} hflip"] = (
            _normalise(_normalise(e["train"]) + _normalise(e["train_mirror"])),
            _normalise(_normalise(e["test"]) + _normalise(e["test_mirror"])),
        )
    first, *others = list(plain)
    combos = [(first, other) for other in others]  # the first setting with each other one
    if len(others) > 1:
        combos.append((first, *others))  # and all of them
    for combo in combos:
        out[" + ".join(combo)] = (
            np.hstack([plain[s][0] for s in combo]),
            np.hstack([plain[s][1] for s in combo]),
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--settings",
        nargs="+",
        default=["efficientnet_lite0:none"],
        help="backbone:size pairs; size 'none' is the backbone's own",
    )
    p.add_argument("--weights", default="auto", help="'auto', a path, or 'none' (tests)")
    p.add_argument("--n-neighbors", type=int, default=2)
    p.add_argument("--cache-dir", default=str(CACHE))
    p.add_argument("--name", default="feature_variants")
    p.add_argument("--results-dir", default=str(RESULTS / "tuning"))
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        x_tr, y_tr, x_te, y_te = load_dataset(args.dataset, args.data_root)
    except DatasetMissing as exc:
        print(f"skipped {args.dataset}: {exc}")
        return {}
    weights = None if args.weights.lower() == "none" else args.weights
    splits = {"train": x_tr, "test": x_te}
    embeddings = {
        s: embed_setting(s, splits, weights, Path(args.cache_dir) / args.dataset)
        for s in args.settings
    }
    classes = sorted(np.unique(y_tr).tolist())
    table: dict[str, dict[str, float]] = {}
    for name, (train, test) in variants(embeddings).items():
        table[name] = {
            str(c): float(
                roc_auc_score(y_te == c, knn_scores(train[y_tr == c], test, args.n_neighbors))
            )
            for c in classes
        }
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "settings": {"dataset": args.dataset, "n_neighbors": args.n_neighbors},
        "roc_auc": table,
        "mean_roc_auc": {name: float(np.mean(list(r.values()))) for name, r in table.items()},
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    markdown = render(result, args.name, classes)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    return result


def render(result: dict[str, Any], name: str, classes: list[int]) -> str:
    """Markdown: one row per feature set, one column per class, the mean last."""
    lines = [
        f"# {name}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        "ROC-AUC (%) of kNN on pretrained features (no fine-tuning), per normal class.",
        "",
        "| features | " + " | ".join(str(c) for c in classes) + " | mean |",
        "|---" * (len(classes) + 2) + "|",
    ]
    for variant, row in result["roc_auc"].items():
        cells = " | ".join(f"{100 * row[str(c)]:.2f}" for c in classes)
        mean = 100 * result["mean_roc_auc"][variant]
        lines.append(f"| {variant} | {cells} | **{mean:.2f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()

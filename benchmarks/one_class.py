"""One-class anomaly-detection benchmark, the protocol of the MSC paper.

For each chosen class of a labelled data set, the class's training images are the
training set; the whole test set is scored and every other class counts as an
anomaly. The script reports ROC-AUC per class and its mean, the fit time and the
scoring throughput, in wall-clock and in CPU time of the process (which other jobs on
a shared machine do not inflate), and goes through the public ``MSCDetector`` API only.

Results are written after every class to ``benchmarks/results/<name>.json`` (and a
Markdown table beside it); a re-run with the same ``--name`` skips classes already
done with the same settings, so long runs can be stopped and resumed.

Examples
--------
Pretrained kNN and MSC on Fashion-MNIST, all classes::

    python -m benchmarks.one_class --dataset fashion-mnist --loss none --name fm_none
    python -m benchmarks.one_class --dataset fashion-mnist --loss msc --name fm_msc

CIFAR-10 on a GPU with a ResNet-152 weights file (torchvision format folder)::

    python -m benchmarks.one_class --dataset cifar10 --data-root ~/data \\
        --backbone resnet152 --weights resnet152.pth --epochs 20 --lr 1e-5 \\
        --device cuda --name cifar10_r152

A ResNet-152 trained on unnormalised ``[0, 1]`` inputs (the ``resmem`` file in
``benchmarks/README.md``) needs its own preprocessing::

    python -m benchmarks.one_class --backbone resnet152 --weights resmem/model.pt \\
        --mean 0 0 0 --std 1 1 1 --name fm_resnet152
"""

from __future__ import annotations

import argparse
import json
import pickle
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results
from msc_detector import MSCDetector

DATASETS = ("fashion-mnist", "digits", "opencv-digits", "cifar10", "cifar100")


class DatasetMissing(Exception):
    """A data set that cannot be had on this machine."""


def _cifar(root: Path, coarse: bool) -> tuple[np.ndarray, ...]:
    folder = root / ("cifar-100-python" if coarse else "cifar-10-batches-py")
    if not folder.is_dir():
        raise DatasetMissing(
            f"{folder} not found: CIFAR cannot be downloaded here. Put the torchvision-format "
            "folder (cifar-10-batches-py or cifar-100-python) under --data-root."
        )
    if coarse:
        parts = {"train": ["train"], "test": ["test"]}
        key = "coarse_labels"
    else:
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    out = []
    for split in ("train", "test"):
        images, labels = [], []
        for name in parts[split]:
            with open(folder / name, "rb") as f:  # the data set's own (trusted) pickle files
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[key])
        out += [np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels)]
    return tuple(out)


def _digits(name: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of scikit-learn's digits or of OpenCV's digits."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target
    from msc_detector.datasets import load_opencv_digits

    try:
        return load_opencv_digits(root)
    except FileNotFoundError as exc:
        raise DatasetMissing(str(exc)) from exc


def load_dataset(name: str, root: str | None) -> tuple[np.ndarray, ...]:
    """Return ``(X_train, y_train, X_test, y_test)`` with channels-last uint8 images.

    ``digits`` (scikit-learn's 8 x 8 digits) and ``opencv-digits`` (OpenCV's 20 x 20
    digits, 500 per class) are split in halves, stratified by class, with seed 0.
    """
    if name == "fashion-mnist":
        from msc_detector.datasets import load_fashion_mnist

        try:
            return (*load_fashion_mnist("train", root), *load_fashion_mnist("test", root))
        except FileNotFoundError as exc:
            raise DatasetMissing(str(exc)) from exc
    if name in ("digits", "opencv-digits"):
        images, labels = _digits(name, root)
        x_tr, x_te, y_tr, y_te = train_test_split(
            images, labels, test_size=0.5, stratify=labels, random_state=0
        )
        return x_tr, y_tr, x_te, y_te
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DatasetMissing(f"{name} needs --data-root (a torchvision-format folder).")
        return _cifar(Path(root).expanduser(), coarse=name == "cifar100")
    raise ValueError(f"unknown dataset {name!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-root", default=None, help="folder of the data set's files")
    p.add_argument("--backbone", default=None, help="timm name (default: the detector's)")
    p.add_argument("--weights", default="auto")
    p.add_argument(
        "--loss",
        default=None,
        help="msc, msc_angular, contrastive, center or none (default: the detector's)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", default=None, help="pixels, 'auto' or 'none'")
    p.add_argument("--crop-pct", default=None, help="evaluation crop share, or 'none'")
    p.add_argument("--frozen-stages", default=None)
    p.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        help="per-channel input mean for the backbone's preprocessing (default: its own)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        help="per-channel input std for the backbone's preprocessing (default: its own)",
    )
    p.add_argument(
        "--min-crop-area", type=float, default=None, help="training crop's smallest area share"
    )
    p.add_argument(
        "--flip-average",
        choices=("on", "off", "auto"),
        default=None,
        help="average each image's embedding with its mirror's (default: the detector's)",
    )
    p.add_argument(
        "--nearest-view",
        choices=("on", "off", "auto"),
        default=None,
        help="append a nearest-neighbour-resized view's embedding (default: the detector's)",
    )
    p.add_argument("--train-size", type=int, default=None, help="training images per class")
    p.add_argument("--test-size", type=int, default=None, help="random test subset")
    p.add_argument("--classes", type=int, nargs="*", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-epoch", action="store_true", help="ROC-AUC after every epoch")
    p.add_argument("--name", default=None, help="results file stem (default: from settings)")
    p.add_argument("--results-dir", default=str(RESULTS))
    return p.parse_args(argv)


def detector_params(args: argparse.Namespace) -> dict[str, Any]:
    """Only the settings given on the command line; the rest are the detector's defaults."""
    params: dict[str, Any] = {"device": args.device, "random_state": args.seed}
    if args.loss is not None:
        params["loss"] = None if args.loss.lower() == "none" else args.loss
    if args.weights != "auto":
        params["weights"] = None if args.weights.lower() == "none" else args.weights
    optional = {
        "backbone": args.backbone,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "min_crop_area": args.min_crop_area,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.image_size is not None:
        size = args.image_size.lower()
        params["image_size"] = None if size == "none" else size if size == "auto" else int(size)
    if args.crop_pct is not None:
        params["crop_pct"] = None if args.crop_pct.lower() == "none" else float(args.crop_pct)
    if args.flip_average is not None:
        flip = args.flip_average
        params["flip_average"] = flip if flip == "auto" else flip == "on"
    if args.nearest_view is not None:
        view = args.nearest_view
        params["nearest_view"] = view if view == "auto" else view == "on"
    if args.frozen_stages is not None:
        fs = args.frozen_stages
        params["frozen_stages"] = fs if fs == "auto" else int(fs)
    preprocess = {k: tuple(v) for k, v in (("mean", args.mean), ("std", args.std)) if v}
    if preprocess:
        params["preprocess"] = preprocess
    return params


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        x_tr, y_tr, x_te, y_te = load_dataset(args.dataset, args.data_root)
    except DatasetMissing as exc:
        print(f"skipped {args.dataset}: {exc}")
        return {}
    rng = np.random.default_rng(args.seed)
    if args.test_size is not None and args.test_size < len(x_te):
        keep = np.sort(rng.permutation(len(x_te))[: args.test_size])
        x_te, y_te = x_te[keep], y_te[keep]
    params = detector_params(args)
    resolved = MSCDetector(**params).get_params()
    resolved.pop("epoch_callback")
    classes = args.classes if args.classes else sorted(np.unique(y_tr).tolist())
    name = args.name or f"{args.dataset}_{resolved['loss'] or 'none'}"
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    settings = {
        "dataset": args.dataset,
        "train_size": args.train_size,
        "test_size": len(x_te),
        "params": {k: str(v) for k, v in resolved.items()},
    }
    result: dict[str, Any] = {"settings": settings, "classes": {}}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            result = previous
        else:
            print(f"{path} holds other settings; starting it afresh")
    # A resumed run keeps the command and machine of its first classes; a class fitted
    # under other conditions (threads, versions) records its own.
    command = shlex.join(["python", "-m", "benchmarks.one_class", *(argv or sys.argv[1:])])
    current = machine()
    result.setdefault("command", command)
    result.setdefault("machine", current)

    for cls in classes:
        if str(cls) in result["classes"]:
            continue
        train = x_tr[y_tr == cls]
        if args.train_size is not None:
            train = train[np.sort(rng.permutation(len(train))[: args.train_size])]
        is_normal = (y_te == cls).astype(int)
        per_epoch: dict[int, float] = {}

        def follow(
            epoch: int,
            det: MSCDetector,
            target: np.ndarray = is_normal,
            store: dict[int, float] = per_epoch,
        ) -> None:
            store[epoch] = float(roc_auc_score(target, det.score_samples(x_te)))

        extra = {"epoch_callback": follow} if args.per_epoch and resolved["loss"] else {}
        start, cpu = time.perf_counter(), time.process_time()
        det = MSCDetector(**params, **extra).fit(train)
        fit_seconds, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        scores = det.score_samples(x_te)
        score_seconds, score_cpu = time.perf_counter() - start, time.process_time() - cpu
        row = {
            "roc_auc": float(roc_auc_score(is_normal, scores)),
            "fit_seconds": fit_seconds,
            "score_images_per_second": len(x_te) / score_seconds,
            "fit_cpu_seconds": fit_cpu,
            "score_images_per_cpu_second": len(x_te) / score_cpu,
            "n_train": len(train),
            "final_loss": det.history_[-1]["loss"] if det.history_ else None,
        }
        if per_epoch:
            row["roc_auc_per_epoch"] = {str(k): v for k, v in sorted(per_epoch.items())}
        if current != result["machine"]:
            row["machine"] = current
            row["command"] = command
        result["classes"][str(cls)] = row
        print(
            f"class {cls}: ROC-AUC {100 * row['roc_auc']:.2f}  fit {fit_seconds:.0f}s  "
            f"scoring {row['score_images_per_second']:.0f} img/s",
            flush=True,
        )
        write(result, path)  # after every class, so that a stopped run keeps it
    print(render(result, path))
    return result


def write(result: dict[str, Any], path: Path) -> str:
    """Write JSON and Markdown; return the Markdown table."""
    aucs = [r["roc_auc"] for r in result["classes"].values()]
    result["mean_roc_auc"] = float(np.mean(aucs)) if aucs else None
    table = render(result, path)
    write_results(path, result, table)
    return table


def render(result: dict[str, Any], path: Path) -> str:
    """The Markdown report of ``result``."""
    rows = result["classes"]
    aucs = [r["roc_auc"] for r in rows.values()]
    lines = [
        f"# {path.stem}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        "| class | ROC-AUC % | fit s | scoring img/s | fit CPU s | scoring img/CPU s "
        "| n train | per-epoch ROC-AUC % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cls, r in rows.items():
        epochs = " ".join(f"{100 * v:.2f}" for v in r.get("roc_auc_per_epoch", {}).values())
        fit_cpu = r.get("fit_cpu_seconds")  # older rows have no CPU times
        fit_cpu = "" if fit_cpu is None else f"{fit_cpu:.0f}"
        lines.append(
            f"| {cls} | {100 * r['roc_auc']:.2f} | {r['fit_seconds']:.0f} | "
            f"{_rate(r['score_images_per_second'])} | {fit_cpu} | "
            f"{_rate(r.get('score_images_per_cpu_second'))} | {r['n_train']} | {epochs} |"
        )
    if aucs:
        fit = np.mean([r["fit_seconds"] for r in rows.values()])
        cpus = [r["fit_cpu_seconds"] for r in rows.values() if "fit_cpu_seconds" in r]
        fit_cpu = f"{np.mean(cpus):.0f}" if len(cpus) == len(rows) else ""
        lines.append(
            f"| **mean** | **{100 * np.mean(aucs):.2f}** | {fit:.0f} | | {fit_cpu} | | | |"
        )
    for cls, r in rows.items():
        if "machine" in r:
            own = json.dumps(r["machine"])
            lines += ["", f"Class {cls} was fitted by `{r['command']}` on: {own}"]
    return "\n".join(lines) + "\n"


def _rate(value: float | None) -> str:
    """Images per second with three significant figures or more; blank for none."""
    return "" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.3g}"


if __name__ == "__main__":
    run()

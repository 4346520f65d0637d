"""Time a fit in one process against the same fit in ``torchrun`` processes (gloo, CPU).

Both sides fit :class:`msc_detector.MSCDetector` (EfficientNet-Lite0, bundled weights)
on the same normal images of one Fashion-MNIST class (scikit-learn's digits without it)
with the same parameters and seed, so they train on the same global batches; rank 0
(or the single process) then scores a test set.

* **1 process**: ``python -m benchmarks.torchrun_speed --worker``, with
  ``OMP_NUM_THREADS`` set to the number of cores given to the other side.
* **N processes**: ``torchrun --standalone --nproc-per-node=N`` of the same worker,
  one thread per process (``torchrun``'s default).

Measured: the wall time of ``fit`` (excluding the interpreter start and imports), the
training epochs alone (``history_``), the whole command including process start, and
the test ROC-AUC. On a CPU the processes share the cores that one process would use
with threads, so no speed-up is expected there; the run shows the cost of the
collectives and of duplicated work (every rank resizes all images). Timings need a
quiet machine: take them under the shared lock.

Example::

    python -m benchmarks.torchrun_speed --nproc 2 --n-train 512 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.output import RESULTS

ROOT = Path(__file__).resolve().parents[1]


def load_data(n_train: int, n_test: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Return the data set's name, normal training images, test images and normal flags."""
    from sklearn.datasets import load_digits

    from msc_detector.datasets import load_fashion_mnist

    try:
        X_train, y_train = load_fashion_mnist("train")
        X_test, y_test = load_fashion_mnist("test")
        name = "Fashion-MNIST"
    except FileNotFoundError:
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        half = len(images) // 2
        X_train, y_train, X_test, y_test = (
            images[:half], digits.target[:half], images[half:], digits.target[half:]
        )  # fmt: skip
        name = "digits"
    normal = 1
    return name, X_train[y_train == normal][:n_train], X_test[:n_test], y_test[:n_test] == normal


def worker(args: argparse.Namespace) -> None:
    """Fit once (in this process or as one rank); rank 0 writes ``args.json_out``."""
    import torch.distributed as dist
    from sklearn.metrics import roc_auc_score

    from msc_detector import MSCDetector

    name, X_normal, X_test, is_normal = load_data(args.n_train, args.n_test)
    detector = MSCDetector(
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        random_state=0,
    )
    start = time.perf_counter()
    detector.fit(X_normal)
    fit_seconds = time.perf_counter() - start
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        auc = roc_auc_score(is_normal, detector.decision_function(X_test))
        record = {
            "data": name,
            "processes": world,
            "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "0")),
            "n_train": len(X_normal),
            "fit_seconds": fit_seconds,
            "train_seconds": sum(h["seconds"] for h in detector.history_),
            "final_loss": detector.history_[-1]["loss"],
            "roc_auc": float(auc),
            "precision": detector.precision_.name,
        }
        Path(args.json_out).write_text(json.dumps(record, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_side(args: argparse.Namespace, processes: int, out: Path) -> dict:
    """Run the worker in ``processes`` processes; return its record plus the wall time."""
    flags = [
        "--worker", "--json-out", str(out), "--n-train", str(args.n_train),
        "--n-test", str(args.n_test), "--image-size", str(args.image_size),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if processes == 1:
        env["OMP_NUM_THREADS"] = str(args.nproc)  # the cores the other side uses
        command = [sys.executable, "-m", "benchmarks.torchrun_speed", *flags]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "benchmarks.torchrun_speed", *flags,
        ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=ROOT)
    record = json.loads(out.read_text())
    record["command_seconds"] = time.perf_counter() - start
    return record


def table(rows: list[dict]) -> str:
    """Markdown table of the sides."""
    lines = [
        "| processes | threads/process | fit (s) | training epochs (s) | whole command (s) "
        "| final loss | ROC-AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['fit_seconds']:.1f} "
            f"| {r['train_seconds']:.1f} | {r['command_seconds']:.1f} | {r['final_loss']:.4f} "
            f"| {r['roc_auc']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out-name", default="torchrun_speed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    RESULTS.mkdir(exist_ok=True)
    rows = [
        run_side(args, 1, RESULTS / f"{args.out_name}_single.json"),
        run_side(args, args.nproc, RESULTS / f"{args.out_name}_torchrun.json"),
    ]
    settings = (
        f"{rows[0]['data']}, {args.n_train} normal training images, image_size "
        f"{args.image_size}, {args.epochs} epoch(s), global batch {args.batch_size}, "
        f"precision {rows[0]['precision']}; machine: {os.cpu_count()} CPU cores (shared)."
    )
    text = f"{settings}\n\n{table(rows)}\n"
    print(text)
    (RESULTS / f"{args.out_name}.md").write_text(text)
    (RESULTS / f"{args.out_name}.json").write_text(
        json.dumps({"settings": vars(args), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()

"""Fine-tune on several GPUs with ``torchrun``, save from rank 0, score the test set.

Launch one process per GPU on one machine (here 8)::

    torchrun --standalone --nproc-per-node=8 examples/multi_gpu.py --out model.msc

``fit`` finds the job that ``torchrun`` started (its ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``), initialises the process group (NCCL) and runs each rank on
``cuda:LOCAL_RANK``. Every rank gets the whole training set and the same parameters;
each embeds its share, trains on its part of every global batch of ``batch_size``
images with the negatives of the whole batch, and ends with the same fitted detector.
Rank 0 saves it, and scores the test images.

The same script runs on CPUs with gloo, for a try on a laptop (small budget, about a
minute on two cores)::

    torchrun --standalone --nproc-per-node=2 examples/multi_gpu.py \\
        --n-train 256 --image-size 32 --batch-size 32

Training images: one Fashion-MNIST class (Debian's ``dataset-fashion-mnist``), or
scikit-learn's digits where Fashion-MNIST is not installed; the other classes are the
anomalies of the test set.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from msc_detector import MSCDetector
from msc_detector.datasets import load_fashion_mnist


def load_data(n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return normal training images, test images and the test images' normal flags."""
    try:
        X_train, y_train = load_fashion_mnist("train")
        X_test, y_test = load_fashion_mnist("test")
    except FileNotFoundError:
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        half = len(images) // 2
        X_train, y_train = images[:half], digits.target[:half]
        X_test, y_test = images[half:], digits.target[half:]
    normal = 1
    return X_train[y_train == normal][:n_train], X_test[:n_test], y_test[:n_test] == normal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000, help="normal training images")
    parser.add_argument("--n-test", type=int, default=2000, help="test images, all classes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="global batch: images per step, all ranks"
    )
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's")
    parser.add_argument("--out", default="model.msc", help="model file written by rank 0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    X_normal, X_test, is_normal = load_data(args.n_train, args.n_test)
    detector = MSCDetector(
        epochs=args.epochs,
        batch_size=args.batch_size,  # a multiple of the number of processes
        image_size=args.image_size,
        random_state=0,  # every rank must use the same parameters
    )
    start = time.perf_counter()
    detector.fit(X_normal)  # every rank calls fit with the whole training set
    seconds = time.perf_counter() - start

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:  # all ranks hold the same detector: one saves and scores
        detector.save(args.out)
        auc = roc_auc_score(is_normal, detector.decision_function(X_test))
        print(
            f"{world} process(es) on {detector.device_}: fit on {len(X_normal)} images in "
            f"{seconds:.1f} s, final loss {detector.history_[-1]['loss']:.4f}; "
            f"test ROC-AUC {auc:.4f}; saved to {args.out}"
        )
    if dist.is_initialized():
        dist.barrier()  # the others wait until rank 0 has saved
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

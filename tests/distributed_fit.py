"""Worker of tests/test_distributed.py, run by ``torchrun --nproc-per-node=2`` (gloo).

Each rank fits the detector of :func:`detector` on :func:`train_images` and writes, to
``<out>/rank<r>.pt``, its network's weights, its fitted arrays, its scores of
:func:`test_images` and the results of a few collectives; rank 0 also saves the model
file ``<out>/model.msc``. The test compares them with a single-process fit.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from msc_detector import MSCDetector, distributed

# 21 images, global batch 8: two steps per epoch, 5 images left over; shards of 11 and 10.
N_TRAIN, BATCH = 21, 8
PARAMS: dict[str, Any] = {
    "weights": None,
    "image_size": 32,
    "epochs": 1,
    "batch_size": BATCH,
    "lr": 0.05,  # large enough that one epoch moves the weights far beyond the tolerance
    "nearest_view": True,  # a second, fixed view: its embedding is sharded too
    "precision": "fp32",
    "device": "cpu",
    "random_state": 0,
    # The kNN scores are compared at 1e-5: the combined score's median/MAD calibration
    # magnifies one- against two-thread rounding in the patch distances (about 1e-4);
    # the ranks' banks and maps are compared on their own.
    "image_score": "global",
}


def train_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8)


def test_images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


def detector(**changes: Any) -> MSCDetector:
    return MSCDetector(**{**PARAMS, **changes})


def fit() -> tuple[MSCDetector, dict[str, Any]]:
    """Fit :func:`detector` on :func:`train_images`; return it and what the test compares.

    ``epoch_callback`` keeps the leave-self-out training scores after each epoch and
    the initial weights.
    """
    seen: dict[str, Any] = {}

    def keep(epoch: int, det: MSCDetector) -> None:
        seen[f"train_scores_{epoch}"] = det.train_scores_.copy()
        if epoch == 0:
            seen["before"] = {k: v.clone() for k, v in det.backbone_.state_dict().items()}

    det = detector(epoch_callback=keep).fit(train_images())
    det.set_params(epoch_callback=None)  # a callback is not stored in a model file
    return det, {**results(det), "callback": seen}


def results(det: MSCDetector) -> dict[str, Any]:
    """Weights, fitted arrays and scores of a fitted detector."""
    return {
        "state": {k: v.detach().clone() for k, v in det.backbone_.state_dict().items()},
        "center": det.center_,
        "train_scores": det.train_scores_,
        "offset": det.offset_,
        "loss": det.history_[0]["loss"],
        "scores": det.score_samples(test_images()),
        "embeddings": det.transform(train_images()),
        "bank": det.patch_bank_.vectors(),
        "maps": det.anomaly_map(test_images()),
    }


def collectives(cluster: distributed.Cluster) -> dict[str, Any]:
    """Run the helpers on rank-dependent inputs, for the test to check."""
    rank = cluster.rank
    uneven = np.arange(3 * (1 - rank) * 2, dtype=np.float32).reshape(-1, 2) + 100 * rank
    distributed._GATHER_BYTES = 8  # one row per round: exercise the rounds
    rounds = cluster.gather_rows(np.full((rank + 2, 3), rank, np.int64))
    distributed._GATHER_BYTES = 64 * 2**20
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = cluster.gather_with_grad(x)  # (4, 3)
    weights = torch.arange(12, dtype=torch.float32).view(4, 3)
    (gathered * weights).sum().backward()
    return {
        "uneven": cluster.gather_rows(uneven),
        "rounds": rounds,
        "sum": cluster.sum(np.array([rank + 1.0, 2.0])),
        "broadcast": cluster.broadcast_int(10 + rank),
        "gathered": gathered.detach(),
        "grad": x.grad,
    }


def main(out: Path) -> None:
    cluster = distributed.current()
    assert cluster is not None and cluster.world_size == 2
    rank = cluster.rank
    det, record = fit()
    if rank == 0:
        det.save(out / "model.msc")
    try:
        detector(batch_size=7).fit(train_images())
        uneven_batch = ""
    except ValueError as exc:
        uneven_batch = str(exc)
    record.update(
        collectives=collectives(cluster),
        uneven_batch_error=uneven_batch,
        unpickled_scores=pickle.loads(pickle.dumps(det)).score_samples(test_images()),
    )
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

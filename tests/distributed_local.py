"""Worker of tests/test_distributed.py's local-fit test, run by ``torchrun --nproc-per-node=2``.

Rank 0 calls ``fit`` alone twice, before the process group exists and inside it, while
rank 1 waits (on torchrun's store, then at a barrier); each attempt must fail within
``MSC_DETECTOR_JOIN_TIMEOUT`` seconds. Both ranks then fit detectors of their own inside
:func:`msc_detector.distributed.local` (on different images, which a joint fit would
refuse) and fit jointly before and after, as a job does. Each rank writes what it saw
to ``<out>/local<r>.pt``. No fit trains (``epochs=0``, a tiny network): what matters is
who joins.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import distributed_fit as shared
import torch
import torch.distributed as dist
from conftest import MODULE_PRE, small_module

from msc_detector import MSCDetector, distributed

# A tiny network of torch's own layers, the same on every rank; no training, no patch bank.
PARAMS = {
    "backbone": small_module(),
    "preprocess": MODULE_PRE,
    "image_size": 32,
    "epochs": 0,
    "patch_memory": None,
    "batch_size": 8,
    "device": "cpu",
    "random_state": 0,
}
QUICK, PATIENT = (
    "2",
    "300",
)  # seconds to wait for the other rank: when it will not come, when it will


def alone(record: dict[str, Any], name: str) -> None:
    """Fit on this rank alone and keep the error and the seconds it took."""
    os.environ["MSC_DETECTOR_JOIN_TIMEOUT"] = QUICK
    start = time.monotonic()
    try:
        MSCDetector(**PARAMS).fit(shared.train_images())
        record[name] = ""
    except TimeoutError as exc:
        record[name] = str(exc)
    record[f"{name}_seconds"] = time.monotonic() - start
    os.environ["MSC_DETECTOR_JOIN_TIMEOUT"] = PATIENT


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    os.environ["MSC_DETECTOR_JOIN_TIMEOUT"] = PATIENT
    store = dist.TCPStore(  # torchrun's store, to wait on before the group exists
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=300),
    )
    record: dict[str, Any] = {}
    if rank == 0:
        alone(record, "before_group")
        record["group_after_failure"] = dist.is_initialized()
        store.set("test/rank0_tried", "1")
    else:
        store.wait(["test/rank0_tried"])
    joint = MSCDetector(**PARAMS).fit(shared.train_images())  # creates the group
    if rank == 0:
        alone(record, "in_group")
    dist.barrier()  # rank 1 waits here meanwhile
    with distributed.local():
        own = MSCDetector(**PARAMS).fit(shared.train_images()[rank:])  # 21 or 20 images
        record["local_cluster"] = distributed.current()
    record["local_scores"] = own.score_samples(shared.test_images())
    again = MSCDetector(**PARAMS).fit(shared.train_images())
    record["joint_scores"] = joint.score_samples(shared.test_images())
    record["again_scores"] = again.score_samples(shared.test_images())
    torch.save(record, out / f"local{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Two processes under ``torchrun`` (gloo, CPU) fit what one process fits.

``tests/distributed_fit.py`` runs under ``torchrun --standalone --nproc-per-node=2``;
every rank writes its network, fitted arrays and scores. A single-process fit with the
same parameters and seed trains on the same global batches (8 images, two steps, the
5 left over dropped) with the same augmentation, so the two must agree up to the
rounding of sums taken in another order (the measured differences are about 3e-7 on
weights that moved by 0.09, so a gradient off by a factor, a centre or a set of
negatives from one rank only would fail by orders of magnitude). That equality is
the check that sharding, the gathered loss, the gradient scaling and the centre are
right. The ranks must agree with each other exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import distributed_fit as worker
import distributed_local
import numpy as np
import pytest
import torch
import torch.distributed as dist

from msc_detector import MSCDetector, distributed
from msc_detector.augment import TwoViewAugment

ROOT = Path(__file__).resolve().parents[1]
# Largest differences accepted between the two-process and the single-process fit.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def torchrun_two(script: str, out: Path, timeout: float) -> None:
    """Run ``tests/<script> <out>`` under torchrun in two CPU processes; fail on an error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(ROOT / "tests" / script), str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """Each rank's record from one two-process run, and the run's output folder."""
    out = tmp_path_factory.mktemp("torchrun")
    torchrun_two("distributed_fit.py", out, timeout=300)
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return records, out


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """The same fit in this process, which has no process group."""
    return worker.fit()[1]


def test_two_processes_train_the_network_one_process_trains(
    ranks: tuple[list[dict[str, Any]], Path], single: dict[str, Any]
) -> None:
    state = ranks[0][0]["state"]
    before = single["callback"]["before"]
    moved = max(float((single["state"][k] - v).abs().max()) for k, v in before.items())
    assert moved > 1e3 * TOLERANCE["atol"]  # the comparison below is not of untrained nets
    for name, expected in single["state"].items():
        torch.testing.assert_close(state[name], expected, **TOLERANCE, msg=name)
    assert ranks[0][0]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_center_index_and_scores_match_the_single_process_fit(
    ranks: tuple[list[dict[str, Any]], Path], single: dict[str, Any]
) -> None:
    record = ranks[0][0]
    for key in ("center", "embeddings", "train_scores", "scores"):
        np.testing.assert_allclose(record[key], single[key], **TOLERANCE, err_msg=key)
    for epoch in (0, 1):  # the detectors handed to epoch_callback
        key = f"train_scores_{epoch}"
        np.testing.assert_allclose(record["callback"][key], single["callback"][key], **TOLERANCE)
    assert record["offset"] == pytest.approx(single["offset"], rel=1e-5, abs=1e-6)
    assert len(record["train_scores"]) == worker.N_TRAIN  # every rank's rows are indexed


def test_every_rank_ends_with_the_same_detector(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    first, second = ranks[0]
    for name, value in first["state"].items():
        torch.testing.assert_close(second["state"][name], value, rtol=0, atol=0, msg=name)
    for key in ("center", "embeddings", "train_scores", "scores", "bank", "maps"):
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)
    assert (second["offset"], second["loss"]) == (first["offset"], first["loss"])


def test_the_model_saved_by_rank_0_loads_and_scores_as_the_ranks_do(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    records, out = ranks
    for record in records:
        np.testing.assert_array_equal(record["unpickled_scores"], record["scores"])
    loaded = MSCDetector.load(out / "model.msc")
    np.testing.assert_allclose(
        loaded.score_samples(worker.test_images()), records[0]["scores"], **TOLERANCE
    )


def test_a_global_batch_that_does_not_split_evenly_is_refused_on_every_rank(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    for record in ranks[0]:
        assert "batch_size=7 is the global batch" in record["uneven_batch_error"]
        assert "use batch_size=6 or 8" in record["uneven_batch_error"]


def test_collectives_return_every_ranks_rows_in_rank_order(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    first, second = (record["collectives"] for record in ranks[0])
    for got in (first, second):
        # rank 0 holds rows [[0, 1], [2, 3], [4, 5]], rank 1 none
        np.testing.assert_array_equal(got["uneven"], np.arange(6, dtype=np.float32).reshape(3, 2))
        np.testing.assert_array_equal(got["rounds"], [[0] * 3] * 2 + [[1] * 3] * 3)
        np.testing.assert_array_equal(got["sum"], [3.0, 4.0])
        assert got["broadcast"] == 10
        torch.testing.assert_close(
            got["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2)
        )
    # Each rank's loss is sum(gathered * w), w = arange(12).view(4, 3): the gradient of
    # its own rows is the sum over both ranks, twice its rows of w.
    weights = torch.arange(12, dtype=torch.float32).view(4, 3)
    torch.testing.assert_close(first["grad"], 2 * weights[:2])
    torch.testing.assert_close(second["grad"], 2 * weights[2:])


def test_a_single_process_is_no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.current() is None
    assert distributed.local_device() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current() is None


def test_shards_cover_the_images_in_order_and_batches_split_evenly() -> None:
    ranks = [distributed.Cluster(r, 3, torch.device("cpu")) for r in range(3)]
    shards = [cluster.shard(8) for cluster in ranks]
    assert [len(s) for s in shards] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(8))
    assert ranks[0].local_batch(12) == 4
    with pytest.raises(ValueError, match="must be a multiple of 3; use batch_size=9 or 12"):
        ranks[1].local_batch(10)


def test_augmenting_a_part_gives_those_rows_of_the_whole_batch() -> None:
    batch = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    augment = TwoViewAugment(32, (0.5,) * 3, (0.25,) * 3)
    whole = augment(batch, torch.Generator().manual_seed(3))
    part = augment(batch[2:4], torch.Generator().manual_seed(3), part=(2, 6))
    for got, expected in zip(part, whole, strict=True):
        torch.testing.assert_close(got, expected[2:4], rtol=0, atol=1e-6)


# ------------------------------------------------ fitting alone inside a job


@pytest.fixture(scope="module")
def local_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's record from tests/distributed_local.py under torchrun (2 processes)."""
    out = tmp_path_factory.mktemp("torchrun_local")
    torchrun_two("distributed_local.py", out, timeout=240)
    return [torch.load(out / f"local{r}.pt", weights_only=False) for r in range(2)]


def test_a_fit_on_one_rank_alone_fails_quickly_and_names_the_way_to_fit_locally(
    local_ranks: list[dict[str, Any]],
) -> None:
    record = local_ranks[0]
    for attempt in ("before_group", "in_group"):  # torchrun's store, then the group's
        message = record[attempt]
        assert "Process 0 of 2 in a torch.distributed job called fit" in message
        assert "process(es) 1 did not call fit" in message
        assert "`with msc_detector.distributed.local():`" in message
        assert "raise MSC_DETECTOR_JOIN_TIMEOUT (seconds; now 2)" in message
        assert 2 <= record[f"{attempt}_seconds"] < 30  # not the group's 30 minutes
    assert not record["group_after_failure"]


def test_local_fits_inside_a_job_are_single_process_fits_and_joint_fits_go_on(
    local_ranks: list[dict[str, Any]],
) -> None:
    for rank, record in enumerate(local_ranks):
        assert record["local_cluster"] is None
        # Each rank fitted its own images (21 and 20, which a joint fit refuses).
        single = MSCDetector(**distributed_local.PARAMS).fit(worker.train_images()[rank:])
        np.testing.assert_allclose(
            record["local_scores"], single.score_samples(worker.test_images()), **TOLERANCE
        )
        # After the failed attempts, every rank's next joint fit met the others again.
        np.testing.assert_array_equal(record["again_scores"], record["joint_scores"])
    np.testing.assert_array_equal(local_ranks[1]["joint_scores"], local_ranks[0]["joint_scores"])
    assert not np.array_equal(local_ranks[0]["local_scores"], local_ranks[1]["local_scores"])


def test_local_keeps_fit_out_of_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: current() would create a group
    assert not distributed.fits_locally()
    with distributed.local():
        assert distributed.fits_locally()
        with distributed.local():
            assert distributed.current() is None
        assert distributed.fits_locally() and distributed.current() is None
    assert not distributed.fits_locally() and not dist.is_initialized()


def test_the_join_handshake_times_out_naming_the_absent_ranks_and_meets_again() -> None:
    store = dist.HashStore()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"Process 0 of 3 .* process\(es\) 1, 2 did not call"):
        distributed._handshake(store, 0, 3, timeout=0.5)
    assert time.monotonic() - start < 10
    # Rank 0 withdrew and did not count the attempt: the next fit of all three meets.
    errors: list[BaseException] = []

    def join(rank: int) -> None:
        try:
            distributed._handshake(store, rank, 3, timeout=60)
        except BaseException as exc:  # reported below
            errors.append(exc)

    for _ in range(2):  # two joint fits in a row
        threads = [threading.Thread(target=join, args=(rank,)) for rank in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors


def test_the_join_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed._join_timeout(None) == distributed.JOIN_TIMEOUT == 60
    monkeypatch.setenv("MSC_DETECTOR_JOIN_TIMEOUT", "2.5")
    assert distributed._join_timeout(None) == 2.5 and distributed._join_timeout(7) == 7
    monkeypatch.setenv("MSC_DETECTOR_JOIN_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MSC_DETECTOR_JOIN_TIMEOUT='soon' must be a number"):
        distributed._join_timeout(None)

"""Multi-process fine-tuning over ``torch.distributed`` (one process per GPU, ``torchrun``).

A :class:`Cluster` is this process's place in a multi-process job: its rank, the
number of processes and the device its collectives use. :func:`current` finds the
job (a default process group that is already initialised, or ``torchrun``'s
environment, from which it initialises one) and returns ``None`` in a plain single
process, so that single-process code paths stay exactly as they are.

The collectives work on numpy arrays and return the same result on every rank:
:meth:`Cluster.gather_rows` (every rank's rows, in rank order, any row counts),
:meth:`Cluster.mean_rows`, :meth:`Cluster.sum` and :meth:`Cluster.broadcast_int`.
:meth:`Cluster.gather_with_grad` gathers a tensor inside autograd: its backward sums
every rank's gradient and keeps this rank's rows, as SimCLR-style libraries do.

When this module initialises the default process group it uses NCCL where the
rank has a CUDA device and gloo otherwise, with torch's default timeouts (10 minutes
for NCCL, 30 for gloo): a rank that waits longer than that in a collective for a
failed rank raises. A process group initialised before ``fit`` is used as it is, so
call :func:`torch.distributed.init_process_group` first for another timeout or backend.
The group outlives ``fit``; :func:`torch.distributed.destroy_process_group` ends it.

Every ``fit`` inside a process group is a joint fit of all its processes. Joining
starts with a handshake through the group's store: a process waits at most
:data:`JOIN_TIMEOUT` seconds (the environment variable ``MSC_DETECTOR_JOIN_TIMEOUT``
overrides it) for the others to call ``fit`` too, and otherwise raises a
``TimeoutError`` that says so, instead of waiting in a collective until the group's
timeout. To fit in one process alone inside a group (to evaluate on rank 0, say), wrap
the fit in :func:`local`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["JOIN_TIMEOUT", "Cluster", "current", "fits_locally", "local", "local_device"]

logger = logging.getLogger(__name__)

# Bytes a rank sends per all-gather round in gather_rows: bounds the receive buffers
# (world size times this) when whole embedding sets are gathered.
_GATHER_BYTES = 64 * 2**20

#: Seconds a process waits in ``fit`` for the other processes of its job to call ``fit``.
JOIN_TIMEOUT = 60.0
_JOIN_TIMEOUT_VARIABLE = "MSC_DETECTOR_JOIN_TIMEOUT"
_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("msc_detector_local", default=False)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Fit in this process alone, also inside a multi-process job.

    Inside the ``with`` block, :func:`current` finds no job: ``fit`` takes the
    single-process path, touches no process group (and initialises none) and waits for
    no other process. Use it where one rank fits a detector of its own, such as an
    evaluation on rank 0 after a joint fit::

        with msc_detector.distributed.local():
            probe = MSCDetector(...).fit(X_val)

    ``device="auto"`` then means the current CUDA device, as in any single process; on
    a rank other than 0 pass ``device=f"cuda:{local_rank}"`` or call
    :func:`torch.cuda.set_device` first. The setting follows the context (threads and
    tasks started inside inherit it, others do not).
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def fits_locally() -> bool:
    """Whether this context fits in this process alone (inside :func:`local`)."""
    return _LOCAL.get()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def _may_use_cuda(device: str | torch.device) -> bool:
    """Whether a device specification is ``"auto"`` or a CUDA device."""
    if isinstance(device, str) and device == "auto":
        return True
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):  # an invalid string: resolving it reports it
        return False


def local_device() -> torch.device | None:
    """Return this rank's GPU under a multi-process launch (``cuda:LOCAL_RANK``).

    ``None`` in a single process, where there is no CUDA device, or when ``LOCAL_RANK``
    names a device that does not exist.
    """
    started = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not (started or _env_int("WORLD_SIZE", 1) > 1) or not torch.cuda.is_available():
        return None
    local_rank = _env_int("LOCAL_RANK", 0)
    if local_rank >= torch.cuda.device_count():
        return None
    return torch.device("cuda", local_rank)


def current(
    device: str | torch.device = "auto", join_timeout: float | None = None
) -> Cluster | None:
    """Find this process's multi-process job and join it; ``None`` in a single process.

    Uses the default process group when one is initialised; otherwise, when
    ``torchrun`` (or any ``env://`` launcher) set ``WORLD_SIZE`` above 1, initialises
    it from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
    with NCCL on a rank with a CUDA device and gloo otherwise. Every process of the job
    must call it (``fit`` does): it waits at most ``join_timeout`` seconds for all of
    them, through the group's store (under torchrun also before the group exists).

    Parameters
    ----------
    device : str or torch.device, default="auto"
        Where the process computes; a new group uses NCCL only where this is
        ``"auto"`` or a CUDA device and the rank has a GPU.

    join_timeout : float, optional
        Seconds to wait for the other processes to call ``fit`` too; default
        ``MSC_DETECTOR_JOIN_TIMEOUT`` from the environment, else :data:`JOIN_TIMEOUT`.

    Returns
    -------
    Cluster or None
        ``None`` when there is one process (also for an initialised group of size 1)
        and inside :func:`local`.

    Raises
    ------
    TimeoutError
        When the other processes do not join within ``join_timeout``.
    """
    if fits_locally() or not dist.is_available():
        return None
    timeout = _join_timeout(join_timeout)
    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size <= 1:
            return None
        # Under torchrun the agent's store exists before the group: meet there first, as
        # creating the group would wait for the other processes until its own timeout.
        _handshake(_agent_store(timeout), _env_int("RANK", 0), world_size, timeout)
        gpu = local_device()
        if gpu is not None and _may_use_cuda(device):
            dist.init_process_group("nccl", device_id=gpu)
        else:
            dist.init_process_group("gloo")
    elif dist.get_world_size() > 1:
        _handshake(_group_store(), dist.get_rank(), dist.get_world_size(), timeout)
    world_size = dist.get_world_size()
    if world_size <= 1:
        return None
    if dist.get_backend() == dist.Backend.NCCL:
        index = _env_int("LOCAL_RANK", torch.cuda.current_device())
        comm = torch.device("cuda", index)
    else:
        comm = torch.device("cpu")
    return Cluster(rank=dist.get_rank(), world_size=world_size, device=comm)


def _join_timeout(given: float | None) -> float:
    if given is not None:
        return float(given)
    value = os.environ.get(_JOIN_TIMEOUT_VARIABLE, "")
    try:
        return float(value) if value else JOIN_TIMEOUT
    except ValueError:
        raise ValueError(
            f"{_JOIN_TIMEOUT_VARIABLE}={value!r} must be a number of seconds."
        ) from None


def _agent_store(timeout: float) -> Any:
    """Return a client of torchrun's agent store, which exists before the group, or None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        logger.info("No store to meet the other processes before the group exists: %s", exc)
        return None


def _group_store() -> Any:
    """Return the default process group's store (torch has no public accessor), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError) as exc:
        logger.info("No store to meet the other processes in: %s", exc)
        return None


def _handshake(store: Any, rank: int, world_size: int, timeout: float) -> None:
    """Wait until every rank has called this for the same joint fit, or raise TimeoutError.

    The ranks of a job join the same sequence of fits, so each counts in ``store`` the
    fits it joined and the n-th fit of every rank meets under the same keys: each rank
    sets its key and waits for all of them. A rank that gives up withdraws its key and
    does not count the fit, so a later fit of all ranks meets again. No store, no check.
    """
    if store is None:
        return
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # the agent's store lasts
    base = dist.PrefixStore(f"msc_detector/{restart}/", store)
    joined = f"joined/rank{rank}"
    meeting = dist.PrefixStore(f"fit{base.add(joined, 0)}/", base)
    keys = [f"rank{r}" for r in range(world_size)]
    meeting.set(keys[rank], "1")
    start = time.monotonic()
    try:
        meeting.wait(keys, datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:  # torch's DistStoreError on a timeout
        absent = [r for r, key in enumerate(keys) if r != rank and not meeting.check([key])]
        meeting.delete_key(keys[rank])
        raise TimeoutError(
            f"Process {rank} of {world_size} in a torch.distributed job called fit and "
            f"waited {time.monotonic() - start:.3g} s, but process(es) "
            f"{', '.join(map(str, absent)) or '(none left)'} did not call fit. Inside a "
            "process group every fit is a joint fit of all processes. To fit in this "
            "process alone (to evaluate on rank 0, say), wrap the fit in "
            "`with msc_detector.distributed.local():`. If the others are only slow to "
            f"reach fit, raise {_JOIN_TIMEOUT_VARIABLE} (seconds; now {timeout:g})."
        ) from exc
    base.add(joined, 1)


@dataclass(frozen=True)
class Cluster:
    """One process of a multi-process job on the default process group.

    Attributes
    ----------
    rank : int
        This process's position, ``0 <= rank < world_size``.
    world_size : int
        The number of processes, at least 2.
    device : torch.device
        Where the tensors of the collectives live: this rank's GPU under NCCL, the
        CPU under gloo.
    """

    rank: int
    world_size: int
    device: torch.device

    def shard(self, n: int) -> np.ndarray:
        """Return this rank's block of ``range(n)``; the first ``n % world_size`` get one more.

        Concatenated in rank order, the blocks are ``range(n)`` again, so
        :meth:`gather_rows` of per-block results is in the original order.
        """
        return np.array_split(np.arange(n), self.world_size)[self.rank]

    def local_batch(self, batch_size: int) -> int:
        """Images per rank of a global batch of ``batch_size`` images.

        Raises
        ------
        ValueError
            If ``batch_size`` is not a multiple of the number of processes.
        """
        if batch_size % self.world_size:
            lower = max(self.world_size, batch_size - batch_size % self.world_size)
            raise ValueError(
                f"batch_size={batch_size} is the global batch, split evenly over "
                f"{self.world_size} processes, so it must be a multiple of {self.world_size}; "
                f"use batch_size={lower} or {lower + self.world_size}."
            )
        return batch_size // self.world_size

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every rank's ``array`` along the first axis, in rank order.

        Ranks may hold different numbers of rows (also none); the other dimensions and
        the dtype must agree. Large arrays travel in rounds of a bounded size.

        Parameters
        ----------
        array : ndarray of shape (n_rank, ...)

        Returns
        -------
        ndarray of shape (sum of n_rank, ...)
            The same on every rank.
        """
        array = np.ascontiguousarray(array)
        counts = self._all_gather(torch.tensor([array.shape[0]], dtype=torch.int64))
        sizes = [int(c) for c in torch.cat(counts)]
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        step = max(1, _GATHER_BYTES // max(1, row_bytes))  # the same on every rank
        local = torch.from_numpy(array)
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        for start in range(0, max(sizes, default=0), step):
            piece = local[start : start + step]
            padded = torch.zeros((step, *array.shape[1:]), dtype=local.dtype)
            padded[: len(piece)] = piece
            for rank, got in enumerate(self._all_gather(padded)):
                keep = min(step, max(0, sizes[rank] - start))
                parts[rank].append(got[:keep])
        rows = [t for rank_parts in parts for t in rank_parts]
        if not rows:
            return array[:0].copy()
        return torch.cat(rows).numpy()

    def mean_rows(self, array: np.ndarray) -> np.ndarray:
        """Mean over every rank's rows of ``array``, in float64 (all-reduced sum and count)."""
        local = np.asarray(array, dtype=np.float64)
        total = self.sum(np.concatenate([local.sum(axis=0).ravel(), [len(local)]]))
        return (total[:-1] / total[-1]).reshape(local.shape[1:])

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of every rank's ``array``, in float64 (the same on every rank)."""
        total = torch.from_numpy(np.asarray(array, dtype=np.float64).copy()).to(self.device)
        dist.all_reduce(total)
        return total.cpu().numpy()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value``, on every rank."""
        box = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(box, src=0)
        return int(box.item())

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along the first axis, keeping the gradient.

        Every rank must pass the same shape. The backward pass sums the gradients that
        all ranks computed for the gathered tensor and hands each rank those of its own
        rows; when every rank computes the same loss of the gathered tensor, this is
        ``world_size`` times the gradient of that loss, which the average over ranks of
        :class:`~torch.nn.parallel.DistributedDataParallel` brings back to one.
        """
        gathered = _GatherRows.apply(tensor.to(self.device), self)
        return gathered.to(tensor.device)

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``all_gather`` of a CPU tensor through the collectives' device; CPU results."""
        local = tensor.to(self.device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return [t.cpu() for t in out]


class _GatherRows(torch.autograd.Function):
    """All-gather along the first axis whose backward sums the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, cluster: Cluster) -> torch.Tensor:
        ctx.cluster = cluster
        local = tensor.contiguous()
        out = [torch.empty_like(local) for _ in range(cluster.world_size)]
        dist.all_gather(out, local)
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cluster: Cluster = ctx.cluster
        total = grad.contiguous().clone()
        dist.all_reduce(total)  # every rank's gradient of its loss w.r.t. all rows
        rows = total.shape[0] // cluster.world_size
        return total[cluster.rank * rows : (cluster.rank + 1) * rows], None

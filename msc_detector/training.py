"""Fine-tuning with a contrastive objective: the centre, the steps and the epoch loop.

:class:`Trainer` separates what multi-process training needs to wrap: the two views of
a batch (:meth:`Trainer.views`), the loss of their embeddings (:meth:`Trainer.loss`),
the optimiser step (:meth:`Trainer.step`), one epoch (:meth:`Trainer.run_epoch`) and
the loop over epochs with progress and history (:meth:`Trainer.fit`). The network
stays in ``eval`` mode (see :mod:`msc_detector.embedding`).

Given a :class:`~msc_detector.distributed.Cluster`, the processes of a multi-process
job train one network as one process would on the same global batches: every rank
draws the same shuffle and the same augmentation parameters for the whole global
batch, embeds its contiguous block of it, and computes the loss over the embeddings
gathered from every rank (the negatives of the global batch); the compute module is
wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, whose averaging of
the gradients undoes the sum over ranks of the gathered embeddings' backward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from msc_detector.augment import AugmentConfig, TwoViewAugment
from msc_detector.data import ResizedImages
from msc_detector.distributed import Cluster
from msc_detector.embedding import features
from msc_detector.losses import make_loss
from msc_detector.runtime import Runtime

__all__ = ["TrainConfig", "Trainer", "fine_tune", "mean_center"]

logger = logging.getLogger(__name__)

EpochHook = Callable[[int, float], None]


def mean_center(embeddings: np.ndarray) -> np.ndarray:
    """Mean of the normalised embeddings (deliberately not re-normalised)."""
    return embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class TrainConfig:
    """The fine-tuning recipe.

    Attributes
    ----------
    loss : str
        A name in :data:`msc_detector.losses.LOSSES`.
    epochs : int
    batch_size : int
        Images per step, over all processes of a multi-process job; each gives two views.
    lr, weight_decay : float
        Plain SGD (no momentum), as the reference.
    temperature : float
        Temperature of the contrastive losses.
    min_crop_area : float
        Lower area bound of the random resized crop of the training views.
    seed : int
        Seeds the shuffling and the augmentation.
    verbose : bool
        Show progress bars over epochs and batches.
    """

    loss: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    min_crop_area: float
    seed: int
    verbose: bool = False


class Trainer:
    """Fine-tunes one network on the two views of each batch.

    Parameters
    ----------
    network : torch.nn.Module
        The headless network whose trainable parameters are optimised.
    compute : torch.nn.Module
        The module that computes for ``network`` (its folded view, sharing its
        parameters), or ``network`` itself.
    center : ndarray of shape (d,)
        The fixed centre of the normalised pretrained embeddings.
    config : TrainConfig
    image_size : int
        Side of the training views.
    mean, std : sequence of float
        The network's input normalisation.
    runtime : Runtime
    cluster : Cluster, optional
        The multi-process job this process trains in; ``None`` for one process.
    """

    def __init__(
        self,
        network: nn.Module,
        compute: nn.Module,
        center: np.ndarray,
        config: TrainConfig,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        runtime: Runtime,
        cluster: Cluster | None = None,
    ) -> None:
        params = [p for p in network.parameters() if p.requires_grad]
        if not params:
            raise ValueError("frozen_stages leaves no trainable parameter; lower it.")
        self.network = network
        self.cluster = cluster
        self.compute = compute if cluster is None else _data_parallel(compute, runtime)
        self.config = config
        self.runtime = runtime
        self.center = torch.from_numpy(np.asarray(center, dtype=np.float32)).to(runtime.device)
        self.augment = TwoViewAugment(
            image_size, mean, std, AugmentConfig(crop_scale=(float(config.min_crop_area), 1.0))
        )
        self.loss_fn = make_loss(config.loss, config.temperature)
        self.optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        fp16 = runtime.precision.name == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.shuffle = np.random.default_rng(config.seed)

    def views(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the two augmented views of a ``uint8`` CPU batch, on the device.

        In a multi-process job ``batch`` is this rank's block of the global batch.
        """
        part = None
        if self.cluster is not None:
            n, ranks = len(batch), self.cluster.world_size
            part = (self.cluster.rank * n, ranks * n)
        return self.augment(self.runtime.to_device(batch), self.generator, part)

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """Compute the objective on the embeddings of two views of the same images.

        In a multi-process job, over the views of the global batch.
        """
        n = view1.shape[0]
        z = features(self.compute, torch.cat([view1, view2]), self.runtime, train=True)
        z1, z2 = z[:n], z[n:]
        if self.cluster is not None:
            pairs = self.cluster.gather_with_grad(torch.stack([z1, z2], dim=1))  # (N * n, 2, d)
            z1, z2 = pairs[:, 0], pairs[:, 1]
        loss = self.loss_fn(z1, z2, self.center)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The training loss became {loss.item()}; lower lr or use precision='fp32'."
            )
        return loss

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss`` (scaled for fp16)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def run_epoch(
        self, batches: Iterable[torch.Tensor], on_batch: Callable[[float], None] | None = None
    ) -> float:
        """Train on each batch once; return the mean batch loss."""
        self.network.eval()  # BatchNorm statistics stay fixed
        total, count = 0.0, 0
        for batch in batches:
            loss = self.loss(*self.views(batch))
            self.step(loss)
            value = float(loss.detach())
            total += value
            count += 1
            if on_batch is not None:
                on_batch(value)
        return total / max(count, 1)

    def fit(self, images: ResizedImages, on_epoch: EpochHook | None = None) -> list[dict]:
        """Run every epoch over shuffled batches of ``images``; return the history.

        Parameters
        ----------
        images : ResizedImages
            The training images, resized once.
        on_epoch : callable, optional
            Called as ``on_epoch(epoch, mean_loss)`` after each epoch (from 1).

        Returns
        -------
        list of dict
            Per epoch: ``epoch``, ``loss`` (mean batch loss) and ``seconds``.
        """
        config = self.config
        batch_size = min(config.batch_size, len(images))
        n_batches = len(images) // batch_size
        local_size = batch_size
        if self.cluster is not None:
            local_size = self.cluster.local_batch(batch_size)
        quiet = not config.verbose or (self.cluster is not None and self.cluster.rank != 0)
        history: list[dict] = []
        epochs = tqdm(range(config.epochs), desc="epochs", disable=quiet)
        for epoch in epochs:
            start = time.perf_counter()
            with tqdm(
                total=n_batches, desc=f"epoch {epoch + 1}", leave=False, disable=quiet
            ) as bar:
                running: list[float] = []

                def report(value: float, bar: tqdm = bar, running: list[float] = running) -> None:
                    running.append(value)
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")

                order = self.shuffle.permutation(len(images))
                if self.cluster is not None:  # this rank's block of each global batch
                    blocks = order[: n_batches * batch_size].reshape(n_batches, -1, local_size)
                    order = blocks[:, self.cluster.rank].ravel()
                mean_loss = self.run_epoch(
                    images.batches(local_size, order, drop_last=True), report
                )
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch + 1, "loss": mean_loss, "seconds": seconds})
            epochs.set_postfix(loss=f"{mean_loss:.4f}")
            logger.info("epoch %d: loss %.4f (%.1fs)", epoch + 1, mean_loss, seconds)
            if on_epoch is not None:
                on_epoch(epoch + 1, mean_loss)
        return history


def fine_tune(
    network: nn.Module,
    images: ResizedImages,
    center: np.ndarray,
    config: TrainConfig,
    *,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    runtime: Runtime,
    compute: nn.Module | None = None,
    on_epoch: EpochHook | None = None,
    cluster: Cluster | None = None,
) -> list[dict]:
    """Fine-tune ``network`` in place on ``images``; return the per-epoch history.

    See :class:`Trainer` for the parameters; ``compute`` defaults to ``network``.
    """
    trainer = Trainer(
        network, compute or network, center, config, image_size, mean, std, runtime, cluster
    )
    return trainer.fit(images, on_epoch)


def _data_parallel(compute: nn.Module, runtime: Runtime) -> nn.Module:
    """Wrap ``compute`` so that backward averages its gradients over the processes.

    Its buffers (BatchNorm statistics) never change, so they are not re-sent each step.
    """
    device = runtime.device
    return nn.parallel.DistributedDataParallel(
        compute,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,
    )

"""Embedding, centre and the fine-tuning epoch: pure functions over torch objects.

The network is kept in ``eval`` mode throughout, also while it is trained: BatchNorm
layers then use (and never update) their ImageNet running statistics, as the method
requires, and dropout/drop-path stay off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msc_detector.augment import TwoViewAugment
from msc_detector.runtime import Precision

__all__ = ["iter_embeddings", "join_views", "mean_center", "train_epoch"]

EvalTransform = Callable[[torch.Tensor], torch.Tensor]

# Input pixels per forward pass when embedding on the CPU. Smaller passes keep the
# activations in cache and mostly below glibc's mmap threshold (fewer page faults):
# EfficientNet-Lite0 embeds 1.6x (224 px, passes of 6 images) and 1.2x (112 px, passes
# of 24) faster than in passes of 64.
_CPU_EMBED_PIXELS = 3 * 2**17


def _features(
    model: nn.Module, x: torch.Tensor, precision: Precision, train: bool = False
) -> torch.Tensor:
    """L2-normalised fp32 features of a normalised float batch."""
    with precision.train_autocast() if train else precision.autocast():
        out = model(precision.prepare(x))
    return F.normalize(out.float(), dim=1)


@torch.inference_mode()
def iter_embeddings(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    transform: EvalTransform,
    device: torch.device,
    precision: Precision,
    flip_average: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the normalised fp32 embeddings of each uint8 batch, one array per batch.

    Parameters
    ----------
    model : torch.nn.Module
        Headless network.
    batches : iterable of torch.Tensor
        ``uint8`` ``(n, 3, S, S)`` batches (on the CPU).
    transform : callable
        Maps a uint8 batch on ``device`` to the normalised float input.
    device : torch.device
    precision : Precision
    flip_average : bool, default=False
        Embed each image and its left-right mirror and yield the normalised mean of
        the two embeddings, which is the same for an image and its mirror.

    Yields
    ------
    numpy.ndarray of shape (n, d), float32
    """
    model.eval()
    non_blocking = device.type == "cuda"
    for batch in batches:
        if non_blocking:
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=non_blocking)
        step = len(batch)
        if device.type == "cpu":
            step = max(1, _CPU_EMBED_PIXELS // (batch.shape[-2] * batch.shape[-1]))
        parts = []
        for part in batch.split(step):
            x = transform(part)
            features = _features(model, x, precision)
            if flip_average:
                features = F.normalize(features + _features(model, x.flip(-1), precision), dim=1)
            parts.append(features)
        yield torch.cat(parts).cpu().numpy()


def join_views(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate unit-norm embeddings of several views of the same images.

    Each part is ``(n, d_i)`` with unit-norm rows; the result is scaled by
    ``1 / sqrt(len(parts))`` so that its rows are unit-norm too. A squared L2
    distance between joined embeddings is then the mean of the views' squared
    distances.

    Parameters
    ----------
    parts : sequence of numpy.ndarray

    Returns
    -------
    numpy.ndarray of shape (n, sum of d_i), float32
    """
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate(parts, axis=1) / np.float32(np.sqrt(len(parts)))).astype(np.float32)


def mean_center(embeddings: np.ndarray) -> np.ndarray:
    """Mean of the normalised embeddings (deliberately not re-normalised)."""
    return embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)


def train_epoch(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    augment: TwoViewAugment,
    loss_fn: nn.Module,
    center: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    on_batch: Callable[[float], None] | None = None,
) -> float:
    """Run one epoch of fine-tuning and return the mean batch loss.

    Parameters
    ----------
    model : torch.nn.Module
        Headless network with its frozen parameters already set.
    batches : iterable of torch.Tensor
        Shuffled ``uint8`` ``(B, 3, S, S)`` batches of training images.
    augment : TwoViewAugment
        Makes the two views of each batch.
    loss_fn : torch.nn.Module
        Called as ``loss_fn(z1, z2, center)`` on normalised features.
    center : torch.Tensor of shape (d,)
        Fixed centre, on ``device``.
    optimizer : torch.optim.Optimizer
    device : torch.device
    precision : Precision
    generator : torch.Generator
        Draws the augmentation parameters.
    scaler : torch.amp.GradScaler, optional
        Needed for fp16 autocast.
    on_batch : callable, optional
        Called with each batch's loss (progress reporting).

    Returns
    -------
    float
        Mean loss over the epoch's batches.
    """
    model.eval()  # BatchNorm statistics stay fixed (see module docstring)
    non_blocking = device.type == "cuda"
    total, count = 0.0, 0
    for batch in batches:
        if non_blocking:
            batch = batch.pin_memory()
        view1, view2 = augment(batch.to(device, non_blocking=non_blocking), generator)
        n = view1.shape[0]
        z = _features(model, torch.cat([view1, view2]), precision, train=True)
        loss = loss_fn(z[:n], z[n:], center)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The training loss became {loss.item()}; lower lr or use precision='fp32'."
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        value = float(loss.detach())
        total += value
        count += 1
        if on_batch is not None:
            on_batch(value)
    return total / max(count, 1)

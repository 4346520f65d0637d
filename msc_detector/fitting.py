"""From normal images to a :class:`~msc_detector.model.FittedModel`: the whole fit.

The steps, each over torch, Faiss and numpy objects (no scikit-learn here):

1. build the backbone, its views and the :class:`~msc_detector.embedding.Embedder`;
2. embed the training images with the pretrained network for the MSC centre (and,
   once, through the networks of the views that are never trained);
3. fine-tune (:func:`msc_detector.training.fine_tune`);
4. **the pass**: one run of every training image through the fine-tuned network gives
   its final embedding and its patch embeddings, which stream into the coreset of the
   patch bank;
5. index the embeddings; their leave-self-out kNN distances are the global anomalies;
6. the leave-one-image-out patch distances of the training images, against the finished
   bank, give its per-position baseline (from the coarse search's bounds of 64 images)
   and the patch anomalies (every image, where the score uses patches);
7. calibrate the :class:`~msc_detector.verdict.ScoreRule` on those anomalies.

So after training every image goes through the network once: step 6 searches the patch
embeddings kept from the pass (float32, :data:`KEPT_PATCH_BYTES` at most, 477 KB per
224-pixel image with the default stages). Where they would need more, step 6 runs those
images through the network a second time instead.
In a multi-process job (see :mod:`msc_detector.distributed`) each rank embeds its share
for the centre and trains on its share; every rank runs the pass and step 6 over all
images and builds the same model.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral
from typing import Any

import numpy as np
import torch

from msc_detector import distributed
from msc_detector.backbones import create_backbone
from msc_detector.coreset import StreamingCoreset
from msc_detector.data import ImageSource, PathSource, ResizedImages
from msc_detector.data import auto_image_size as _auto_image_size
from msc_detector.embedding import Embedder, View, join_views
from msc_detector.index import IndexSpec, KNNIndex
from msc_detector.model import FittedModel, PatchScorer
from msc_detector.patch_bank import PatchIndex
from msc_detector.patches import resolve_stages
from msc_detector.runtime import Runtime
from msc_detector.training import TrainConfig, fine_tune, mean_center
from msc_detector.verdict import ScoreRule

__all__ = ["AUTO_PATCH_MEMORY", "KEPT_PATCH_BYTES", "FitSettings", "KeptPatches", "fit_model"]

logger = logging.getLogger(__name__)

#: The patch bank size of ``patch_memory="auto"``.
AUTO_PATCH_MEMORY = 16384
# Training images resized once and kept in memory up to this size (uint8 bytes).
_CACHE_BYTES = 3 * 2**30
#: Bytes of patch embeddings the fit keeps from its pass for the leave-one-image-out
#: distances (float32); beyond them it runs the images through the network again.
KEPT_PATCH_BYTES = 3 * 2**30
# Training images whose leave-self-out patch distance bounds set the bank's baseline: 64
# set it as well as 256 did (benchmarks/results/score_rules_baseline64.md,
# defects_baseline64.md, measured with exact distances).
_BASELINE_IMAGES = 64
_DIVERGED = (
    "Fine-tuning diverged: the {what} became non-finite, so every image would score alike. "
    "Lower lr or weight_decay, or use precision='fp32'. A previously fitted model is unchanged."
)


@dataclass(frozen=True)
class FitSettings:
    """What a fit needs from the estimator's parameters, validated."""

    backbone: Any
    weights: Any
    preprocess: Any
    frozen_stages: int | str
    loss: str | None
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    min_crop_area: float
    n_neighbors: int
    index: IndexSpec
    flip_average: bool | str
    nearest_view: bool | str
    image_size: int | str | None
    crop_pct: float | None
    crop_mode: str
    device: Any
    precision: str
    num_workers: int
    patch_memory: int | str | None
    patch_stages: str | Sequence[int]
    image_score: str
    verbose: bool

    @property
    def trains(self) -> bool:
        """Whether the fit fine-tunes the network."""
        return self.loss is not None and self.epochs > 0

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], index: IndexSpec, num_workers: int
    ) -> FitSettings:
        """Return the settings from an estimator's (validated) parameters."""
        names = {f.name for f in fields(cls)} - {"index", "num_workers"}
        values = {name: params[name] for name in names}
        for name in ("epochs", "batch_size", "n_neighbors"):
            values[name] = int(values[name])
        for name in ("lr", "weight_decay", "temperature", "min_crop_area"):
            values[name] = float(values[name])
        if values["crop_pct"] is not None:
            values["crop_pct"] = float(values["crop_pct"])
        values["verbose"] = bool(values["verbose"])
        stages = values["patch_stages"]
        if not isinstance(stages, str):
            valid = [
                isinstance(s, Integral) and not isinstance(s, bool) and int(s) >= 0 for s in stages
            ]
            if not stages or not all(valid):
                raise ValueError(
                    "patch_stages must be 'auto' or a non-empty tuple of feature-stage positions "
                    f"(integers >= 0, e.g. (2, 3)); got {stages!r}."
                )
        return cls(**values, index=index, num_workers=num_workers)


EpochHook = Callable[[int, FittedModel], None]


def fit_model(
    source: ImageSource, settings: FitSettings, seed: int, on_epoch: EpochHook | None = None
) -> FittedModel:
    """Run the whole fit; ``on_epoch(epoch, model)`` gets a global-only model per epoch."""
    cluster = distributed.current(settings.device)
    if cluster is not None:
        seed = _join(cluster, source, settings, seed)
    runtime = Runtime.resolve(_device_spec(settings.device, cluster), settings.precision)
    if cluster is not None and cluster.device.type == "cuda" and runtime.device.type != "cuda":
        raise ValueError(
            f"The process group uses NCCL, which trains on CUDA devices only, but "
            f"device={settings.device!r} resolved to {runtime.device}; use device='auto' or "
            "'cuda', or initialise a gloo process group before fit."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = create_backbone(
            settings.backbone, settings.weights, settings.frozen_stages, settings.preprocess
        )
    network = runtime.place(built.model)
    spec = built.spec
    size = _image_size(settings.image_size, spec.preprocess.input_size, source)
    crop_pct = spec.preprocess.crop_pct if settings.crop_pct is None else settings.crop_pct
    min_side = source.min_side()
    small = min_side is not None and 2 * min_side <= size  # enlarged 2x or more
    views = [View(spec.preprocess.interpolation, network)]
    if small if settings.nearest_view == "auto" else settings.nearest_view:
        # The sharp view goes through the network as it is now, before fine-tuning.
        views.append(View("nearest", _frozen_copy(network) if settings.trains else network))
    flip = small if settings.flip_average == "auto" else bool(settings.flip_average)
    embedder = Embedder(views, spec, size, float(crop_pct), flip, runtime, settings.crop_mode)
    settings.index.check(len(source), embedder.dim)  # before any work
    images = ResizedImages(
        source,
        embedder.load_size,
        spec.preprocess.interpolation,
        cache_bytes=_CACHE_BYTES,
        num_workers=settings.num_workers,
        squash=embedder.squash,
    )
    stages = _patch_stages(settings, network, size)
    gpu = runtime.device.type == "cuda"
    shard = None if cluster is None else cluster.shard(len(images))

    def embed_view0() -> np.ndarray:
        """Embed this rank's share through view 0; return all ranks' rows."""
        batches = embedder.embed_resized(0, images.batches(settings.batch_size, shard))
        local = np.concatenate([np.empty((0, spec.num_features), np.float32), *batches])
        return local if cluster is None else cluster.gather_rows(local)

    # The views other than the first never change: embed them once.
    fixed = [
        _embed_view(embedder, source, view, settings, cluster, shard)
        for view in range(1, len(views))
    ]
    common: dict[str, Any] = {
        "embedder": embedder,
        "n_train": len(images),
        "train_paths": [str(p) for p in source.paths] if isinstance(source, PathSource) else None,
        "weights_source": built.weights_source,
    }
    history: list[dict] = []
    if settings.trains:
        logger.info("Embedding %d training images with the pretrained %s", len(images), spec.name)
        pretrained = embed_view0()
        center = mean_center(pretrained)

        def snapshot(epoch: int, own: np.ndarray) -> None:
            assert on_epoch is not None
            joined = join_views([own, *fixed])
            index, global_train = _global_index(joined, settings, gpu)
            rule = ScoreRule.calibrate("global", global_train, None)
            on_epoch(
                epoch,
                FittedModel(
                    index=index, center=center, rule=rule, patches=None, history=[], **common
                ),
            )

        if on_epoch is not None:
            snapshot(0, pretrained)
        history = fine_tune(
            network,
            images,
            center,
            _train_config(settings, seed),
            image_size=size,
            mean=spec.preprocess.mean,
            std=spec.preprocess.std,
            runtime=runtime,
            compute=embedder.compute_network(network),
            on_epoch=(lambda epoch, loss: snapshot(epoch, embed_view0())) if on_epoch else None,
            cluster=cluster,
        )
        if not all(bool(torch.isfinite(p).all()) for p in network.parameters()):
            raise FloatingPointError(_DIVERGED.format(what="network weights"))
    # The pass: final embeddings and patch embeddings of every image, in one network call.
    logger.info("Embedding %d training images%s", len(images), " and patches" if stages else "")
    coreset, grid = None, (0, 0)
    kept = KeptPatches(_distance_order(settings, len(images)), KEPT_PATCH_BYTES)
    parts: list[np.ndarray] = []
    first = 0
    for batch in images.batches(settings.batch_size):
        z, patches = embedder.run(0, batch, stages)
        parts.append(z)
        if patches is not None:
            coreset = _add_patches(coreset, patches, first, len(images), settings, seed)
            grid = (patches.shape[1], patches.shape[2])
            kept.add(first, patches)
        first += len(batch)
    own = np.concatenate(parts)
    if not settings.trains:
        center = mean_center(own)
    index, global_train = _global_index(join_views([own, *fixed]), settings, gpu)
    scorer, patch_train = None, None
    if coreset is not None:
        scorer, patch_train = _patch_bank(coreset, grid, stages, embedder, images, settings, kept)
    rule = ScoreRule.calibrate(
        settings.image_score if scorer else "global", global_train, patch_train
    )
    return FittedModel(
        index=index, center=center, rule=rule, patches=scorer, history=history, **common
    )


def _embed_view(
    embedder: Embedder,
    source: ImageSource,
    view: int,
    settings: FitSettings,
    cluster: distributed.Cluster | None,
    shard: np.ndarray | None,
) -> np.ndarray:
    """All rows of the embeddings of view ``view`` (each rank embeds its share)."""
    if cluster is None:
        return embedder.embed_all(source, settings.batch_size, settings.num_workers, [view])
    rows = source if shard is None else _Rows(source, shard)
    local = [np.empty((0, embedder.spec.num_features), np.float32)]
    local += list(embedder.embed(rows, settings.batch_size, settings.num_workers, [view]))
    return cluster.gather_rows(np.concatenate(local))


def _global_index(
    embeddings: np.ndarray, settings: FitSettings, gpu: bool
) -> tuple[KNNIndex, np.ndarray]:
    """Index the embeddings; return the index and their leave-self-out global anomalies."""
    if not np.isfinite(embeddings).all():
        raise FloatingPointError(_DIVERGED.format(what="embeddings"))
    index = KNNIndex(settings.index).fit(embeddings)
    # The embeddings themselves are the queries: exact even where the index compresses.
    squared, _ = index.search_leave_self_out(
        settings.n_neighbors, embeddings, settings.index.search_settings(), gpu=gpu
    )
    return index, squared.sum(axis=1, dtype=np.float64)


def _patch_stages(settings: FitSettings, network: torch.nn.Module, size: int) -> tuple[str, ...]:
    """Return the stages that make patch embeddings, or ``()`` for no patch bank."""
    if settings.patch_memory is None:
        return ()
    try:
        return resolve_stages(network, settings.patch_stages, size)
    except ValueError:
        if settings.patch_memory != "auto":
            raise
        logger.info(
            "No patch bank: %s gives no feature maps; scoring with the global score.",
            type(network).__name__,
        )
        return ()


def _add_patches(
    coreset: StreamingCoreset | None,
    patches: torch.Tensor,
    first: int,
    n_images: int,
    settings: FitSettings,
    seed: int,
) -> StreamingCoreset:
    """Stream one batch's patch embeddings, tagged (image, row, column), into the coreset."""
    b, h, w, d = patches.shape
    if not bool(torch.isfinite(patches).all()):
        raise FloatingPointError(_DIVERGED.format(what="patch embeddings"))
    if coreset is None:
        auto = settings.patch_memory == "auto"
        memory = AUTO_PATCH_MEMORY if auto else int(settings.patch_memory)  # type: ignore[arg-type]
        coreset = StreamingCoreset(n_images * h * w, memory, seed)
    grid = np.meshgrid(np.arange(first, first + b), np.arange(h), np.arange(w), indexing="ij")
    coreset.add(patches.reshape(-1, d), np.stack(grid, axis=-1).reshape(-1, 3))
    return coreset


def _distance_order(settings: FitSettings, n: int) -> np.ndarray:
    """Return the training images whose patches the bank's baseline and score need again."""
    if settings.image_score != "global":  # the score uses every image's patch anomaly
        return np.arange(n)
    return _baseline_sample(n)


def _baseline_sample(n: int) -> np.ndarray:
    """Return the images, spread over the training set, whose distance bounds set the baseline."""
    return np.unique(np.linspace(0, n - 1, _BASELINE_IMAGES).round()).astype(np.int64)


class KeptPatches:
    """The patch embeddings of the fit's pass that its patch distances need, within a budget.

    Parameters
    ----------
    order : ndarray of int
        The images whose patches are kept, increasing.
    budget : int
        Bytes they may take; more, and none are kept (the images are run again).
    """

    def __init__(self, order: np.ndarray, budget: int) -> None:
        self.order = order
        self.budget = budget
        self.patches: np.ndarray | None = None
        self.over_budget = False

    def add(self, first: int, patches: torch.Tensor) -> None:
        """Keep those of the images ``first, first + 1, ...`` of ``patches`` in the order."""
        if self.over_budget:
            return
        b, h, w, d = patches.shape
        if self.patches is None:
            if len(self.order) * h * w * d * 4 > self.budget:
                self.over_budget = True
                return
            self.patches = np.empty((len(self.order), h, w, d), np.float32)
        low, high = np.searchsorted(self.order, [first, first + b])
        self.patches[low:high] = patches.numpy()[self.order[low:high] - first]

    def batches(
        self,
        batch_size: int,
        embedder: Embedder,
        images: ResizedImages,
        stages: tuple[str, ...],
        among: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield the images ``among`` (increasing; default: the order) and their patches.

        The patches are the kept ones, or computed again beyond the budget.
        """
        among = self.order if among is None else among
        if self.patches is not None:
            rows = np.searchsorted(self.order, among)
            for start in range(0, len(among), batch_size):
                chosen = rows[start : start + batch_size]
                yield among[start : start + batch_size], torch.from_numpy(self.patches[chosen])
            return
        first = 0
        for batch in images.batches(batch_size, order=among):
            _, patches = embedder.run(0, batch, stages)
            assert patches is not None
            yield among[first : first + len(patches)], patches
            first += len(patches)


def _patch_bank(
    coreset: StreamingCoreset,
    grid: tuple[int, int],
    stages: tuple[str, ...],
    embedder: Embedder,
    images: ResizedImages,
    settings: FitSettings,
    kept: KeptPatches,
) -> tuple[PatchScorer, np.ndarray | None]:
    """Build the bank and its baseline; also the patch anomalies where the score uses them."""
    vectors, tags = coreset.result()
    n = len(images)
    scorer = PatchScorer(PatchIndex(vectors.numpy(), tags[:, 0], tags[:, 1:], grid), stages)
    # Patches near the border have fewer look-alikes than inner ones (the padding makes
    # each position its own kind), so their nearest distances run higher: the map shows
    # each distance above the typical one at its position. That typical distance is
    # the mean over a sample of images of the coarse search's bounds, which equal the
    # exact leave-self-out distances for most patches at a fraction of their cost.
    # The sample's patches are held (at most _BASELINE_IMAGES images) until the baseline
    # is known, so that they are not run through the network again beyond the budget.
    args, sample = (settings.batch_size, embedder, images, stages), _baseline_sample(n)
    held = list(kept.batches(*args, among=sample))
    bounds = [scorer.distance_bounds(patches, owners) for owners, patches in held]
    scorer.bank.baseline = np.concatenate(bounds).mean(axis=0)
    patch_train = None
    if settings.image_score != "global":  # the score uses the patch anomalies
        patch_train = np.empty(n, np.float64)
        rest = kept.batches(*args, among=np.setdiff1d(kept.order, sample))
        for owners, patches in itertools.chain(held, rest):
            patch_train[owners] = scorer.anomalies(patches, embedder.image_size, owners)
    kept.patches = None  # free them before the index and rule are built
    return scorer, patch_train


def _join(
    cluster: distributed.Cluster, source: ImageSource, settings: FitSettings, seed: int
) -> int:
    """Check that every rank fits the same job; return rank 0's seed."""
    counts = cluster.gather_rows(np.array([len(source), settings.batch_size], np.int64)[None])
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
    if settings.trains:
        cluster.local_batch(min(settings.batch_size, len(source)))  # raises if uneven
    return cluster.broadcast_int(seed)


def _device_spec(device: Any, cluster: distributed.Cluster | None) -> Any:
    """Return the device to resolve: this rank's GPU for ``"auto"``/``"cuda"`` in a job."""
    gpu = distributed.local_device() if cluster is not None else None
    if gpu is not None and str(device) in ("auto", "cuda"):
        return gpu
    return device


def _train_config(settings: FitSettings, seed: int) -> TrainConfig:
    return TrainConfig(
        loss=str(settings.loss),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        temperature=settings.temperature,
        min_crop_area=settings.min_crop_area,
        seed=seed,
        verbose=settings.verbose,
    )


def _image_size(image_size: int | str | None, native: int, source: ImageSource) -> int:
    """Network input side: as given, the backbone's (``None``) or from the images (``"auto"``)."""
    if image_size is None:
        return native
    if image_size != "auto":
        return int(image_size)
    return _auto_image_size(native, source.min_side())


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


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return a copy of ``model`` in eval mode that no optimiser can change."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen

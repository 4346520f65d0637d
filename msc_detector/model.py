"""The fitted model: one object that owns every piece of fitted state and every search.

A :class:`FittedModel` turns images into verdicts. Each image is decoded once and run
once through the network (:meth:`Embedder.embed_batches
<msc_detector.embedding.Embedder.embed_batches>`); that one pass gives its global
embedding, searched in the kNN index of the training embeddings, and its patch
embeddings, searched in the patch bank (:class:`PatchScorer`). The
:class:`~msc_detector.verdict.ScoreRule` joins the two anomalies into one score.
:meth:`FittedModel.state` and :meth:`FittedModel.from_state` are the one description
of the fitted state that model files, pickles and the Dask shipment use.

No scikit-learn here; :class:`~msc_detector.MSCDetector` keeps the parameters, the
validation and ``offset_``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from msc_detector.backbones import BackboneSpec
from msc_detector.data import ImageSource
from msc_detector.embedding import Embedder, View
from msc_detector.index import KNNIndex
from msc_detector.patch_bank import PatchIndex
from msc_detector.patches import grid_to_maps, map_reach, map_to_image, network_positions
from msc_detector.runtime import Precision, land_runtime
from msc_detector.verdict import ScoreRule

__all__ = ["Evidence", "Explanation", "FittedModel", "FittedViews", "MapSource"]
__all__ += ["PatchScorer", "SavedParts"]


class PatchScorer:
    """Patch distances, anomaly maps and patch image scores against a bank of normal patches.

    Parameters
    ----------
    bank : PatchIndex
        The kept training patches with their owners, grid positions and baseline.
    stages : tuple of str
        The network's stage modules whose outputs make the patch embeddings.
    """

    def __init__(self, bank: PatchIndex, stages: tuple[str, ...]) -> None:
        self.bank = bank
        self.stages = tuple(stages)

    def raw_distances(
        self, features: torch.Tensor, owners: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each patch to its nearest bank patch, and that patch's position.

        With ``owners`` (the training image of each image), patches of the image's own
        are skipped (leave-self-out).

        Returns
        -------
        distances : ndarray of shape (n, h, w), float32
        nearest : ndarray of shape (n, h, w), int64
        """
        queries, patch_owners = _queries(features, owners)
        squared, nearest = self.bank.nearest(queries, patch_owners)
        shape = features.shape[:3]
        return np.sqrt(np.maximum(squared, 0.0)).reshape(shape), nearest.reshape(shape)

    def excess(self, raw: np.ndarray) -> torch.Tensor:
        """Distances above the typical one at their grid position (the map's values)."""
        return torch.from_numpy(raw - self.bank.baseline)

    def distance_bounds(
        self, features: torch.Tensor, owners: np.ndarray | None = None
    ) -> np.ndarray:
        """Distance of each patch to *a* near bank patch: never below the nearest's, mostly equal.

        The coarse search that :meth:`anomalies` starts from, at a fraction of
        :meth:`raw_distances`' cost; ``owners`` as there.

        Returns
        -------
        ndarray of shape (n, h, w), float32
        """
        queries, patch_owners = _queries(features, owners)
        squared, _ = self._bounds(queries, patch_owners, features.shape[:3])
        return np.sqrt(np.maximum(squared, 0.0))

    def source(self, index: int) -> tuple[int, tuple[float, float]]:
        """Return the training image of bank patch ``index`` and the patch's centre in it.

        The centre is ``(row, column)`` as fractions (0-1) of the image's network input;
        ``(-1, (nan, nan))`` for ``index`` -1 (no patch).
        """
        if index < 0:
            return -1, (float("nan"), float("nan"))
        bank = self.bank
        row, col = ((bank.positions[index] + 0.5) / np.asarray(bank.grid, np.float64)).tolist()
        return int(bank.owners[index]), (row, col)

    def anomalies(
        self, features: torch.Tensor, size: int, owners: np.ndarray | None = None
    ) -> np.ndarray:
        """Measure each image's patch anomaly, its map's maximum, searching few patches exactly.

        The maximum of the map of the exact distances, ``raw_distances(features,
        owners)[0]``, but most patches are not searched exactly. The
        coarse search bounds every patch's distance from above, so a map made from the
        bounds lies on or above the exact map everywhere. Where the map made so far
        peaks, the patches under the peak are searched exactly and the map made again,
        until the peak rests on exact distances only: the peak's value is then the
        exact map's maximum (nothing exceeds it). Usually a few dozen of an image's
        patches need the exact search.

        Returns
        -------
        ndarray of shape (n,), float64
        """
        n, h, w, _ = features.shape
        queries, patch_owners = _queries(features, owners)
        squared, exact = self._bounds(queries, patch_owners, (n, h, w))
        (rows_first, rows_last), (cols_first, cols_last) = map_reach(size, h), map_reach(size, w)
        result = np.empty(n, np.float64)
        todo = np.arange(n)
        while len(todo):
            maps = grid_to_maps(self.excess(np.sqrt(np.maximum(squared[todo], 0.0))), size)
            values, peaks = (part.numpy() for part in maps.flatten(1).max(dim=1))
            wanted = np.zeros((len(todo), h, w), bool)
            for j, (y, x) in enumerate(zip(*np.unravel_index(peaks, (size, size)), strict=True)):
                rows = slice(rows_first[y], rows_last[y] + 1)
                wanted[j, rows, cols_first[x] : cols_last[x] + 1] = True
            wanted &= ~exact[todo]
            settled = ~wanted.any(axis=(1, 2))
            result[todo[settled]] = values[settled]
            needed = np.zeros_like(exact)
            needed[todo] = wanted
            self._search_exactly(queries, patch_owners, squared, exact, needed)
            todo = todo[~settled]
        return result

    def _bounds(
        self, queries: np.ndarray, owners: np.ndarray | None, shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Squared distance bounds of ``queries`` (``shape``), and where they are exact."""
        squared = self.bank.nearest_bound(queries, owners).reshape(shape)
        exact = np.zeros(shape, bool)
        unbounded = ~np.isfinite(squared)  # the coarse search found only the image's own patches
        self._search_exactly(queries, owners, squared, exact, unbounded)
        return squared, exact

    def _search_exactly(
        self,
        queries: np.ndarray,
        owners: np.ndarray | None,
        squared: np.ndarray,
        exact: np.ndarray,
        needed: np.ndarray,
    ) -> None:
        """Replace the squared distances of the ``needed`` patches with exact ones."""
        rows = np.flatnonzero(needed)
        if not len(rows):
            return
        found = self.bank.nearest(queries[rows], None if owners is None else owners[rows])[0]
        squared.reshape(-1)[rows] = found
        exact.reshape(-1)[rows] = True


def _queries(
    features: torch.Tensor, owners: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the patches of ``features`` (n, h, w, d) as search queries, and each one's image."""
    _, h, w, d = features.shape
    return features.reshape(-1, d).numpy(), None if owners is None else np.repeat(owners, h * w)


@dataclass(frozen=True)
class MapSource:
    """What one image's anomaly map is made from: small, kept until a map is needed.

    Attributes
    ----------
    excess : torch.Tensor of shape (h, w)
        Patch distances above the baseline.
    nearest : ndarray of shape (h, w), int64
        Position in the bank of each patch's nearest bank patch.
    size : tuple of int
        The image's own height and width.
    """

    excess: torch.Tensor
    nearest: np.ndarray
    size: tuple[int, int]


@dataclass
class Evidence:
    """What one pass tells about a batch of images (``None`` where not asked for).

    Attributes
    ----------
    squared, indices : ndarray of shape (n, k)
        Squared distances to, and positions of, the nearest training embeddings.
    patch_excess : torch.Tensor of shape (n, h, w)
        Patch distances above the baseline.
    patch_nearest : ndarray of shape (n, h, w), int64
        Position in the bank of each patch's nearest bank patch.
    patch_anomaly : ndarray of shape (n,), float64
        Maximum of each smoothed map: the patch anomaly.
    sizes : list of (int, int)
        The images' own heights and widths.
    """

    squared: np.ndarray | None
    indices: np.ndarray | None
    patch_excess: torch.Tensor | None
    patch_nearest: np.ndarray | None
    patch_anomaly: np.ndarray | None
    sizes: list[list[int]]

    def map_sources(self) -> list[MapSource]:
        """Return what each image's map is made from (the batch must have patch evidence)."""
        assert self.patch_excess is not None and self.patch_nearest is not None
        return [
            MapSource(self.patch_excess[j], self.patch_nearest[j], (int(h), int(w)))
            for j, (h, w) in enumerate(self.sizes)
        ]


@dataclass(eq=False)
class FittedModel:
    """Every piece of a fitted detector's state, with the searches over it.

    Attributes
    ----------
    embedder : Embedder
        Views, networks, preprocessing and runtime.
    index : KNNIndex
        The training images' embeddings.
    center : ndarray of shape (n_features,)
        Mean of the normalised pretrained embeddings (the MSC loss's centre).
    rule : ScoreRule
        How the two anomalies make one score, with its training scores.
    patches : PatchScorer or None
        The patch bank, where the model has one.
    n_train : int
    train_paths : list of str or None
        The training files, in the index's order, where fit was given paths.
    history : list of dict
        Per training epoch: ``epoch``, ``loss``, ``seconds``.
    weights_source : str
        Where the initial weights came from.
    """

    embedder: Embedder
    index: KNNIndex
    center: np.ndarray
    rule: ScoreRule
    patches: PatchScorer | None
    n_train: int
    train_paths: list[str] | None
    history: list[dict[str, Any]]
    weights_source: str

    def evidence(
        self,
        source: ImageSource,
        *,
        batch_size: int,
        num_workers: int,
        k: int = 0,
        settings: Mapping[str, int] | None = None,
        patches: bool = False,
        maps: bool = False,
        gpu: bool = False,
    ) -> Iterator[Evidence]:
        """One pass over ``source``: per batch, the global search and the patch search.

        Parameters
        ----------
        k : int, default=0
            Nearest training embeddings to find; 0 skips the global search.
        settings : mapping, optional
            Search settings of an approximate index (``nprobe``, ``efSearch``).
        patches : bool, default=False
            Also search the patch bank (the model must have one).
        maps : bool, default=False
            Also search every patch exactly, for maps. The patch anomaly is measured
            either way by :meth:`PatchScorer.anomalies`, so scores do not depend on it.
        """
        if patches and self.patches is None:
            raise ValueError("This model has no patch bank.")
        stages = self.patches.stages if patches and self.patches is not None else ()
        size = self.embedder.image_size
        for batch in self.embedder.embed_batches(source, batch_size, num_workers, stages):
            found = Evidence(None, None, None, None, None, batch.sizes)
            if k:
                found.squared, found.indices = self.index.search(
                    batch.embeddings, k, dict(settings or {}), gpu
                )
            if self.patches is not None and batch.patches is not None:
                found.patch_anomaly = self.patches.anomalies(batch.patches, size)
                if maps:  # every patch's distance, searched exactly
                    raw, found.patch_nearest = self.patches.raw_distances(batch.patches)
                    found.patch_excess = self.patches.excess(raw)
            yield found

    def image_map(self, source: MapSource) -> np.ndarray:
        """Return an image's anomaly map at the image's own size (NaN where unseen)."""
        height, width = source.size
        network_map = grid_to_maps(source.excess[None], self.embedder.image_size)[0]
        emb = self.embedder
        return map_to_image(network_map, height, width, emb.load_size, emb.image_size, emb.squash)

    def map_peak(self, source: MapSource, image_map: np.ndarray) -> dict[str, Any]:
        """Where an image's map peaks and which normal patch is nearest there.

        Returns ``peak`` (row, column; NaN where the map is all NaN), ``distance`` (the
        patch's distance to its nearest bank patch, without the baseline) and
        ``bank_index`` (-1 where the map is all NaN).
        """
        assert self.patches is not None
        if not np.isfinite(image_map).any():  # the network saw none of the image
            return {"peak": (np.nan, np.nan), "distance": np.nan, "bank_index": -1}
        bank, size, load = self.patches.bank, self.embedder.image_size, self.embedder.load_size
        height, width = source.size
        y, x = np.unravel_index(int(np.nanargmax(image_map)), image_map.shape)
        squash = self.embedder.squash
        ny = float(network_positions(height, width, load, size, squash)[y])
        nx = float(network_positions(width, height, load, size, squash)[x])
        h, w = bank.grid
        row = min(h - 1, max(0, int(ny / size * h)))
        col = min(w - 1, max(0, int(nx / size * w)))
        return {
            "peak": (float(y), float(x)),
            "distance": float(source.excess[row, col]) + float(bank.baseline[row, col]),
            "bank_index": int(source.nearest[row, col]),
        }

    def scores(self, found: Evidence, k: int) -> np.ndarray:
        """``score_samples`` of a batch from its evidence (``k`` neighbours summed)."""
        global_anomaly = None
        if found.squared is not None:
            global_anomaly = found.squared[:, :k].sum(axis=1, dtype=np.float64)
        return self.rule.scores(global_anomaly, found.patch_anomaly)

    def networks(self) -> tuple[nn.Module, nn.Module | None]:
        """Return the fine-tuned network and the pretrained one of the nearest view."""
        views = self.embedder.views
        extra = views[1].network if len(views) > 1 else None
        return views[0].network, None if extra is views[0].network else extra

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return the fitted state as JSON-able scalars and named arrays.

        The names are those of the model file (:data:`msc_detector.persistence.FITTED`
        and its arrays); the networks (``embedder.views``), the backbone spec, the index
        and the training paths are this object's other members, which persistence
        stores as they are. :meth:`from_state` rebuilds the model.
        """
        emb, rule = self.embedder, self.rule
        scalars: dict[str, Any] = {
            "image_size_": emb.image_size,
            "crop_pct_": emb.crop_pct,
            "crop_mode_": emb.crop_mode,
            "flip_average_": emb.flip_average,
            "nearest_view_": len(emb.views) > 1,
            "n_train_": self.n_train,
            "history_": [dict(entry) for entry in self.history],
            "device_": str(emb.runtime.device),
            "precision_": emb.runtime.precision.name,
            "weights_source_": self.weights_source,
            "patch_stages_": list(self.patches.stages) if self.patches else [],
            "image_score_": rule.mode,
            "score_locations_": list(rule.locations),
            "score_scales_": list(rule.scales),
        }
        arrays: dict[str, np.ndarray] = {
            "center_": np.ascontiguousarray(self.center, np.float32),
            "train_scores_": np.ascontiguousarray(rule.train_scores, np.float64),
        }
        if self.patches is not None:
            bank = self.patches.bank
            arrays["patch_vectors"] = np.ascontiguousarray(bank.vectors(), np.float32)
            arrays["patch_owners"] = bank.owners
            arrays["patch_positions"] = bank.positions
            arrays["patch_grid"] = np.asarray(bank.grid, np.int64)
            arrays["patch_baseline"] = bank.baseline
        return scalars, arrays

    @classmethod
    def from_state(
        cls,
        scalars: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        parts: SavedParts,
        device: str | torch.device = "auto",
        precision: str = "auto",
    ) -> FittedModel:
        """Rebuild a model from :meth:`state` and its other members, landed on ``device``.

        ``device="auto"``: the device it was fitted on where that exists, else the CPU
        (with a warning for a GPU-fitted model); see :func:`msc_detector.runtime.land_runtime`.
        """
        runtime = land_runtime(scalars["device_"], scalars["precision_"], precision, device)
        network = runtime.place(parts.backbone)
        views = [View(parts.spec.preprocess.interpolation, network)]
        if scalars["nearest_view_"]:
            other = parts.pretrained
            views.append(View("nearest", network if other is None else runtime.place(other)))
        embedder = Embedder(
            views,
            parts.spec,
            scalars["image_size_"],
            scalars["crop_pct_"],
            scalars["flip_average_"],
            runtime,
            scalars["crop_mode_"],
        )
        patches = None
        if scalars["patch_stages_"]:
            grid = arrays["patch_grid"]
            bank = PatchIndex(
                arrays["patch_vectors"],
                arrays["patch_owners"],
                arrays["patch_positions"],
                (int(grid[0]), int(grid[1])),
                arrays["patch_baseline"],
            )
            patches = PatchScorer(bank, tuple(scalars["patch_stages_"]))
        rule = ScoreRule(
            scalars["image_score_"],
            tuple(scalars["score_locations_"]),  # type: ignore[arg-type]
            tuple(scalars["score_scales_"]),  # type: ignore[arg-type]
            arrays["train_scores_"],
        )
        return cls(
            embedder=embedder,
            index=parts.index,
            center=arrays["center_"],
            rule=rule,
            patches=patches,
            n_train=int(scalars["n_train_"]),
            train_paths=parts.train_paths,
            history=[dict(entry) for entry in scalars["history_"]],
            weights_source=str(scalars["weights_source_"]),
        )


@dataclass
class Explanation:
    """Scores and their evidence, per image: what ``MSCDetector.explain`` returns.

    Attributes
    ----------
    scores : ndarray of shape (n,), float64
        ``score_samples``.
    false_alarm_rates : ndarray of shape (n,), float64
        See :meth:`MSCDetector.false_alarm_rate <msc_detector.MSCDetector.false_alarm_rate>`.
    indices : ndarray of shape (n, k), int64
        Positions in the training set of the nearest training images.
    distances : ndarray of shape (n, k), float32
        Euclidean distances to them, as ``kneighbors`` returns them.
    map_sources : list of MapSource
        What each image's map is made from, where maps were asked for; :meth:`maps`
        and :meth:`peaks` turn them into maps at the images' own sizes.
    """

    scores: np.ndarray
    false_alarm_rates: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    map_sources: list[MapSource] = field(default_factory=list)
    model: FittedModel | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, k: int, model: FittedModel) -> Explanation:
        """Return an explanation of no images, with room for ``k`` neighbours."""
        none = np.empty(0)
        k_empty = (np.empty((0, k), np.int64), np.empty((0, k), np.float32))
        return cls(none, none, *k_empty, model=model)

    def add(self, found: Evidence, k: int, wanted: int, maps: bool) -> None:
        """Append one batch's scores, neighbours and map sources."""
        assert self.model is not None
        self.scores = np.concatenate([self.scores, self.model.scores(found, k)])
        if wanted:
            assert found.squared is not None and found.indices is not None
            distances = np.sqrt(np.maximum(found.squared[:, :wanted], 0.0))
            self.distances = np.concatenate([self.distances, distances])
            self.indices = np.concatenate([self.indices, found.indices[:, :wanted]])
        if maps:
            self.map_sources += found.map_sources()

    def maps(self) -> list[np.ndarray]:
        """Return each image's anomaly map at its own size, float32 (NaN where unseen)."""
        assert self.model is not None
        return [self.model.image_map(source) for source in self.map_sources]

    def map_neighbors(self, maps: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Return the ``return_neighbors`` dict of ``anomaly_map`` for these ``maps``."""
        model = self.model
        assert model is not None and model.patches is not None
        peaks = [model.map_peak(s, m) for s, m in zip(self.map_sources, maps, strict=True)]
        sources = [model.patches.source(int(p["bank_index"])) for p in peaks]
        return {
            "peak": np.asarray([p["peak"] for p in peaks], np.float64).reshape(-1, 2),
            "distance": np.asarray([p["distance"] for p in peaks], np.float32),
            "train_index": np.asarray([owner for owner, _ in sources], np.int64),
            "train_position": np.asarray([pos for _, pos in sources], np.float64).reshape(-1, 2),
        }


class FittedViews:
    """Read-only views of a fitted estimator's ``model_``: its public fitted attributes.

    Each raises ``AttributeError`` before ``fit`` (so ``hasattr`` says unfitted).
    """

    def _fitted_model(self) -> FittedModel:
        model = self.__dict__.get("model_")
        if model is None:
            raise AttributeError(f"This {type(self).__name__} is not fitted yet; call fit first.")
        return model

    @property
    def embedder_(self) -> Embedder:
        """The embedder: views, networks, preprocessing, runtime."""
        return self._fitted_model().embedder

    @property
    def index_(self) -> KNNIndex:
        """The kNN index of the training embeddings."""
        return self._fitted_model().index

    @property
    def center_(self) -> np.ndarray:
        """The MSC centre."""
        return self._fitted_model().center

    @property
    def train_scores_(self) -> np.ndarray:
        """Leave-self-out ``score_samples`` of the training images."""
        return self._fitted_model().rule.train_scores

    @property
    def history_(self) -> list[dict[str, Any]]:
        """Per-epoch training figures."""
        return self._fitted_model().history

    @property
    def weights_source_(self) -> str:
        """Where the initial weights came from."""
        return self._fitted_model().weights_source

    @property
    def n_train_(self) -> int:
        """Number of training images."""
        return self._fitted_model().n_train

    @property
    def train_paths_(self) -> list[str] | None:
        """The training files, where fit was given paths."""
        return self._fitted_model().train_paths

    @property
    def patch_bank_(self) -> PatchIndex | None:
        """The patch bank, or ``None``."""
        m = self._fitted_model()
        return m.patches.bank if m.patches else None

    @property
    def patch_stages_(self) -> tuple[str, ...]:
        """The stages of the patch embeddings."""
        m = self._fitted_model()
        return m.patches.stages if m.patches else ()

    @property
    def image_score_(self) -> str:
        """The image score ``fit`` calibrated."""
        return self._fitted_model().rule.mode

    @property
    def score_locations_(self) -> tuple[float, float]:
        """Locations of the global and patch anomalies."""
        return self._fitted_model().rule.locations

    @property
    def score_scales_(self) -> tuple[float, float]:
        """Scales of the global and patch anomalies."""
        return self._fitted_model().rule.scales

    @property
    def backbone_(self) -> nn.Module:
        """The fine-tuned network."""
        return self._fitted_model().embedder.views[0].network

    @property
    def pretrained_backbone_(self) -> nn.Module | None:
        """The pretrained network of the nearest view, if any."""
        return self._fitted_model().networks()[1]

    @property
    def backbone_spec_(self) -> BackboneSpec:
        """Architecture, preprocessing and frozen stages."""
        return self._fitted_model().embedder.spec

    @property
    def device_(self) -> torch.device:
        """Device of the networks."""
        return self._fitted_model().embedder.runtime.device

    @property
    def precision_(self) -> Precision:
        """Autocast set-up of the networks."""
        return self._fitted_model().embedder.runtime.precision

    @property
    def image_size_(self) -> int:
        """Network input side."""
        return self._fitted_model().embedder.image_size

    @property
    def crop_mode_(self) -> str:
        """How ``fit`` made non-square images square (``"squash"`` or ``"center"``)."""
        return self._fitted_model().embedder.crop_mode

    @property
    def crop_pct_(self) -> float:
        """Evaluation crop share."""
        return self._fitted_model().embedder.crop_pct

    @property
    def flip_average_(self) -> bool:
        """Whether embeddings average each image with its mirror."""
        return self._fitted_model().embedder.flip_average

    @property
    def nearest_view_(self) -> bool:
        """Whether embeddings join a nearest-neighbour view."""
        return len(self._fitted_model().embedder.views) > 1


@dataclass(frozen=True)
class SavedParts:
    """The members of a saved model besides its scalars and arrays, rebuilt on the CPU."""

    spec: BackboneSpec
    backbone: nn.Module
    pretrained: nn.Module | None
    index: KNNIndex
    train_paths: list[str] | None

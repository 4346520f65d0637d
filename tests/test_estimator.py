"""MSCDetector against scikit-learn's outlier-detector contract, on tiny synthetic data."""

from __future__ import annotations

import copy
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import MODULE_PRE, small_module
from PIL import Image
from sklearn.base import clone, is_outlier_detector
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import get_tags
from sklearn.utils._param_validation import InvalidParameterError

from msc_detector import MSCDetector
from msc_detector.data import as_image_source
from msc_detector.embedding import View
from msc_detector.losses import LOSSES


@pytest.fixture
def fitted(images, fast_params) -> MSCDetector:
    return MSCDetector(**fast_params).fit(images)


def to_float(X: np.ndarray) -> np.ndarray:
    return X.astype(np.float32) / 255.0


class NormalOnlyFolds:
    """K folds whose training part keeps only the normal images (label 1)."""

    def __init__(self, n_splits: int = 2) -> None:
        self.n_splits = n_splits

    def split(self, X, y, groups=None):
        y = np.asarray(y)
        rng = np.random.default_rng(0)
        normal, anomalous = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        folds = np.array_split(rng.permutation(normal), self.n_splits)
        for i, test_normal in enumerate(folds):
            train = np.concatenate([f for j, f in enumerate(folds) if j != i])
            yield train, np.concatenate([test_normal, anomalous])

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits


# ----------------------------------------------------------------- contract


def test_fit_returns_self_with_fitted_attributes(images, fast_params) -> None:
    det = MSCDetector(**fast_params)
    assert det.fit(images) is det
    assert det.center_.shape == (1280,) and det.center_.dtype == np.float32
    assert det.n_train_ == 24 and det.image_size_ == 32
    assert det.index_.ntotal == 24
    assert len(det.history_) == 1 and {"epoch", "loss", "seconds"} <= set(det.history_[0])
    assert not hasattr(det, "n_features_in_")


def test_init_only_stores_parameters() -> None:
    det = MSCDetector(lr=-5, contamination=3.0, backbone="nope")  # validated in fit, not here
    assert det.get_params()["lr"] == -5 and det.backbone == "nope"


def test_scores_decision_and_predict_agree(fitted, images) -> None:
    queries = np.concatenate([images[:6], 255 - images[:6]])
    scores = fitted.score_samples(queries)
    decision = fitted.decision_function(queries)
    labels = fitted.predict(queries)
    assert scores.shape == (12,) and labels.dtype.kind == "i"
    np.testing.assert_allclose(decision, scores - fitted.offset_)
    np.testing.assert_array_equal(labels, np.where(decision < 0, -1, 1))
    assert set(np.unique(labels)) <= {-1, 1}


def test_score_is_minus_summed_squared_knn_distance(fitted, images) -> None:
    emb = fitted.transform(images[:5])
    train = fitted.index_.index.reconstruct_n(0, fitted.index_.ntotal)
    d2 = ((emb[:, None, :] - train[None]) ** 2).sum(-1)
    expected = -np.sort(d2, axis=1)[:, :2].sum(1)
    np.testing.assert_allclose(fitted.score_samples(images[:5]), expected, atol=1e-5)


def test_offset_is_contamination_percentile_of_leave_self_out_scores(fitted) -> None:
    dist, idx = fitted.kneighbors()
    assert not (idx == np.arange(24)[:, None]).any()
    np.testing.assert_allclose(fitted.train_scores_, -(dist**2).sum(1), rtol=1e-5)
    assert fitted.offset_ == pytest.approx(np.percentile(fitted.train_scores_, 10))


def test_training_images_are_their_own_nearest_neighbour_when_queried(fitted, images) -> None:
    dist, idx = fitted.kneighbors(images[:4], n_neighbors=1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(4))
    np.testing.assert_allclose(dist[:, 0], 0, atol=1e-3)


@pytest.mark.parametrize("contamination", [0.1, 0.25, 0.5])
def test_fit_predict_flags_about_contamination(images, fast_params, contamination) -> None:
    labels = MSCDetector(**fast_params, contamination=contamination).fit_predict(images)
    assert abs((labels == -1).mean() - contamination) <= 1 / 24 + 1e-9


def test_transform_gives_normalised_float32_embeddings(fitted, images) -> None:
    emb = fitted.transform(images[:7])
    assert emb.shape == (7, 1280) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_kneighbors_validates_n_neighbors(fitted, images) -> None:
    with pytest.raises(ValueError, match="n_neighbors"):
        fitted.kneighbors(images[:2], n_neighbors=0)
    with pytest.raises(ValueError, match="n_neighbors"):
        fitted.kneighbors(n_neighbors=24)
    assert fitted.kneighbors(images[:2], return_distance=False).shape == (2, 2)


@pytest.mark.parametrize("k", [0, -3, 2.5, 25, True])
def test_n_neighbors_set_after_fit_is_validated_when_scoring(fitted, images, k) -> None:
    fitted.set_params(n_neighbors=k)
    with pytest.raises(ValueError, match=r"n_neighbors must be an integer in \[1, 24\]"):
        fitted.score_samples(images[:2])


def test_every_input_form_gives_the_same_scores(fitted, images, tmp_path: Path) -> None:
    queries = images[:5]
    expected = fitted.score_samples(queries)
    paths = []
    for i, a in enumerate(queries):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    forms = {
        "float": queries.astype(np.float64) / 255.0,
        "tensor": torch.from_numpy(queries).permute(0, 3, 1, 2),
        "pil": [Image.fromarray(a) for a in queries],
        "paths": paths,
        "str paths": [str(p) for p in paths],
        "list of arrays": list(queries),
    }
    for name, X in forms.items():
        np.testing.assert_allclose(fitted.score_samples(X), expected, rtol=1e-6, err_msg=name)
    assert fitted.train_paths_ is None  # fitted on an array


def test_grayscale_and_any_size_images_are_accepted(fast_params) -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(10, 20, 28), dtype=np.uint8)
    det = MSCDetector(**fast_params).fit(gray)
    assert det.predict(gray[:, None].repeat(3, axis=1).transpose(0, 2, 3, 1)).shape == (10,)
    sizes = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        for h, w in [(40, 50), (17, 90), (64, 64)]
    ]
    assert det.score_samples(sizes).shape == (3,)


def test_inputs_are_not_modified(images, fast_params) -> None:
    frozen = images.copy()
    frozen.setflags(write=False)
    det = MSCDetector(**fast_params).fit(frozen)
    det.score_samples(frozen)
    np.testing.assert_array_equal(frozen, images)


# -------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("contamination", 0.0),
        ("contamination", 0.7),
        ("n_neighbors", 0),
        ("epochs", -1),
        ("batch_size", 1),
        ("lr", -1e-3),
        ("temperature", 0.0),
        ("image_size", 8),
        ("loss", "simclr"),
        ("precision", "fp8"),
        ("frozen_stages", -1),
        ("weights", 3),
        ("min_crop_area", 0.0),
        ("min_crop_area", 1.5),
        ("nearest_view", "on"),
    ],
)
def test_out_of_range_parameters_are_rejected_in_fit(images, fast_params, param, value) -> None:
    det = MSCDetector(**{**fast_params, param: value})
    with pytest.raises(InvalidParameterError, match=param):
        det.fit(images)


def test_min_crop_area_sets_the_training_crop(images, fast_params, monkeypatch) -> None:
    import msc_detector.training as training_module

    used = []

    class Recording(training_module.TwoViewAugment):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            used.append(self.config.crop_scale)

    monkeypatch.setattr(training_module, "TwoViewAugment", Recording)
    MSCDetector(**fast_params).fit(images)
    MSCDetector(**fast_params, min_crop_area=1.0).fit(images)
    assert used == [(0.2, 1.0), (1.0, 1.0)]


def test_unknown_backbone_suggests_names(images, fast_params) -> None:
    with pytest.raises(ValueError, match="Did you mean"):
        MSCDetector(**fast_params, backbone="resnet_152").fit(images)


def test_too_few_images_for_the_neighbours(images, fast_params) -> None:
    with pytest.raises(ValueError, match=r"n_neighbors \+ 1 = 3"):
        MSCDetector(**fast_params).fit(images[:2])
    MSCDetector(**{**fast_params, "n_neighbors": 1}).fit(images[:2])


def test_unavailable_devices_and_precisions_are_explained(images, fast_params) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            MSCDetector(**fast_params, device="cuda").fit(images)
    with pytest.raises(ValueError, match="fp16"):
        MSCDetector(**fast_params, device="cpu", precision="fp16").fit(images)


@pytest.mark.parametrize("device", ["meta", "xpu", "hpu", "xla"])
def test_unsupported_device_types_are_refused_up_front(images, fast_params, device) -> None:
    with pytest.raises(ValueError, match=f"not '{device}'.*use 'auto', 'cpu', 'cuda' or 'mps'"):
        MSCDetector(**fast_params, device=device).fit(images)


def test_an_absurd_image_size_is_refused_naming_it(images, fast_params) -> None:
    with pytest.raises(InvalidParameterError, match="'image_size' parameter"):
        MSCDetector(**{**fast_params, "image_size": 10**6}).fit(images)


@pytest.mark.parametrize("change", [{"lr": 1e30}, {"weight_decay": 1e30}])
def test_diverging_training_raises_and_keeps_the_fitted_model(fitted, images, change) -> None:
    before = fitted.score_samples(images)
    fitted.set_params(**change, batch_size=24)  # one step: the loss itself is still finite
    with pytest.raises(FloatingPointError, match=r"diverged.*Lower lr or weight_decay"):
        fitted.fit(images)
    np.testing.assert_array_equal(fitted.score_samples(images), before)


def test_scoring_before_fit_raises_not_fitted(images) -> None:
    det = MSCDetector()
    for method in (
        det.score_samples,
        det.decision_function,
        det.predict,
        det.transform,
        det.kneighbors,
    ):
        with pytest.raises(NotFittedError):
            method(images)


def test_bad_scoring_input_is_rejected(fitted) -> None:
    with pytest.raises(ValueError, match="NaN"):
        fitted.score_samples(np.full((2, 32, 32), np.nan, np.float32))


# ------------------------------------------------------------ fit behaviour


@pytest.mark.parametrize("loss", [*sorted(LOSSES), None])
def test_every_loss_trains(images, fast_params, loss) -> None:
    det = MSCDetector(**{**fast_params, "loss": loss, "epochs": 2}).fit(images)
    assert len(det.history_) == (0 if loss is None else 2)
    assert all(np.isfinite(h["loss"]) for h in det.history_)


def test_training_changes_the_embedding_and_kneighbors_uses_it(images, fast_params) -> None:
    frozen = MSCDetector(**{**fast_params, "loss": None}).fit(images)
    trained = MSCDetector(**{**fast_params, "lr": 0.05, "epochs": 2}).fit(images)
    np.testing.assert_allclose(frozen.center_, trained.center_, rtol=1e-5, atol=1e-6)
    assert not np.allclose(frozen.transform(images), trained.transform(images), atol=1e-4)


def test_frozen_parameters_do_not_move(images, fast_params) -> None:
    from msc_detector.backbones import create_backbone

    initial = create_backbone("efficientnet_lite0", weights=None)
    torch.manual_seed(0)
    det = MSCDetector(**{**fast_params, "lr": 0.05}).fit(images)
    before = {n: p for n, p in initial.model.named_parameters() if not p.requires_grad}
    after = dict(det.backbone_.named_parameters())
    assert before and all(not after[n].requires_grad for n in before)
    # BatchNorm running statistics are never updated: they equal a fresh network's.
    fresh = MSCDetector(**{**fast_params, "loss": None}).fit(images)
    for name, buf in fresh.backbone_.named_buffers():
        if "running" in name:
            torch.testing.assert_close(dict(det.backbone_.named_buffers())[name], buf)


def test_random_state_makes_fit_reproducible_without_touching_global_rng(images, fast_params):
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what we check
    a = MSCDetector(**{**fast_params, "epochs": 2}).fit(images).score_samples(images)
    b = MSCDetector(**{**fast_params, "epochs": 2}).fit(images).score_samples(images)
    np.testing.assert_array_equal(a, b)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state[1], np.random.get_state()[1])  # noqa: NPY002
    assert py_state == random.getstate()
    c = MSCDetector(**{**fast_params, "epochs": 2, "random_state": 1}).fit(images)
    assert not np.array_equal(a, c.score_samples(images))


def test_failed_fit_leaves_a_fitted_model_unchanged(fitted, images) -> None:
    expected = fitted.score_samples(images)
    attrs = {k: v for k, v in vars(fitted).items() if k.endswith("_")}
    with pytest.raises(ValueError):
        fitted.fit(np.full((5, 32, 32), np.nan, np.float32))
    fitted.set_params(lr=-1.0)
    with pytest.raises(InvalidParameterError):
        fitted.fit(images)
    fitted.set_params(lr=1e-4)
    assert all(vars(fitted)[k] is v for k, v in attrs.items())
    np.testing.assert_array_equal(fitted.score_samples(images), expected)


def test_interrupted_fit_leaves_a_fitted_model_unchanged(fitted, images) -> None:
    expected = fitted.score_samples(images)
    weights = {k: v.clone() for k, v in fitted.backbone_.state_dict().items()}

    def interrupt(epoch: int, _det: MSCDetector) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    fitted.set_params(epoch_callback=interrupt, epochs=3, lr=0.05)
    with pytest.raises(KeyboardInterrupt):
        fitted.fit(images[::-1])
    for k, v in fitted.backbone_.state_dict().items():
        assert torch.equal(v, weights[k])
    np.testing.assert_array_equal(fitted.score_samples(images), expected)


def test_epoch_callback_sees_a_fitted_detector_each_epoch(images, fast_params) -> None:
    seen = []

    def follow(epoch: int, det: MSCDetector) -> None:
        seen.append((epoch, det.score_samples(images[:3]).shape, det.offset_))

    MSCDetector(**{**fast_params, "epochs": 2}, epoch_callback=follow).fit(images)
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1] == (3,) for s in seen)


def test_verbose_shows_progress_with_the_loss(images, fast_params, capsys) -> None:
    MSCDetector(**{**fast_params, "verbose": 1}).fit(images)
    err = capsys.readouterr().err
    assert "epoch" in err and "loss=" in err
    MSCDetector(**fast_params).fit(images)
    assert capsys.readouterr().err == ""


def test_fp32_and_bf16_agree_closely(images, fast_params) -> None:
    a = MSCDetector(**{**fast_params, "loss": None, "precision": "fp32"}).fit(images)
    b = MSCDetector(**{**fast_params, "loss": None, "precision": "bf16"}).fit(images)
    assert a.precision_.name == "fp32" and b.precision_.name == "bf16"
    cos = (a.transform(images) * b.transform(images)).sum(1)
    assert cos.min() > 0.98


# ---------------------------------------------------------------- sklearn


def test_clone_get_and_set_params(fitted) -> None:
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not hasattr(copy, "offset_")
    copy.set_params(n_neighbors=5, loss="msc_angular")
    assert copy.n_neighbors == 5 and fitted.n_neighbors == 2


def test_tags_declare_an_image_outlier_detector() -> None:
    det = MSCDetector()
    tags = get_tags(det)
    assert is_outlier_detector(det) and tags.estimator_type == "outlier_detector"
    assert not tags.input_tags.two_d_array and tags.input_tags.three_d_array
    assert not tags.input_tags.allow_nan and tags.requires_fit


def test_pipeline(images, fast_params) -> None:
    steps = [("scale", FunctionTransformer(to_float)), ("det", MSCDetector(**fast_params))]
    pipe = Pipeline(steps)
    pipe.fit(images)
    np.testing.assert_allclose(
        pipe.decision_function(images[:4]),
        pipe.named_steps["det"].decision_function(to_float(images[:4])),
    )
    assert pipe.predict(images[:4]).shape == (4,)


def test_cross_val_score_roc_auc_with_normal_only_training_folds(blob_images, fast_params):
    normal, anomalies = blob_images
    X = np.concatenate([normal, anomalies])
    y = np.r_[np.ones(len(normal), int), np.zeros(len(anomalies), int)]
    scores = cross_val_score(
        MSCDetector(**fast_params),
        X,
        y,
        cv=NormalOnlyFolds(2),
        scoring="roc_auc",
        error_score="raise",
    )
    assert scores.shape == (2,) and np.all(scores > 0.9)


def test_grid_search_over_epochs_and_neighbours(blob_images, fast_params) -> None:
    normal, anomalies = blob_images
    X = np.concatenate([normal, anomalies])
    y = np.r_[np.ones(len(normal), int), np.zeros(len(anomalies), int)]
    search = GridSearchCV(
        MSCDetector(**fast_params),
        {"epochs": [0, 1], "n_neighbors": [1, 3]},
        cv=NormalOnlyFolds(2),
        scoring="roc_auc",
        error_score="raise",
    ).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_params_["n_neighbors"] in (1, 3)
    assert search.best_estimator_.n_train_ == len(X)


# ------------------------------------------------------------- persistence


def scores_in_a_fresh_process(detector: MSCDetector, images: np.ndarray, tmp_path: Path):
    """Dump ``detector`` with joblib and score ``images`` with it in a new interpreter."""
    model, data, out = tmp_path / "det.joblib", tmp_path / "x.npy", tmp_path / "s.npy"
    joblib.dump(detector, model)
    np.save(data, images)
    code = textwrap.dedent(f"""
        import joblib, numpy as np
        det = joblib.load({str(model)!r})
        np.save({str(out)!r}, det.score_samples(np.load({str(data)!r})))
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    return np.load(out)


def test_joblib_round_trip_in_a_fresh_process(fitted, images, tmp_path: Path) -> None:
    fresh = scores_in_a_fresh_process(fitted, images, tmp_path)
    np.testing.assert_array_equal(fresh, fitted.score_samples(images))


def test_a_cuda_fitted_model_loads_on_a_cpu_with_a_warning(fitted, images, monkeypatch):
    import json

    state = fitted.__getstate__()
    members = state["_model"]["members"]
    metadata = json.loads(members["metadata.json"])
    metadata["fitted"].update(device_="cuda:0", precision_="bf16")
    members["metadata.json"] = json.dumps(metadata).encode()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored = MSCDetector.__new__(MSCDetector)
    with pytest.warns(UserWarning, match="fitted on cuda:0.*loaded on the CPU"):
        restored.__setstate__(state)
    assert restored.device_ == torch.device("cpu")
    assert restored.precision_.device_type == "cpu"
    cos = (restored.transform(images) * fitted.transform(images)).sum(1)
    assert cos.min() > 0.98
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MSCDetector.__new__(MSCDetector).__setstate__(fitted.__getstate__())


# ------------------------------------------------------------ flip averaging


def embed_with(det: MSCDetector, X: np.ndarray, **changes) -> np.ndarray:
    """Embed ``X`` with a copy of the detector's embedder, some of its settings changed."""
    embedder = copy.copy(det.embedder_)
    for name, value in changes.items():
        setattr(embedder, name, value)
    return embedder.embed_all(as_image_source(X), batch_size=8)


def test_flip_average_embeds_the_normalised_mean_of_an_image_and_its_mirror(images, fast_params):
    fitted = MSCDetector(**fast_params, flip_average=True).fit(images)
    assert fitted.flip_average_
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    # the same network, embedding without the mirror
    expected = embed_with(fitted, images, flip_average=False) + embed_with(
        fitted, mirrored, flip_average=False
    )
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(fitted.transform(images), expected, atol=1e-5)
    np.testing.assert_allclose(fitted.transform(mirrored), expected, atol=1e-5)


def test_without_flip_average_a_mirror_scores_differently(images, fast_params) -> None:
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    plain = MSCDetector(**fast_params, flip_average=False).fit(images)
    averaged = MSCDetector(**fast_params, flip_average=True).fit(images)
    assert not plain.flip_average_
    gap = np.abs(plain.score_samples(images) - plain.score_samples(mirrored))
    assert gap.min() > 1e-3
    np.testing.assert_allclose(
        averaged.score_samples(images), averaged.score_samples(mirrored), atol=1e-5
    )


def test_flip_average_is_on_for_small_images_only_by_default(
    fitted, images, small_images, fast_params
) -> None:
    assert fitted.flip_average == "auto" and fitted.flip_average_ is False  # 32 px at 32
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    assert np.abs(fitted.score_samples(images) - fitted.score_samples(mirrored)).min() > 1e-3
    assert MSCDetector(**fast_params).fit(small_images).flip_average_ is True  # 16 px at 32


def test_scoring_follows_the_flip_average_of_the_fit(fitted, images) -> None:
    before = fitted.score_samples(images)
    fitted.set_params(flip_average=True)  # takes effect at the next fit only
    np.testing.assert_array_equal(fitted.score_samples(images), before)


# ------------------------------------------------------------- nearest view


@pytest.fixture
def small_images() -> np.ndarray:
    """16 random 16-pixel RGB images: at image_size 32 they are enlarged 2x."""
    return np.random.default_rng(3).integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)


def test_nearest_view_is_on_for_images_enlarged_2x_or_more(
    fitted, images, small_images, fast_params
) -> None:
    assert fitted.nearest_view == "auto" and fitted.nearest_view_ is False  # 32 px at 32
    assert MSCDetector(**fast_params).fit(small_images).nearest_view_ is True  # 16 px at 32
    forced = MSCDetector(**fast_params, nearest_view=True).fit(images)
    assert forced.nearest_view_ is True and forced.index_.dim == 2 * forced.center_.shape[0]
    off = MSCDetector(**fast_params, nearest_view=False).fit(small_images)
    assert off.nearest_view_ is False and off.index_.dim == off.center_.shape[0]


def test_nearest_view_appends_the_pretrained_embedding_of_a_pixel_block_upscale(
    small_images, fast_params
) -> None:
    det = MSCDetector(**fast_params).fit(small_images)
    joined = det.transform(small_images)
    width = det.center_.shape[0]
    assert joined.shape == (16, 2 * width)
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)
    own_view, nearest_view = det.embedder_.views
    assert nearest_view.network is det.pretrained_backbone_
    tuned = {"views": (own_view,)}  # the fine-tuned network, one view
    pretrained = {"views": (View(own_view.interpolation, det.pretrained_backbone_),)}
    own = embed_with(det, small_images, **tuned)  # the backbone's own (bicubic) enlargement
    blocks = small_images.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(joined[:, :width] * np.sqrt(2), own, atol=1e-5)
    np.testing.assert_allclose(
        joined[:, width:] * np.sqrt(2), embed_with(det, blocks, **pretrained), atol=1e-5
    )
    assert np.abs(own - embed_with(det, small_images, **pretrained)).max() > 1e-3  # fine-tuned
    assert (
        np.abs(embed_with(det, blocks, **tuned) - embed_with(det, blocks, **pretrained)).max()
        > 1e-3
    )


def test_the_pretrained_network_is_kept_unchanged(small_images, fast_params) -> None:
    det = MSCDetector(**fast_params).fit(small_images)
    start = MSCDetector(**fast_params, loss=None).fit(small_images)  # same seed, no training
    assert start.pretrained_backbone_ is None  # one network embeds both views
    kept = det.pretrained_backbone_.state_dict()
    for name, tensor in start.backbone_.state_dict().items():
        torch.testing.assert_close(kept[name], tensor, rtol=0, atol=0)
    assert not any(p.requires_grad for p in det.pretrained_backbone_.parameters())
    tuned = dict(det.backbone_.named_parameters())
    assert any(not torch.equal(tuned[n], p) for n, p in start.backbone_.named_parameters())
    single = MSCDetector(**fast_params, nearest_view=False).fit(small_images)
    assert single.pretrained_backbone_ is None


def test_a_pickle_keeps_the_pretrained_network(small_images, fast_params) -> None:
    det = MSCDetector(**fast_params).fit(small_images)
    copied = pickle.loads(pickle.dumps(det))
    assert copied.pretrained_backbone_ is not None
    scores = det.score_samples(small_images)
    np.testing.assert_array_equal(copied.score_samples(small_images), scores)


def test_scoring_follows_the_nearest_view_of_the_fit(small_images, fast_params) -> None:
    det = MSCDetector(**fast_params).fit(small_images)
    before = det.score_samples(small_images)
    det.set_params(nearest_view=False)  # takes effect at the next fit only
    np.testing.assert_array_equal(det.score_samples(small_images), before)


def test_epoch_callback_scores_with_both_views(small_images, fast_params) -> None:
    seen = []

    def follow(epoch: int, det: MSCDetector) -> None:
        seen.append((det.index_.dim, det.score_samples(small_images[:3])))

    final = MSCDetector(**fast_params, epoch_callback=follow).fit(small_images)
    assert [dim for dim, _ in seen] == [final.index_.dim] * 2 == [2 * 1280] * 2
    np.testing.assert_allclose(seen[-1][1], final.score_samples(small_images[:3]), atol=1e-6)


# ------------------------------------------------------ reading never writes


def same_state(det: MSCDetector) -> dict:
    """The estimator's attributes, each by identity, and the fitted arrays' bytes."""
    return {
        name: (id(value), value.tobytes() if isinstance(value, np.ndarray) else None)
        for name, value in vars(det).items()
    }


@pytest.mark.parametrize("origin", ["fitted", "loaded", "unpickled"])
def test_scoring_leaves_the_estimator_unchanged(small_images, fast_params, origin, tmp_path):
    det = MSCDetector(**fast_params).fit(small_images)  # two views: two networks
    if origin == "loaded":
        det.save(tmp_path / "m.msc")
        det = MSCDetector.load(tmp_path / "m.msc")
    elif origin == "unpickled":
        det = pickle.loads(pickle.dumps(det))
    before = same_state(det)
    det.score_samples(small_images)
    det.decision_function(small_images[:3])
    det.predict(small_images[:3])
    det.transform(small_images[:3])
    det.kneighbors(small_images[:3])
    det.kneighbors()
    det.anomaly_map(small_images[:3], return_neighbors=True)
    assert same_state(det) == before


def test_a_pickle_and_a_model_file_land_by_the_same_rule(fitted, images, tmp_path, monkeypatch):
    """Both go to the device they were fitted on where it exists, else to the CPU, warning."""
    import json

    from msc_detector import persistence

    members = persistence.encode(fitted)
    metadata = json.loads(members["metadata.json"])
    metadata["fitted"].update(device_="cuda:0", precision_="bf16")
    members["metadata.json"] = json.dumps(metadata).encode()
    state = {**fitted.__getstate__(), "_model": {"members": members}}
    monkeypatch.setattr(persistence, "encode", lambda detector: members)
    fitted.save(tmp_path / "cuda.msc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="fitted on cuda:0.*loaded on the CPU"):
        loaded = MSCDetector.load(tmp_path / "cuda.msc")
    unpickled = MSCDetector.__new__(MSCDetector)
    with pytest.warns(UserWarning, match="fitted on cuda:0.*loaded on the CPU"):
        unpickled.__setstate__(state)
    for det in (loaded, unpickled):
        assert det.device_ == torch.device("cpu") and det.precision_.device_type == "cpu"
    np.testing.assert_array_equal(loaded.score_samples(images), unpickled.score_samples(images))
    with pytest.raises(ValueError, match="CUDA is not available"):
        MSCDetector.load(tmp_path / "cuda.msc", device="cuda")


# ------------------------------------------------------------ module backbones


@pytest.fixture
def module_params(fast_params) -> dict:
    params = {k: v for k, v in fast_params.items() if k != "weights"}
    return {**params, "backbone": small_module(), "preprocess": dict(MODULE_PRE), "lr": 0.1}


@pytest.fixture
def module_fitted(images, module_params) -> MSCDetector:
    return MSCDetector(**module_params).fit(images)


def test_a_module_backbone_fits_scores_and_trains_a_copy(images, module_params) -> None:
    module = module_params["backbone"]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    det = MSCDetector(**module_params).fit(images)
    assert det.backbone is module  # fit never replaces or changes a parameter
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert det.backbone_ is not module
    trained = det.backbone_.state_dict()
    assert not torch.equal(trained["3.weight"], before["3.weight"])  # fine-tuning moved it
    assert det.weights_source_ == "module:torch.nn.modules.container.Sequential"
    assert det.backbone_spec_.num_features == 16 and det.transform(images).shape == (24, 16)
    scores = det.score_samples(images)
    assert scores.shape == (24,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(det.predict(images), np.where(scores < det.offset_, -1, 1))


def test_a_module_backbone_is_folded_where_it_can_be(module_fitted) -> None:
    network = module_fitted.backbone_
    assert module_fitted.embedder_.compute_network(network) is not network  # conv + BN folded
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    plain.append(torch.nn.Flatten())
    det = MSCDetector(plain, preprocess=MODULE_PRE, image_size=32, epochs=0, random_state=0)
    det.fit(np.zeros((4, 32, 32, 3), np.uint8))
    assert det.embedder_.compute_network(det.backbone_) is det.backbone_  # nothing to fold


def test_a_module_backbone_is_fitted_alike_by_clones(images, module_fitted) -> None:
    copy_ = clone(module_fitted)
    assert copy_.backbone is not module_fitted.backbone  # clone deep-copies the module
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            copy_.backbone.state_dict().values(),
            module_fitted.backbone.state_dict().values(),
            strict=True,
        )
    )
    assert copy_.preprocess == module_fitted.preprocess and not hasattr(copy_, "offset_")
    np.testing.assert_array_equal(
        copy_.fit(images).score_samples(images), module_fitted.score_samples(images)
    )


def test_grid_search_with_a_module_backbone(blob_images, module_params) -> None:
    normal, anomalies = blob_images
    X = np.concatenate([normal, anomalies])
    y = np.r_[np.ones(len(normal), int), np.zeros(len(anomalies), int)]
    search = GridSearchCV(
        MSCDetector(**{**module_params, "epochs": 0}),
        {"n_neighbors": [1, 3]},
        cv=NormalOnlyFolds(2),
        scoring="roc_auc",
        error_score="raise",
    ).fit(X, y)
    assert search.best_estimator_.backbone_spec_.is_module
    assert search.best_estimator_.n_train_ == len(X)


def test_a_module_detector_pickles_with_equal_scores(module_fitted, images, tmp_path) -> None:
    restored = pickle.loads(pickle.dumps(module_fitted))
    scores = module_fitted.score_samples(images)
    np.testing.assert_array_equal(restored.score_samples(images), scores)
    assert restored.backbone_spec_ == module_fitted.backbone_spec_
    assert restored.weights_source_ == module_fitted.weights_source_
    assert [p.requires_grad for p in restored.backbone_.parameters()] == [
        p.requires_grad for p in module_fitted.backbone_.parameters()
    ]
    np.testing.assert_array_equal(
        scores_in_a_fresh_process(module_fitted, images, tmp_path), scores
    )


def test_a_module_detector_with_a_nearest_view_pickles_both_networks(module_params) -> None:
    small = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    det = MSCDetector(**module_params).fit(small)
    assert det.nearest_view_ and det.pretrained_backbone_ is not None
    restored = pickle.loads(pickle.dumps(det))
    assert restored.pretrained_backbone_ is not None
    np.testing.assert_array_equal(restored.score_samples(small), det.score_samples(small))


def test_preprocess_replaces_a_named_backbones_own(images, fast_params) -> None:
    plain = MSCDetector(**{**fast_params, "epochs": 0}).fit(images)
    own = plain.backbone_spec_.preprocess
    det = MSCDetector(
        **{**fast_params, "epochs": 0}, preprocess={"mean": (0, 0, 0), "std": (1,) * 3}
    )
    det.fit(images)
    pre = det.backbone_spec_.preprocess
    assert (pre.mean, pre.std) == ((0.0,) * 3, (1.0,) * 3)
    assert (pre.input_size, pre.interpolation) == (own.input_size, own.interpolation)
    assert not np.allclose(det.transform(images), plain.transform(images))


@pytest.mark.parametrize(
    ("preprocess", "error"),
    [
        ({"mean": (0, 0, 0), "sdt": (1, 1, 1)}, ValueError),
        ({"std": (0, 1, 1)}, ValueError),
        ("imagenet", InvalidParameterError),
    ],
)
def test_invalid_preprocess_fails_fit(images, fast_params, preprocess, error) -> None:
    with pytest.raises(error, match="preprocess"):
        MSCDetector(**fast_params, preprocess=preprocess).fit(images)


def test_a_module_backbone_without_preprocess_fails_fit_saying_what_to_pass(images) -> None:
    with pytest.raises(ValueError, match=r"preprocess=dict\(input_size=.*missing: input_size"):
        MSCDetector(small_module()).fit(images)
    with pytest.raises(ValueError, match="feature_info"):
        MSCDetector(small_module(), preprocess=MODULE_PRE, frozen_stages=1).fit(images)

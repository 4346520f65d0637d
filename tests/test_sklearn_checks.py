"""scikit-learn's own estimator checks, run on the detector through a table adapter.

scikit-learn's suite feeds 2-D tables of floats, which an image detector refuses by
design, and it skips every check of an estimator whose tags say so. To run it anyway,
:class:`TableDetector` (test-only) declares 2-D input and reads each row of a numeric
table as a grayscale image one pixel high, its values squashed into [0, 1] by a fixed
element-wise map (NaN and infinities pass through, for the detector to refuse); sparse
matrices and anything that is not a numeric table go to the detector as they are. Every
other line of code the checks exercise is the detector's own: cloning, parameters, tags,
fitting, scoring, pickling, the outlier contract and the transformer contract. The
checks that cannot apply to an image detector are listed with their reasons.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import MODULE_PRE, small_module
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from msc_detector import MSCDetector


def as_images(X: Any) -> Any:
    """A numeric 2-D table as grayscale images ``(n, 1, f)`` in [0, 1]; anything else as is."""
    if scipy.sparse.issparse(X):
        return X
    array = np.asarray(X)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        return X
    table = array.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        squashed = 1.0 / (1.0 + np.exp(-table))
    return np.where(np.isfinite(table), squashed, table)[:, None, :]


class TableDetector(MSCDetector):
    """MSCDetector that reads a 2-D table as images one pixel high (see the module docstring)."""

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        return tags

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        return "TableDetector(tiny)"  # short test ids; the module backbone prints 400 characters

    def fit(self, X: Any, y: Any = None) -> TableDetector:
        return super().fit(as_images(X), y)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        return super().fit_predict(as_images(X), y)

    def score_samples(self, X: Any) -> np.ndarray:
        return super().score_samples(as_images(X))

    def decision_function(self, X: Any) -> np.ndarray:
        return super().decision_function(as_images(X))

    def predict(self, X: Any) -> np.ndarray:
        return super().predict(as_images(X))

    def transform(self, X: Any) -> np.ndarray:
        return super().transform(as_images(X))


# A detector that fits a table of 300 rows in well under a second: a two-layer network of
# its own (no weights to load), 16-pixel inputs, no fine-tuning, no patch bank.
DETECTOR = TableDetector(
    backbone=small_module(),
    preprocess={**MODULE_PRE, "input_size": 16},
    image_size=16,
    epochs=0,
    patch_memory=None,
    batch_size=64,
    device="cpu",
    random_state=0,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Run the tiny network on one thread: two spin against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Checks that cannot apply to an image detector, with the reason.
NO_FEATURE_COUNT = (
    "images have no feature count: MSCDetector sets no n_features_in_ and resizes every "
    "image to image_size, so a table of another width is no error"
)
NO_FIT_TRANSFORM = (
    "it calls fit_transform, which MSCDetector lacks: it is an outlier detector whose "
    "transform gives embeddings (fit(X).transform(X))"
)
NOT_FOR_IMAGES = {
    "check_estimators_overwrite_params": (
        "it compares joblib.hash of each parameter with that of its deepcopy, and a torch "
        "module hashes differently from its deepcopy; fit leaves the module backbone as it "
        "was (test_fit_leaves_a_module_backbone_as_it_was)"
    ),
    "check_n_features_in_after_fitting": NO_FEATURE_COUNT,
    "check_n_features_in": NO_FEATURE_COUNT,
    "check_outliers_train": NO_FEATURE_COUNT + " (it expects predict(X.T) to raise)",
    "check_complex_data": (
        "complex tables are no images; it wants the words 'Complex data not supported'"
    ),
    "check_dtype_object": "a table of Python objects is no image (nor a list of images)",
    "check_estimators_empty_data_messages": (
        "it wants messages about samples and features; MSCDetector's speak of images "
        "('X is empty; pass at least one image', 'images of 1x0 pixels')"
    ),
    "check_fit2d_1sample": (
        "it wants the words '1 sample'; MSCDetector says fit needs n_neighbors + 1 images, "
        "as a training image is not its own neighbour"
    ),
    "check_fit2d_predict1d": (
        "it wants the words 'Reshape your data'; MSCDetector names the image shapes it takes"
    ),
    "check_outliers_fit_predict": (
        "fit_predict labels the training images leave-self-out, as LocalOutlierFactor does, "
        "while fit(X).predict(X) finds each image itself at distance 0 (the documented "
        "outlier contract)"
    ),
    "check_transformer_data_not_an_array": NO_FIT_TRANSFORM,
    "check_transformer_general": NO_FIT_TRANSFORM,
    "check_transformer_general(readonly_memmap=True)": NO_FIT_TRANSFORM,
}


def expected_failures(estimator: Any) -> dict[str, str]:
    return NOT_FOR_IMAGES


@parametrize_with_checks([DETECTOR], expected_failed_checks=expected_failures, xfail_strict=True)
def test_scikit_learn_checks(estimator, check) -> None:
    check(estimator)


def test_fit_leaves_a_module_backbone_as_it_was() -> None:
    network = small_module()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    detector = clone(DETECTOR).set_params(backbone=network, epochs=1, batch_size=8)
    detector.fit(as_images(np.random.default_rng(0).normal(size=(24, 3))))
    assert detector.get_params()["backbone"] is network and network.training
    for name, value in network.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_the_detector_declares_what_it_is_to_scikit_learn() -> None:
    tags = MSCDetector().__sklearn_tags__()
    assert tags.estimator_type == "outlier_detector"
    assert tags.transformer_tags is not None  # it has transform: the checks require the tag
    assert tags.transformer_tags.preserves_dtype == []  # embeddings are float32 whatever X is
    assert not tags.input_tags.two_d_array and tags.input_tags.three_d_array
    with pytest.raises(ValueError, match="MSCDetector takes images"):
        MSCDetector().fit(np.zeros((4, 3)))

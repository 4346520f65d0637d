"""MSCDetector.anomaly_map, the patch bank and the patch image scores."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODULE_PRE, small_module, write_model
from PIL import Image
from scipy.ndimage import gaussian_filter

from msc_detector import MSCDetector, persistence
from msc_detector.patches import grid_to_maps


def textures(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth grey noise: a stand-in for a normal surface."""
    rng = np.random.default_rng(seed)
    noise = np.stack([gaussian_filter(a, 1.0) for a in rng.normal(size=(n, size, size))])
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return np.repeat((noise * 120 + 60)[..., None], 3, axis=-1).astype(np.uint8)


def with_squares(images: np.ndarray, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright square pasted into each image (a copy), and the squares' masks."""
    rng = np.random.default_rng(seed)
    out, masks = images.copy(), np.zeros(images.shape[:3], bool)
    for i in range(len(out)):
        y, x = rng.integers(2, images.shape[1] - side - 2, size=2)
        out[i, y : y + side, x : x + side] = 255
        masks[i, y : y + side, x : x + side] = True
    return out, masks


_SCORES = ("global", "patch", "combined")
MODULE = {
    "preprocess": MODULE_PRE,
    "epochs": 1,
    "batch_size": 8,
    "random_state": 0,
    "patch_memory": 400,
}


@pytest.fixture(scope="module")
def surfaces() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train = textures(16, 32, seed=0)
    test, masks = with_squares(textures(6, 32, seed=1), 6, seed=2)
    return train, test, masks


def module_detector(**changes) -> MSCDetector:
    return MSCDetector(small_module(), **{**MODULE, **changes})


def peaks(maps: np.ndarray) -> list[tuple[int, int]]:
    return [np.unravel_index(int(np.nanargmax(m)), m.shape) for m in maps]


def test_a_synthetic_defect_s_map_peaks_inside_its_mask(surfaces) -> None:
    train, test, masks = surfaces
    det = module_detector().fit(train)
    maps = det.anomaly_map(test)
    assert maps.shape == (6, 32, 32) and maps.dtype == np.float32
    for m, mask, (y, x) in zip(maps, masks, peaks(maps), strict=True):
        assert mask[y, x]
        assert m[mask].mean() > m[~mask].mean() + 3 * m[~mask].std()
    clean = det.anomaly_map(textures(6, 32, seed=1))
    assert clean.max() < maps.max(axis=(1, 2)).min()


def test_the_bundled_lite0_localises_a_defect_within_a_patch(fast_params) -> None:
    """Pretrained stride-8 features at 64 px: the peak lies within 8 px of the square."""
    train = textures(12, 64, seed=3)
    test, masks = with_squares(textures(4, 64, seed=4), 12, seed=5)
    params = {**fast_params, "weights": "auto", "image_size": 64, "loss": None}
    det = MSCDetector(**params, patch_memory=500).fit(train)
    maps = det.anomaly_map(test)
    for mask, (y, x) in zip(masks, peaks(maps), strict=True):
        ys, xs = np.nonzero(mask)
        assert ys.min() - 8 <= y <= ys.max() + 8 and xs.min() - 8 <= x <= xs.max() + 8
    patch = MSCDetector(**{**params, "image_score": "patch"}, patch_memory=500).fit(train)
    assert (patch.decision_function(test) < 0).all()


@pytest.fixture(scope="module")
def fitted() -> tuple[MSCDetector, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    params = {"weights": None, "image_size": 32, "epochs": 1, "batch_size": 8}
    params["image_score"] = "global"  # a bank for the maps; the kNN score to compare with
    return MSCDetector(**params, random_state=0, patch_memory=20).fit(images), images


@pytest.fixture(scope="module")
def keep_all(fitted) -> MSCDetector:
    """The same detector, with every training patch in its bank."""
    det, images = fitted
    return MSCDetector(**{**det.get_params(), "patch_memory": 10_000}).fit(images)


def test_every_input_form_gives_the_same_maps(fitted, tmp_path: Path) -> None:
    det, images = fitted
    expected = det.anomaly_map(images[:3])
    assert expected.shape == (3, 32, 32) and expected.dtype == np.float32
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    forms = [
        images[:3].astype(np.float64) / 255.0,
        torch.from_numpy(images[:3]).permute(0, 3, 1, 2),
        [Image.fromarray(image) for image in images[:3]],
        paths,
        [str(p) for p in paths],
        list(images[:3]),
    ]
    for form in forms:
        got = det.anomaly_map(form)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    gray = det.anomaly_map(images[:2, :, :, 0])
    assert gray.shape == (2, 32, 32)


def test_images_of_different_sizes_get_maps_of_their_own_sizes(fitted) -> None:
    det, images = fitted
    rng = np.random.default_rng(1)
    mixed = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(32, 32), (20, 48), (64, 40)]
    ]
    center = MSCDetector(**{**det.get_params(), "crop_mode": "center"}).fit(images)
    for detector in (det, center):
        maps = detector.anomaly_map(mixed)
        assert isinstance(maps, list)
        assert [m.shape for m in maps] == [(32, 32), (20, 48), (64, 40)]
        assert all(m.dtype == np.float32 for m in maps)
        assert not np.isnan(maps[0]).any()
    # Squashed (the default), every pixel of a non-square image is seen.
    assert not any(np.isnan(m).any() for m in det.anomaly_map(mixed))
    # Cut to its centre square, a non-square image is seen there only; the rest is NaN.
    maps = center.anomaly_map(mixed)
    assert np.isnan(maps[1][:, :10]).all() and not np.isnan(maps[1][:, 16:32]).any()
    assert np.isnan(maps[2][:10]).all() and not np.isnan(maps[2][16:48]).any()


def test_a_defect_at_the_end_of_a_wide_image_is_seen_only_when_squashed(fitted) -> None:
    det, _ = fitted
    strips = textures(14, 96, seed=4)[:, :32]  # 32 x 96 surfaces: 12 to fit, 2 to score
    params = {**det.get_params(), "patch_memory": 400, "image_score": "patch"}
    squash, center = (
        MSCDetector(**{**params, "crop_mode": mode}).fit(strips[:12])
        for mode in ("squash", "center")
    )
    clean = strips[12:]
    marked = clean.copy()
    marked[:, 12:20, 84:92] = 255  # near the right end, outside the centre square
    scores = squash.score_samples(np.concatenate([clean, marked]))
    assert (scores[2:] < scores[:2]).all()
    scores = center.score_samples(np.concatenate([clean, marked]))
    np.testing.assert_array_equal(scores[2:], scores[:2])  # never seen
    maps = squash.anomaly_map(marked)
    assert maps.shape == (2, 32, 96) and not np.isnan(maps).any()
    assert all(np.unravel_index(m.argmax(), m.shape)[1] >= 64 for m in maps)


def test_the_patch_bank_holds_at_most_patch_memory_patches(fitted, keep_all) -> None:
    det, images = fitted
    bank = det.patch_bank_
    assert len(bank) == 20 and bank.grid == (4, 4)
    assert bank.owners.min() >= 0 and bank.owners.max() < len(images)
    assert len(keep_all.patch_bank_) == len(images) * 16


def test_neighbors_name_the_training_patch_nearest_to_the_peak(fitted, keep_all) -> None:
    det, images = fitted
    maps, neighbors = keep_all.anomaly_map(images[:4], return_neighbors=True)
    # Every patch of a training image is in the bank: each is its own nearest patch.
    np.testing.assert_array_equal(neighbors["train_index"], np.arange(4))
    np.testing.assert_allclose(neighbors["distance"], np.zeros(4), atol=1e-5)
    peak_cells = np.floor(neighbors["peak"] / 32 * 4)
    np.testing.assert_allclose(neighbors["train_position"], (peak_cells + 0.5) / 4)
    maps, neighbors = det.anomaly_map(images[:4] // 2, return_neighbors=True)
    assert neighbors["peak"].shape == neighbors["train_position"].shape == (4, 2)
    assert (neighbors["distance"] > 0).all()
    assert ((neighbors["train_position"] > 0) & (neighbors["train_position"] < 1)).all()
    for m, (y, x) in zip(maps, neighbors["peak"].astype(int), strict=True):
        assert m[y, x] == np.nanmax(m)


def leave_self_out_distances(det: MSCDetector, train: np.ndarray) -> np.ndarray:
    """Each training patch's distance to the nearest bank patch of another image, (n, h, w)."""
    bank = det.patch_bank_
    batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in train])
    features = det.embedder_.run(0, batch, det.patch_stages_)[1].numpy()
    vectors, grids = bank.vectors(), []
    for i, grid in enumerate(features):
        d = ((grid.reshape(-1, grid.shape[-1])[:, None] - vectors[None]) ** 2).sum(-1)
        d[:, bank.owners == i] = np.inf
        grids.append(np.sqrt(d.min(axis=1)).reshape(grid.shape[:2]))
    return np.stack(grids)


def patch_scores(det: MSCDetector, distances: np.ndarray) -> np.ndarray:
    """Minus the maxima of the maps of ``distances`` above the bank's baseline."""
    excess = torch.from_numpy(distances - det.patch_bank_.baseline)
    return -grid_to_maps(excess, det.image_size_).amax(dim=(1, 2)).double().numpy()


def test_patch_training_scores_leave_each_image_s_own_patches_out(surfaces) -> None:
    train, _, _ = surfaces
    det = module_detector(image_score="patch").fit(train)
    expected = patch_scores(det, leave_self_out_distances(det, train))
    np.testing.assert_allclose(det.train_scores_, expected, rtol=1e-4)
    assert (det.score_samples(train) >= det.train_scores_ - 1e-6).all()  # self included


def test_the_baseline_is_the_mean_leave_self_out_distance_per_position(surfaces) -> None:
    train, _, _ = surfaces
    det = module_detector(patch_memory=100).fit(train)
    bank = det.patch_bank_
    grids = leave_self_out_distances(det, train)  # 16 images: all of them set the baseline
    np.testing.assert_allclose(bank.baseline, np.mean(grids, axis=0), rtol=1e-4, atol=1e-5)
    assert bank.baseline.shape == bank.grid and bank.baseline.dtype == np.float32


def test_a_sample_of_the_images_sets_the_baseline_and_every_image_is_scored(
    surfaces, monkeypatch
) -> None:
    from msc_detector import fitting

    train, _, _ = surfaces
    monkeypatch.setattr(fitting, "_BASELINE_IMAGES", 5)
    det = module_detector(image_score="patch").fit(train)
    grids = leave_self_out_distances(det, train)
    sample = [0, 4, 8, 11, 15]  # five images spread over the sixteen
    np.testing.assert_allclose(
        det.patch_bank_.baseline, grids[sample].mean(axis=0), rtol=1e-4, atol=1e-5
    )
    # The sample sets the baseline (from distance bounds, exact on a bank this small),
    # and every image's score is its leave-self-out patch score.
    np.testing.assert_allclose(det.train_scores_, patch_scores(det, grids), rtol=1e-4)


@pytest.mark.parametrize("image_score", ["global", "patch", "combined"])
def test_the_outlier_contract_holds_for_each_image_score(surfaces, image_score) -> None:
    train, test, _ = surfaces
    det = module_detector(image_score=image_score, contamination=0.25).fit(train)
    X = np.concatenate([train[:4], test])
    scores = det.score_samples(X)
    assert scores.dtype == np.float64 and scores.shape == (len(X),)
    decision = det.decision_function(X)
    np.testing.assert_allclose(decision, scores - det.offset_)
    np.testing.assert_array_equal(det.predict(X), np.where(decision < 0, -1, 1))
    assert det.offset_ == pytest.approx(np.percentile(det.train_scores_, 25.0))
    assert (det.fit_predict(train) == -1).mean() == pytest.approx(0.25, abs=0.07)
    if image_score != "global":
        assert (det.predict(test) == -1).all()  # the squares


def test_combined_sums_the_scores_centred_and_scaled_on_their_training_values(surfaces) -> None:
    train, test, _ = surfaces
    glob, patch, both = (module_detector(image_score=s).fit(train) for s in _SCORES)
    parts = [(-glob.train_scores_, -glob.score_samples(test))]
    parts += [(-patch.train_scores_, -patch.score_samples(test))]
    medians = [np.median(a) for a, _ in parts]
    scales = [1.4826 * np.median(np.abs(a - m)) for (a, _), m in zip(parts, medians, strict=True)]
    np.testing.assert_allclose(both.score_locations_, medians)
    np.testing.assert_allclose(both.score_scales_, scales)
    for k, scored in enumerate((both.train_scores_, both.score_samples(test))):
        z = [(p[k] - m) / s for p, m, s in zip(parts, medians, scales, strict=True)]
        np.testing.assert_allclose(scored, -(z[0] + z[1]))
    assert glob.score_scales_ == patch.score_scales_ == (1.0, 1.0)


def test_without_a_patch_bank_the_errors_name_the_fix(fitted) -> None:
    det, images = fitted
    bare = MSCDetector(**{**det.get_params(), "patch_memory": None}).fit(images)
    assert bare.patch_bank_ is None
    with pytest.raises(ValueError, match=r"number of patches\) and fit again"):
        bare.anomaly_map(images[:1])
    with pytest.raises(
        ValueError, match="image_score='patch' scores patches, which needs a patch bank"
    ):
        MSCDetector(**{**det.get_params(), "patch_memory": None, "image_score": "patch"}).fit(
            images
        )
    for stages in [(), (-1,), ("blocks",), (True,)]:
        with pytest.raises(ValueError, match="patch_stages"):
            MSCDetector(**{**det.get_params(), "patch_stages": stages}).fit(images)
    refit = pickle.loads(pickle.dumps(det)).set_params(patch_stages=(9,))
    with pytest.raises(ValueError, match="positions in"):
        refit.fit(images)  # fails at the patch step, after training
    np.testing.assert_array_equal(refit.patch_bank_.vectors(), det.patch_bank_.vectors())
    assert refit.patch_stages_ == det.patch_stages_
    with pytest.raises(ValueError, match="patch_memory"):
        MSCDetector(**{**det.get_params(), "patch_memory": 0}).fit(images)
    with pytest.raises(ValueError, match="image_score"):
        MSCDetector(**{**det.get_params(), "image_score": "max"}).fit(images)


@pytest.mark.parametrize("image_score", ["patch", "combined"])
def test_maps_and_scores_survive_saving_and_pickling(fitted, tmp_path, image_score) -> None:
    _, images = fitted
    det = MSCDetector(
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=8,
        random_state=0,
        patch_memory=20,
        image_score=image_score,
        patch_stages=(2, 3),
    ).fit(images)
    maps, neighbors = det.anomaly_map(images[:3], return_neighbors=True)
    det.save(tmp_path / "m.msc")
    for other in (MSCDetector.load(tmp_path / "m.msc"), pickle.loads(pickle.dumps(det))):
        got, got_neighbors = other.anomaly_map(images[:3], return_neighbors=True)
        np.testing.assert_array_equal(got, maps)
        for key, value in neighbors.items():
            np.testing.assert_array_equal(got_neighbors[key], value)
        np.testing.assert_array_equal(other.score_samples(images), det.score_samples(images))
        assert other.image_score_ == image_score and other.score_scales_ == det.score_scales_
        np.testing.assert_array_equal(other.patch_bank_.owners, det.patch_bank_.owners)
        np.testing.assert_array_equal(other.patch_bank_.baseline, det.patch_bank_.baseline)
        assert other.patch_stages_ == det.patch_stages_ == ("blocks.2", "blocks.4")
        assert other.get_params() == det.get_params()  # patch_stages comes back a tuple


def test_a_format_2_file_loads_without_a_patch_bank(fitted, tmp_path) -> None:
    det, images = fitted
    members = persistence.encode(det)
    from safetensors.numpy import load, save

    arrays = {k: v for k, v in load(members["arrays.safetensors"]).items() if "patch" not in k}
    metadata = json.loads(members["metadata.json"])
    for key in ("patch_stages_", "image_score_", "score_scales_", "score_locations_"):
        del metadata["fitted"][key]
    for key in ("patch_memory", "patch_stages", "image_score"):
        del metadata["params"][key]
    members.update(
        {"arrays.safetensors": save(arrays), "metadata.json": json.dumps(metadata).encode()}
    )
    write_model(tmp_path / "old.msc", members, 2)
    old = MSCDetector.load(tmp_path / "old.msc")
    assert old.patch_bank_ is None and old.patch_memory is None and old.image_score_ == "global"
    np.testing.assert_array_equal(old.score_samples(images), det.score_samples(images))
    with pytest.raises(ValueError, match="patch bank"):
        old.anomaly_map(images[:1])
    assert persistence.inspect(tmp_path / "old.msc")["format_version"] == 2


def test_a_model_file_with_more_patches_than_its_training_images_hold_is_refused(
    fitted, tmp_path
) -> None:
    det, _ = fitted
    members = persistence.encode(det)
    metadata = json.loads(members["metadata.json"])
    metadata["params"]["patch_memory"] = 5  # read by the next fit only: still loads
    members["metadata.json"] = json.dumps(metadata).encode()
    assert len(persistence.decode(members, "test").arrays["patch_vectors"]) == 20
    metadata["fitted"]["n_train_"] = 12
    from safetensors.numpy import load, save

    arrays = load(members["arrays.safetensors"])
    arrays["patch_grid"] = np.array([1, 1], np.int64)  # 12 images of 1 patch: not 20
    arrays["patch_positions"] = np.zeros_like(arrays["patch_positions"])
    arrays["patch_baseline"] = np.zeros((1, 1), np.float32)
    members["arrays.safetensors"] = save(arrays)
    with pytest.raises(persistence.ModelFileError, match="holds 20 patches"):
        persistence.decode(members, "test")


def test_anomaly_map_never_writes_to_the_estimator(fitted) -> None:
    det, images = fitted
    before = {
        k: (id(v), v.tobytes() if isinstance(v, np.ndarray) else None)
        for k, v in vars(det).items()
    }
    bank = det.patch_bank_.vectors().copy()
    det.anomaly_map(images[:3], return_neighbors=True)
    det.anomaly_map([Image.fromarray(images[0]), Image.fromarray(images[1, :20])])
    after = {
        k: (id(v), v.tobytes() if isinstance(v, np.ndarray) else None)
        for k, v in vars(det).items()
    }
    assert after == before
    np.testing.assert_array_equal(det.patch_bank_.vectors(), bank)


class _Flat(torch.nn.Module):
    """A module backbone with no feature-map stage: pixels straight to a vector."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def test_auto_patch_memory_skips_the_bank_where_the_backbone_has_no_feature_maps() -> None:
    train = textures(12, 32, seed=0)
    detector = MSCDetector(_Flat(), **{**MODULE, "patch_memory": "auto"}).fit(train)
    assert detector.patch_bank_ is None
    with pytest.raises(ValueError, match="patch_memory"):
        detector.anomaly_map(train[:2])
    with pytest.raises(ValueError, match="gives no patches; pass patch_memory=None"):
        MSCDetector(_Flat(), **{**MODULE, "patch_memory": 64}).fit(train)
    assert module_detector(patch_memory="auto").fit(train).patch_bank_ is not None

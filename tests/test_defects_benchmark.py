"""The defect benchmark: its data (crops, defects, masks) and its localisation metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from benchmarks import defects, pro

pytest.importorskip("defect_synthesis")
pytest.importorskip("cv2")


# ----------------------------------------------------------------------- metrics


def _brute_force_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at each distinct value, region by region and threshold by threshold."""
    regions = []
    for i in range(len(masks)):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        overlaps = [above[i][region].sum() / region.sum() for i, region in regions]
        pros.append(sum(overlaps) / len(overlaps))
        fprs.append(above[~masks].sum() / (~masks).sum())
    return np.array(fprs), np.array(pros)


def _brute_force_area(fpr: np.ndarray, pro_: np.ndarray, limit: float) -> float:
    """Area by thin vertical strips of the piecewise-linear curve (a different integrator)."""
    xs = np.linspace(0, limit, 200_001)
    return float(np.interp(xs, fpr, pro_).mean())


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, 12, size=(3, 7, 7)).astype(float)  # many ties
    masks = np.zeros((3, 7, 7), bool)
    masks[0, 1:3, 1:3] = True  # a 4-pixel region
    masks[0, 5, 5] = True  # a 1-pixel region
    masks[1, 2:6, 3] = True  # a line; image 2 is defect-free
    maps[masks] += rng.integers(0, 6, size=masks.sum())
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_curve_matches_a_brute_force_loop(seed: int) -> None:
    maps, masks = _random_case(seed)
    fpr, pro_ = pro.pro_curve(maps, masks)
    want_fpr, want_pro = _brute_force_curve(maps, masks)
    np.testing.assert_allclose(fpr, want_fpr, atol=1e-12)
    np.testing.assert_allclose(pro_, want_pro, atol=1e-12)
    for limit in (0.3, 0.05, 1.0):
        assert pro.pro_auc(maps, masks, limit) == pytest.approx(
            _brute_force_area(want_fpr, want_pro, limit), abs=1e-4
        )


def test_pro_auc_is_one_for_a_perfect_map_and_zero_for_an_inverted_one() -> None:
    _, masks = _random_case(0)
    assert pro.pro_auc(masks.astype(float), masks) == pytest.approx(1.0)
    assert pro.pro_auc(-masks.astype(float), masks) == pytest.approx(0.0)


def test_pro_of_random_maps_is_half_the_fpr_limit() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 16, 16), bool)
    masks[:20, 4:9, 4:9] = True
    assert pro.pro_auc(rng.random(masks.shape), masks, 0.3) == pytest.approx(0.15, abs=0.03)


def test_pro_weighs_a_small_region_like_a_large_one() -> None:
    masks = np.zeros((1, 20, 20), bool)
    masks[0, :10, :10] = True  # 100 pixels, found
    masks[0, 15, 15] = True  # 1 pixel, missed
    maps = masks.astype(float)
    maps[0, 15, 15] = -1.0  # below every defect-free pixel
    # Pixel-level ROC-AUC barely notices the missed pixel; PRO counts it as half the defects.
    assert pro.pixel_roc_auc(maps, masks) > 0.99
    assert pro.pro_auc(maps, masks, 0.3) == pytest.approx(0.5, abs=0.01)


def test_pixel_roc_auc_and_input_checks() -> None:
    maps, masks = _random_case(3)
    assert pro.pixel_roc_auc(maps, masks) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel())
    )
    with pytest.raises(ValueError, match="both be"):
        pro.pro_auc(maps[0], masks[0])
    with pytest.raises(ValueError, match="defect pixel"):
        pro.pro_auc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="max_fpr"):
        pro.pro_auc(maps, masks, 0.0)


# -------------------------------------------------------------------------- data


def _row_photo(height: int = 160, width: int = 96) -> np.ndarray:
    """A photo whose every pixel holds its row number, so a crop tells where it came from."""
    return np.repeat(np.arange(height, dtype=np.uint8)[:, None], width, axis=1)


def test_training_and_test_crops_come_from_disjoint_rows() -> None:
    data = defects.build("grass", _row_photo(), size=32, n_train=20, n_good=6, n_per_defect=1)
    split = round(160 * 0.6)
    assert data.train.shape == (20, 32, 32) and data.train.dtype == np.uint8
    assert data.train.max() < split
    assert data.test.shape == (6 + 5, 32, 32, 3)  # RGB: the defects keep their colours
    good = data.test[data.kinds == defects.GOOD]
    assert good.min() >= split and np.all(good == good[..., :1])  # grey surface
    # Defective crops come from there too: a defect paints over less than half a crop.
    assert np.all(np.median(data.test[data.labels == 1], axis=(1, 2)) >= split)


def test_test_set_has_each_defect_with_a_mask_where_the_image_changed() -> None:
    rng = np.random.default_rng(0)
    texture = (rng.random((200, 200)) * 60 + 100).astype(np.uint8)  # mid-grey noise
    data = defects.build("gravel", texture, size=64, n_train=2, n_good=3, n_per_defect=2)
    assert list(data.kinds) == ["good"] * 3 + [k for k in defects.DEFECTS for _ in range(2)]
    assert np.array_equal(data.labels, data.kinds != "good")
    assert not data.masks[:3].any() and all(m.any() for m in data.masks[3:])
    crop = texture[100:164, 50:114]
    for kind in defects.DEFECTS:
        image, mask = defects.add_defect(crop, kind, seed=5)
        assert image.shape == (*crop.shape, 3) and image.dtype == np.uint8
        change = np.abs(image.astype(int) - crop[..., None]).max(axis=2)
        assert change[mask].mean() > 3 * change[~mask].mean() + 5, kind
        grey, same_mask = defects.add_defect(crop, kind, seed=5, color=False)
        assert grey.shape == crop.shape and np.array_equal(mask, same_mask)
    grey_set = defects.build("gravel", texture, size=64, n_train=2, n_good=3, n_per_defect=2,
                             color=False)  # fmt: skip
    assert grey_set.test.shape == (13, 64, 64) and np.array_equal(grey_set.masks, data.masks)


def test_the_data_is_fixed_by_the_seed_and_leaves_global_state_alone() -> None:
    texture = _row_photo(200, 200)
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    before = (random.random(), np.random.random())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    copy = texture.copy()
    first = defects.build("brick", texture, size=48, n_train=3, n_good=1, n_per_defect=1)
    assert (random.random(), np.random.random()) == before  # noqa: NPY002
    assert np.array_equal(texture, copy)
    again = defects.build("brick", texture, size=48, n_train=3, n_good=1, n_per_defect=1)
    other = defects.build("brick", texture, size=48, n_train=3, n_good=1, n_per_defect=1, seed=1)
    assert np.array_equal(first.test, again.test) and np.array_equal(first.masks, again.masks)
    assert not np.array_equal(first.masks, other.masks)


def test_photos_are_scikit_images_textures() -> None:
    pytest.importorskip("skimage")
    assert defects.photo("brick").shape == (512, 512)
    with pytest.raises(ValueError, match="unknown texture"):
        defects.photo("marble")


# -------------------------------------------------------------------------- runs


def test_a_tiny_run_reports_every_score_and_resumes(tmp_path, capsys) -> None:
    argv = ["--textures", "brick", "--size", "32", "--train-size", "12", "--good", "4"]
    argv += ["--per-defect", "1", "--combined", "--results-dir", str(tmp_path), "--name", "t"]
    for param in ("weights=null", "image_size=32", "batch_size=8", "patch_memory=64"):
        argv += ["--param", param]
    result = defects.run(argv)
    row = result["textures"]["brick"]
    assert list(row["image_roc_auc"]) == ["global", "patch", "combined"]
    assert all(0 <= v <= 1 for v in row["image_roc_auc"].values())
    assert 0 <= row["pixel_roc_auc"] <= 1 and 0 <= row["pro_30"] <= 1
    assert row["patch_bank_size"] <= 64 and row["n_test"] == 4 + 5
    assert set(row["image_roc_auc_per_defect"]["patch"]) == set(defects.DEFECTS)
    table = (tmp_path / "t.md").read_text()
    assert "| **mean** |" in table and "PRO@30% %" in table
    assert row["command"].startswith("python -m benchmarks.defects --textures brick")
    capsys.readouterr()
    assert defects.run(argv)["textures"] == result["textures"]  # done: nothing refitted
    assert "brick: image" not in capsys.readouterr().out

"""Patch embeddings from intermediate stages, map geometry, and the patch index."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import small_module

from msc_detector.backbones import create_backbone
from msc_detector.embedding import Embedder, View
from msc_detector.model import PatchScorer
from msc_detector.patch_bank import PatchIndex
from msc_detector.patches import (
    SIGMA_AT_224,
    gaussian_blur,
    grid_to_maps,
    map_reach,
    map_to_image,
    network_positions,
    resolve_stages,
)
from msc_detector.runtime import Runtime


@pytest.mark.parametrize(
    ("name", "expected"),
    [("efficientnet_lite0", ("blocks.2", "blocks.4")), ("resnet18", ("layer2", "layer3"))],
)
def test_auto_stages_are_the_stride_8_and_16_stages(name, expected) -> None:
    network = timm.create_model(name, pretrained=False, num_classes=0)
    assert resolve_stages(network, "auto", 64) == expected
    assert resolve_stages(network, (3, 2), 64) == expected  # positions, sorted


def test_stages_of_a_module_without_feature_info_are_found_by_their_strides() -> None:
    # Children: conv (stride 1), bn, relu, conv (stride 2), pool, flatten.
    assert resolve_stages(small_module(), "auto", 32) == ("2", "3")
    with pytest.raises(ValueError, match=r"positions in \[0, 4\]"):
        resolve_stages(small_module(), (7,), 32)


def test_unknown_stage_positions_are_refused_naming_the_stages() -> None:
    network = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="layer4"):
        resolve_stages(network, (5,), 64)


def lite0_embedder(size: int = 64) -> Embedder:
    built = create_backbone("efficientnet_lite0", weights=None)
    runtime = Runtime.resolve("cpu", "fp32")
    network = runtime.place(built.model)
    return Embedder([View("bilinear", network)], built.spec, size, 1.0, False, runtime)


def test_patch_embeddings_are_the_averaged_joined_stage_outputs() -> None:
    """The folded, truncated run gives what timm's own feature extractor gives."""
    embedder = lite0_embedder()
    batch = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got = embedder.run(0, batch, ("blocks.2", "blocks.4"))[1]
    assert got.shape == (2, 8, 8, 40 + 112) and got.dtype == torch.float32

    architecture = embedder.spec.architecture
    reference = timm.create_model(architecture, features_only=True, out_indices=(2, 3))
    reference.load_state_dict(embedder.views[0].network.state_dict(), strict=False)
    mean, std = embedder.spec.preprocess.mean, embedder.spec.preprocess.std
    x = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        fine, coarse = reference.eval()(x)
    pool = [F.avg_pool2d(f, 3, 1, 1, count_include_pad=False) for f in (fine, coarse)]
    up = F.interpolate(pool[1], size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.cat([pool[0], up], dim=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_stage_hooks_are_removed_and_ignore_other_threads() -> None:
    embedder = lite0_embedder(32)
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    embedder.run(0, batch, ("blocks.2", "blocks.4"))
    compute = embedder.compute_network(embedder.views[0].network)
    assert not any(m._forward_hooks for m in compute.modules())
    # The whole network still runs to its end afterwards.
    assert next(embedder.embed_resized(0, [batch])).shape == (2, embedder.spec.num_features)


def test_gaussian_blur_keeps_constants_and_spreads_a_peak() -> None:
    flat = torch.full((1, 20, 20), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    peak = torch.zeros(1, 21, 21)
    peak[0, 10, 10] = 1.0
    blurred = gaussian_blur(peak, 2.0)
    assert blurred.argmax() == 10 * 21 + 10
    assert 0.95 < float(blurred.sum()) <= 1.0 + 1e-6
    torch.testing.assert_close(blurred[0], blurred[0].T)  # isotropic


def test_grid_to_maps_upsamples_to_the_network_side() -> None:
    grid = torch.zeros(2, 4, 4)
    grid[1, 0, 3] = 5.0
    maps = grid_to_maps(grid, 32)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
    y, x = divmod(int(maps[1].argmax()), 32)
    assert y < 8 and x >= 24  # the top-right cell
    assert float(maps[0].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("size", "h", "w"), [(224, 28, 28), (128, 16, 16), (64, 8, 5), (20, 3, 3)]
)
def test_grid_to_maps_is_upsampling_then_the_gaussian(size, h, w) -> None:
    grid = torch.rand(3, h, w, generator=torch.Generator().manual_seed(size))
    upsampled = F.interpolate(grid[:, None], size=(size, size), mode="bilinear")[:, 0]
    expected = gaussian_blur(upsampled, SIGMA_AT_224 * size / 224)
    torch.testing.assert_close(grid_to_maps(grid, size), expected, rtol=1e-5, atol=1e-6)


def test_a_map_pixel_depends_on_the_cells_within_its_reach_only() -> None:
    size, cells = 64, 8
    first, last = map_reach(size, cells)
    assert (np.diff(first) >= 0).all() and (np.diff(last) >= 0).all() and (first <= last).all()
    for cell in range(cells):
        grid = torch.zeros(1, cells, cells)
        grid[0, cell, 3] = 1.0
        column = grid_to_maps(grid, size)[0, :, 3 * size // cells]
        within = (first <= cell) & (cell <= last)
        assert (column[torch.from_numpy(~within)] == 0).all()  # untouched outside the reach
        assert (column[torch.from_numpy(within)] > 0).any()


def _scorer(m: int, grid: int, dim: int, seed: int = 0) -> PatchScorer:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((m, dim)).astype(np.float32)
    owners, positions = rng.integers(0, 40, m), rng.integers(0, grid, (m, 2))
    baseline = rng.random((grid, grid)).astype(np.float32)
    return PatchScorer(PatchIndex(vectors, owners, positions, (grid, grid), baseline), ("a",))


@pytest.mark.parametrize("leave_out", [False, True])
def test_patch_anomalies_equal_the_maxima_of_exact_maps(leave_out, monkeypatch) -> None:
    scorer = _scorer(4096, 16, 24)
    assert scorer.bank.coarse is not None  # a bank this large has the coarse index
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.standard_normal((12, 16, 16, 24)).astype(np.float32))
    features[2, 4:7, 9:12] += 4.0  # a defect: far from every bank patch
    owners = np.arange(12) if leave_out else None
    exact = grid_to_maps(scorer.excess(scorer.raw_distances(features, owners)[0]), 128)
    searched: list[int] = []
    nearest = scorer.bank.nearest
    monkeypatch.setattr(
        scorer.bank, "nearest", lambda q, *a: searched.append(len(q)) or nearest(q, *a)
    )
    got = scorer.anomalies(features, 128, owners)
    np.testing.assert_allclose(got, exact.amax(dim=(1, 2)).double().numpy(), rtol=1e-5)
    assert int(np.argmax(got)) == 2
    assert 0 < sum(searched) < features[..., 0].numel() // 2  # most patches: coarse only


@pytest.mark.parametrize("leave_out", [False, True])
def test_distance_bounds_never_fall_below_the_exact_distances_and_mostly_equal_them(
    leave_out,
) -> None:
    scorer = _scorer(4096, 16, 24)
    assert scorer.bank.coarse is not None
    features = torch.from_numpy(
        np.random.default_rng(2).standard_normal((6, 16, 16, 24)).astype(np.float32)
    )
    owners = np.arange(6) if leave_out else None
    exact = scorer.raw_distances(features, owners)[0]
    bounds = scorer.distance_bounds(features, owners)
    assert bounds.shape == exact.shape and bounds.dtype == np.float32
    assert (bounds >= exact * (1 - 1e-6)).all()
    assert 0.5 < np.isclose(bounds, exact, rtol=1e-5).mean() < 1  # coarse, yet mostly exact


def test_a_small_bank_is_searched_exactly() -> None:
    scorer = _scorer(1000, 8, 8)
    assert scorer.bank.coarse is None
    features = torch.randn(3, 8, 8, 8)
    raw = scorer.raw_distances(features)[0]
    exact = grid_to_maps(scorer.excess(raw), 64).amax(dim=(1, 2)).double().numpy()
    np.testing.assert_array_equal(scorer.anomalies(features, 64), exact)
    np.testing.assert_array_equal(scorer.distance_bounds(features), raw)


def test_a_square_image_maps_back_onto_itself() -> None:
    network_map = torch.arange(64.0).reshape(8, 8)
    out = map_to_image(network_map, 8, 8, load_size=8, size=8)
    assert out.dtype == np.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out, network_map.numpy(), atol=1e-5)
    big = map_to_image(network_map, 32, 32, load_size=8, size=8)
    assert big.shape == (32, 32) and not np.isnan(big).any()


def test_pixels_the_network_never_saw_are_nan() -> None:
    network_map = torch.ones(16, 16)
    wide = map_to_image(network_map, 16, 32, load_size=16, size=16)  # centre square kept
    assert np.isnan(wide[:, :8]).all() and np.isnan(wide[:, 24:]).all()
    assert not np.isnan(wide[:, 8:24]).any()
    cropped = map_to_image(network_map, 20, 20, load_size=20, size=16)  # crop_pct = 0.8
    assert np.isnan(cropped[:2]).all() and np.isnan(cropped[:, -2:]).all()
    assert not np.isnan(cropped[2:18, 2:18]).any()


def test_network_positions_follow_the_resize_and_crops() -> None:
    # 10 pixels shown as 20 (x2), of which the centre 16 reach the network: start at 2.
    pos = network_positions(10, 10, load_size=20, size=16)
    np.testing.assert_allclose(pos.numpy(), np.arange(10) * 2 + 1 - 2)


def test_patch_index_leaves_each_query_s_own_image_out() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(120, 6)).astype(np.float32)
    owners = np.repeat(np.arange(6), 20)
    positions = np.stack([np.arange(120) // 5 % 4, np.arange(120) % 5], axis=1)
    bank = PatchIndex(vectors, owners, positions, (4, 5))
    assert len(bank) == 120
    queries = vectors[::7] + 0.01  # each is nearest to a patch of its own image
    query_owners = owners[::7]
    dist, idx = bank.nearest(queries, query_owners)
    full = ((queries[:, None] - vectors[None]) ** 2).sum(-1)
    full[owners[None, :] == query_owners[:, None]] = np.inf
    np.testing.assert_array_equal(idx, full.argmin(axis=1))
    np.testing.assert_allclose(dist, full.min(axis=1), rtol=1e-4)
    d0, i0 = bank.nearest(queries)
    assert (owners[i0] == query_owners).all() and (d0 < dist).all()


def test_a_patch_index_of_one_image_falls_back_to_its_own_patches() -> None:
    vectors = np.eye(3, dtype=np.float32)
    bank = PatchIndex(vectors, np.zeros(3), np.zeros((3, 2)), (1, 1))
    dist, idx = bank.nearest(vectors[:1], np.zeros(1))
    assert idx.tolist() == [0] and dist.tolist() == [0.0]

"""Every accepted input form, and a clear error for every rejected one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
from PIL import Image

from msc_detector.data import (
    ArraySource,
    BatchedImages,
    PathSource,
    PILSource,
    ResizedImages,
    ResizedViews,
    as_image_source,
    resize_square,
)


def load_all(X) -> torch.Tensor:
    source = as_image_source(X)
    return torch.stack(source.load(range(len(source))))


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)


def test_numpy_uint8_rgb_becomes_chw(rgb) -> None:
    out = load_all(rgb)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 12, 10)
    assert torch.equal(out, torch.from_numpy(rgb).permute(0, 3, 1, 2))


def test_float_images_in_unit_range_match_uint8(rgb) -> None:
    assert torch.equal(load_all(rgb.astype(np.float32) / 255.0), load_all(rgb))


@pytest.mark.parametrize("shape", [(4, 9, 9), (4, 9, 9, 1)])
def test_grayscale_arrays_become_three_equal_channels(shape) -> None:
    gray = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    out = load_all(gray)
    assert out.shape == (4, 3, 9, 9)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.equal(out[:, 0], torch.from_numpy(gray.reshape(4, 9, 9)))


def test_torch_tensors_are_channels_first(rgb) -> None:
    tensor = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(load_all(tensor), load_all(rgb))
    assert torch.equal(load_all(tensor[:, :1]), load_all(rgb[..., :1]))


def test_pil_images_and_files_decode_to_the_same_pixels(rgb, tmp_path: Path) -> None:
    pil = [Image.fromarray(a) for a in rgb]
    paths = []
    for i, image in enumerate(pil):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    assert isinstance(as_image_source(pil), PILSource)
    assert isinstance(as_image_source([str(p) for p in paths]), PathSource)
    assert torch.equal(load_all(pil), load_all(rgb))
    assert torch.equal(load_all(paths), load_all(rgb))
    assert torch.equal(load_all([str(p) for p in paths]), load_all(rgb))


def test_pil_grayscale_and_rgba_become_rgb(rgb) -> None:
    gray = Image.fromarray(rgb[0, ..., 0])
    rgba = Image.fromarray(np.dstack([rgb[0], np.full((12, 10), 255, np.uint8)]))
    out = load_all([gray, rgba])
    assert out.shape == (2, 3, 12, 10)
    assert torch.equal(out[1], torch.from_numpy(rgb[0]).permute(2, 0, 1))


def test_list_of_equal_arrays_is_stacked(rgb) -> None:
    assert torch.equal(load_all(list(rgb)), load_all(rgb))


def test_path_files_are_decoded_lazily(rgb, tmp_path: Path) -> None:
    paths = []
    for i, a in enumerate(rgb):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    source = as_image_source(paths)
    paths[3].write_bytes(b"not an image any more")  # only reading it fails
    assert source.load([0, 1])[0].shape == (3, 12, 10)
    with pytest.raises(ValueError, match=r"3\.png"):
        source.load([3])


def test_inputs_are_never_modified(rgb) -> None:
    frozen = rgb.copy()
    frozen.setflags(write=False)  # any in-place write would raise
    images = ResizedImages(as_image_source(frozen), 16, "bicubic", cache_bytes=10**9)
    list(images.batches(2))
    assert np.array_equal(frozen, rgb)
    tensor = torch.from_numpy(rgb.astype(np.float32) / 255).permute(0, 3, 1, 2)
    before = tensor.clone()
    list(ResizedImages(as_image_source(tensor), 16, "bilinear", 0).batches(2))
    assert torch.equal(tensor, before)


@pytest.mark.parametrize(
    ("X", "error", "match"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty"),
        ([], ValueError, "empty"),
        (np.zeros((4, 64), np.uint8), ValueError, "2-D array"),
        (np.zeros((8, 8), np.uint8)[None, None, None], ValueError, "expected"),
        (np.zeros((2, 8, 8, 2), np.uint8), ValueError, "2 channels"),
        (np.zeros((2, 8, 8, 4), np.uint8), ValueError, "4 channels"),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, "channels-first"),
        (torch.zeros(2, 4, 8, 8), ValueError, "4 channels"),
        (torch.zeros(2, 8, 8), ValueError, r"\(n, C, H, W\)"),
        (np.full((2, 8, 8), np.nan, np.float32), ValueError, "NaN or infinite"),
        (np.full((2, 8, 8), np.inf, np.float64), ValueError, "NaN or infinite"),
        (torch.full((2, 3, 8, 8), float("nan")), ValueError, "NaN or infinite"),
        (np.full((2, 8, 8), 255.0, np.float32), ValueError, r"lie in \[0, 1\]"),
        (np.zeros((2, 8, 8), np.int16), TypeError, "dtype int16"),
        (np.zeros((2, 8, 8), bool), TypeError, "dtype bool"),
        ([np.zeros((8, 8), np.uint8), np.zeros((9, 9), np.uint8)], ValueError, "mixed shapes"),
        ([np.zeros((8, 8), np.uint8), "a.png"], TypeError, "mixes element types"),
        ([1, 2, 3], TypeError, "list of int"),
        ("images/", TypeError, "single path"),
        (Image.new("RGB", (4, 4)), TypeError, "single PIL image"),
        ({"a": 1}, TypeError, "unsupported type dict"),
        (scipy.sparse.csr_matrix(np.eye(4)), TypeError, "sparse csr_matrix; sparse input is not"),
        (scipy.sparse.coo_array(np.eye(4)), TypeError, "sparse coo_array; sparse input is not"),
        (np.zeros((12, 1, 0)), ValueError, r"images of 1x0 pixels \(shape \(12, 1, 0\)\)"),
        (np.zeros((2, 0, 8, 3), np.uint8), ValueError, "images of 0x8 pixels"),
        (torch.zeros(2, 3, 8, 0), ValueError, "images of 8x0 pixels"),
        ([np.zeros((0, 4)), np.zeros((0, 4))], ValueError, "images of 0x4 pixels"),
    ],
)
def test_bad_inputs_raise_clear_errors(X, error, match) -> None:
    with pytest.raises(error, match=match):
        as_image_source(X)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.png"):
        as_image_source([tmp_path / "nope.png"])


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    source = as_image_source([bad])
    with pytest.raises(ValueError, match=r"notes\.txt"):
        source.load([0])


def test_resize_square_keeps_the_centre_and_size() -> None:
    wide = torch.zeros(3, 20, 40, dtype=torch.uint8)
    wide[:, :, 10:30] = 200  # a centred square
    out = resize_square(wide, 10, "bilinear")
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert bool((out[:, :, 1:-1] == 200).all())  # only the centre survives the crop
    assert int(out.min()) > 150  # edges blend slightly with the antialiasing filter
    same = torch.randint(0, 255, (2, 3, 10, 10), dtype=torch.uint8)
    assert torch.equal(resize_square(same, 10), same)


def test_squashing_keeps_the_whole_image_and_both_ends() -> None:
    wide = torch.zeros(3, 20, 40, dtype=torch.uint8)
    wide[:, :, :8], wide[:, :, -8:] = 100, 250  # the two ends, which a centre crop drops
    out = resize_square(wide, 10, "bilinear", squash=True)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert int(out[:, :, 0].min()) > 80 and int(out[:, :, -1].min()) > 200
    assert bool((out[:, :, 3:7] == 0).all())  # the middle, squeezed twice as much
    assert int(resize_square(wide, 10, "bilinear").max()) == 0
    squares = torch.randint(0, 255, (2, 3, 20, 20), dtype=torch.uint8)
    assert torch.equal(resize_square(squares, 10, squash=True), resize_square(squares, 10))
    source = as_image_source(wide.permute(1, 2, 0).numpy()[None])
    (batch,) = next(ResizedViews(source, 10, ["bilinear"], squash=True).batches(1))
    assert torch.equal(batch[0], out)


class _Counted(ArraySource):
    """An array source that records which images each ``load`` call decodes."""

    def __init__(self, images: np.ndarray) -> None:
        super().__init__(images, channels_last=True)
        self.calls: list[list[int]] = []

    def load(self, indices):
        self.calls.append(list(indices))
        return super().load(indices)


@pytest.mark.parametrize(("side", "calls"), [(2400, [[0], [1], [2]]), (40, [[0], [1, 2]])])
def test_large_photos_are_decoded_and_resized_one_at_a_time(side: int, calls) -> None:
    """A batch of 3-MP photos never sits in memory whole; small images still go together."""
    images = np.random.default_rng(0).integers(0, 256, (3, side, side // 2, 3), dtype=np.uint8)
    source = _Counted(images)
    views = BatchedImages(source, 16, 3, ("bilinear", "nearest"), with_sizes=True)[0]
    assert source.calls == calls
    everything = torch.from_numpy(images).permute(0, 3, 1, 2)
    for view, how in zip(views[:2], ("bilinear", "nearest"), strict=True):
        assert torch.equal(view, resize_square(everything, 16, how))  # as one batch, exactly
    assert views[2].tolist() == [[side, side // 2]] * 3


def test_nearest_resize_turns_each_pixel_into_a_block() -> None:
    image = torch.randint(0, 256, (2, 3, 7, 7), dtype=torch.uint8)
    out = resize_square(image, 21, "nearest")
    expected = image.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
    assert torch.equal(out, expected)


def test_resized_images_cache_and_stream_agree(rgb) -> None:
    source = as_image_source(rgb)
    cached = ResizedImages(source, 16, "bicubic", cache_bytes=10**9)
    streamed = ResizedImages(source, 16, "bicubic", cache_bytes=0)
    assert cached.cache is not None and streamed.cache is None
    order = [4, 0, 2, 1, 3]
    a = torch.cat(list(cached.batches(2, order)))
    b = torch.cat(list(streamed.batches(2, order)))
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b)
    assert len(list(cached.batches(2, order, drop_last=True))) == 2


class CountingSource(ArraySource):
    """An array source that records every image it loads."""

    def __init__(self, data: np.ndarray) -> None:
        super().__init__(data, channels_last=True)
        self.loaded: list[int] = []

    def load(self, indices):
        self.loaded.extend(indices)
        return super().load(indices)


def test_resized_views_decode_each_image_once_for_all_views(rgb) -> None:
    source = CountingSource(rgb)
    groups = list(ResizedViews(source, 16, ["bicubic", "nearest"]).batches(2))
    assert sorted(source.loaded) == list(range(len(rgb)))  # once each, for both views
    for i, interpolation in enumerate(["bicubic", "nearest"]):
        alone = ResizedImages(as_image_source(rgb), 16, interpolation, cache_bytes=0)
        assert torch.equal(torch.cat([g[i] for g in groups]), torch.cat(list(alone.batches(2))))


def test_array_source_accepts_any_index_order(rgb) -> None:
    source = ArraySource(rgb, channels_last=True)
    assert torch.equal(source.load([2])[0], torch.from_numpy(rgb[2]).permute(2, 0, 1))

"""Inputs a demanding user or an attacker sends (issue 17): threads, odd files, bad weights."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msc_detector import MSCDetector
from msc_detector.data import as_image_source


def load_all(X) -> torch.Tensor:
    source = as_image_source(X)
    return torch.stack(source.load(range(len(source))))


def _png_files(folder: Path, n: int = 10, side: int = 32) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_threads_scoring_file_paths_agree_with_one_thread(tmp_path: Path) -> None:
    paths = _png_files(tmp_path)
    detector = MSCDetector(
        weights=None, image_size=32, epochs=0, batch_size=4, num_workers=2, random_state=0
    ).fit(paths)
    expected = detector.score_samples(paths)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(6):
            results = list(pool.map(lambda _: detector.score_samples(paths), range(4)))
            for scores in results:
                np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ 16-bit images


@pytest.fixture
def gray8() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, size=(12, 10), dtype=np.uint8)


def test_16bit_png_decodes_like_its_8bit_version(gray8, tmp_path: Path) -> None:
    # The 16-bit image is the 8-bit one scaled by 257, plus low bits an 8-bit file drops.
    low_bits = np.random.default_rng(3).integers(0, 128, size=gray8.shape)
    gray16 = (gray8.astype(np.uint16) * 257 + low_bits).astype(np.uint16)
    Image.fromarray(gray8).save(tmp_path / "8.png")
    Image.fromarray(gray16).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"  # what PIL reads back
    eight, sixteen = load_all([tmp_path / "8.png", tmp_path / "16.png"])
    assert sixteen.shape == (3, 12, 10)
    assert int((sixteen.int() - eight.int()).abs().max()) <= 1
    assert torch.equal(eight[0], torch.from_numpy(gray8))


def test_16bit_pil_images_of_every_mode_are_scaled(gray8) -> None:
    gray16 = gray8.astype(np.uint16) * 257
    little = Image.fromarray(gray16)
    big = Image.frombytes("I;16B", (10, 12), gray16.astype(">u2").tobytes())
    as_int = little.convert("I")  # 32-bit ints holding 16-bit values: the range rule
    assert (little.mode, big.mode, as_int.mode) == ("I;16", "I;16B", "I")
    out = load_all([little, big, as_int])
    expected = torch.from_numpy(gray8).expand(3, -1, -1)
    for image in out:
        assert torch.equal(image, expected)


def test_int_images_within_8bit_range_are_taken_as_8bit(gray8) -> None:
    as_int = Image.fromarray(gray8.astype(np.int32))
    assert as_int.mode == "I"
    assert torch.equal(load_all([as_int])[0], torch.from_numpy(gray8).expand(3, -1, -1))


@pytest.mark.parametrize("value", [-1, 70000])
def test_int_images_outside_16bit_range_are_refused(value: int, tmp_path: Path) -> None:
    image = Image.fromarray(np.full((8, 8), value, np.int32))
    with pytest.raises(ValueError, match=r"image 0 of X.*8 or 16 bits"):
        load_all([image])
    image.save(tmp_path / "deep.tif")
    with pytest.raises(ValueError, match=r"deep\.tif.*8 or 16 bits"):
        load_all([tmp_path / "deep.tif"])


# ------------------------------------------------------------------ EXIF orientation


def _sideways_jpeg(path: Path) -> np.ndarray:
    """Save a 12 x 20 JPEG tagged 'rotate 90 clockwise'; return its stored pixels."""
    stored = np.zeros((12, 20, 3), np.uint8)
    stored[:4, :5] = (250, 20, 20)  # a red corner that tells the rotations apart
    stored[6:, 10:] = (20, 250, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be turned 90 degrees clockwise
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        return np.asarray(raw.convert("RGB"))  # the pixels as stored, decoded


def test_jpeg_exif_orientation_is_applied_to_files(tmp_path: Path) -> None:
    raw = _sideways_jpeg(tmp_path / "phone.jpg")
    out = load_all([tmp_path / "phone.jpg"])[0]
    upright = np.rot90(raw, k=-1)  # clockwise
    assert out.shape == (3, 20, 12)
    assert torch.equal(out, torch.from_numpy(upright.copy()).permute(2, 0, 1))


def test_exif_orientation_of_pil_images_is_applied_without_changing_them(tmp_path: Path) -> None:
    raw = _sideways_jpeg(tmp_path / "phone.jpg")
    image = Image.open(tmp_path / "phone.jpg")
    out = load_all([image])[0]
    assert torch.equal(out, torch.from_numpy(np.rot90(raw, k=-1).copy()).permute(2, 0, 1))
    assert image.size == (20, 12) and image.getexif()[0x0112] == 6  # the input is untouched
    assert np.array_equal(np.asarray(image.convert("RGB")), raw)


# ------------------------------------------------------------------ decompression bombs


def _png_header_only(path: Path, width: int, height: int) -> None:
    """Write a PNG whose header declares ``width x height`` RGB pixels but holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 100_000, 100_000)  # 10^10 pixels, over 2x PIL's limit
    source = as_image_source([bomb])
    assert source.min_side() is None  # the header read does not crash
    with pytest.raises(ValueError, match=r"bomb\.png.*MAX_IMAGE_PIXELS"):
        source.load([0])


def test_files_over_a_lowered_pixel_limit_are_refused(tmp_path: Path, monkeypatch) -> None:
    paths = _png_files(tmp_path, n=3, side=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 > 2 x 100
    source = as_image_source(paths)
    assert source.min_side() is None
    with pytest.raises(ValueError, match=r"0\.png"):
        source.load([0, 1])
    with pytest.raises(ValueError, match=r"\.png"):
        MSCDetector(weights=None, image_size=32, epochs=0, num_workers=0).fit(paths)

"""Anomaly maps in the HTML report: the heat overlay, the ringed training patch, the section."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msc_detector import MSCDetector
from msc_detector.cli import main
from msc_detector.cli.report import MapPeak, render_report
from msc_detector.cli.thumbnails import HEAT_COLORS, Thumbnail, make_overlay, make_thumbnail
from tests.test_report import _report_data


def _pixels(thumb: Thumbnail | str) -> np.ndarray:
    assert isinstance(thumb, Thumbnail), thumb
    with Image.open(io.BytesIO(base64.b64decode(thumb.uri.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"), dtype=float)


def _grey_file(tmp_path: Path, size: tuple[int, int] = (64, 48)) -> str:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((size[1], size[0]), 128, np.uint8)).save(path)
    return str(path)


def test_overlay_puts_heat_where_the_map_is_high_and_leaves_the_rest_grey(
    tmp_path: Path,
) -> None:
    path = _grey_file(tmp_path)
    heat = np.zeros((12, 16), np.float32)  # a coarser map than the image: it is resized
    heat[:, 12:] = 1.0  # the right quarter is anomalous
    heat[:4, :4] = np.nan  # the top-left corner was not inspected
    pixels = _pixels(make_overlay(path, heat, low=0.0, high=1.0))
    assert pixels.shape == (48, 64, 3)
    hot, cold, unseen = pixels[24, 60], pixels[24, 30], pixels[2, 2]
    assert hot[0] >= hot[1] >= hot[2] and hot[0] > hot[2] + 30  # warm: the scale's top
    assert np.ptp(cold) < 3 and 80 < cold[0] < 110  # dimmed grey, no heat
    assert np.ptp(unseen) < 3 and unseen[0] < cold[0] - 30  # darker: not inspected
    top = _pixels(make_overlay(path, heat * 2, low=0.0, high=1.0))[24, 60]
    assert np.allclose(top, hot, atol=3)  # values above the scale's top are clipped to it
    middle = _pixels(make_overlay(path, heat, low=0.0, high=2.0))[24, 60]
    assert middle[0] > middle[2] + 100  # half-way up: orange
    assert make_overlay(path, np.zeros(5), 0.0, 1.0) == "no anomaly map"
    assert make_overlay(str(tmp_path / "gone.png"), heat, 0.0, 1.0) == "file not found"


def test_a_thumbnail_mark_rings_the_place(tmp_path: Path) -> None:
    path = _grey_file(tmp_path, (200, 200))
    plain = _pixels(make_thumbnail(path))
    marked = _pixels(make_thumbnail(path, mark=(0.25, 0.75)))
    changed = np.abs(marked - plain).sum(axis=2) > 30
    rows, cols = np.nonzero(changed)
    assert changed.any()
    assert abs(rows.mean() - 50) < 4 and abs(cols.mean() - 150) < 4  # centred on the mark
    assert not changed[100:, :].any()  # nowhere else
    assert np.allclose(marked[50, 150], plain[50, 150])  # a ring: the patch itself is visible


def test_report_shows_maps_beside_flagged_images_only_when_it_has_them(tmp_path: Path) -> None:
    plain = render_report(_report_data(tmp_path))
    assert ">anomaly map<" not in plain and '<figure class="map"' not in plain
    assert 'class="heat"' not in plain
    rng = np.random.default_rng(0)
    maps = {0: rng.random((20, 30)).astype(np.float32), 1: rng.random((21, 30)) * 3}
    peaks = {0: MapPeak(distance=0.75, train_index=2, train_position=(0.5, 0.25))}
    document = render_report(_report_data(tmp_path, maps=maps, peaks=peaks))
    assert document.count('<figure class="map"') == 3  # two maps, one ringed training image
    assert document.count(">anomaly map<") == 2
    assert "nearest normal patch to the peak" in document and "distance 0.75" in document
    first = "linear-gradient(90deg,rgb" + str(HEAT_COLORS[0]).replace(" ", "")
    assert 'class="heat"' in document and first in document.replace(" ", "")
    values = np.concatenate([m.ravel() for m in maps.values()])
    assert f"to {float(values.max()):.3g} (their maximum)" in document
    assert f"from {float(np.median(values)):.3g} (the median" in document
    sources = re.findall(r'<img src="([^"]*)"', document)
    assert all(re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", s) for s in sources)
    assert len(sources) == len(re.findall(r'<img src="', plain)) + 3


def _folders(root: Path) -> tuple[Path, Path]:
    """Training images (smooth blobs) and test images (blobs, two with a bright square)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for folder, count in (("train", 12), ("test", 4)):
        (root / folder).mkdir()
        for i in range(count):
            cy, cx = rng.uniform(10, 22, size=2)
            image = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0) * 120
            if folder == "test" and i < 2:
                image[4:12, 20:28] = 255
            Image.fromarray(image.astype(np.uint8)).save(root / folder / f"{folder}_{i}.png")
    return root / "train", root / "test"


@pytest.mark.parametrize("patch_memory", [64, None])
def test_report_command_shows_maps_for_a_detector_with_a_patch_bank(
    tmp_path: Path, fast_params: dict, patch_memory: int | None
) -> None:
    train, test = _folders(tmp_path)
    detector = MSCDetector(**fast_params, patch_memory=patch_memory, num_workers=0)
    detector.fit(sorted(str(p) for p in train.iterdir()))
    detector.save(tmp_path / "model.msc")
    page = tmp_path / "report.html"
    args = ["report", str(tmp_path / "model.msc"), str(test), "-o", str(page), "--top", "3"]
    assert main([*args, "-q"]) == 0
    document = page.read_text()
    if patch_memory is None:
        assert "anomaly map" not in document
        return
    assert document.count(">anomaly map<") == 3
    assert document.count("nearest normal patch to the peak") == 3
    ringed = re.findall(r'<figure class="map" title="([^"]*)"', document)
    assert [Path(t).parent.name for t in ringed] == ["test", "train"] * 3

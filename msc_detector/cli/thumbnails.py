"""Image files -> small thumbnails as ``data:`` URIs, for a report that opens offline.

A thumbnail is turned upright by the file's EXIF orientation (as the detector sees it),
scaled to 8 bits when it is a 16-bit image, and shrunk to fit a square. Small images are
kept as they are, as PNG, and shown enlarged with sharp pixels; larger ones become JPEG.

An overlay thumbnail lays an anomaly map over the image as translucent heat: the image in
dimmed grey, and on it a colour from dark red to pale yellow whose opacity grows with
the map's value, so the places the map calls normal stay visible; a normal thumbnail can
carry a ring that marks one place (the training patch nearest to a map's peak).
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps

__all__ = ["HEAT_COLORS", "Thumbnail", "heat_colors", "make_overlay", "make_thumbnail"]

#: Largest thumbnail side in pixels (about twice the side shown, for sharp screens).
MAX_SIDE = 240
_PNG_UP_TO = 96  # thumbnails no larger than this are PNG: exact pixels, still small
#: The heat scale, from the lowest to the highest map value shown (RGB anchors).
HEAT_COLORS = ((80, 0, 20), (190, 20, 30), (245, 110, 20), (255, 200, 40), (255, 255, 190))
_HEAT_OPACITY = (0.15, 0.8)  # opacity at the bottom and the top of the scale
_DIMMED = 0.75  # brightness of the grey image under the heat
_UNSEEN = 0.35  # brightness of the parts the network never sees (NaN in the map)


@dataclass
class Thumbnail:
    """An embedded thumbnail.

    Attributes
    ----------
    uri : str
        ``data:image/png;base64,...`` or ``data:image/jpeg;base64,...``.
    width, height : int
        The thumbnail's size in pixels.
    source_size : tuple of int
        The image's own ``(width, height)``.
    """

    uri: str
    width: int
    height: int
    source_size: tuple[int, int]


def _eight_bit(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB; 16- and 32-bit integer images are scaled, not clipped."""
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        sixteen = image.mode.startswith("I;16") or values.max(initial=0) > 255
        values = np.clip(values / 257.0 if sixteen else values, 0, 255)
        return Image.fromarray(values.round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _open(path: str, max_side: int) -> tuple[Image.Image, tuple[int, int]] | str:
    """Read ``path`` as upright 8-bit RGB shrunk to fit ``max_side``, with its own size.

    Returns the image and the file's ``(width, height)``, or why it cannot be read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decompression-bomb warnings: only a thumbnail
            with Image.open(path) as opened:
                source_size = opened.size
                opened.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size
                image = _eight_bit(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # any unreadable image: a caption, not a failed report
        return f"cannot read: {type(exc).__name__}"
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image, source_size


def _encode(image: Image.Image, source_size: tuple[int, int]) -> Thumbnail:
    buffer = io.BytesIO()
    if max(image.size) <= _PNG_UP_TO:
        image.save(buffer, "PNG", optimize=True)
        kind = "png"
    else:
        image.save(buffer, "JPEG", quality=85, optimize=True)
        kind = "jpeg"
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumbnail(f"data:image/{kind};base64,{data}", *image.size, source_size)


def make_thumbnail(
    path: str, max_side: int = MAX_SIDE, mark: tuple[float, float] | None = None
) -> Thumbnail | str:
    """Return a thumbnail of the image file ``path``, or why it cannot be read.

    Parameters
    ----------
    path : str
    max_side : int, default=240
        Largest side of the thumbnail; smaller images keep their size.
    mark : tuple of float, optional
        ``(row, column)`` as fractions (0-1) of the image's height and width: a ring is
        drawn around that place.

    Returns
    -------
    Thumbnail or str
        The message is short and meant for a caption.
    """
    opened = _open(path, max_side)
    if isinstance(opened, str):
        return opened
    image, source_size = opened
    if mark is not None:
        image = _ring(image, mark)
    return _encode(image, source_size)


def _ring(image: Image.Image, mark: tuple[float, float]) -> Image.Image:
    """Return a copy of ``image`` with a light ring inside a dark one around ``mark``."""
    marked = image.copy()
    draw = ImageDraw.Draw(marked)
    width, height = marked.size
    y, x = mark[0] * height, mark[1] * width
    radius = max(4.0, 0.1 * max(width, height))
    thick = max(1, round(radius / 6))
    for grow, color in ((thick, (0, 0, 0)), (0, HEAT_COLORS[3])):
        r = radius + grow
        draw.ellipse((x - r, y - r, x + r, y + r), outline=color, width=thick)
    return marked


def heat_colors(level: np.ndarray) -> np.ndarray:
    """RGB colours (float, 0-255) of ``level`` in ``[0, 1]`` on the heat scale."""
    anchors = np.asarray(HEAT_COLORS, np.float64)
    stops = np.linspace(0.0, 1.0, len(anchors))
    level = np.clip(level, 0.0, 1.0)
    return np.stack([np.interp(level, stops, anchors[:, c]) for c in range(3)], axis=-1)


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 ``(h, w)`` array to PIL's ``(width, height)``."""
    resized = Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float64)


def make_overlay(
    path: str,
    anomaly_map: np.ndarray,
    low: float,
    high: float,
    max_side: int = MAX_SIDE,
) -> Thumbnail | str:
    """Return a thumbnail of ``path`` with ``anomaly_map`` over it as translucent heat.

    Parameters
    ----------
    path : str
    anomaly_map : ndarray of shape (h, w)
        Higher is more anomalous; it covers the whole upright image and is resized to
        the thumbnail. NaN marks pixels the detector did not inspect: they are shown
        darker, without heat.
    low, high : float
        Map values shown as the bottom and the top of the heat scale (shared by all
        overlays of a report, so that colours compare between images); values at or
        below ``low`` get no heat.
    max_side : int, default=240

    Returns
    -------
    Thumbnail or str
        The message is short and meant for a caption.
    """
    opened = _open(path, max_side)
    if isinstance(opened, str):
        return opened
    image, source_size = opened
    values = np.asarray(anomaly_map, np.float32)
    if values.ndim != 2 or values.size == 0:
        return "no anomaly map"
    seen = np.isfinite(values)
    heat = _resize(np.where(seen, values, low).astype(np.float32), image.size)
    span = high - low
    level = np.clip((heat - low) / span, 0.0, 1.0) if span > 0 else np.zeros_like(heat)
    bottom, top = _HEAT_OPACITY
    alpha = np.where(level > 0, bottom + (top - bottom) * level, 0.0)[..., None]
    shade = np.where(_resize(seen.astype(np.float32), image.size) > 0.5, _DIMMED, _UNSEEN)
    grey = np.asarray(image.convert("L"), np.float64) * shade
    blended = grey[..., None] * (1 - alpha) + heat_colors(level) * alpha
    out = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8), "RGB")
    return _encode(out, source_size)

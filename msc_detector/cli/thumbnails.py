"""Image files -> small thumbnails as ``data:`` URIs, for a report that opens offline.

A thumbnail is turned upright by the file's EXIF orientation (as the detector sees it),
scaled to 8 bits when it is a 16-bit image, and shrunk to fit a square. Small images are
kept as they are, as PNG, and shown enlarged with sharp pixels; larger ones become JPEG.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = ["Thumbnail", "make_thumbnail"]

#: Largest thumbnail side in pixels (about twice the side shown, for sharp screens).
MAX_SIDE = 240
_PNG_UP_TO = 96  # thumbnails no larger than this are PNG: exact pixels, still small


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


def make_thumbnail(path: str, max_side: int = MAX_SIDE) -> Thumbnail | str:
    """Return a thumbnail of the image file ``path``, or why it cannot be read.

    Parameters
    ----------
    path : str
    max_side : int, default=240
        Largest side of the thumbnail; smaller images keep their size.

    Returns
    -------
    Thumbnail or str
        The message is short and meant for a caption.
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
    buffer = io.BytesIO()
    if max(image.size) <= _PNG_UP_TO:
        image.save(buffer, "PNG", optimize=True)
        kind = "png"
    else:
        image.save(buffer, "JPEG", quality=85, optimize=True)
        kind = "jpeg"
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumbnail(f"data:image/{kind};base64,{data}", *image.size, source_size)

"""Accepted image inputs -> one source type, and batches of resized uint8 images.

Accepted inputs (see :func:`as_image_source`):

* numpy arrays, channels-last: ``(n, H, W)``, ``(n, H, W, 1)`` or ``(n, H, W, 3)``,
  ``uint8`` in 0-255 or floating point in 0-1;
* torch tensors, channels-first: ``(n, C, H, W)`` with ``C`` in {1, 3}, same dtypes;
* lists (or tuples) of PIL images, of file paths (``str`` or :class:`pathlib.Path`,
  decoded lazily) or of equally shaped numpy arrays.

Nothing the user passes is modified or copied whole: sources index into it lazily.
Every image becomes a ``uint8`` tensor ``(3, S, S)``: grayscale is repeated to three
channels, the shorter side is resized to ``S`` and the centre ``S x S`` is kept.
Files and PIL images are first turned upright by their EXIF orientation tag.
Files with more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's
decompression-bomb limit) are refused with a ``ValueError`` naming them.
16-bit images (PIL modes ``"I;16*"``) are scaled to 8 bits (divided by 257); 32-bit
integer images (mode ``"I"``) are taken as 8-bit when their values lie in 0-255, as
16-bit when in 0-65535, and refused otherwise.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ArraySource",
    "BatchedImages",
    "ImageSource",
    "PILSource",
    "PathSource",
    "ResizedImages",
    "ResizedViews",
    "as_image_source",
    "auto_image_size",
    "resize_square",
    "resized_sides",
]

_VALID_SHAPES = "(n, H, W), (n, H, W, 1) or (n, H, W, 3) numpy arrays, (n, C, H, W) tensors"


class ImageSource:
    """A lazily indexed collection of images.

    Subclasses implement :meth:`__len__` and :meth:`load`, which returns a list of
    ``uint8`` tensors ``(3, H, W)`` (sizes may differ between images).
    """

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:  # pragma: no cover
        """Return the images at ``indices`` as ``uint8`` tensors ``(3, H, W)``."""
        raise NotImplementedError

    def min_side(self, sample: int = 16) -> int | None:
        """Shorter image side, the smallest over the first ``sample`` images (None: unknown)."""
        return None

    def decode_workers(self) -> int:
        """DataLoader processes worth decoding these images in: none for images in memory."""
        return 0


def _to_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Map a float batch in [0, 1] or a uint8 batch to uint8 without touching the input."""
    if batch.dtype == torch.uint8:
        return batch
    return (batch.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


class ArraySource(ImageSource):
    """Images held in one array: numpy channels-last or torch channels-first."""

    def __init__(self, data: np.ndarray | torch.Tensor, channels_last: bool) -> None:
        self.data = data
        self.channels_last = channels_last

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def min_side(self, sample: int = 16) -> int | None:
        """Shorter side of the images (all share one shape)."""
        h, w = self.data.shape[1:3] if self.channels_last else self.data.shape[2:4]
        return int(min(h, w))

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Return the images at ``indices`` as ``uint8`` tensors ``(3, H, W)``."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.data, torch.Tensor):
            batch = self.data[torch.from_numpy(idx)].detach().cpu()
        else:
            batch = torch.from_numpy(np.ascontiguousarray(self.data[idx]))  # fancy index copies
        if self.channels_last:
            batch = batch.unsqueeze(-1) if batch.ndim == 3 else batch
            batch = batch.permute(0, 3, 1, 2)
        batch = _to_uint8(batch)
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        return list(batch)


def _integer_to_uint8(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Scale 16-bit (or 8-bit) integer pixels to 0-255, rounding to the nearest level.

    ``sixteen_bit`` images are divided by 257 (65535 -> 255). Otherwise the bit depth is
    unknown and the values decide: all within 0-255 stay as they are, within 0-65535
    they are 16-bit; anything else is refused.
    """
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise ValueError(
            f"its integer pixel values span [{lo}, {hi}], which fits neither 8 nor 16 bits; "
            "convert it to 8 or 16 bits per channel"
        )
    if sixteen_bit or hi > 255:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return values.astype(np.uint8)


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Decode ``image`` into a ``uint8`` tensor ``(3, H, W)``.

    An EXIF orientation is applied first, as image viewers do (a phone photo tagged
    "rotate 90" comes out upright), to files and PIL images alike so that both give
    the same pixels; ``image`` itself is not changed. Integer grayscale modes are then
    scaled to 8 bits rather than clipped, as ``convert("RGB")`` would clip 16-bit
    values to 0 or 255: ``"I;16*"`` modes are 16-bit; mode ``"I"`` carries no depth,
    so :func:`_integer_to_uint8` applies its range rule.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)  # a turned copy, without the tag
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N" and "I"
        gray = _integer_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16"))
        return torch.from_numpy(gray).expand(3, -1, -1)
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class PILSource(ImageSource):
    """A list of PIL images (any mode PIL can convert to RGB or 16-bit, any size)."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def min_side(self, sample: int = 16) -> int | None:
        """Smallest shorter side among the first ``sample`` images."""
        return min(min(image.size) for image in self.images[:sample])

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Return the images at ``indices`` as ``uint8`` tensors ``(3, H, W)``."""
        out = []
        for i in indices:
            try:
                out.append(_pil_to_tensor(self.images[i]))
            except ValueError as exc:
                raise ValueError(f"Cannot use image {i} of X: {exc}.") from exc
        return out


class PathSource(ImageSource):
    """Image files, decoded only when a batch needs them."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def decode_workers(self) -> int:
        """Up to 4 processes decoding files, leaving one core to the network."""
        return min(4, max(0, (os.cpu_count() or 1) - 1))

    def min_side(self, sample: int = 16) -> int | None:
        """Smallest shorter side among the first ``sample`` files (headers only)."""
        sides = []
        for path in self.paths[:sample]:
            try:
                with Image.open(path) as image:  # reads the header, not the pixels
                    sides.append(min(image.size))
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
                continue  # reported by name when the file is decoded
        return min(sides) if sides else None

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Decode the files at ``indices`` into ``uint8`` tensors ``(3, H, W)``."""
        out = []
        for i in indices:
            path = self.paths[i]
            try:
                with Image.open(path) as image:
                    out.append(_pil_to_tensor(image))
            except Image.DecompressionBombError as exc:
                raise ValueError(
                    f"Image file {str(path)!r} is refused as a possible decompression bomb: "
                    f"{exc} If it is trusted, raise PIL.Image.MAX_IMAGE_PIXELS (now "
                    f"{Image.MAX_IMAGE_PIXELS}; pixel counts over twice that are refused) "
                    "before passing it, or resize the file."
                ) from exc
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise ValueError(
                    f"Cannot read image file {str(path)!r}: {exc}. Remove it from the input "
                    "or replace it with a readable image."
                ) from exc
        return out


def _check_values(array: np.ndarray | torch.Tensor, what: str) -> None:
    if isinstance(array, torch.Tensor):
        dtype_ok = array.dtype == torch.uint8 or array.is_floating_point()
        is_float = array.is_floating_point()
    else:
        dtype_ok = array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)
        is_float = bool(np.issubdtype(array.dtype, np.floating))
    if not dtype_ok:
        raise TypeError(
            f"{what} has dtype {array.dtype}; images must be uint8 (0-255) or floating point "
            "(0-1). Convert with .astype(np.uint8) or divide by the maximum value."
        )
    if not is_float:
        return
    if isinstance(array, torch.Tensor):
        finite = bool(torch.isfinite(array).all())
        lo, hi = (float(array.min()), float(array.max())) if finite else (0.0, 0.0)
    else:
        finite = bool(np.isfinite(array).all())
        lo, hi = (float(array.min()), float(array.max())) if finite else (0.0, 0.0)
    if not finite:
        raise ValueError(f"{what} contains NaN or infinite values; clean or drop those images.")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what} is floating point with values in [{lo:.4g}, {hi:.4g}]; float images must "
            "lie in [0, 1]. Divide 0-255 data by 255, or pass it as uint8."
        )


def _check_sides(height: int, width: int, what: str, shape: tuple[int, ...]) -> None:
    if height < 1 or width < 1:
        raise ValueError(
            f"{what} holds images of {height}x{width} pixels (shape {shape}); every image "
            "needs at least one pixel."
        )


def _numpy_source(array: np.ndarray, what: str = "X") -> ArraySource:
    if array.ndim == 2:
        raise ValueError(
            f"{what} is a 2-D array of shape {array.shape}, but MSCDetector takes images: "
            f"{_VALID_SHAPES}. Reshape flattened images to (n, H, W) first."
        )
    if array.ndim not in (3, 4):
        raise ValueError(f"{what} has shape {array.shape}; expected {_VALID_SHAPES}.")
    if array.ndim == 4 and array.shape[-1] not in (1, 3):
        hint = (
            " It looks channels-first: numpy input is channels-last, so use "
            "np.moveaxis(X, 1, -1) or pass a torch tensor."
            if array.shape[1] in (1, 3)
            else ""
        )
        raise ValueError(
            f"{what} has {array.shape[-1]} channels in its last axis (shape {array.shape}); "
            f"expected 1 (grayscale) or 3 (RGB).{hint}"
        )
    _check_sides(array.shape[1], array.shape[2], what, array.shape)
    _check_values(array, what)
    return ArraySource(array, channels_last=True)


def _tensor_source(tensor: torch.Tensor, what: str = "X") -> ArraySource:
    if tensor.ndim != 4:
        raise ValueError(
            f"{what} is a tensor of shape {tuple(tensor.shape)}; expected (n, C, H, W)."
        )
    if tensor.shape[1] not in (1, 3):
        raise ValueError(
            f"{what} has {tensor.shape[1]} channels (shape {tuple(tensor.shape)}); tensors are "
            "channels-first (n, C, H, W) with C = 1 (grayscale) or 3 (RGB)."
        )
    _check_sides(tensor.shape[2], tensor.shape[3], what, tuple(tensor.shape))
    _check_values(tensor, what)
    return ArraySource(tensor, channels_last=False)


def _list_source(items: Sequence[Any]) -> ImageSource:
    kinds = {
        "path"
        if isinstance(x, str | os.PathLike)
        else "pil"
        if isinstance(x, Image.Image)
        else "array"
        if isinstance(x, np.ndarray)
        else type(x).__name__
        for x in items
    }
    if len(kinds) > 1:
        raise TypeError(
            f"X mixes element types {sorted(kinds)}; pass a list of only file paths, only PIL "
            "images or only numpy arrays."
        )
    kind = kinds.pop()
    if kind == "path":
        missing = [str(p) for p in items if not Path(p).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} image file(s) do not exist, e.g. {missing[0]!r}. Check the paths."
            )
        return PathSource(items)
    if kind == "pil":
        return PILSource(items)
    if kind == "array":
        shapes = {x.shape for x in items}
        if len(shapes) > 1:
            raise ValueError(
                f"X is a list of arrays with mixed shapes {sorted(shapes)[:4]}; arrays in one "
                "list must share a shape. Pass PIL images or file paths for images of "
                "different sizes."
            )
        return _numpy_source(np.stack(items), "X (stacked list of arrays)")
    raise TypeError(f"X is a list of {kind}; expected file paths, PIL images or numpy arrays.")


def as_image_source(X: Any) -> ImageSource:
    """Validate ``X`` and wrap it in an :class:`ImageSource` without copying it.

    Parameters
    ----------
    X : array-like, tensor or list
        See the module docstring for the accepted forms.

    Returns
    -------
    ImageSource

    Raises
    ------
    TypeError
        For unsupported container or element types and dtypes.
    ValueError
        For empty input, wrong rank or channel count, NaN/inf, values out of range,
        mixed shapes, and missing files.
    """
    if isinstance(X, ImageSource):
        return X
    if isinstance(X, str | os.PathLike):
        raise TypeError(
            "X is a single path; pass a list of image paths, "
            "e.g. sorted(Path(folder).glob('*.png')).",
        )
    if isinstance(X, Image.Image):
        raise TypeError("X is a single PIL image; pass a list of images, e.g. [image].")
    if type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(
            f"X is a sparse {type(X).__name__}; sparse input is not supported: MSCDetector "
            f"takes images, {_VALID_SHAPES}, or lists of PIL images or file paths."
        )
    if isinstance(X, np.ndarray | torch.Tensor):
        if X.ndim == 0 or X.shape[0] == 0:
            raise ValueError("X is empty; pass at least one image.")
        return _tensor_source(X) if isinstance(X, torch.Tensor) else _numpy_source(X)
    if isinstance(X, list | tuple):
        if len(X) == 0:
            raise ValueError("X is empty; pass at least one image.")
        return _list_source(X)
    raise TypeError(
        f"X has unsupported type {type(X).__name__}; expected a numpy array, a torch tensor or "
        "a list of PIL images, file paths or numpy arrays."
    )


def auto_image_size(native: int, min_side: int | None) -> int:
    """Network input side for images whose shorter side is ``min_side`` pixels.

    The backbone's own ``native`` size, unless the images are small: then 4x their
    shorter side, rounded up to a multiple of 16 and at least 64. Upsampling further
    adds no detail but costs compute as the square of the side.

    Parameters
    ----------
    native : int
        The backbone's input size.
    min_side : int or None
        Shorter image side; ``None`` (unknown) gives ``native``.

    Returns
    -------
    int
    """
    if min_side is None:
        return native
    return min(native, max(64, 16 * math.ceil(4 * min_side / 16)))


def resized_sides(height: int, width: int, size: int, squash: bool = False) -> tuple[int, int]:
    """Height and width an image is resized to before its centre ``size`` square is kept.

    ``size`` on both sides with ``squash``; else the shorter side becomes ``size`` and
    the longer keeps the aspect ratio (see :func:`resize_square`).
    """
    if squash:
        return size, size
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def resize_square(
    image: torch.Tensor, size: int, interpolation: str = "bilinear", *, squash: bool = False
) -> torch.Tensor:
    """Resize to ``size x size``: the whole image (``squash``), or its centre square.

    Parameters
    ----------
    image : torch.Tensor
        ``uint8`` of shape ``(3, H, W)`` or ``(n, 3, H, W)``.
    size : int
        Output side.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Resampling. Bilinear and bicubic are antialiased when shrinking;
        ``"nearest"`` copies source pixels (enlarged, each pixel becomes a sharp
        block). Any other name resamples bilinearly.
    squash : bool, default=False
        Resize each side to ``size``, changing the aspect ratio of a non-square image
        but keeping all of it. Otherwise the shorter side is resized to ``size`` and
        the centre square kept: the ends of the longer side are cut off.

    Returns
    -------
    torch.Tensor
        ``uint8`` of shape ``(3, size, size)`` or ``(n, 3, size, size)``.
    """
    batched = image.ndim == 4
    x = image if batched else image.unsqueeze(0)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        new_h, new_w = resized_sides(h, w, size, squash)
        if interpolation == "nearest":
            x = F.interpolate(x.float(), size=(new_h, new_w), mode="nearest-exact")
        else:
            mode = interpolation if interpolation == "bicubic" else "bilinear"
            x = F.interpolate(
                x.float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False
            )
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x if batched else x[0]


# Pixels of an image above which a batch is decoded and resized one image at a time: 64
# camera photos of 12 MP are 2.3 GB decoded and 9 GB as the floats a resize works in.
_LARGE_PIXELS = 2**21


class BatchedImages(torch.utils.data.Dataset):
    """Batches of resized ``uint8`` images, one batch per item.

    Made for ``DataLoader(dataset, batch_size=None, num_workers=...)``, so that file
    decoding runs in worker processes while the model works. Each item is a tuple
    with the batch resized by each of ``interpolations``: every image is decoded
    once, however many views are made of it.

    Parameters
    ----------
    source : ImageSource
    size : int
        Output side of each square image.
    batch_size : int
    interpolations : sequence of str
        One resampling per view (see :func:`resize_square`).
    order : sequence of int, optional
        Image order (e.g. a shuffled permutation); defaults to ``range(len(source))``.
    drop_last : bool, default=False
        Drop a final partial batch.
    with_sizes : bool, default=False
        Add to each item an ``int64`` ``(b, 2)`` tensor of the images' own heights and
        widths (for placing anomaly maps back on them).
    squash : bool, default=False
        Squash non-square images whole into the square (see :func:`resize_square`).
    """

    def __init__(
        self,
        source: ImageSource,
        size: int,
        batch_size: int,
        interpolations: Sequence[str] = ("bilinear",),
        order: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
        with_sizes: bool = False,
        squash: bool = False,
    ) -> None:
        self.source = source
        self.size = size
        self.squash = squash
        self.batch_size = batch_size
        self.interpolations = tuple(interpolations)
        self.with_sizes = with_sizes
        self.order = np.arange(len(source)) if order is None else np.asarray(order)
        n = len(self.order)
        self.n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
        images = self.source.load(idx[:1])
        large = images[0].shape[-2] * images[0].shape[-1] > _LARGE_PIXELS
        if not large:
            images += self.source.load(idx[1:])
        if not large and all(im.shape == images[0].shape for im in images):
            sizes = [im.shape[-2:] for im in images]
            views = self._views(torch.stack(images))  # one resize for the batch
        else:  # image by image; large ones decoded each after the last one is resized
            rest = (self.source.load([j])[0] for j in idx[1:]) if large else iter(())
            sizes, parts = [], []
            for image in itertools.chain(images, rest):
                sizes.append(image.shape[-2:])
                parts.append(self._views(image[None]))
            views = tuple(torch.cat(view) for view in zip(*parts, strict=True))
        return (*views, torch.tensor(sizes, dtype=torch.int64)) if self.with_sizes else views

    def _views(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``batch`` resized by each of the interpolations."""
        return tuple(
            resize_square(batch, self.size, how, squash=self.squash) for how in self.interpolations
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(len(self)):
            yield self[i]


def _load_batches(dataset: BatchedImages, num_workers: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Iterate ``dataset``, in ``num_workers`` processes where that is safe and pays off.

    Off the main thread, and for a single batch, the calling thread decodes.
    """
    # Workers are forked. One forked from a thread other than the main one dies as it
    # exits: its copy of concurrent.futures' exit hook joins the pool thread it now runs
    # on ("cannot join current thread", exit code 1), and the parent raises "DataLoader
    # worker exited unexpectedly" -- a web app scoring uploads from a thread pool. The
    # "spawn" and "forkserver" contexts avoid that, but every worker then imports torch
    # and re-runs the caller's __main__ (a script without a main guard recurses), which
    # measured slower than no workers at all (96 PNGs of 400x500 on 2 cores: here 1.9 s,
    # fork 0.9 s, forkserver 4.1 s, spawn 4.8 s; four threads at once: here 2.7 s,
    # forkserver 17 s). So threads decode in place: PIL and torch release the GIL, and
    # concurrent callers overlap anyway.
    on_main_thread = threading.current_thread() is threading.main_thread()
    if num_workers <= 0 or len(dataset) <= 1 or not on_main_thread:
        yield from dataset
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=False
    )
    yield from loader


class ResizedViews:
    """A source resized to one square side by several resamplings, streamed in batches.

    For scoring, where each image is embedded once per view: every image is decoded
    once and resized by each of ``interpolations``.

    Parameters
    ----------
    source : ImageSource
    size : int
        Side of the square images.
    interpolations : sequence of str
        One resampling per view (see :func:`resize_square`).
    num_workers : int
        DataLoader worker processes.
    with_sizes : bool, default=False
        End each batch with the images' own ``(height, width)`` (see :class:`BatchedImages`).
    squash : bool, default=False
        Squash non-square images whole into the square (see :func:`resize_square`).
    """

    def __init__(
        self,
        source: ImageSource,
        size: int,
        interpolations: Sequence[str],
        num_workers: int = 0,
        with_sizes: bool = False,
        squash: bool = False,
    ) -> None:
        self.source = source
        self.size = size
        self.interpolations = tuple(interpolations)
        self.num_workers = num_workers
        self.with_sizes = with_sizes
        self.squash = squash

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield, per batch of images in order, one ``uint8`` tensor per view.

        Each tensor is ``(b, 3, size, size)``; they hold the same images.
        """
        dataset = BatchedImages(
            self.source,
            self.size,
            batch_size,
            self.interpolations,
            with_sizes=self.with_sizes,
            squash=self.squash,
        )
        yield from _load_batches(dataset, self.num_workers)


class ResizedImages:
    """A source resized to one square side, held in memory when it fits.

    Training reads its images once per epoch; small images (Fashion-MNIST, CIFAR)
    are therefore resized once and kept as one ``uint8`` tensor. Sources too large
    for ``cache_bytes`` are decoded batch by batch, in ``num_workers`` processes.

    Parameters
    ----------
    source : ImageSource
    size : int
        Side of the stored square images.
    interpolation : str
    cache_bytes : int
        Largest in-memory cache; ``0`` never caches.
    num_workers : int
        DataLoader worker processes for uncached sources.
    squash : bool, default=False
        Squash non-square images whole into the square (see :func:`resize_square`).
    """

    def __init__(
        self,
        source: ImageSource,
        size: int,
        interpolation: str,
        cache_bytes: int,
        num_workers: int = 0,
        squash: bool = False,
    ) -> None:
        self.source = source
        self.size = size
        self.interpolation = interpolation
        self.num_workers = num_workers
        self.squash = squash
        self.cache: torch.Tensor | None = None
        if len(source) * 3 * size * size <= cache_bytes:
            self.cache = torch.cat(list(self._decode(None, 256, False)))

    def __len__(self) -> int:
        return len(self.source)

    def _decode(
        self, order: Sequence[int] | np.ndarray | None, batch_size: int, drop_last: bool
    ) -> Iterator[torch.Tensor]:
        dataset = BatchedImages(
            self.source,
            self.size,
            batch_size,
            (self.interpolation,),
            order,
            drop_last,
            squash=self.squash,
        )
        for (batch,) in _load_batches(dataset, self.num_workers):
            yield batch

    def batches(
        self,
        batch_size: int,
        order: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield ``uint8`` batches ``(b, 3, size, size)`` in ``order``.

        Parameters
        ----------
        batch_size : int
        order : sequence of int, optional
            Image indices; defaults to all images in order.
        drop_last : bool, default=False
        """
        if self.cache is None:
            yield from self._decode(order, batch_size, drop_last)
            return
        idx = torch.arange(len(self)) if order is None else torch.as_tensor(np.asarray(order))
        stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        for start in range(0, stop, batch_size):
            yield self.cache[idx[start : start + batch_size]]

"""Loaders for the small labelled image sets used by the examples, tests and benchmarks.

Nothing is downloaded: Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``
package (or any folder holding the four idx files), OpenCV's handwritten digits from
Debian's ``opencv-doc`` package (or any folder holding ``digits.png``), digits from
scikit-learn.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "OPENCV_DIGITS_DIR",
    "load_fashion_mnist",
    "load_opencv_digits",
    "one_class_split",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DIGITS_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from local idx files.

    Parameters
    ----------
    split : {"train", "test"}
    root : path-like, optional
        Folder with the (optionally gzipped) idx files; defaults to
        ``$FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    images : ndarray of shape (n, 28, 28), uint8
    labels : ndarray of shape (n,), uint8
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    folder = (
        Path(root)
        if root is not None
        else Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    )
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0]} not found. Install Debian's package "
                "(apt-get install dataset-fashion-mnist) or pass root= to a folder with the "
                "idx files."
            )
        found.append(_read_idx(path))
    return found[0], found[1]


def load_opencv_digits(
    root: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load OpenCV's 5,000 handwritten digits, 500 of each class, in class order.

    OpenCV's sample image ``digits.png`` is a 1000 x 2000 grey sheet of 20 x 20 digits,
    100 to a row; every five rows hold 500 digits of one class, 0 to 9. It is read with
    PIL; OpenCV is not needed.

    Parameters
    ----------
    root : path-like, optional
        Folder with ``digits.png`` (or ``digits.png.gz``); defaults to
        ``/usr/share/doc/opencv-doc/examples/data``, where Debian's ``opencv-doc``
        package puts it.

    Returns
    -------
    images : ndarray of shape (5000, 20, 20), uint8
        White digits on black.
    labels : ndarray of shape (5000,), int64
        ``0`` for the first 500 images, ``1`` for the next 500, and so on.
    """
    from PIL import Image

    folder = Path(root) if root is not None else OPENCV_DIGITS_DIR
    candidates = [folder / "digits.png", folder / "digits.png.gz"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"OpenCV's digits image {candidates[0]} not found. Install Debian's package "
            "(apt-get install opencv-doc) or pass root= to a folder with digits.png."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        sheet = np.asarray(image.convert("L"))
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{path} is {sheet.shape[1]} x {sheet.shape[0]} pixels, not 2000 x 1000.")
    images = sheet.reshape(50, 20, 100, 20).swapaxes(1, 2).reshape(5000, 20, 20)
    return np.ascontiguousarray(images), np.repeat(np.arange(10, dtype=np.int64), 500)


def one_class_split(labels: np.ndarray, normal_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary targets for one-class evaluation: 1 for the normal class, 0 otherwise.

    Parameters
    ----------
    labels : ndarray of shape (n,)
    normal_class : int

    Returns
    -------
    is_normal : ndarray of shape (n,), int
        1 where ``labels == normal_class``.
    normal_index : ndarray of int
        Positions of the normal samples.
    """
    is_normal = (np.asarray(labels) == normal_class).astype(int)
    return is_normal, np.flatnonzero(is_normal)

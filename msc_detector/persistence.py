"""Model files: a fitted detector in one zip archive that loads without running code.

:meth:`MSCDetector.save <msc_detector.MSCDetector.save>` writes, and
:meth:`MSCDetector.load <msc_detector.MSCDetector.load>` reads, the file described here.
Nothing in it is ever unpickled, evaluated or imported: tensors are safetensors, everything
else is JSON or the Faiss index's own bytes, and every member is checked against a
SHA-256 manifest before it is parsed. :func:`inspect` verifies a file and returns its
metadata without importing torch, timm or Faiss.

.. rubric:: File format, version 1

A model file (suggested extension ``.msc``; any name works) is a zip archive that holds
exactly the five members below, each *stored* (uncompressed, as tensors do not compress),
unencrypted, in this order:

``manifest.json``
    A JSON object ``{"format": "msc-detector-model", "format_version": 1, "members":
    {NAME: {"size": BYTES, "sha256": HEX}}}`` with one entry for each of the four other
    members: its size in bytes and the lowercase hex SHA-256 of its bytes. Readers check
    ``format`` and ``format_version`` before anything else and refuse a version they do
    not know.
``metadata.json``
    A UTF-8 JSON object (``NaN`` and ``Infinity`` may appear in ``history_`` losses, as
    Python's :mod:`json` writes them) with the keys

    ``estimator``
        Class that saved the file, e.g. ``"msc_detector.estimator.MSCDetector"``;
        informational, never imported.
    ``created``
        UTC time of saving, ISO 8601 (``"2025-01-31T12:00:00Z"``).
    ``versions``
        Strings for ``msc_detector``, ``python``, ``torch``, ``timm``, ``faiss``,
        ``scikit-learn``, ``numpy`` and ``safetensors`` at saving time.
    ``params``
        ``get_params(deep=False)``. Path-likes and :class:`torch.device` are written as
        strings; values JSON cannot hold (the callable ``epoch_callback``, a
        ``RandomState`` instance as ``random_state``) are written as ``null``, and
        saving warns that they were dropped. They only matter for a new ``fit``, except
        ``n_neighbors``, which scoring uses. A parameter that a file lacks because it
        was written before the parameter existed is read with the value that version
        behaved as: ``flip_average=False``, ``nearest_view=False``.
    ``backbone_spec``
        :meth:`BackboneSpec.to_dict <msc_detector.backbones.BackboneSpec.to_dict>`:
        ``name``, ``architecture`` (a timm name), ``num_features``, ``preprocess``
        (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``) and
        ``frozen_stages``.
    ``fitted``
        The fitted scalars: ``offset_`` (number), ``image_size_`` and ``n_train_``
        (integers), ``crop_pct_`` (number in (0, 1]), ``flip_average_`` and
        ``nearest_view_`` (booleans; files written before they existed lack them and
        are read as ``false``),
        ``history_`` (list of objects),
        ``device_`` (the device string it was fitted on, e.g. ``"cuda:0"``),
        ``precision_`` (``"fp32"``, ``"bf16"`` or ``"fp16"``) and ``weights_source_``
        (string).
    ``index``
        ``{"type": "IndexFlatL2", "dim": D, "ntotal": N, "chunk_size": INT, "use_gpu":
        BOOL}`` with ``N = fitted.n_train_`` and ``D = F = backbone_spec.num_features``,
        or ``D = 2 * F`` where ``fitted.nearest_view_`` is true.
``arrays.safetensors``
    Two tensors: ``center_`` (float32, shape ``(F,)``) and ``train_scores_`` (float64,
    shape ``(N,)``).
``index.faiss``
    ``faiss.serialize_index`` of the exact L2 index of the ``N`` normalised training
    embeddings: the 4-byte tag ``IxF2``, a 41-byte little-endian header (``d`` int32,
    ``ntotal`` int64, two reserved int64, ``is_trained`` byte, ``metric_type`` int32 = 1,
    number of float32 values uint64 = ``d * ntotal``), then the ``d * ntotal`` float32
    values. Readers check this layout before Faiss sees the bytes.
``backbone.safetensors``
    The state dict of the fine-tuned headless timm network (the architecture named in
    ``backbone_spec``, built with ``num_classes=0``): contiguous CPU tensors, timm key
    names. Where ``fitted.nearest_view_`` is true and the network was fine-tuned, the
    member also holds the state dict of the same network before fine-tuning, which
    embeds the nearest view, with its key names prefixed by ``pretrained.``. Without
    such keys (files from before they existed, or no fine-tuning) the fine-tuned
    network embeds both views.

.. rubric:: Verification

Reading refuses, with a :class:`ModelFileError` naming the problem: a file that is not a
zip archive (a pickle or joblib dump is recognised and named as such), a truncated or
damaged archive, a member that is compressed, encrypted, oversized (declared larger than
the archive itself, or a JSON member above its limit), duplicated, unexpected (such as a
``data.pkl``) or missing, a name that could escape a directory, a size or SHA-256 that
does not match the manifest, invalid JSON, metadata of the wrong shape, tensors or an
index that do not match the metadata, and a ``format_version`` newer than
:data:`FORMAT_VERSION`. Checksums detect accidental corruption and careless edits; they
do not authenticate the author. What protects against a malicious file is that nothing in
it is executed: JSON, safetensors and a length-checked flat index are pure data, the
backbone architecture must be a name timm knows locally (no ``hf-hub:`` download), and no
class or function is looked up by a name read from the file.

.. rubric:: Atomic writes

Writing is atomic: the archive is written to a temporary file beside the target, flushed
and ``fsync``-ed, then renamed over the target with :func:`os.replace` and the directory
``fsync``-ed. An interruption or a full disk leaves the previous file untouched and
removes the temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import secrets
import stat
import struct
import time
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from msc_detector.backbones import BackboneSpec
    from msc_detector.index import KNNIndex

__all__ = ["FORMAT_VERSION", "ModelFileError", "SavedModel", "inspect", "load", "save"]

FORMAT_NAME = "msc-detector-model"
#: The newest model-file format this code reads and the one it writes.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
METADATA = "metadata.json"
ARRAYS = "arrays.safetensors"
INDEX = "index.faiss"
BACKBONE = "backbone.safetensors"
# Key prefix, in BACKBONE, of the pretrained network that embeds the nearest view.
PRETRAINED_PREFIX = "pretrained."
MEMBERS = (MANIFEST, METADATA, ARRAYS, INDEX, BACKBONE)

# JSON members are parsed in memory: cap them well above any real file.
_JSON_LIMITS = {MANIFEST: 2**20, METADATA: 64 * 2**20}
_CHUNK = 2**20
_ZIP_MAGIC = b"PK\x03\x04"
# faiss.serialize_index of an IndexFlatL2: tag, d, ntotal, 2 reserved, is_trained,
# metric_type, number of float32 values; then the values.
_FLAT_L2_HEADER = struct.Struct("<4siqqq?iQ")
_FLAT_L2_TAG = b"IxF2"
_METRIC_L2 = 1
# Bytes per element of the safetensors dtypes; headers above safetensors' own limit are refused.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_SAFETENSORS_HEADER_LIMIT = 100 * 2**20
_PRECISIONS = ("fp32", "bf16", "fp16")
# Parameters and fitted attributes added after format version 1, with the value that
# gives a file (or pickle) written before they existed the behaviour it was saved with.
ADDED_PARAMS: dict[str, Any] = {"flip_average": False, "nearest_view": False}
ADDED_FITTED: dict[str, Any] = {"flip_average_": False, "nearest_view_": False}
# Libraries whose version change can change scores or break loading.
_CHECKED_VERSIONS = ("msc_detector", "torch", "timm", "faiss", "scikit-learn")
_FITTED_KEYS = (
    "offset_",
    "image_size_",
    "crop_pct_",
    "n_train_",
    "history_",
    "device_",
    "precision_",
    "weights_source_",
)


class ModelFileError(ValueError):
    """A model file is damaged, altered, in an unknown format, or not a model file at all.

    The message names the file and the problem. Nothing from the file has been executed
    when this is raised.
    """


# ------------------------------------------------------------------------------ writing


def save(detector: Any, path: str | os.PathLike[str]) -> None:
    """Write a fitted detector to ``path`` atomically, in the format described above.

    Parameters
    ----------
    detector : MSCDetector
        A fitted detector (:meth:`MSCDetector.save <msc_detector.MSCDetector.save>`
        checks this and raises ``NotFittedError`` otherwise).
    path : str or path-like
        Destination; an existing file there is replaced only once the new one is
        complete and on disk.

    Raises
    ------
    ValueError
        If ``detector`` is not fitted.

    Warns
    -----
    UserWarning
        When parameters JSON cannot hold (``epoch_callback``, a ``RandomState`` as
        ``random_state``) are dropped: the loaded detector has them as ``None``.
    """
    if getattr(detector, "index_", None) is None or getattr(detector, "backbone_", None) is None:
        raise ValueError(f"{type(detector).__name__} is not fitted; call fit before saving.")
    members = _encode(detector)
    _write_atomically(Path(path), members)


def _encode(detector: Any) -> list[tuple[str, bytes]]:
    """Serialise ``detector`` into the archive members, manifest first."""
    import numpy as np
    from safetensors.numpy import save as save_arrays
    from safetensors.torch import save as save_tensors

    params, dropped = _json_params(detector.get_params(deep=False))
    if dropped:
        warnings.warn(
            f"{', '.join(dropped)} cannot be stored in a model file and "
            f"{'is' if len(dropped) == 1 else 'are'} saved as None (only fit uses "
            f"{'it' if len(dropped) == 1 else 'them'}).",
            UserWarning,
            stacklevel=4,
        )
    index = detector.index_
    spec = detector.backbone_spec_
    metadata = {
        "estimator": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _running_versions(),
        "params": params,
        "backbone_spec": spec.to_dict(),
        "fitted": {
            "offset_": float(detector.offset_),
            "image_size_": int(detector.image_size_),
            "crop_pct_": float(detector.crop_pct_),
            "flip_average_": bool(detector.flip_average_),
            "nearest_view_": bool(detector.nearest_view_),
            "n_train_": int(detector.n_train_),
            "history_": list(detector.history_),
            "device_": str(detector.device_),
            "precision_": str(detector.precision_.name),
            "weights_source_": str(detector.weights_source_),
        },
        "index": {
            "type": "IndexFlatL2",
            "dim": index.dim,
            "ntotal": index.ntotal,
            "chunk_size": int(index.chunk_size),
            "use_gpu": bool(index.use_gpu),
        },
    }
    arrays: dict[str, np.ndarray] = {
        "center_": np.ascontiguousarray(detector.center_, dtype=np.float32),
        "train_scores_": np.ascontiguousarray(detector.train_scores_, dtype=np.float64),
    }
    blobs = {
        METADATA: json.dumps(metadata, indent=2, default=_json_default).encode("utf-8"),
        ARRAYS: save_arrays(arrays),
        INDEX: index.to_bytes(),
        BACKBONE: save_tensors(_network_tensors(detector)),
    }
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "members": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in blobs.items()
        },
    }
    return [(MANIFEST, json.dumps(manifest, indent=2).encode("utf-8")), *blobs.items()]


def _json_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Encode estimator parameters for JSON; return them and the names set to None."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in params.items():
        if value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, np.generic) and isinstance(value.item(), bool | int | float):
            out[name] = value.item()
        elif isinstance(value, os.PathLike | torch.device):
            out[name] = str(os.fspath(value) if isinstance(value, os.PathLike) else value)
        else:
            out[name] = None
            dropped.append(name)
    return out, dropped


def _json_default(value: Any) -> Any:
    """Encode numpy scalars that creep into ``history_``."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _network_tensors(detector: Any) -> dict[str, torch.Tensor]:
    """Tensors of ``backbone.safetensors``: the network's, then any pretrained one's."""
    tensors = _cpu_state_dict(detector.backbone_)
    pretrained = getattr(detector, "pretrained_backbone_", None)
    if pretrained is not None:
        tensors.update({PRETRAINED_PREFIX + k: v for k, v in _cpu_state_dict(pretrained).items()})
    return tensors


def _cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a state dict, none sharing memory (as safetensors needs)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:  # tied weights, or views of one buffer
            tensor = tensor.clone()
            pointer = tensor.untyped_storage().data_ptr()
        storages.add(pointer)
        out[name] = tensor
    return out


def _running_versions() -> dict[str, str]:
    """Versions of the libraries a model file depends on, as running now."""
    import faiss
    import numpy
    import safetensors
    import timm
    import torch

    import msc_detector

    return {
        "msc_detector": str(msc_detector.__version__),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "faiss": str(faiss.__version__),
        "scikit-learn": _distribution_version("scikit-learn"),
        "numpy": str(numpy.__version__),
        "safetensors": str(safetensors.__version__),
    }


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _write_atomically(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write the archive beside ``path``, fsync it, then rename it over ``path``."""
    if path.is_symlink():  # write through the link, as open() would
        path = Path(os.path.realpath(path))
    directory = path.parent
    temp, fd = _create_temp_file(directory, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                stamp = time.localtime()[:6]
                for name, data in members:
                    info = zipfile.ZipInfo(name, date_time=stamp)
                    info.compress_type = zipfile.ZIP_STORED
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data)
            handle.flush()
            os.fsync(handle.fileno())
        if path.is_file():  # keep the permissions of the file being replaced
            os.chmod(temp, stat.S_IMODE(path.stat().st_mode))
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


def _create_temp_file(directory: Path, name: str) -> tuple[Path, int]:
    """Create a new, uniquely named file in ``directory`` with the default permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = directory / f".{name[:200]}.{secrets.token_hex(6)}.tmp"
        try:
            return temp, os.open(temp, flags, 0o666)  # the umask applies, as with open()
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary file in {str(directory)!r}.")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where unsupported)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class SavedModel:
    """The verified, parsed content of a model file: pure data plus a CPU network.

    Attributes
    ----------
    path : pathlib.Path
        The file it was read from.
    metadata : dict
        ``metadata.json`` (see the module documentation).
    params : dict
        The estimator parameters as saved.
    backbone_spec : BackboneSpec
        Architecture and preprocessing of the network.
    backbone : torch.nn.Module
        The rebuilt network with the saved weights, in eval mode, on the CPU.
    pretrained_backbone : torch.nn.Module or None
        The network before fine-tuning, which embeds the nearest view, rebuilt
        likewise; ``None`` where the file holds none.
    center : ndarray of shape (n_features,), float32
    train_scores : ndarray of shape (n_train,), float64
    index : KNNIndex
        The Faiss index of the training embeddings.
    """

    path: Path
    metadata: dict[str, Any]
    params: dict[str, Any]
    backbone_spec: BackboneSpec
    backbone: torch.nn.Module
    pretrained_backbone: torch.nn.Module | None
    center: np.ndarray
    train_scores: np.ndarray
    index: KNNIndex

    @property
    def device(self) -> str:
        """The device the detector was fitted on, e.g. ``"cuda:0"``."""
        return str(self.metadata["fitted"]["device_"])

    def fitted_state(self, device: torch.device) -> dict[str, Any]:
        """Return the fitted attributes of a detector, with the network on ``device``.

        The saved precision is kept when ``device`` is of the type the detector was
        fitted on; otherwise the ``precision`` parameter is resolved for ``device``
        (``"auto"`` where that is not available there). The network is moved, not
        copied: call this once.

        Parameters
        ----------
        device : torch.device
            Where the network should run; it must exist on this machine.

        Returns
        -------
        dict
            ``backbone_``, ``backbone_spec_``, ``weights_source_``, ``device_``,
            ``precision_``, ``image_size_``, ``crop_pct_``, ``flip_average_``,
            ``nearest_view_``, ``pretrained_backbone_``, ``n_train_``, ``center_``, ``index_``,
            ``train_scores_``, ``offset_`` and ``history_``.
        """
        import torch

        from msc_detector.runtime import resolve_precision

        fitted = {**ADDED_FITTED, **self.metadata["fitted"]}
        if torch.device(fitted["device_"]).type == device.type:
            choice = str(fitted["precision_"])
        else:
            choice = str(self.params.get("precision") or "auto")
        try:
            precision = resolve_precision(choice, device)
        except ValueError:  # e.g. fp16 saved from a GPU, now on a CPU
            precision = resolve_precision("auto", device)
        pretrained = self.pretrained_backbone
        return {
            "backbone_": precision.place(self.backbone, device),
            "backbone_spec_": self.backbone_spec,
            "weights_source_": str(fitted["weights_source_"]),
            "device_": device,
            "precision_": precision,
            "image_size_": int(fitted["image_size_"]),
            "crop_pct_": float(fitted["crop_pct_"]),
            "flip_average_": bool(fitted["flip_average_"]),
            "nearest_view_": bool(fitted["nearest_view_"]),
            "pretrained_backbone_": None
            if pretrained is None
            else precision.place(pretrained, device),
            "n_train_": int(fitted["n_train_"]),
            "center_": self.center,
            "index_": self.index,
            "train_scores_": self.train_scores,
            "offset_": float(fitted["offset_"]),
            "history_": [dict(entry) for entry in fitted["history_"]],
        }


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a model file and return its metadata, without importing torch.

    Every member's size and SHA-256 are checked against the manifest and the metadata
    and index layout are validated, so a file that passes is intact; only building the
    network (which needs torch and timm) is left to :meth:`MSCDetector.load`.

    Parameters
    ----------
    path : str or path-like
        A file written by :meth:`MSCDetector.save <msc_detector.MSCDetector.save>`.

    Returns
    -------
    dict
        ``format``, ``format_version``, the keys of ``metadata.json`` (``estimator``,
        ``created``, ``versions``, ``params``, ``backbone_spec``, ``fitted``, ``index``)
        and ``members`` (name -> ``{"size", "sha256"}``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ModelFileError
        If the file is not a valid model file; the message names the problem.

    Examples
    --------
    >>> import msc_detector
    >>> info = msc_detector.inspect("detector.msc")  # doctest: +SKIP
    >>> info["versions"]["torch"], info["backbone_spec"]["architecture"]  # doctest: +SKIP
    ('2.4.1', 'tf_efficientnet_lite0')
    """
    verified = _read_verified(path, keep=())
    return {
        "format": verified.manifest["format"],
        "format_version": verified.manifest["format_version"],
        **verified.metadata,
        "members": verified.manifest["members"],
    }


def load(path: str | os.PathLike[str]) -> SavedModel:
    """Verify and parse a model file, and rebuild its network on the CPU.

    Nothing is downloaded and nothing from the file is executed.
    :meth:`MSCDetector.load <msc_detector.MSCDetector.load>` turns the result into a
    detector on the chosen device.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.

    Returns
    -------
    SavedModel

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ModelFileError
        If the file is not a valid model file; the message names the problem.

    Warns
    -----
    UserWarning
        When msc-detector, torch, timm, faiss or scikit-learn differ from the versions
        that saved the file.
    """
    import timm
    import torch
    from safetensors.numpy import load as load_arrays
    from safetensors.torch import load as load_tensors

    from msc_detector.backbones import BackboneSpec, rebuild_backbone
    from msc_detector.index import KNNIndex

    verified = _read_verified(path, keep=(ARRAYS, INDEX, BACKBONE))
    where, metadata, blobs = verified.path, verified.metadata, verified.blobs
    fitted, index_meta = metadata["fitted"], metadata["index"]
    _warn_on_version_change(where, metadata["versions"])  # before anything can fail on them
    try:
        torch.device(fitted["device_"])
    except RuntimeError as exc:
        raise _error(
            where, f"fitted.device_ {fitted['device_']!r} is not a torch device."
        ) from exc

    try:
        spec = BackboneSpec.from_dict(metadata["backbone_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _error(where, f"metadata.json has an invalid backbone_spec ({exc!r}).") from exc
    if ":" in spec.architecture or not timm.is_model(spec.architecture):
        raise _error(
            where,
            f"the backbone architecture {spec.architecture!r} is not a timm model available "
            f"in timm {timm.__version__} without downloading.",
        )

    try:
        arrays = load_arrays(blobs[ARRAYS])
    except Exception as exc:  # safetensors reports malformed data with its own error type
        raise _error(where, f"{ARRAYS} is not a valid safetensors file ({exc}).") from exc
    try:
        index = KNNIndex.from_bytes(
            blobs[INDEX],
            chunk_size=int(index_meta["chunk_size"]),
            use_gpu=bool(index_meta["use_gpu"]),
        )
    except RuntimeError as exc:  # Faiss reports read errors as RuntimeError
        raise _error(where, f"Faiss could not read {INDEX} ({exc}).") from exc

    try:
        state = load_tensors(blobs[BACKBONE])
    except Exception as exc:  # safetensors reports malformed data with its own error type
        raise _error(where, f"{BACKBONE} is not a valid safetensors file ({exc}).") from exc
    pretrained_state = {
        key[len(PRETRAINED_PREFIX) :]: tensor
        for key, tensor in state.items()
        if key.startswith(PRETRAINED_PREFIX)
    }
    if pretrained_state and fitted.get("nearest_view_") is not True:
        raise _error(
            where,
            f"{BACKBONE} holds a pretrained network ({PRETRAINED_PREFIX}* keys), which only "
            "a detector with fitted.nearest_view_ uses.",
        )
    try:
        backbone = rebuild_backbone(
            spec, {k: v for k, v in state.items() if not k.startswith(PRETRAINED_PREFIX)}
        )
        pretrained = rebuild_backbone(spec, pretrained_state) if pretrained_state else None
    except (RuntimeError, ValueError) as exc:  # load_state_dict mismatches, bad stages
        raise _error(
            where, f"the weights in {BACKBONE} do not fit {spec.architecture!r} ({exc})."
        ) from exc
    dim = spec.num_features
    if int(getattr(backbone, "num_features", dim)) != dim:
        raise _error(where, f"{spec.architecture!r} has no {dim}-wide features as recorded.")

    return SavedModel(
        path=where,
        metadata=metadata,
        params={**ADDED_PARAMS, **metadata["params"]},
        backbone_spec=spec,
        backbone=backbone,
        pretrained_backbone=pretrained,
        center=arrays["center_"],
        train_scores=arrays["train_scores_"],
        index=index,
    )


def _warn_on_version_change(path: Path, saved: Mapping[str, str]) -> None:
    running = _running_versions()
    changed = [
        f"{name} {saved.get(name, 'unknown')} (now {running[name]})"
        for name in _CHECKED_VERSIONS
        if _release(saved.get(name, "unknown")) != _release(running[name])
    ]
    if changed:
        warnings.warn(
            f"{path} was saved with {', '.join(changed)}. Loading across versions usually "
            "works, but scores may differ slightly from those where it was saved.",
            UserWarning,
            stacklevel=4,
        )


def _release(version: str) -> str:
    """Drop a local build label: ``"2.4.1+cu121"`` and ``"2.4.1+cpu"`` are one release."""
    return str(version).split("+", 1)[0]


# ------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class _Verified:
    path: Path
    manifest: dict[str, Any]
    metadata: dict[str, Any]
    blobs: dict[str, bytes]


def _error(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a usable model file: {problem}")


def _read_verified(path: str | os.PathLike[str], keep: Collection[str]) -> _Verified:
    """Check the archive, the manifest, every checksum and the metadata's shape.

    Returns the parsed manifest and metadata, and the bytes of the members in ``keep``
    (the others are hashed in chunks and dropped).
    """
    where = Path(path)
    if not where.exists():
        raise FileNotFoundError(f"No model file at {str(where)!r}.")
    if where.is_dir():
        raise _error(where, "it is a directory; a model file is a single zip archive.")
    archive_size = where.stat().st_size
    with where.open("rb") as handle:
        _check_signature(where, handle.read(len(_ZIP_MAGIC)))
        handle.seek(0)
        try:
            archive = zipfile.ZipFile(handle)
        except zipfile.BadZipFile as exc:
            raise _error(where, f"the zip archive is truncated or damaged ({exc}).") from exc
        with archive:
            infos = _check_entries(where, archive, archive_size)
            manifest = _parse_json(where, MANIFEST, _read_member(where, archive, infos[MANIFEST]))
            _check_manifest(where, manifest)
            _check_member_names(where, infos)
            blobs: dict[str, bytes] = {}
            for name in MEMBERS[1:]:
                data = _read_member(
                    where,
                    archive,
                    infos[name],
                    manifest["members"][name],
                    keep=name == METADATA or name in keep,
                )
                if data is not None:
                    blobs[name] = data
            metadata = _parse_json(where, METADATA, blobs.pop(METADATA))
            _check_metadata(where, metadata)

            def head(name: str, n_bytes: int) -> bytes:
                if name in blobs:
                    return blobs[name][:n_bytes]
                with archive.open(infos[name]) as member:
                    return member.read(n_bytes)

            sizes = {name: info.file_size for name, info in infos.items()}
            _check_layouts(where, metadata, head, sizes)
    return _Verified(path=where, manifest=manifest, metadata=metadata, blobs=blobs)


def _check_signature(path: Path, head: bytes) -> None:
    if head == _ZIP_MAGIC:
        return
    if not head:
        raise _error(path, "the file is empty.")
    if head[:1] == b"\x80":  # the PROTO opcode that starts pickles of protocol 2 and later
        raise _error(
            path,
            "it is a pickle (e.g. written by joblib.dump or pickle.dump), not a file written "
            "by MSCDetector.save. It was not unpickled, since unpickling can run arbitrary "
            "code; load pickles only from trusted sources, with joblib.load.",
        )
    raise _error(
        path,
        f"it is not a zip archive (it starts with {head!r}; model files written by "
        f"MSCDetector.save start with {_ZIP_MAGIC!r}).",
    )


def _check_entries(
    path: Path, archive: zipfile.ZipFile, archive_size: int
) -> dict[str, zipfile.ZipInfo]:
    """Reject unsafe, duplicated, compressed, encrypted or oversized entries."""
    infos: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in archive.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise _error(path, f"member {name!r} has a path that escapes the archive.")
        if name in infos:
            raise _error(path, f"member {name!r} appears more than once.")
        if info.flag_bits & 0x1:
            raise _error(path, f"member {name!r} is encrypted.")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _error(
                path,
                f"member {name!r} is compressed; MSCDetector.save stores members "
                "uncompressed, so this archive was made or repacked by something else.",
            )
        if info.file_size != info.compress_size:
            raise _error(path, f"member {name!r} declares inconsistent sizes.")
        limit = min(archive_size, _JSON_LIMITS.get(name, archive_size))
        if info.file_size > limit:
            raise _error(
                path,
                f"member {name!r} declares {info.file_size} bytes, more than the "
                f"{limit} allowed for it in this {archive_size}-byte file.",
            )
        total += info.file_size
        infos[name] = info
    if total > archive_size:
        raise _error(
            path, f"its members declare {total} bytes, more than the {archive_size}-byte file."
        )
    if MANIFEST not in infos:
        unexpected = sorted(set(infos) - set(MEMBERS))
        if unexpected:
            raise _error(path, f"unexpected member(s) {unexpected}; no {MANIFEST}.")
        raise _error(path, f"missing member {MANIFEST!r}.")
    return infos


def _check_member_names(path: Path, infos: Mapping[str, zipfile.ZipInfo]) -> None:
    unexpected = [name for name in infos if name not in MEMBERS]
    if unexpected:
        raise _error(
            path,
            f"unexpected member {unexpected[0]!r} (a model file holds exactly "
            f"{', '.join(MEMBERS)}). It was not read.",
        )
    missing = [name for name in MEMBERS if name not in infos]
    if missing:
        raise _error(path, f"missing member {missing[0]!r}.")


def _read_member(
    path: Path,
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    expected: Mapping[str, Any] | None = None,
    keep: bool = True,
) -> bytes | None:
    """Read one member, checking its CRC-32 and, given ``expected``, its size and SHA-256."""
    name = info.filename
    if expected is not None and info.file_size != expected["size"]:
        raise _error(
            path,
            f"member {name!r} has {info.file_size} bytes but the manifest says "
            f"{expected['size']}: the file was altered.",
        )
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    try:
        with archive.open(info) as member:
            for chunk in _chunks(member):
                digest.update(chunk)
                if keep:
                    chunks.append(chunk)
    except (zipfile.BadZipFile, EOFError) as exc:  # CRC mismatch, truncation, bad header
        raise _error(path, f"member {name!r} is corrupted ({exc}).") from exc
    if expected is not None and digest.hexdigest() != expected["sha256"]:
        raise _error(
            path,
            f"member {name!r} is corrupted or was altered: its SHA-256 does not match the "
            "manifest.",
        )
    return b"".join(chunks) if keep else None


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _parse_json(path: Path, name: str, data: bytes | None) -> Any:
    try:
        return json.loads((data or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _error(path, f"{name} is not valid JSON ({exc}).") from exc


def _check_manifest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise _error(path, f"{MANIFEST} declares format {found!r}, not {FORMAT_NAME!r}.")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _error(path, f"{MANIFEST} has an invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise _error(
            path,
            f"it uses model-file format {version}, written by a newer msc-detector; this "
            f"version reads formats up to {FORMAT_VERSION}. Upgrade msc-detector to load it.",
        )
    members = manifest.get("members")
    if not isinstance(members, dict) or set(members) != set(MEMBERS[1:]):
        listed = sorted(members) if isinstance(members, dict) else members
        raise _error(path, f"{MANIFEST} lists members {listed}, not {list(MEMBERS[1:])}.")
    for name, entry in members.items():
        valid = (
            isinstance(entry, dict)
            and _is_int(entry.get("size"))
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in entry["sha256"])
        )
        if not valid:
            raise _error(path, f"{MANIFEST} has an invalid entry for {name!r}: {entry!r}.")


def _check_metadata(path: Path, metadata: Any) -> None:
    """Check the shape of ``metadata.json`` so that loading it cannot fail half-way."""

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise _error(path, f"{METADATA}: {what}.")

    require(isinstance(metadata, dict), "the top level must be an object")
    for key in ("versions", "params", "backbone_spec", "fitted", "index"):
        require(isinstance(metadata.get(key), dict), f"{key!r} must be an object")
    versions, fitted, index = metadata["versions"], metadata["fitted"], metadata["index"]
    require(all(isinstance(v, str) for v in versions.values()), "versions must be strings")
    spec = metadata["backbone_spec"]
    require(isinstance(spec.get("architecture"), str), "backbone_spec.architecture: string")
    require(_is_int(spec.get("num_features")), "backbone_spec.num_features: integer")
    pre = spec.get("preprocess")
    require(
        isinstance(pre, dict)
        and _is_int(pre.get("input_size"))
        and all(
            isinstance(pre.get(key), list)
            and len(pre[key]) == 3
            and all(_is_number(v) for v in pre[key])
            for key in ("mean", "std")
        )
        and isinstance(pre.get("interpolation"), str)
        and _is_number(pre.get("crop_pct")),
        "backbone_spec.preprocess needs input_size, mean, std, interpolation and crop_pct",
    )
    missing = [key for key in _FITTED_KEYS if key not in fitted]
    require(not missing, f"fitted lacks {missing}")
    require(_is_number(fitted["offset_"]), "fitted.offset_ must be a number")
    for key in ("image_size_", "n_train_"):
        require(_is_int(fitted[key]) and fitted[key] > 0, f"fitted.{key}: positive integer")
    require(
        _is_number(fitted["crop_pct_"]) and 0 < fitted["crop_pct_"] <= 1,
        "fitted.crop_pct_ must be a number in (0, 1]",
    )
    with_added = {**ADDED_FITTED, **fitted}  # files from before a key existed lack it
    for key in ADDED_FITTED:
        require(isinstance(with_added[key], bool), f"fitted.{key} must be a boolean")
    require(
        isinstance(fitted["history_"], list)
        and all(isinstance(entry, dict) for entry in fitted["history_"]),
        "fitted.history_ must be a list of objects",
    )
    device = fitted["device_"]
    require(
        isinstance(device, str) and _is_device_string(device),
        f"fitted.device_ {device!r} is not a device string",
    )
    require(fitted["precision_"] in _PRECISIONS, f"fitted.precision_ must be one of {_PRECISIONS}")
    require(isinstance(fitted["weights_source_"], str), "fitted.weights_source_: string")
    require(index.get("type") == "IndexFlatL2", "index.type must be 'IndexFlatL2'")
    views = 2 if with_added["nearest_view_"] is True else 1
    require(
        index.get("dim") == views * spec["num_features"]
        and index.get("ntotal") == fitted["n_train_"],
        "index dim/ntotal must equal backbone_spec.num_features (twice that with "
        "fitted.nearest_view_) and fitted.n_train_",
    )
    require(
        _is_int(index.get("chunk_size")) and index["chunk_size"] > 0,
        "index.chunk_size: positive integer",
    )
    require(isinstance(index.get("use_gpu"), bool), "index.use_gpu must be a boolean")


def _check_layouts(
    path: Path,
    metadata: Mapping[str, Any],
    head: Callable[[str, int], bytes],
    sizes: Mapping[str, int],
) -> None:
    """Check the binary members' headers against the metadata, before any library parses them.

    ``head(name, n)`` returns the first ``n`` bytes of a member and ``sizes`` the member
    sizes; checksums were verified already.
    """
    dim, ntotal = metadata["index"]["dim"], metadata["index"]["ntotal"]
    arrays = _safetensors_layout(path, ARRAYS, head, sizes[ARRAYS])
    features = metadata["backbone_spec"]["num_features"]
    expected = {"center_": ("F32", [features]), "train_scores_": ("F64", [ntotal])}
    if arrays != expected:
        raise _error(path, f"{ARRAYS} holds {arrays}; the metadata implies {expected}.")
    if not _safetensors_layout(path, BACKBONE, head, sizes[BACKBONE]):
        raise _error(path, f"{BACKBONE} holds no tensors.")

    # faiss.serialize_index of an IndexFlatL2 holding ntotal x dim float32 values.
    expected_size = _FLAT_L2_HEADER.size + 4 * dim * ntotal
    problem = f"{INDEX} is not the serialised L2 index of {ntotal} vectors of dimension {dim}"
    if sizes[INDEX] != expected_size:
        raise _error(path, f"{problem} ({sizes[INDEX]} bytes instead of {expected_size}).")
    tag, d, n, _, _, _, metric, count = _FLAT_L2_HEADER.unpack(head(INDEX, _FLAT_L2_HEADER.size))
    if (tag, d, n, metric, count) != (_FLAT_L2_TAG, dim, ntotal, _METRIC_L2, dim * ntotal):
        raise _error(path, f"{problem} (header {tag!r}, d={d}, ntotal={n}, metric={metric}).")


def _safetensors_layout(
    path: Path, name: str, head: Callable[[str, int], bytes], size: int
) -> dict[str, tuple[str, list[int]]]:
    """Parse a safetensors header and check that its tensors tile the data exactly.

    Returns
    -------
    dict
        Tensor name -> (safetensors dtype, shape).
    """

    def fail(reason: str) -> ModelFileError:
        return _error(path, f"{name} is not a valid safetensors file ({reason}).")

    if size < 8:
        raise fail(f"{size} bytes")
    (header_size,) = struct.unpack("<Q", head(name, 8))
    if header_size > min(size - 8, _SAFETENSORS_HEADER_LIMIT):
        raise fail(f"a header of {header_size} bytes")
    try:
        header = json.loads(head(name, 8 + header_size)[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"its header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise fail("its header is not an object")
    header.pop("__metadata__", None)
    layout: dict[str, tuple[str, list[int]]] = {}
    spans: list[tuple[int, int]] = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or not _valid_tensor_entry(entry):
            raise fail(f"a malformed entry for {key!r}")
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if end - start != _SAFETENSORS_ITEMSIZE[dtype] * math.prod(shape):
            raise fail(f"{key!r} has offsets {[start, end]} for a {dtype} tensor of {shape}")
        layout[key] = (dtype, shape)
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise fail("its tensors overlap or leave gaps")
        position = end
    if 8 + header_size + position != size:
        raise fail(f"the tensors end at byte {8 + header_size + position} of {size}")
    return layout


def _valid_tensor_entry(entry: Mapping[str, Any]) -> bool:
    shape, span = entry.get("shape"), entry.get("data_offsets")
    return (
        entry.get("dtype") in _SAFETENSORS_ITEMSIZE
        and isinstance(shape, list)
        and all(_is_int(d) and d >= 0 for d in shape)
        and isinstance(span, list)
        and len(span) == 2
        and all(_is_int(o) and o >= 0 for o in span)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_device_string(value: str) -> bool:
    kind, _, number = value.partition(":")
    return kind.isalpha() and kind.isascii() and (not number or number.isdigit())

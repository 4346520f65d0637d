"""Model files: a fitted detector in one zip archive that loads without running code.

The format (members, schema, trust, versions) is described in :ref:`model-files`.
:func:`save` writes a file and :func:`dumps` its bytes (the Dask shipment); :func:`read`
verifies and decodes one, :func:`inspect` verifies one without importing torch, timm or
Faiss. Pickles hold the same members (:func:`encode`, :func:`decode`) without the archive;
a ``torch.nn.Module`` backbone has no model file, and its pickles hold the modules instead
of ``networks.safetensors``. :mod:`~msc_detector.persistence.schema` declares the format,
:mod:`~msc_detector.persistence.container` reads and writes the archive and
:mod:`~msc_detector.persistence.codec` turns a detector into members and back.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

from msc_detector._atomic import atomic_write
from msc_detector.persistence import codec
from msc_detector.persistence.codec import SavedModel, decode, encode, json_params
from msc_detector.persistence.container import verified_members, write_archive
from msc_detector.persistence.schema import (
    FITTED,
    FORMAT_VERSION,
    MEMBERS,
    METADATA_SCHEMA,
    READABLE_VERSIONS,
    ModelFileError,
)

__all__ = ["FITTED", "FORMAT_VERSION", "MEMBERS", "METADATA_SCHEMA", "READABLE_VERSIONS"]
__all__ += ["ModelFileError", "SavedModel", "decode", "dumps", "encode", "inspect", "read"]
__all__ += ["save"]


def _payload(detector: Any) -> dict[str, bytes]:
    """Return the payload of a detector's model file, warning about dropped parameters."""
    payload = encode(detector)  # refuses a module backbone
    if dropped := json_params(detector.get_params(deep=False))[1]:
        message = f"{', '.join(dropped)} cannot be stored in a model file: saved as None"
        warnings.warn(f"{message} (only fit uses it).", UserWarning, stacklevel=4)
    return payload


def save(detector: Any, path: str | os.PathLike[str]) -> None:
    """Write a fitted detector to ``path`` atomically, in the format described above.

    Warns (``UserWarning``) when parameters JSON cannot hold (``epoch_callback``, a
    ``RandomState`` as ``random_state``) are dropped: they load as ``None``. Refuses,
    with a ``ValueError`` that names joblib, a detector whose backbone is a module.
    """
    payload = _payload(detector)
    with atomic_write(path) as handle:
        write_archive(handle, payload)


def dumps(detector: Any) -> bytes:
    """Return the bytes of ``detector``'s model file, in memory (see :func:`save`)."""
    buffer = io.BytesIO()
    write_archive(buffer, _payload(detector))
    return buffer.getvalue()


def read(source: str | os.PathLike[str] | bytes) -> SavedModel:
    """Verify a model file (a path, or its bytes) and :func:`decode` it."""
    where, manifest, members = verified_members(source)
    return decode(members, str(where), version=manifest["format_version"])


def inspect(path: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """Verify a model file and return its metadata, without importing torch, timm or Faiss.

    All is checked but the networks, which only :meth:`MSCDetector.load
    <msc_detector.MSCDetector.load>` builds. Returns ``format``, ``format_version``,
    the keys of ``metadata.json`` and ``members`` (name -> ``{"size", "sha256"}``).
    """
    where, manifest, members = verified_members(path)
    metadata, _ = codec.metadata_and_arrays(where, members, manifest["format_version"])
    info = {key: manifest[key] for key in ("format", "format_version")}
    return {**info, **metadata, "members": manifest["members"]}


def to_pickle_state(detector: Any) -> dict[str, Any]:
    """Return what a pickle of a fitted detector holds.

    Its members; for a module backbone, the members without networks and the networks
    themselves (on the CPU).
    """
    model, version = detector.model_, {"format_version": FORMAT_VERSION}
    if not model.embedder.spec.is_module:
        return {"members": encode(detector), **version}
    networks = tuple(_on_cpu(network) for network in model.networks())
    return {"members": encode(detector, networks=False), "networks": networks, **version}


def from_pickle_state(state: dict[str, Any], attributes: dict[str, Any]) -> tuple[Any, float]:
    """Return the model and ``offset_`` of :func:`to_pickle_state`, landed as ``load`` lands.

    A pickle without a format version was written in format 5. Parameters missing from
    the estimator's pickled ``attributes`` (added since) are set there as the members
    hold them.
    """
    version = state.get("format_version", 5)
    saved = decode(state["members"], "pickle", networks=state.get("networks"), version=version)
    for name, value in saved.params.items():
        attributes.setdefault(name, value)
    precision = saved.params.get("precision") or "auto"
    return saved.model("auto", str(precision)), float(saved.fitted["offset_"])


def _on_cpu(model: Any) -> Any:
    """``model`` itself where it is on the CPU, else a CPU copy of it (for pickling)."""
    import copy

    if model is None:
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return model if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(model).cpu()

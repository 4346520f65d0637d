"""Model files: a fitted detector in one zip archive that loads without running code.

:meth:`MSCDetector.save <msc_detector.MSCDetector.save>` and :meth:`MSCDetector.load
<msc_detector.MSCDetector.load>` write and read the file described here; pickling a
detector uses the same :func:`encode` and :func:`decode`, without the archive. Tensors
are safetensors, the rest is JSON: nothing is unpickled, evaluated or imported.

A detector whose backbone was given as a ``torch.nn.Module`` has no model file: the
file rebuilds networks from their timm architecture name and holds no code, so
:func:`save` refuses it. Its pickles hold the same members but ``networks.safetensors``,
and the pickled modules themselves instead.
:func:`inspect` verifies a file without importing torch, timm or Faiss.

.. rubric:: File format, version 3

A zip archive (``.msc`` by convention) of exactly these members, in this order, stored
(compressed or encrypted members are refused):

``manifest.json`` (at most 64 KiB)
    ``{"format": "msc-detector-model", "format_version": 3, "members": {NAME: {"size":
    BYTES, "sha256": HEX}}}`` for the three members below.
``metadata.json`` (at most 16 MiB)
    A JSON object with exactly the keys of :data:`METADATA_SCHEMA`: ``estimator`` (never
    imported), ``created`` (UTC, ISO 8601), ``versions`` (of the libraries at saving),
    ``params`` (``get_params(deep=False)``, with ``null`` for what JSON cannot hold;
    ``preprocess`` and ``index_params`` may be objects of their fields, ``patch_stages``
    an array),
    ``backbone_spec`` (:meth:`BackboneSpec.to_dict
    <msc_detector.backbones.BackboneSpec.to_dict>`), ``fitted`` (:data:`FITTED`) and
    ``index``: ``{"kind": STR, "params": {STR: INT}, "faiss_class": STR, "dim": D,
    "ntotal": N}``, the index as built (``msc_detector.index.IndexSpec.to_dict``) and
    the Faiss class, width and size it has.
``arrays.safetensors``
    ``center_`` (float32, ``(F,)``), ``train_scores_`` (float64, ``(N,)``) and the
    index, all finite: for ``kind`` ``"flat"`` its vectors, ``index_vectors`` (float32,
    ``(N, D)``), from which the exact index is rebuilt; for the approximate kinds its
    ``faiss.serialize_index`` bytes, ``index_faiss`` (uint8, ``(B,)``), whose
    deserialised class, width and size must match ``index``. Where the training images
    were files, also ``train_paths`` (uint8: the ``N`` paths as file-system bytes, each
    followed by a NUL byte);
    ``F = backbone_spec.num_features``, ``N = fitted.n_train_``, ``D = F``, or ``2F``
    where ``fitted.nearest_view_``. Where the detector has a patch bank
    (``fitted.patch_stages_`` not empty), also ``patch_vectors`` (float32, ``(M, P)``,
    finite), ``patch_owners`` (int64, ``(M,)``, training image indices in ``[0, N)``),
    ``patch_positions`` (int64, ``(M, 2)``, row and column in the grid) and
    ``patch_grid`` (int64, ``(2,)``, the grid's height and width ``h, w``) and
    ``patch_baseline`` (float32, ``(h, w)``, finite), with ``1 <= M <= params.patch_memory``.
``networks.safetensors``
    The fine-tuned headless timm network's state dict under the key prefix
    ``backbone.`` and, where the detector keeps one, the pretrained network's (which
    embeds the nearest view) under ``pretrained.``.

Format 2 (0.1.0) is format 3 without ``metadata.json["index"]``: a flat index.

.. rubric:: Trust

A flat index is read as plain float32 vectors. An approximate index (IVF, PQ, HNSW)
holds structures that only Faiss can rebuild, so its bytes are handed to Faiss's own
reader (``faiss.deserialize_index``, never a memory-mapped read). That reader is C++
written for files one made oneself, not hardened against crafted input: load a model
file with an approximate index only from a source you trust as you would trust its
Faiss index file. Storing the inverted lists, codes and graph as arrays and rebuilding
them would avoid that, at the cost of code for each Faiss structure.

Reading refuses, with a :class:`ModelFileError` that names the problem, anything else:
a pickle, a damaged archive, a size or SHA-256 that differs from the manifest, JSON
outside the schema, arrays that do not match it, an architecture that timm does not know
locally (no ``hf-hub:`` download), weights that do not fit it. Checksums catch damage,
not forgery; a hostile file is harmless because it is pure data. Writing is atomic: an
interrupted save leaves the previous file as it was.

.. rubric:: Versioning

:data:`FORMAT_VERSION` is bumped by any change that an older reader would misread or
refuse (a member, a key, a dtype, a meaning), and each bump is recorded in
``CHANGELOG.md``. A release reads every format version written since 0.1.0 (formats 2 and 3)
and refuses newer ones with a message to upgrade. Format 1 was a development format that
no release wrote; it is refused with a message to fit and save again. Format 3 added
approximate indexes (``index`` in the metadata, ``index_faiss`` in the arrays) and the
patch bank (the ``patch_*`` arrays) and the fitted ``patch_stages_``, ``image_score_``
and ``score_scales_``; a format-2 file loads as a detector without a patch bank
(``patch_memory=None``, ``image_score="global"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import struct
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from msc_detector.backbones import BackboneSpec
    from msc_detector.index import KNNIndex, PatchIndex

__all__ = ["FITTED", "FORMAT_VERSION", "METADATA_SCHEMA", "ModelFileError", "SavedModel"]
__all__ += ["decode", "encode", "inspect", "read", "save"]

FORMAT_NAME = "msc-detector-model"
#: The patch bank size of ``patch_memory="auto"``: the most patches such a file holds.
AUTO_PATCH_MEMORY = 16384
#: The model-file format this code writes, and the newest it reads.
FORMAT_VERSION = 3
#: Every format version this code reads.
READABLE_VERSIONS = (2, 3)

MANIFEST, METADATA = "manifest.json", "metadata.json"
ARRAYS, NETWORKS = "arrays.safetensors", "networks.safetensors"
MEMBERS = (MANIFEST, METADATA, ARRAYS, NETWORKS)
PAYLOAD = MEMBERS[1:]  # what encode returns and decode reads
BACKBONE, PRETRAINED = "backbone.", "pretrained."  # key prefixes in NETWORKS
_LIMITS = {MANIFEST: 64 * 2**10, METADATA: 16 * 2**20}  # bytes, checked before parsing
_MAX_HISTORY = 100_000
_ZIP_MAGIC = b"PK\x03\x04"
# What zipfile raises on a damaged archive: a flipped bit can give any of these.
_ZIP_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, OSError, NotImplementedError)
_ZIP_ERRORS += (EOFError, struct.error, ValueError)
# Libraries whose version change can change scores or break loading (warned about).
_CHECKED_VERSIONS = ("msc_detector", "torch", "timm", "faiss", "scikit-learn")


class ModelFileError(ValueError):
    """A model file is damaged, altered, in an unknown format, or not a model file at all.

    The message names the file and the problem. Nothing from the file has been executed
    when this is raised.
    """


# -------------------------------------------------------------------------- schema


class Field(NamedTuple):
    """A key of a JSON member: what is valid, said in words, and how it is encoded."""

    valid: Callable[[Any], Any]
    meaning: str
    encode: Callable[[Any], Any] = lambda value: value  # FITTED: the attribute -> JSON


def _is(*types: type, test: Callable[[Any], Any] | None = None) -> Callable[[Any], bool]:
    """Return a check: ``isinstance(value, types)``, where a bool is no number, and ``test``."""
    no_bool = bool not in types
    return lambda v: (
        isinstance(v, types)
        and not (no_bool and isinstance(v, bool))
        and (test is None or bool(test(v)))
    )


def _mapping(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return _is(dict, test=lambda mapping: all(map(valid, mapping.values())))


_NUMBER = (int, float)
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d{1,4})?")
_SHA256 = re.compile("[0-9a-f]{64}")
_HISTORY_ENTRY = _mapping(_is(*_NUMBER))
_POSITIVE = _is(int, test=lambda v: v > 0)
_SCALAR = _is(type(None), bool, *_NUMBER, str)
_NUMBERS = _is(list, test=lambda items: len(items) <= 16 and all(map(_is(*_NUMBER), items)))
_POSITIVE_NUMBER = _is(*_NUMBER, test=lambda v: math.isfinite(v) and v > 0)
_NOT_SAVED = (
    "A detector whose backbone is a torch.nn.Module ({kind}) cannot be saved as a model "
    "file: a model file rebuilds its network from a timm architecture name and holds no "
    "code. Pickle it with joblib.dump(detector, path) instead, and load it with joblib.load "
    "only where you trust the file (unpickling can run code)."
)

#: The fitted scalars, ``metadata.json["fitted"]``: one entry per detector attribute.
FITTED: dict[str, Field] = {
    "offset_": Field(_is(*_NUMBER, test=math.isfinite), "a finite number", float),
    "image_size_": Field(_is(int, test=lambda v: 16 <= v <= 4096), "an int in [16, 4096]", int),
    "crop_pct_": Field(_is(*_NUMBER, test=lambda v: 0 < v <= 1), "a number in (0, 1]", float),
    "flip_average_": Field(_is(bool), "a boolean", bool),
    "nearest_view_": Field(_is(bool), "a boolean", bool),
    "n_train_": Field(_POSITIVE, "a positive integer", int),
    "history_": Field(
        _is(list, test=lambda v: len(v) <= _MAX_HISTORY and all(map(_HISTORY_ENTRY, v))),
        f"a list of at most {_MAX_HISTORY} objects of numbers",
        list,
    ),
    "device_": Field(_is(str, test=_DEVICE.fullmatch), "a device such as 'cuda:0'", str),
    "precision_": Field(
        lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16", lambda p: p.name
    ),
    "weights_source_": Field(_is(str), "a string", str),
    "patch_stages_": Field(
        _is(list, test=lambda v: len(v) <= 16 and all(map(_is(str), v))),
        "a list of at most 16 module names",
        list,
    ),
    "image_score_": Field(
        lambda v: v in ("global", "patch", "combined"), "global, patch or combined", str
    ),
    "score_scales_": Field(
        _is(list, test=lambda v: len(v) == 2 and all(map(_POSITIVE_NUMBER, v))),
        "a list of two positive finite numbers",
        lambda v: [float(x) for x in v],
    ),
}
#: What a format-2 file (no patch bank) means for the fitted keys format 3 added.
_FORMAT_2_FITTED = {"patch_stages_": [], "image_score_": "global", "score_scales_": [1.0, 1.0]}
_PATCH_ARRAYS = (
    "patch_vectors",
    "patch_owners",
    "patch_positions",
    "patch_grid",
    "patch_baseline",
)
#: The keys of ``metadata.json``; :func:`decode` checks ``backbone_spec`` further.
METADATA_SCHEMA: dict[str, Field] = {
    "estimator": Field(_is(str), "a string"),
    "created": Field(_is(str), "a string"),
    "versions": Field(_mapping(_is(str)), "an object of strings"),
    "params": Field(
        _mapping(
            lambda v: _SCALAR(v) or _NUMBERS(v) or _mapping(lambda f: _SCALAR(f) or _NUMBERS(f))(v)
        ),
        "an object of nulls, booleans, numbers, strings, arrays of numbers and objects of those",
    ),
    "backbone_spec": Field(
        _is(dict, test=lambda v: _POSITIVE(v.get("num_features"))),
        "an object with a positive integer num_features",
    ),
    "fitted": Field(_is(dict), "an object"),
    "index": Field(
        _is(
            dict,
            test=lambda v: (
                sorted(v) == ["dim", "faiss_class", "kind", "ntotal", "params"]
                and _is(str)(v["kind"])
                and _is(str)(v["faiss_class"])
                and _mapping(_POSITIVE)(v["params"])
                and _POSITIVE(v["dim"])
                and _POSITIVE(v["ntotal"])
            ),
        ),
        "an object of kind, params, faiss_class, dim and ntotal",
    ),
}
_SIZE, _DIGEST = _is(int, test=lambda v: v >= 0), _is(str, test=_SHA256.fullmatch)
_ENTRY = _is(dict, test=lambda v: _SIZE(v.get("size")) and _DIGEST(v.get("sha256")))
_MANIFEST_SCHEMA = {
    "format": Field(lambda v: v == FORMAT_NAME, repr(FORMAT_NAME)),
    "format_version": Field(
        lambda v: _is(int)(v) and v in READABLE_VERSIONS, f"one of {READABLE_VERSIONS}"
    ),
    "members": Field(
        _is(dict, test=lambda m: sorted(m) == sorted(PAYLOAD) and all(map(_ENTRY, m.values()))),
        f'{{NAME: {{"size": BYTES, "sha256": HEX}}}} for each of {list(PAYLOAD)}',
    ),
}


def _check(where: object, label: str, value: Any, schema: Mapping[str, Field]) -> None:
    """Require exactly the keys of ``schema``, each valid."""
    if not isinstance(value, dict) or sorted(value) != sorted(schema):
        raise _error(where, f"{label} must be an object with the keys {list(schema)}.")
    for name, field in schema.items():
        if not field.valid(value[name]):
            raise _error(where, f"{label}[{name!r}] must be {field.meaning}.")


# ------------------------------------------------------------------------ encoding


def encode(detector: Any, networks: bool = True) -> dict[str, bytes]:
    """Serialise a fitted detector into the payload members, for a file or a pickle.

    Returns ``metadata.json``, ``arrays.safetensors`` and, with ``networks``,
    ``networks.safetensors`` by name. Parameters JSON cannot hold are written as
    ``null`` (:func:`save` warns). Without ``networks`` the caller keeps the networks
    (a pickle of a module backbone); with them, a module backbone is refused.
    """
    import numpy as np
    from safetensors.numpy import save as save_arrays
    from safetensors.torch import save as save_tensors

    metadata = {
        "estimator": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _running_versions(),
        "params": _json_params(detector.get_params(deep=False))[0],
        "backbone_spec": detector.backbone_spec_.to_dict(),
        "fitted": {name: field.encode(getattr(detector, name)) for name, field in FITTED.items()},
        "index": detector.index_.describe(),
    }
    arrays: dict[str, np.ndarray] = {
        "center_": np.ascontiguousarray(detector.center_, dtype=np.float32),
        "train_scores_": np.ascontiguousarray(detector.train_scores_, dtype=np.float64),
    }
    if detector.index_.spec.exact:
        arrays["index_vectors"] = np.ascontiguousarray(detector.index_.vectors(), np.float32)
    else:
        arrays["index_faiss"] = detector.index_.to_bytes()
    if detector.train_paths_ is not None:
        joined = b"".join(os.fsencode(path) + b"\0" for path in detector.train_paths_)
        arrays["train_paths"] = np.frombuffer(joined, dtype=np.uint8)
    bank = detector.patch_bank_
    if bank is not None:
        arrays["patch_vectors"] = np.ascontiguousarray(bank.vectors(), dtype=np.float32)
        arrays["patch_owners"] = np.ascontiguousarray(bank.owners, dtype=np.int64)
        arrays["patch_positions"] = np.ascontiguousarray(bank.positions, dtype=np.int64)
        arrays["patch_grid"] = np.asarray(bank.grid, dtype=np.int64)
        arrays["patch_baseline"] = np.ascontiguousarray(bank.baseline, dtype=np.float32)
    payload = {  # default=: numpy scalars creep into history_
        METADATA: json.dumps(metadata, indent=2, default=lambda v: v.item()).encode(),
        ARRAYS: save_arrays(arrays),
    }
    if not networks:
        return payload
    spec = detector.backbone_spec_
    if spec.is_module:
        raise ValueError(_NOT_SAVED.format(kind=spec.architecture.split(":", 1)[1]))
    nets = {BACKBONE: detector.backbone_, PRETRAINED: detector.pretrained_backbone_}
    tensors = {  # copies: safetensors refuses tensors that share memory (tied weights)
        prefix + key: value.detach().to("cpu", copy=True).contiguous()
        for prefix, network in nets.items()
        if network is not None
        for key, value in network.state_dict().items()
    }
    return {**payload, NETWORKS: save_tensors(tensors)}


def _json_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Encode estimator parameters for JSON; return them and the names set to None.

    Scalars, paths and devices are kept; so is a flat mapping of those or of sequences
    of numbers (``preprocess``, a dict or a ``PreprocessConfig``). Anything else, and a
    mapping holding anything else, is ``None``.
    """
    import dataclasses

    out: dict[str, Any] = {}
    for name, value in params.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            encoded = {key: _json_value(item) for key, item in value.items()}
            whole = all(
                isinstance(key, str) and (encoded[key] is not None or item is None)
                for key, item in value.items()
            )
            out[name] = encoded if whole else None
        else:
            out[name] = _json_value(value)
    return out, [name for name, value in params.items() if out[name] is None and value is not None]


def _json_value(value: Any) -> Any:
    """Return a JSON scalar (or a list of numbers) for ``value``, or ``None`` for none."""
    import numpy as np
    import torch

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, os.PathLike | torch.device):
        return str(os.fspath(value) if isinstance(value, os.PathLike) else value)
    if isinstance(value, None | bool | int | float | str):
        return value
    if isinstance(value, list | tuple | np.ndarray) and len(value) <= 16:
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            return items
    return None


def _running_versions() -> dict[str, str]:
    from importlib import import_module, metadata

    names = ("msc_detector", "torch", "timm", "faiss", "numpy", "safetensors")
    versions = {name: str(import_module(name).__version__) for name in names}
    versions["python"] = platform.python_version()
    versions["scikit-learn"] = metadata.version("scikit-learn")
    return versions


# ------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class SavedModel:
    """A decoded detector: pure data, with its networks rebuilt on the CPU in eval mode.

    ``fitted`` holds the validated values of :data:`FITTED` as saved (``device_`` is
    the string of the device it was fitted on); ``index`` is rebuilt from the vectors.
    """

    params: dict[str, Any]
    backbone_spec: BackboneSpec
    backbone: nn.Module
    pretrained_backbone: nn.Module | None
    center: np.ndarray
    train_scores: np.ndarray
    index: KNNIndex
    fitted: dict[str, Any]
    train_paths: list[str] | None = None
    patch_bank: PatchIndex | None = None


def decode(
    members: Mapping[str, bytes],
    where: str,
    networks: tuple[nn.Module, nn.Module | None] | None = None,
    version: int = FORMAT_VERSION,
) -> SavedModel:
    """Validate and parse the members written by :func:`encode`.

    ``where`` names their source in messages (a path, or ``"pickle"``); ``version``
    is the format version they were written in (see Versioning). ``networks``:
    the fine-tuned and pretrained networks where the members hold none (the pickle of a
    module backbone); otherwise they are rebuilt from ``networks.safetensors``. Raises
    :class:`ModelFileError` for anything invalid; warns when msc-detector, torch, timm,
    faiss or scikit-learn differ from the versions that wrote them.
    """
    import timm
    from safetensors.torch import load as load_tensors

    from msc_detector.backbones import BackboneSpec, rebuild_backbone

    needed = PAYLOAD if networks is None else (METADATA, ARRAYS)
    if missing := [name for name in needed if name not in members]:
        raise _error(where, f"missing member {missing[0]!r}.")
    metadata, arrays = _metadata_and_arrays(where, members, version)
    _warn_on_version_change(where, metadata["versions"])
    try:
        spec = BackboneSpec.from_dict(metadata["backbone_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _error(where, f"{METADATA} has an invalid backbone_spec ({exc!r}).") from exc
    if networks is not None:
        return _saved_model(where, metadata, arrays, spec, *networks)
    if ":" in spec.architecture or not timm.is_model(spec.architecture):  # e.g. "hf-hub:..."
        raise _error(where, f"timm has no {spec.architecture!r} without downloading.")
    tensors = _parse(where, NETWORKS, members[NETWORKS], load_tensors)
    states = [
        {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        for prefix in (BACKBONE, PRETRAINED)
    ]
    if sum(map(len, states)) != len(tensors):
        raise _error(where, f"{NETWORKS} holds keys outside {BACKBONE} and {PRETRAINED}.")
    try:  # an empty backbone state fails too: strict loading misses every key
        backbone = rebuild_backbone(spec, states[0])
        pretrained = rebuild_backbone(spec, states[1]) if states[1] else None
    except (RuntimeError, ValueError) as exc:
        problem = f"the weights in {NETWORKS} do not fit {spec.architecture!r} ({exc})."
        raise _error(where, problem) from exc
    if getattr(backbone, "num_features", None) != spec.num_features:
        raise _error(where, f"{spec.architecture!r} does not have {spec.num_features} features.")
    return _saved_model(where, metadata, arrays, spec, backbone, pretrained)


def _saved_model(
    where: object,
    metadata: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    spec: BackboneSpec,
    backbone: nn.Module,
    pretrained: nn.Module | None,
) -> SavedModel:
    """Assemble a :class:`SavedModel` from checked members and networks."""
    from msc_detector.index import PatchIndex

    # JSON arrays come back as the tuples they were (patch_stages, preprocess' mean and std)
    params = {
        name: {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        if isinstance(value, dict)
        else tuple(value)
        if isinstance(value, list)
        else value
        for name, value in metadata["params"].items()
    }
    return SavedModel(
        params=params,
        backbone_spec=spec,
        backbone=backbone,
        pretrained_backbone=pretrained,
        center=arrays["center_"],
        train_scores=arrays["train_scores_"],
        index=_index(where, metadata, arrays),
        fitted=dict(metadata["fitted"]),
        train_paths=_split_paths(arrays["train_paths"]) if "train_paths" in arrays else None,
        patch_bank=PatchIndex(
            arrays["patch_vectors"],
            arrays["patch_owners"],
            arrays["patch_positions"],
            (int(arrays["patch_grid"][0]), int(arrays["patch_grid"][1])),
            arrays["patch_baseline"],
        )
        if "patch_vectors" in arrays
        else None,
    )


def _index(
    where: object, metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> KNNIndex:
    """Rebuild the index: from its vectors (flat), else from its checked Faiss bytes."""
    from msc_detector.index import IndexSpec, KNNIndex

    info = metadata.get("index") or {"kind": "flat", "params": {}}  # format 2: flat
    try:
        spec = IndexSpec.from_dict(info)
        if spec.exact:
            return KNNIndex(spec).fit(arrays["index_vectors"])
        return KNNIndex.from_bytes(
            arrays["index_faiss"], spec, info["faiss_class"], info["dim"], info["ntotal"]
        )
    except ValueError as exc:
        raise _error(where, f"its index cannot be rebuilt: {exc}") from exc


def _split_paths(joined: np.ndarray) -> list[str]:
    """Undo the NUL-terminated joining of ``train_paths`` (checked by the reader)."""
    return [os.fsdecode(path) for path in joined.tobytes().split(b"\0")[:-1]]


def _metadata_and_arrays(
    where: object, members: Mapping[str, bytes], version: int = FORMAT_VERSION
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check ``metadata.json``, then the arrays against it (without torch).

    Metadata of format 2 comes back as format 3 says a detector without a patch bank.
    """
    import numpy as np
    from safetensors.numpy import load as load_arrays

    metadata = _parse(where, METADATA, members[METADATA], json.loads)
    schema = METADATA_SCHEMA  # format 2 has no index key: a flat index
    if isinstance(metadata, dict) and "index" not in metadata:
        schema = {k: v for k, v in METADATA_SCHEMA.items() if k != "index"}
    _check(where, METADATA, metadata, schema)
    if version == 2 and isinstance(metadata["fitted"], dict):
        metadata["fitted"] = {**metadata["fitted"], **_FORMAT_2_FITTED}
        metadata["params"] = {**metadata["params"], "patch_memory": None}
    _check(where, f"{METADATA}['fitted']", metadata["fitted"], FITTED)
    arrays = _parse(where, ARRAYS, members[ARRAYS], load_arrays)
    fitted, features = metadata["fitted"], metadata["backbone_spec"]["num_features"]
    n, dim = fitted["n_train_"], features * (2 if fitted["nearest_view_"] else 1)
    expected = {
        "center_": ("float32", (features,)),
        "train_scores_": ("float64", (n,)),
        "index_vectors": ("float32", (n, dim)),
    }
    found = {name: (str(array.dtype), array.shape) for name, array in arrays.items()}
    index = metadata.get("index", {"kind": "flat", "dim": dim, "ntotal": n})
    if index["kind"] != "flat":
        del expected["index_vectors"]
        blob = arrays.get("index_faiss")
        expected["index_faiss"] = (
            "uint8",
            blob.shape if blob is not None and blob.ndim == 1 else (-1,),
        )
    if "train_paths" in found:
        paths = arrays["train_paths"]
        expected["train_paths"] = ("uint8", paths.shape)
        if paths.ndim != 1 or paths[-1:].tolist() != [0] or np.count_nonzero(paths == 0) != n:
            raise _error(where, f"{ARRAYS} has train_paths that do not hold {n} paths.")
    if fitted["patch_stages_"]:
        expected.update(_patch_arrays_expected(where, arrays, metadata["params"]))
    if found != expected:
        raise _error(where, f"{ARRAYS} holds {found}; the metadata implies {expected}.")
    if (index["dim"], index["ntotal"]) != (dim, n):
        raise _error(
            where,
            f"{METADATA} describes an index of {index['ntotal']} vectors of width "
            f"{index['dim']}; the detector has {n} of width {dim}.",
        )
    if "patch_grid" in arrays:
        owners, positions = arrays["patch_owners"], arrays["patch_positions"]
        inside = (owners >= 0).all() and (owners < n).all() and (positions >= 0).all()
        if not (
            inside
            and (arrays["patch_grid"] > 0).all()
            and (positions < arrays["patch_grid"]).all()
        ):
            raise _error(where, f"{ARRAYS} has patch owners or positions outside their range.")
    if infinite := [name for name, array in arrays.items() if not np.isfinite(array).all()]:
        raise _error(where, f"{ARRAYS} holds non-finite values in {infinite}.")
    return metadata, arrays


def _patch_arrays_expected(
    where: object, arrays: Mapping[str, np.ndarray], params: Mapping[str, Any]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return the dtypes and shapes of the patch-bank arrays (their size within budget)."""
    if any(name not in arrays for name in _PATCH_ARRAYS):
        raise _error(where, f"{ARRAYS} lacks the patch bank arrays {list(_PATCH_ARRAYS)}.")
    vectors, grid = arrays["patch_vectors"], arrays["patch_grid"]
    rows, cols = (int(grid[0]), int(grid[1])) if grid.shape == (2,) else (-1, -1)
    m = vectors.shape[0] if vectors.ndim == 2 else -1
    memory = params.get("patch_memory")
    if memory == "auto":
        memory = AUTO_PATCH_MEMORY
    if m < 1 or not (_POSITIVE(memory) and m <= int(memory)):  # type: ignore[arg-type]
        raise _error(where, f"{ARRAYS} holds {m} patches; params.patch_memory is {memory!r}.")
    return {
        "patch_vectors": ("float32", (m, vectors.shape[1])),
        "patch_owners": ("int64", (m,)),
        "patch_positions": ("int64", (m, 2)),
        "patch_grid": ("int64", (2,)),
        "patch_baseline": ("float32", (rows, cols)),
    }


def _parse(where: object, name: str, data: bytes, load: Callable[[bytes], Any]) -> Any:
    """Parse a member with ``load`` (:func:`json.loads` or safetensors' own validation)."""
    if len(data) > _LIMITS.get(name, len(data)):
        raise _error(where, f"{name} has {len(data)} bytes, over its limit of {_LIMITS[name]}.")
    try:
        return load(data)
    except Exception as exc:  # JSON and safetensors errors, of several types
        raise _error(where, f"{name} is not valid ({exc}).") from exc


def _warn_on_version_change(where: object, saved: Mapping[str, str]) -> None:
    now, then = _running_versions(), {k: saved.get(k, "unknown") for k in _CHECKED_VERSIONS}
    # A local build label does not count: "2.4.1+cu121" and "2.4.1+cpu" are one release.
    changed = [k for k in then if then[k].split("+")[0] != now[k].split("+")[0]]
    if changed:
        warnings.warn(
            f"{where} was saved with {', '.join(f'{k} {then[k]} (now {now[k]})' for k in changed)}"
            ". Loading across versions usually works, but scores may differ slightly.",
            UserWarning,
            stacklevel=4,
        )


def _error(where: object, problem: str) -> ModelFileError:
    return ModelFileError(f"{where} is not a usable model file: {problem}")


# ------------------------------------------------------------------------ the file


def save(detector: Any, path: str | os.PathLike[str]) -> None:
    """Write a fitted detector to ``path`` atomically, in the format described above.

    Warns (``UserWarning``) when parameters JSON cannot hold (``epoch_callback``, a
    ``RandomState`` as ``random_state``) are dropped: they load as ``None``. Refuses,
    with a ``ValueError`` that names joblib, a detector whose backbone is a module.
    """
    spec = detector.backbone_spec_
    if spec.is_module:
        raise ValueError(_NOT_SAVED.format(kind=spec.architecture.split(":", 1)[1]))
    if dropped := _json_params(detector.get_params(deep=False))[1]:
        message = f"{', '.join(dropped)} cannot be stored in a model file: saved as None"
        warnings.warn(f"{message} (only fit uses it).", UserWarning, stacklevel=3)
    payload = encode(detector)
    members = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in payload.items()
    }
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "members": members}
    _write_atomically(Path(path), {MANIFEST: json.dumps(manifest, indent=2).encode(), **payload})


def read(path: str | os.PathLike[str]) -> SavedModel:
    """Verify a model file and :func:`decode` it (``FileNotFoundError`` if absent)."""
    where, manifest, members = _verified_members(path)
    return decode(members, str(where), version=manifest["format_version"])


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a model file and return its metadata, without importing torch, timm or Faiss.

    All is checked but the networks, which only :meth:`MSCDetector.load
    <msc_detector.MSCDetector.load>` builds. Returns ``format``, ``format_version``,
    the keys of ``metadata.json`` and ``members`` (name -> ``{"size", "sha256"}``).
    """
    where, manifest, members = _verified_members(path)
    metadata, _ = _metadata_and_arrays(where, members, manifest["format_version"])
    info = {key: manifest[key] for key in ("format", "format_version")}
    return {**info, **metadata, "members": manifest["members"]}


def _verified_members(path: str | os.PathLike[str]) -> tuple[Path, Any, dict[str, bytes]]:
    """Check the archive, its members, the manifest and the checksums; read the payload."""
    where = Path(path)
    if where.is_dir():
        raise _error(where, "it is a directory; a model file is one zip archive.")
    with where.open("rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
        if head[:1] == b"\x80":  # the PROTO opcode that starts pickles of protocol 2 and later
            raise _error(
                where,
                "it is a pickle (e.g. from joblib.dump), not a file written by MSCDetector.save. "
                "It was not unpickled: that can run any code. Load pickles only from trusted "
                "sources, with joblib.load.",
            )
        if head != _ZIP_MAGIC:
            raise _error(where, f"it is not a zip archive: it starts with {head!r}.")
        size = os.fstat(handle.fileno()).st_size
        try:
            archive = zipfile.ZipFile(handle)
        except _ZIP_ERRORS as exc:
            raise _error(where, f"the zip archive is truncated or damaged ({exc}).") from exc
        with archive:
            names: list[str] = []
            for info in archive.infolist():
                name, limit = info.filename, min(size, _LIMITS.get(info.filename, size))
                if name in names:
                    raise _error(where, f"member {name!r} appears more than once.")
                if max(info.file_size, info.compress_size) > limit:
                    raise _error(where, f"member {name!r} declares more than {limit} bytes.")
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    raise _error(where, f"member {name!r} is compressed or encrypted.")
                names.append(name)
            if MANIFEST in names:  # first: a newer format may hold other members
                manifest = _parse(where, MANIFEST, _read(where, archive, MANIFEST), json.loads)
                _check_manifest(where, manifest)
            wrong = [f"unexpected member {name!r}" for name in names if name not in MEMBERS]
            wrong += [f"missing member {name!r}" for name in MEMBERS if name not in names]
            if wrong:
                raise _error(
                    where, f"{wrong[0]}; a model file holds exactly {', '.join(MEMBERS)}."
                )
            members = {name: _read(where, archive, name) for name in PAYLOAD}
    for name, data in members.items():
        entry = manifest["members"][name]
        if len(data) != entry["size"]:
            raise _error(where, f"member {name!r} has {len(data)} bytes, not {entry['size']}.")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _error(where, f"member {name!r} does not match its SHA-256: it was altered.")
    return where, manifest, members


def _read(where: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except _ZIP_ERRORS as exc:  # CRC mismatch, truncation, a damaged local header
        raise _error(where, f"member {name!r} is corrupted ({exc}).") from exc


def _check_manifest(where: Path, manifest: Any) -> None:
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT_NAME:
        raise _error(where, f"{MANIFEST} declares format {found!r}, not {FORMAT_NAME!r}.")
    version = manifest.get("format_version")
    if _is(int)(version) and version == 1:
        raise _error(
            where,
            "it was written by a development version of msc-detector before 0.1.0 (model-file "
            "format 1), which this version does not read. Fit the detector again and save it.",
        )
    if _is(int)(version) and version > FORMAT_VERSION:
        raise _error(
            where,
            f"it uses model-file format {version}, written by a newer msc-detector; this "
            f"version reads formats up to {FORMAT_VERSION}. Upgrade msc-detector to load it.",
        )
    _check(where, MANIFEST, manifest, _MANIFEST_SCHEMA)


def _write_atomically(path: Path, members: Mapping[str, bytes]) -> None:
    """Write the archive beside ``path``, fsync it, rename it over ``path``, fsync the dir."""
    path = Path(os.path.realpath(path)) if path.is_symlink() else path  # write through links
    temp = path.parent / f".{path.name[:200]}.{os.urandom(6).hex()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:  # 0o666: the umask applies, as with open()
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w") as archive:  # stored: the default
                for name, data in members.items():
                    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data)
            handle.flush()
            os.fsync(handle.fileno())
        if path.is_file():  # keep the permissions of the file being replaced
            os.chmod(temp, path.stat().st_mode & 0o7777)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if os.name == "posix":  # make the rename durable
        with contextlib.suppress(OSError):
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

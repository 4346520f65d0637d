"""The model file's codec: a fitted detector <-> the payload members (see :ref:`model-files`).

:func:`encode` writes :meth:`FittedModel.state <msc_detector.model.FittedModel.state>`,
the parameters, ``offset_``, the index and the networks; :func:`decode` checks each member
against :mod:`~msc_detector.persistence.schema` and returns a :class:`SavedModel`.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msc_detector.persistence.schema import (
    ARRAY_SHAPES,
    ARRAYS,
    FITTED,
    FORMAT_VERSION,
    METADATA,
    METADATA_SCHEMA,
    NETWORKS,
    PAYLOAD,
    UPGRADES,
    check,
    error,
    is_param,
    parse,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from msc_detector.backbones import BackboneSpec
    from msc_detector.index import KNNIndex
    from msc_detector.model import FittedModel, SavedParts

__all__ = ["SavedModel", "decode", "encode", "json_params"]

PREFIXES = ("backbone.", "pretrained.")  # of the two networks' keys in NETWORKS
INDEX_PREFIX = "index."  # an approximate index's plain arrays in ARRAYS (format 5)
# Libraries whose version change can change scores or break loading (warned about).
_CHECKED_VERSIONS = ("msc_detector", "torch", "timm", "faiss", "scikit-learn")


def encode(detector: Any, networks: bool = True) -> dict[str, bytes]:
    """Serialise a fitted detector into the payload members, for a file or a pickle.

    Without ``networks``, ``networks.safetensors`` is left out (a pickle of a module
    backbone holds the modules); with them, a module backbone is refused. Parameters
    JSON cannot hold are written as ``null``.
    """
    import numpy as np
    from safetensors.numpy import save as save_arrays
    from safetensors.torch import save as save_tensors

    model = detector.model_
    spec, index = model.embedder.spec, model.index
    if networks and spec.is_module:
        kind = spec.architecture.split(":", 1)[1]
        raise ValueError(
            f"A detector whose backbone is a torch.nn.Module ({kind}) cannot be saved as a "
            "model file: a model file rebuilds its network from a timm architecture name and "
            "holds no code. Pickle it with joblib.dump(detector, path) instead, and load it "
            "with joblib.load only where you trust the file (unpickling can run code)."
        )
    fitted, arrays = model.state()
    fitted["offset_"] = float(detector.offset_)
    metadata = {
        "estimator": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _running_versions(),
        "params": json_params(detector.get_params(deep=False))[0],
        "backbone_spec": spec.to_dict(),
        "fitted": {name: fitted[name] for name in FITTED},
        "index": index.describe(),
    }
    if index.spec.exact:
        arrays["index_vectors"] = np.ascontiguousarray(index.vectors(), np.float32)
    elif index.spec.has_plain_form:
        arrays.update({INDEX_PREFIX + k: v for k, v in index.to_arrays().items()})
    else:  # pre-transforms, refinements, other quantizers: Faiss's bytes
        arrays["index_faiss"] = index.to_bytes()
    if model.train_paths is not None:
        joined = b"".join(os.fsencode(path) + b"\0" for path in model.train_paths)
        arrays["train_paths"] = np.frombuffer(joined, dtype=np.uint8)
    payload = {  # default=: numpy scalars creep into history_
        METADATA: json.dumps(metadata, indent=2, default=lambda v: v.item()).encode(),
        ARRAYS: save_arrays(arrays),
    }
    if networks:  # copies: safetensors refuses tensors that share memory (tied weights)
        payload[NETWORKS] = save_tensors(
            {
                prefix + key: value.detach().to("cpu", copy=True).contiguous()
                for prefix, network in zip(PREFIXES, model.networks(), strict=True)
                if network is not None
                for key, value in network.state_dict().items()
            }
        )
    return payload


def json_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Encode estimator parameters for JSON; return them and the names set to None.

    A value is kept where its JSON form (numpy values, paths, devices and dataclasses
    made plain) is one that ``metadata.json`` holds (:func:`~.schema.is_param`).
    """
    out = {name: _json_value(value) for name, value in params.items()}
    return out, [name for name, value in params.items() if out[name] is None and value is not None]


def _json_value(value: Any) -> Any:
    import dataclasses

    import numpy as np
    import torch

    def plain(v: Any) -> Any:  # what json.dumps cannot write itself
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.asdict(v)
        if isinstance(v, Mapping):
            return dict(v)
        if isinstance(v, np.generic | np.ndarray):
            return v.tolist()
        if isinstance(v, os.PathLike | torch.device):
            return str(os.fspath(v) if isinstance(v, os.PathLike) else v)
        raise TypeError(type(v).__name__)

    if isinstance(value, Mapping) and not all(isinstance(key, str) for key in value):
        return None  # json.dumps would write an int key as a string
    try:
        encoded = json.loads(json.dumps(value, default=plain))
    except (TypeError, ValueError):  # an object JSON cannot hold, such as a tuple key
        return None
    return encoded if is_param(encoded) else None


def _running_versions() -> dict[str, str]:
    from importlib import import_module, metadata

    names = ("msc_detector", "torch", "timm", "faiss", "numpy", "safetensors")
    versions = {name: str(import_module(name).__version__) for name in names}
    versions["python"] = platform.python_version()
    versions["scikit-learn"] = metadata.version("scikit-learn")
    return versions


@dataclass(frozen=True)
class SavedModel:
    """A decoded detector: pure data, with its networks rebuilt on the CPU in eval mode.

    ``fitted`` holds the checked values of :data:`FITTED` (``device_``: where it was
    fitted), ``arrays`` the checked arrays, ``parts`` what else the model is built from.
    """

    params: dict[str, Any]
    fitted: dict[str, Any]
    arrays: dict[str, np.ndarray]
    parts: SavedParts

    def model(self, device: str | torch.device = "auto", precision: str = "auto") -> FittedModel:
        """Return the fitted model, landed on ``device`` (see ``FittedModel.from_state``)."""
        from msc_detector.model import FittedModel

        return FittedModel.from_state(self.fitted, self.arrays, self.parts, device, precision)


def decode(
    members: Mapping[str, bytes],
    where: str,
    networks: tuple[nn.Module, nn.Module | None] | None = None,
    version: int = FORMAT_VERSION,
) -> SavedModel:
    """Check the members written by :func:`encode` in format ``version`` and rebuild them.

    ``where`` names them in messages (a path, or ``"pickle"``); ``networks`` are the
    fine-tuned and pretrained networks where the members hold none (a pickle of a module
    backbone). Raises :class:`ModelFileError` for anything invalid; warns when
    msc-detector, torch, timm, faiss or scikit-learn differ from those that wrote them.
    """
    from msc_detector.backbones import BackboneSpec
    from msc_detector.model import SavedParts

    needed = PAYLOAD if networks is None else (METADATA, ARRAYS)
    if missing := [name for name in needed if name not in members]:
        raise error(where, f"missing member {missing[0]!r}.")
    metadata, arrays = metadata_and_arrays(where, members, version)
    _warn_on_version_change(where, metadata["versions"])
    try:
        spec = BackboneSpec.from_dict(metadata["backbone_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise error(where, f"{METADATA} has an invalid backbone_spec ({exc!r}).") from exc
    backbone, pretrained = networks or _networks(where, spec, members[NETWORKS])
    joined = arrays.pop("train_paths", None)  # each followed by a NUL byte (checked)
    paths = None if joined is None else list(map(os.fsdecode, joined.tobytes().split(b"\0")[:-1]))
    index = _index(where, metadata["index"], arrays)
    parts = SavedParts(spec, backbone, pretrained, index, paths)
    return SavedModel(_tuples(metadata["params"]), metadata["fitted"], arrays, parts)


def _networks(
    where: object, spec: BackboneSpec, data: bytes
) -> tuple[nn.Module, nn.Module | None]:
    """Rebuild the fine-tuned and the pretrained network from ``networks.safetensors``."""
    import timm
    from safetensors.torch import load as load_tensors

    from msc_detector.backbones import rebuild_backbone

    if ":" in spec.architecture or not timm.is_model(spec.architecture):  # e.g. "hf-hub:..."
        raise error(where, f"timm has no {spec.architecture!r} without downloading.")
    tensors = parse(where, NETWORKS, data, load_tensors)
    states = [
        {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        for prefix in PREFIXES
    ]
    if sum(map(len, states)) != len(tensors):
        raise error(where, f"{NETWORKS} holds keys outside {' and '.join(PREFIXES)}.")
    try:  # an empty backbone state fails too: strict loading misses every key
        backbone = rebuild_backbone(spec, states[0])
        pretrained = rebuild_backbone(spec, states[1]) if states[1] else None
    except (RuntimeError, ValueError) as exc:
        problem = f"the weights in {NETWORKS} do not fit {spec.architecture!r} ({exc})."
        raise error(where, problem) from exc
    if getattr(backbone, "num_features", None) != spec.num_features:
        raise error(where, f"{spec.architecture!r} does not have {spec.num_features} features.")
    return backbone, pretrained


def _tuples(value: Any) -> Any:
    """Return JSON ``value`` with its arrays as the tuples they were (``patch_stages``...)."""
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return tuple(value) if isinstance(value, list) else value


def _index(where: object, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> KNNIndex:
    """Rebuild the index from its vectors, its checked plain arrays, or its Faiss bytes.

    Faiss bytes (formats 3 and 4, and kinds without a plain-array form) are size-checked
    before Faiss's reader sees them.
    """
    from msc_detector.index import IndexSpec, KNNIndex

    plain = {k[len(INDEX_PREFIX) :]: v for k, v in arrays.items() if k.startswith(INDEX_PREFIX)}
    try:
        spec, dim, ntotal = IndexSpec.from_dict(info), info["dim"], info["ntotal"]
        if spec.exact:
            return KNNIndex(spec).fit(arrays["index_vectors"])
        if plain:
            return KNNIndex.from_arrays(plain, spec, dim, ntotal)
        return KNNIndex.from_bytes(arrays["index_faiss"], spec, info["faiss_class"], dim, ntotal)
    except ValueError as exc:
        raise error(where, f"its index cannot be rebuilt: {exc}") from exc


def metadata_and_arrays(
    where: object, members: Mapping[str, bytes], version: int = FORMAT_VERSION
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check ``metadata.json``, then the arrays against it (without torch).

    Metadata of an older format comes back in the current one (:data:`UPGRADES`).
    """
    import numpy as np
    from safetensors.numpy import load as load_arrays

    from msc_detector.index_kinds import has_plain_form

    metadata = parse(where, METADATA, members[METADATA], json.loads)
    schema = dict(METADATA_SCHEMA)
    if version == 2 and isinstance(metadata, dict) and "index" not in metadata:
        del schema["index"]  # a flat index, described below
    check(where, METADATA, metadata, schema)
    for since, added in UPGRADES.items():
        if version <= since:
            for key, defaults in added.items():
                metadata[key] = {**metadata[key], **defaults}
    check(where, f"{METADATA}['fitted']", metadata["fitted"], FITTED)
    fitted, features = metadata["fitted"], metadata["backbone_spec"]["num_features"]
    n, dim = fitted["n_train_"], features * (2 if fitted["nearest_view_"] else 1)
    flat = {"kind": "flat", "params": {}, "faiss_class": "IndexFlat", "dim": dim, "ntotal": n}
    index, kind = metadata.setdefault("index", flat), metadata["index"]["kind"]
    arrays = parse(where, ARRAYS, members[ARRAYS], load_arrays)
    stored = [name for name in arrays if name.startswith(INDEX_PREFIX)]
    if kind == "flat":
        stored = ["index_vectors"]
    elif version < 5 or not has_plain_form(kind):
        stored = ["index_faiss"]
    elif not stored:  # plain arrays, each checked as the index is rebuilt
        raise error(where, f"{ARRAYS} lacks the arrays of its {kind!r} index.")
    if "train_paths" in arrays:
        stored.append("train_paths")
    if fitted["patch_stages_"]:
        stored += [name for name in ARRAY_SHAPES if name.startswith("patch_")]
    expected = sorted(["center_", "train_scores_", *stored])
    if sorted(arrays) != expected:
        raise error(where, f"{ARRAYS} holds {sorted(arrays)}; the metadata implies {expected}.")
    sizes: dict[int | str, int] = {"n": n, "f": features, "d": dim}
    if "patch_grid" in arrays and arrays["patch_grid"].shape == (2,):
        sizes["h"], sizes["w"] = arrays["patch_grid"].tolist()
    for name, (dtype, shape) in ARRAY_SHAPES.items():  # binding the sizes first seen
        if (array := arrays.get(name)) is None:
            continue
        for size, found in zip(shape, array.shape, strict=False):
            if isinstance(size, str):
                sizes.setdefault(size, found)
        wanted = tuple(sizes.get(size, size) for size in shape)
        if (str(array.dtype), array.shape) != (dtype, wanted):
            raise error(
                where,
                f"{ARRAYS} holds {name!r} as {array.dtype} {array.shape}; the metadata "
                f"implies {dtype} {wanted}.",
            )
    if (index["dim"], index["ntotal"]) != (dim, n):
        raise error(
            where,
            f"{METADATA} describes an index of {index['ntotal']} vectors of width "
            f"{index['dim']}; the detector has {n} of width {dim}.",
        )
    if "train_paths" in arrays:
        paths = arrays["train_paths"]
        if paths[-1:].tolist() != [0] or np.count_nonzero(paths == 0) != n:
            raise error(where, f"{ARRAYS} has train_paths that do not hold {n} paths.")
    if "patch_grid" in arrays:
        m, h, w = len(arrays["patch_vectors"]), sizes["h"], sizes["w"]
        if not 1 <= m <= n * h * w:
            raise error(
                where,
                f"{ARRAYS} holds {m} patches; a grid of {h} x {w} patches of {n} "
                "training images holds 1 to all of them.",
            )
        owners, positions = arrays["patch_owners"], arrays["patch_positions"]
        inside = (owners >= 0) & (owners < n), (positions >= 0) & (positions < (h, w))
        if not (inside[0].all() and inside[1].all()):
            raise error(where, f"{ARRAYS} has patch owners or positions outside their range.")
    if infinite := [name for name, array in arrays.items() if not np.isfinite(array).all()]:
        raise error(where, f"{ARRAYS} holds non-finite values in {infinite}.")
    return metadata, arrays


def _warn_on_version_change(where: object, saved: Mapping[str, str]) -> None:
    now, then = _running_versions(), {k: saved.get(k, "unknown") for k in _CHECKED_VERSIONS}
    # A local build label does not count: "2.4.1+cu121" and "2.4.1+cpu" are one release.
    if changed := [k for k in then if then[k].split("+")[0] != now[k].split("+")[0]]:
        warnings.warn(
            f"{where} was saved with {', '.join(f'{k} {then[k]} (now {now[k]})' for k in changed)}"
            ". Loading across versions usually works, but scores may differ slightly.",
            UserWarning,
            stacklevel=4,
        )

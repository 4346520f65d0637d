"""The model file's codec: a fitted detector's declared state <-> the payload members.

:func:`encode` writes what :meth:`FittedModel.state <msc_detector.model.FittedModel.state>`
declares, the estimator's parameters and ``offset_``, the index and the networks;
:func:`decode` checks every member against :mod:`~msc_detector.persistence.schema` and
returns a :class:`SavedModel`, from which :meth:`SavedModel.model` rebuilds the
fitted model on a device.
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
    ARRAYS,
    FITTED,
    FORMAT_2_FITTED,
    FORMAT_3_FITTED,
    FORMAT_VERSION,
    METADATA,
    METADATA_SCHEMA,
    NETWORKS,
    NOT_SAVED,
    PATCH_ARRAYS,
    PAYLOAD,
    check,
    error,
    parse,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from msc_detector.backbones import BackboneSpec
    from msc_detector.index import KNNIndex
    from msc_detector.model import FittedModel

__all__ = ["SavedModel", "decode", "encode", "json_params"]

BACKBONE, PRETRAINED = "backbone.", "pretrained."  # key prefixes in NETWORKS
INDEX_PREFIX = "index."  # an approximate index's plain arrays in ARRAYS (format 5)
# Libraries whose version change can change scores or break loading (warned about).
_CHECKED_VERSIONS = ("msc_detector", "torch", "timm", "faiss", "scikit-learn")


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

    model = detector.model_
    fitted, arrays = model.state()
    fitted["offset_"] = float(detector.offset_)
    metadata = {
        "estimator": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _running_versions(),
        "params": json_params(detector.get_params(deep=False))[0],
        "backbone_spec": model.embedder.spec.to_dict(),
        "fitted": {name: fitted[name] for name in FITTED},
        "index": model.index.describe(),
    }
    if model.index.spec.exact:
        arrays["index_vectors"] = np.ascontiguousarray(model.index.vectors(), np.float32)
    elif model.index.spec.has_plain_form:
        arrays.update({INDEX_PREFIX + k: v for k, v in model.index.to_arrays().items()})
    else:  # pre-transforms, refinements, other quantizers: Faiss's bytes
        arrays["index_faiss"] = model.index.to_bytes()
    if model.train_paths is not None:
        joined = b"".join(os.fsencode(path) + b"\0" for path in model.train_paths)
        arrays["train_paths"] = np.frombuffer(joined, dtype=np.uint8)
    payload = {  # default=: numpy scalars creep into history_
        METADATA: json.dumps(metadata, indent=2, default=lambda v: v.item()).encode(),
        ARRAYS: save_arrays(arrays),
    }
    if not networks:
        return payload
    spec = model.embedder.spec
    if spec.is_module:
        raise ValueError(NOT_SAVED.format(kind=spec.architecture.split(":", 1)[1]))
    nets = dict(zip((BACKBONE, PRETRAINED), model.networks(), strict=True))
    tensors = {  # copies: safetensors refuses tensors that share memory (tied weights)
        prefix + key: value.detach().to("cpu", copy=True).contiguous()
        for prefix, network in nets.items()
        if network is not None
        for key, value in network.state_dict().items()
    }
    return {**payload, NETWORKS: save_tensors(tensors)}


def json_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
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


@dataclass(frozen=True)
class SavedModel:
    """A decoded detector: pure data, with its networks rebuilt on the CPU in eval mode.

    ``fitted`` holds the validated values of :data:`FITTED` as saved (``device_`` is
    the string of the device it was fitted on), ``arrays`` the checked arrays;
    ``index`` is rebuilt.
    """

    params: dict[str, Any]
    backbone_spec: BackboneSpec
    backbone: nn.Module
    pretrained_backbone: nn.Module | None
    index: KNNIndex
    fitted: dict[str, Any]
    arrays: dict[str, np.ndarray]
    train_paths: list[str] | None = None

    def model(self, device: str | torch.device = "auto", precision: str = "auto") -> FittedModel:
        """Return the fitted model, landed on ``device`` (see ``FittedModel.from_state``)."""
        from msc_detector.model import FittedModel, SavedParts

        parts = SavedParts(
            self.backbone_spec,
            self.backbone,
            self.pretrained_backbone,
            self.index,
            self.train_paths,
        )
        return FittedModel.from_state(self.fitted, self.arrays, parts, device, precision)


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
        raise error(where, f"missing member {missing[0]!r}.")
    metadata, arrays = metadata_and_arrays(where, members, version)
    _warn_on_version_change(where, metadata["versions"])
    try:
        spec = BackboneSpec.from_dict(metadata["backbone_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise error(where, f"{METADATA} has an invalid backbone_spec ({exc!r}).") from exc
    if networks is not None:
        return _saved_model(where, metadata, arrays, spec, *networks)
    if ":" in spec.architecture or not timm.is_model(spec.architecture):  # e.g. "hf-hub:..."
        raise error(where, f"timm has no {spec.architecture!r} without downloading.")
    tensors = parse(where, NETWORKS, members[NETWORKS], load_tensors)
    states = [
        {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        for prefix in (BACKBONE, PRETRAINED)
    ]
    if sum(map(len, states)) != len(tensors):
        raise error(where, f"{NETWORKS} holds keys outside {BACKBONE} and {PRETRAINED}.")
    try:  # an empty backbone state fails too: strict loading misses every key
        backbone = rebuild_backbone(spec, states[0])
        pretrained = rebuild_backbone(spec, states[1]) if states[1] else None
    except (RuntimeError, ValueError) as exc:
        problem = f"the weights in {NETWORKS} do not fit {spec.architecture!r} ({exc})."
        raise error(where, problem) from exc
    if getattr(backbone, "num_features", None) != spec.num_features:
        raise error(where, f"{spec.architecture!r} does not have {spec.num_features} features.")
    return _saved_model(where, metadata, arrays, spec, backbone, pretrained)


def _saved_model(
    where: object,
    metadata: Mapping[str, Any],
    arrays: dict[str, np.ndarray],
    spec: BackboneSpec,
    backbone: nn.Module,
    pretrained: nn.Module | None,
) -> SavedModel:
    """Assemble a :class:`SavedModel` from checked members and networks."""
    # JSON arrays come back as the tuples they were (patch_stages, preprocess' mean and std)
    params = {
        name: {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        if isinstance(value, dict)
        else tuple(value)
        if isinstance(value, list)
        else value
        for name, value in metadata["params"].items()
    }
    paths = arrays.pop("train_paths", None)
    return SavedModel(
        params=params,
        backbone_spec=spec,
        backbone=backbone,
        pretrained_backbone=pretrained,
        index=_index(where, metadata, arrays),
        fitted=dict(metadata["fitted"]),
        arrays=arrays,
        train_paths=None if paths is None else _split_paths(paths),
    )


def _index(
    where: object, metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> KNNIndex:
    """Rebuild the index from its vectors, its checked plain arrays, or its Faiss bytes.

    Faiss bytes (formats 3 and 4, and kinds without a plain-array form) are size-checked
    before Faiss's reader sees them.
    """
    from msc_detector.index import IndexSpec, KNNIndex

    info = metadata.get("index") or {"kind": "flat", "params": {}}  # format 2: flat
    try:
        spec = IndexSpec.from_dict(info)
        if spec.exact:
            return KNNIndex(spec).fit(arrays["index_vectors"])
        plain = _index_arrays(arrays)
        if plain:
            return KNNIndex.from_arrays(plain, spec, info["dim"], info["ntotal"])
        return KNNIndex.from_bytes(
            arrays["index_faiss"], spec, info["faiss_class"], info["dim"], info["ntotal"]
        )
    except ValueError as exc:
        raise error(where, f"its index cannot be rebuilt: {exc}") from exc


def _index_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return an approximate index's plain arrays, by the names ``KNNIndex`` gives them."""
    size = len(INDEX_PREFIX)
    return {k[size:]: v for k, v in arrays.items() if k.startswith(INDEX_PREFIX)}


def _split_paths(joined: np.ndarray) -> list[str]:
    """Undo the NUL-terminated joining of ``train_paths`` (checked by the reader)."""
    return [os.fsdecode(path) for path in joined.tobytes().split(b"\0")[:-1]]


def metadata_and_arrays(
    where: object, members: Mapping[str, bytes], version: int = FORMAT_VERSION
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check ``metadata.json``, then the arrays against it (without torch).

    Metadata of format 2 comes back as format 3 says a detector without a patch bank.
    """
    import numpy as np
    from safetensors.numpy import load as load_arrays

    metadata = parse(where, METADATA, members[METADATA], json.loads)
    schema = METADATA_SCHEMA  # format 2 has no index key: a flat index
    if isinstance(metadata, dict) and "index" not in metadata:
        schema = {k: v for k, v in METADATA_SCHEMA.items() if k != "index"}
    check(where, METADATA, metadata, schema)
    if version == 2 and isinstance(metadata["fitted"], dict):
        metadata["fitted"] = {**metadata["fitted"], **FORMAT_2_FITTED}
        metadata["params"] = {**metadata["params"], "patch_memory": None}
    if version <= 3 and isinstance(metadata["fitted"], dict):  # "combined" was not centred
        metadata["fitted"] = {**metadata["fitted"], **FORMAT_3_FITTED}
    check(where, f"{METADATA}['fitted']", metadata["fitted"], FITTED)
    arrays = parse(where, ARRAYS, members[ARRAYS], load_arrays)
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
        expected.update(_approximate_index_expected(where, index, arrays, version))
    if "train_paths" in found:
        paths = arrays["train_paths"]
        expected["train_paths"] = ("uint8", paths.shape)
        if paths.ndim != 1 or paths[-1:].tolist() != [0] or np.count_nonzero(paths == 0) != n:
            raise error(where, f"{ARRAYS} has train_paths that do not hold {n} paths.")
    if fitted["patch_stages_"]:
        expected.update(_patch_arrays_expected(where, arrays, n))
    if found != expected:
        raise error(where, f"{ARRAYS} holds {found}; the metadata implies {expected}.")
    if (index["dim"], index["ntotal"]) != (dim, n):
        raise error(
            where,
            f"{METADATA} describes an index of {index['ntotal']} vectors of width "
            f"{index['dim']}; the detector has {n} of width {dim}.",
        )
    if "patch_grid" in arrays:
        m, (rows, cols) = len(arrays["patch_vectors"]), arrays["patch_grid"].tolist()
        if m > n * rows * cols:
            raise error(
                where,
                f"{ARRAYS} holds {m} patches; a grid of {rows} x {cols} patches of {n} "
                "training images holds 1 to all of them.",
            )
        owners, positions = arrays["patch_owners"], arrays["patch_positions"]
        inside = (owners >= 0).all() and (owners < n).all() and (positions >= 0).all()
        if not (
            inside
            and (arrays["patch_grid"] > 0).all()
            and (positions < arrays["patch_grid"]).all()
        ):
            raise error(where, f"{ARRAYS} has patch owners or positions outside their range.")
    if infinite := [name for name, array in arrays.items() if not np.isfinite(array).all()]:
        raise error(where, f"{ARRAYS} holds non-finite values in {infinite}.")
    return metadata, arrays


def _approximate_index_expected(
    where: object, index: Mapping[str, Any], arrays: Mapping[str, np.ndarray], version: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return the names, dtypes and shapes of an approximate index's arrays.

    From format 5, a kind with a plain-array form has its plain arrays (each checked when
    the index is rebuilt) and never Faiss bytes; otherwise the bytes, one uint8 array.
    """
    from msc_detector.index_kinds import has_plain_form

    if version >= 5 and has_plain_form(index["kind"]):
        names = [name for name in arrays if name.startswith(INDEX_PREFIX)]
        if not names:
            raise error(where, f"{ARRAYS} lacks the arrays of its {index['kind']!r} index.")
        return {name: (str(arrays[name].dtype), arrays[name].shape) for name in names}
    blob = arrays.get("index_faiss")
    return {"index_faiss": ("uint8", blob.shape if blob is not None and blob.ndim == 1 else (-1,))}


def _patch_arrays_expected(
    where: object, arrays: Mapping[str, np.ndarray], n_train: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return the dtypes and shapes of the patch-bank arrays.

    The bank holds at most every patch of every training image: ``n_train * h * w``.
    (Not ``params.patch_memory``: parameters changed after fit are read by the next fit.)
    """
    if any(name not in arrays for name in PATCH_ARRAYS):
        raise error(where, f"{ARRAYS} lacks the patch bank arrays {list(PATCH_ARRAYS)}.")
    vectors, grid = arrays["patch_vectors"], arrays["patch_grid"]
    rows, cols = (int(grid[0]), int(grid[1])) if grid.shape == (2,) else (-1, -1)
    m = vectors.shape[0] if vectors.ndim == 2 else -1
    if m < 1 or rows < 1 or cols < 1:
        raise error(
            where,
            f"{ARRAYS} holds {m} patches; a grid of {rows} x {cols} patches of {n_train} "
            "training images holds 1 to all of them.",
        )
    return {
        "patch_vectors": ("float32", (m, vectors.shape[1])),
        "patch_owners": ("int64", (m,)),
        "patch_positions": ("int64", (m, 2)),
        "patch_grid": ("int64", (2,)),
        "patch_baseline": ("float32", (rows, cols)),
    }


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

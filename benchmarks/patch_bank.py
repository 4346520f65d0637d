"""Cost of the patch bank: build seconds, memory and anomaly-map rate, per patch_memory.

What is measured, on this machine (see ``machine`` in the results):

* ``extract_ms_per_image``: patch embeddings of one 224-pixel image (EfficientNet-Lite0,
  bundled weights, stages ``blocks.2`` + ``blocks.4``: a 28 x 28 grid of 152 values), from
  ``--images`` images of scikit-image's ``grass`` photo (random 224-pixel crops);
* ``coreset_s_6000``: :class:`~msc_detector.coreset.StreamingCoreset` over the patches of
  6,000 such images (4.7 million vectors of 152 values, streamed as Gaussian noise: the
  selection's cost depends on the counts, not on the values);
* ``build_s_6000``: the estimate for a bank of 6,000 images, ``6000 * extract`` plus the
  coreset;
* ``bank_mib``: the bank's memory (vectors in the Faiss index, owners and positions);
* ``map_images_per_second``: :meth:`MSCDetector.anomaly_map` on 64 other crops with a
  bank of that size built from ``--images`` training crops.

Example::

    python -m benchmarks.patch_bank --memory 4096 16384 65536 --name patch_bank_cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results
from msc_detector import MSCDetector
from msc_detector.coreset import StreamingCoreset

SIDE = 224


def crops(n: int, seed: int) -> np.ndarray:
    """``n`` random 224-pixel crops of scikit-image's grass photo, as RGB."""
    from skimage import data

    photo = data.grass()
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, photo.shape[0] - SIDE, n)
    xs = rng.integers(0, photo.shape[1] - SIDE, n)
    out = np.stack([photo[y : y + SIDE, x : x + SIDE] for y, x in zip(ys, xs, strict=True)])
    return np.repeat(out[..., None], 3, axis=-1)


def coreset_seconds(total: int, memory: int, dim: int, piece: int = 784 * 64) -> float:
    """Seconds of a streaming coreset over ``total`` noise vectors of width ``dim``."""
    generator = torch.Generator().manual_seed(0)
    coreset = StreamingCoreset(total, memory, seed=0)
    seconds = 0.0
    for start in range(0, total, piece):
        rows = min(piece, total - start)
        vectors = torch.randn(rows, dim, generator=generator)
        tags = np.zeros((rows, 3), np.int64)
        begin = time.perf_counter()
        coreset.add(vectors, tags)
        seconds += time.perf_counter() - begin
    begin = time.perf_counter()
    coreset.result()
    return seconds + time.perf_counter() - begin


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--images", type=int, default=200, help="training crops actually embedded")
    p.add_argument("--name", default="patch_bank")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    train, test = crops(args.images, seed=0), crops(64, seed=1)
    base = {"loss": None, "random_state": 0, "image_size": SIDE}
    rows: dict[str, Any] = {}
    for memory in args.memory:
        det = MSCDetector(**base, patch_memory=memory).fit(train)
        batch = torch.from_numpy(train[:32]).permute(0, 3, 1, 2).contiguous()
        det.embedder_.run(0, batch[:2], det.patch_stages_)[1]  # warm-up (folding)
        begin = time.perf_counter()
        dim = det.embedder_.run(0, batch, det.patch_stages_)[1].shape[-1]
        extract_ms = 1000 * (time.perf_counter() - begin) / len(batch)
        h, w = det.patch_bank_.grid
        coreset_s = coreset_seconds(6000 * h * w, memory, dim)
        bank = det.patch_bank_
        bank_mib = len(bank) * (dim * 4 + 8 + 16) / 2**20
        det.anomaly_map(test[:4])  # warm-up
        begin = time.perf_counter()
        det.anomaly_map(test)
        rate = len(test) / (time.perf_counter() - begin)
        rows[str(memory)] = {
            "patch_dim": int(dim),
            "grid": [h, w],
            "bank_patches": len(bank),
            "extract_ms_per_image": extract_ms,
            "coreset_s_6000": coreset_s,
            "build_s_6000": 6000 * extract_ms / 1000 + coreset_s,
            "bank_mib": bank_mib,
            "map_images_per_second": rate,
        }
        print(memory, rows[str(memory)], flush=True)
    command = shlex.join(["python", "-m", "benchmarks.patch_bank", *sys.argv[1:]])
    result = {"command": command, "machine": machine(), "images": args.images, "rows": rows}
    table = render(result)
    write_results(Path(args.results_dir) / f"{args.name}.json", result, table)
    print(table)
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Patch bank cost by patch_memory (EfficientNet-Lite0, 224 px, 28 x 28 patches)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        "| patch_memory | bank MiB | extract ms/image | coreset s (6,000 images) "
        "| build s (6,000 images, est.) | anomaly_map img/s |",
        "|---|---|---|---|---|---|",
    ]
    for memory, row in result["rows"].items():
        lines.append(
            f"| {memory} | {row['bank_mib']:.1f} | {row['extract_ms_per_image']:.1f} "
            f"| {row['coreset_s_6000']:.1f} | {row['build_s_6000']:.0f} "
            f"| {row['map_images_per_second']:.1f} |"
        )
    lines += [
        "",
        f"Extraction timed on 32 of {result['images']} grass crops; the coreset on the "
        "patch count of 6,000 images (noise vectors); the map rate on 64 other crops with "
        f"a bank built from the {result['images']} crops.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()

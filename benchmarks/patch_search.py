"""What the patch evidence's searches cost, and the coreset's block and projection.

One default detector is fitted on 224-pixel crops of OpenCV's sample photos (as
:mod:`benchmarks.verdict_cost`); the patch embeddings of the test crops then measure:

* the **patch anomaly** (each image's map maximum), from every patch searched exactly
  against the bank and from :meth:`PatchScorer.anomalies
  <msc_detector.model.PatchScorer.anomalies>` (a coarse bound, exact search under the
  peak): milliseconds per image, patches searched exactly per image, the largest
  relative difference between the two;
* the **exact search**: Faiss's exact flat index against the bank's block scan
  (:class:`~msc_detector.patch_bank.BankScan`), on batches of test patches of the sizes
  the bounded search (tens to hundreds) and maps (thousands) ask for: milliseconds per
  1,000 queries, and how often both find the same patch;
* the **coarse index**: seconds to build the bank's index with it;
* the **map baseline**: on the training images that set it, the coarse search's
  leave-one-image-out bounds (what fit averages) against the exact distances: the
  share of patches where they agree, how far the baseline moves, and both searches'
  seconds;
* the **coreset**: greedy k-centre selection of 16,384 of the test patches with blocks
  of 16,384 or 8,192 candidates and a 128- or 64-dimensional projection: seconds, and
  the mean and largest distance of every 37th patch to the nearest kept one.

Timings need a quiet machine. Results go to ``benchmarks/results/<name>.json`` and ``.md``.

Example
-------
::

    python -m benchmarks.patch_search --train 200 --test 200 --name patch_search_224
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results
from benchmarks.verdict_cost import crops

CORESETS = ((16384, 128), (8192, 128), (16384, 64))
EXACT_BATCHES = (32, 128, 512, 4096)  # queries per exact search


def exact_search_rows(bank: Any, patches: torch.Tensor) -> list[dict[str, float]]:
    """Faiss's exact flat search against the bank's scan, per query batch size."""
    import faiss

    flat = faiss.IndexFlatL2(patches.shape[1])
    flat.add(np.ascontiguousarray(bank.vectors()))
    queries = patches.numpy()[:: max(1, len(patches) // 16384)]
    rows = []
    for batch in EXACT_BATCHES:
        batches = [queries[i : i + batch] for i in range(0, len(queries), batch)]
        seconds, found = {}, {}
        for name, search in (
            ("faiss", lambda q: flat.search(q, 1)[1][:, 0]),
            ("scan", lambda q: bank.scan.nearest(q)[1]),
        ):
            start = time.perf_counter()
            found[name] = np.concatenate([search(q) for q in batches])
            seconds[name] = time.perf_counter() - start
        rows.append(
            {
                "queries_per_search": batch,
                "faiss_ms_per_1000": 1000 * seconds["faiss"] / len(queries) * 1000,
                "scan_ms_per_1000": 1000 * seconds["scan"] / len(queries) * 1000,
                "same_patch_share": float((found["faiss"] == found["scan"]).mean()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def patch_anomaly_rows(det: Any, features: list[torch.Tensor]) -> dict[str, float]:
    """Exhaustive against bounded patch anomalies of the batches ``features``."""
    from msc_detector.patch_bank import PatchIndex
    from msc_detector.patches import grid_to_maps

    scorer, size = det.model_.patches, det.image_size_
    bank = scorer.bank
    n = sum(len(f) for f in features)
    start = time.perf_counter()
    exhaustive = np.concatenate(
        [
            grid_to_maps(scorer.excess(scorer.raw_distances(f)[0]), size).amax(dim=(1, 2)).numpy()
            for f in features
        ]
    )
    exhaustive_seconds = time.perf_counter() - start
    searched: list[int] = []
    nearest = bank.nearest
    bank.nearest = lambda queries, *owners: (
        searched.append(len(queries)) or nearest(queries, *owners)
    )
    start = time.perf_counter()
    bounded = np.concatenate([scorer.anomalies(f, size) for f in features])
    bounded_seconds = time.perf_counter() - start
    del bank.nearest
    start = time.perf_counter()
    PatchIndex(bank.vectors(), bank.owners, bank.positions, bank.grid, bank.baseline)
    build_seconds = time.perf_counter() - start
    return {
        "images": n,
        "patches_per_image": int(np.prod(features[0].shape[1:3])),
        "bank_patches": len(bank),
        "exhaustive_ms_per_image": 1000 * exhaustive_seconds / n,
        "bounded_ms_per_image": 1000 * bounded_seconds / n,
        "exact_searches_per_image": sum(searched) / n,
        "max_relative_difference": float(
            np.max(np.abs(bounded - exhaustive) / np.maximum(np.abs(exhaustive), 1e-12))
        ),
        "bank_index_build_seconds": build_seconds,
    }


def baseline_rows(det: Any, train: np.ndarray) -> dict[str, float]:
    """The baseline's coarse bounds against the exact leave-one-image-out distances."""
    from msc_detector.data import as_image_source
    from msc_detector.fitting import _baseline_sample

    scorer, embedder = det.model_.patches, det.model_.embedder
    sample = _baseline_sample(len(train))
    batches = embedder.embed_batches(as_image_source(train[sample]), 32, 0, scorer.stages)
    searches = {
        "exact": lambda patches, owners: scorer.raw_distances(patches, owners)[0],
        "bounded": scorer.distance_bounds,
    }
    found: dict[str, list[np.ndarray]] = {name: [] for name in searches}
    seconds = dict.fromkeys(searches, 0.0)
    first = 0
    for batch in batches:
        owners = sample[first : first + len(batch.patches)]
        first += len(owners)
        for name, search in searches.items():
            start = time.perf_counter()
            found[name].append(search(batch.patches, owners))
            seconds[name] += time.perf_counter() - start
    exact, bounds = np.concatenate(found["exact"]), np.concatenate(found["bounded"])
    moved = bounds.mean(axis=0) / exact.mean(axis=0) - 1
    return {
        "baseline_images": len(sample),
        "equal_share": float(np.isclose(bounds, exact, rtol=1e-5).mean()),
        "baseline_mean_relative_difference": float(moved.mean()),
        "baseline_max_relative_difference": float(moved.max()),
        "exact_seconds": seconds["exact"],
        "bounded_seconds": seconds["bounded"],
    }


def coreset_rows(patches: torch.Tensor, memory: int) -> list[dict[str, float]]:
    """Time and coverage of the coreset settings in :data:`CORESETS`."""
    from msc_detector.coreset import StreamingCoreset

    probes = patches[::37]
    rows = []
    for block, projection in CORESETS:
        coreset = StreamingCoreset(len(patches), memory, 0, block, projection)
        tags = np.zeros((len(patches), 3), np.int64)
        start = time.perf_counter()
        for first in range(0, len(patches), 6272):
            coreset.add(patches[first : first + 6272], tags[first : first + 6272])
        kept, _ = coreset.result()
        seconds = time.perf_counter() - start
        cover = torch.cat([torch.cdist(p, kept).min(dim=1).values for p in probes.split(1024)])
        rows.append(
            {
                "block": block,
                "projection_dim": projection,
                "seconds": seconds,
                "mean_cover": float(cover.mean()),
                "max_cover": float(cover.max()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def render(result: dict[str, Any]) -> str:
    search, base = result["search"], result["baseline"]
    lines = [
        f"# {result['name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        f"{search['images']} test images of {search['patches_per_image']} patches against a "
        f"bank of {search['bank_patches']} patches.",
        "",
        "| patch anomaly | ms per image |",
        "|---|---|",
        f"| every patch searched exactly | {search['exhaustive_ms_per_image']:.2f} |",
        f"| bounded (PatchScorer.anomalies) | {search['bounded_ms_per_image']:.2f} |",
        "",
        f"Patches searched exactly per image by the bounded search: "
        f"{search['exact_searches_per_image']:.1f}; largest relative difference from the "
        f"exhaustive maximum: {search['max_relative_difference']:.1e}; building the bank's "
        f"index with its coarse index: {search['bank_index_build_seconds']:.3f} s.",
        "",
        f"The map baseline, from {base['baseline_images']} training images: the coarse "
        f"search's leave-one-image-out bounds equal the exact distances (rtol 1e-5) for "
        f"{100 * base['equal_share']:.1f} % of their patches; the baseline they give differs "
        f"by {100 * base['baseline_mean_relative_difference']:.2f} % on average, at most "
        f"{100 * base['baseline_max_relative_difference']:.2f} %; bounded search "
        f"{base['bounded_seconds']:.2f} s, exact {base['exact_seconds']:.2f} s.",
        "",
        "| exact search: queries per search | Faiss flat, ms per 1,000 queries | bank scan, "
        "ms per 1,000 | same nearest patch |",
        "|---|---|---|---|",
        *(
            f"| {row['queries_per_search']} | {row['faiss_ms_per_1000']:.1f} | "
            f"{row['scan_ms_per_1000']:.1f} | {100 * row['same_patch_share']:.2f} % |"
            for row in result.get("exact", [])
        ),
        "",
        "| coreset block | projection | seconds | mean cover | max cover |",
        "|---|---|---|---|---|",
    ]
    for row in result["coresets"]:
        lines.append(
            f"| {row['block']} | {row['projection_dim']} | {row['seconds']:.2f} | "
            f"{row['mean_cover']:.3f} | {row['max_cover']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from msc_detector import MSCDetector
    from msc_detector.data import as_image_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=200, help="training crops")
    p.add_argument("--test", type=int, default=200, help="crops whose patches are measured")
    p.add_argument("--size", type=int, default=224, help="crop side (the network's input)")
    p.add_argument("--name", default="patch_search")
    args = p.parse_args(argv)
    train = crops(args.train, args.size, 0)
    det = MSCDetector(random_state=0).fit(train)
    embedder, stages = det.model_.embedder, det.model_.patches.stages
    test = as_image_source(crops(args.test, args.size, 1))
    features = [batch.patches for batch in embedder.embed_batches(test, 32, 0, stages)]
    search = patch_anomaly_rows(det, features)
    print(search, flush=True)
    patches = torch.cat(features).reshape(-1, features[0].shape[-1])
    result = {
        "name": args.name,
        "command": shlex.join(["python", "-m", "benchmarks.patch_search", *sys.argv[1:]]),
        "settings": vars(args),
        "machine": machine(),
        "search": search,
        "baseline": baseline_rows(det, train),
        "exact": exact_search_rows(det.patch_bank_, patches),
        "coresets": coreset_rows(patches, len(det.patch_bank_)),
    }
    table = render(result)
    write_results(RESULTS / f"{args.name}.json", result, table)
    print(table)
    return result


if __name__ == "__main__":
    run()

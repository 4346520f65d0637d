"""What the default verdict costs: fit and scoring time with and without the patch evidence.

Three detectors are fitted in this one process on the same normal-size images (224-pixel
crops of OpenCV's sample photos, no extra views) and score the same test images:

* ``global, no bank``: ``image_score="global", patch_memory=None``, the global score
  alone (what the detector was before it had a patch bank);
* ``global, bank``: ``image_score="global"`` with the default patch bank (its fit
  builds the bank; its scores need no patch search);
* ``default``: ``MSCDetector()``, the combined score from one pass per image.

Reported: fit seconds (wall and process CPU, the fastest of ``--fit-repeats`` rounds that
alternate the three detectors), scoring images per second (the fastest of ``--repeats``
rounds, alternating likewise), and the ratios
the project tracks (default fit over the fit without a bank; default scoring over
global-only scoring). Timings need a quiet machine. Results go to
``benchmarks/results/<name>.json`` and ``.md``.

Example
-------
::

    python -m benchmarks.verdict_cost --train 300 --test 600 --name verdict_cost_224
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import numpy as np

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results
from benchmarks.score_rules import _photo

PHOTOS = ("building", "starry_night", "fruits", "baboon")
CONFIGS = {
    "global, no bank": {"image_score": "global", "patch_memory": None},
    "global, bank": {"image_score": "global"},
    "default": {},
}


def crops(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` RGB crops of ``size`` pixels from OpenCV's sample photos, uint8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = np.asarray(Image.fromarray(_photo(PHOTOS[i % len(PHOTOS)])).convert("RGB"))
        y = rng.integers(0, image.shape[0] - size + 1)
        x = rng.integers(0, image.shape[1] - size + 1)
        out.append(image[y : y + size, x : x + size])
    return np.stack(out)


def fitted(params: dict[str, Any], train: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """Fit one detector, timed."""
    from msc_detector import MSCDetector

    det = MSCDetector(random_state=0, **params)
    wall, cpu = time.perf_counter(), time.process_time()
    det.fit(train)
    fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
    det.score_samples(train[:8])  # warm-up
    row = {"image_score": det.image_score_, "fit_seconds": fit_wall, "fit_cpu_seconds": fit_cpu}
    return det, row


def scoring_times(det: Any, test: np.ndarray) -> tuple[float, float]:
    """Wall and CPU seconds of one ``score_samples`` over ``test``."""
    wall, cpu = time.perf_counter(), time.process_time()
    det.score_samples(test)
    return time.perf_counter() - wall, time.process_time() - cpu


def render(result: dict[str, Any]) -> str:
    rows, ratios = result["rows"], result["ratios"]
    lines = [
        f"# {result['name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        "| detector | image_score_ | fit s | fit CPU s | scoring img/s | scoring img/CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['image_score']} | {row['fit_seconds']:.1f} | "
            f"{row['fit_cpu_seconds']:.1f} | {row['score_images_per_second']:.1f} | "
            f"{row['score_images_per_cpu_second']:.1f} |"
        )
    lines += ["", "| ratio | wall | CPU | target |", "|---|---|---|---|"]
    for name, (wall, cpu, target) in ratios.items():
        lines.append(f"| {name} | {wall:.2f}x | {cpu:.2f}x | {target} |")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=300, help="training crops")
    p.add_argument("--test", type=int, default=600, help="scored crops")
    p.add_argument("--size", type=int, default=224, help="crop side (the network's input)")
    p.add_argument("--repeats", type=int, default=3, help="scoring rounds (fastest kept)")
    p.add_argument("--fit-repeats", type=int, default=3, help="fit rounds (fastest kept)")
    p.add_argument("--name", default="verdict_cost")
    args = p.parse_args(argv)
    train, test = crops(args.train, args.size, 0), crops(args.test, args.size, 1)
    # Fit rounds alternate the detectors too: one fit varied by 30% from run to run here.
    rows: dict[str, dict[str, Any]] = {}
    detectors: dict[str, Any] = {}
    for _ in range(args.fit_repeats):
        for name, params in CONFIGS.items():
            detectors[name], row = fitted(params, train)
            print(name, {k: round(v, 2) for k, v in row.items() if k != "image_score"})
            kept = rows.setdefault(name, {**row, "fit_seconds_per_round": []})
            kept["fit_seconds_per_round"].append(row["fit_seconds"])
            for key in ("fit_seconds", "fit_cpu_seconds"):
                kept[key] = min(kept[key], row[key])
    # Scoring rounds alternate the detectors; the fastest round of each is kept, so a
    # passing load on the machine slows no detector more than another.
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, det in detectors.items():
            times[name].append(scoring_times(det, test))
    for name, row in rows.items():
        wall, cpu = min(t[0] for t in times[name]), min(t[1] for t in times[name])
        row["score_images_per_second"] = len(test) / wall
        row["score_images_per_cpu_second"] = len(test) / cpu
        row["score_seconds_per_round"] = [t[0] for t in times[name]]
        print(name, "scoring img/s", round(row["score_images_per_second"], 1))
    base, bank, default = rows["global, no bank"], rows["global, bank"], rows["default"]
    ratios = {
        "default fit / fit without a bank": (
            default["fit_seconds"] / base["fit_seconds"],
            default["fit_cpu_seconds"] / base["fit_cpu_seconds"],
            "<= 1.25x",
        ),
        "default scoring time / global scoring time": (
            bank["score_images_per_second"] / default["score_images_per_second"],
            bank["score_images_per_cpu_second"] / default["score_images_per_cpu_second"],
            "<= 1.15x",
        ),
    }
    result = {
        "name": args.name,
        "command": shlex.join(["python", "-m", "benchmarks.verdict_cost", *sys.argv[1:]]),
        "settings": vars(args),
        "machine": machine(),
        "rows": rows,
        "ratios": ratios,
    }
    table = render(result)
    write_results(RESULTS / f"{args.name}.json", result, table)
    print(table)
    return result


if __name__ == "__main__":
    run()

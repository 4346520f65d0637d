"""Scoring camera-sized photos: peak memory and time per image.

A batch of image files is decoded and resized before the network sees it. Decoded at
full size all at once, a batch of 12-megapixel photos needs gigabytes; decoded and
resized one at a time (``msc_detector.data._LARGE_PIXELS``, above which a batch is
streamed), it needs one photo's worth. This benchmark writes ``--photos`` JPEG photos
of ``--width`` x ``--height`` pixels (scikit-image's brick texture, enlarged, with
noise), fits the default detector on 40 small crops of the same texture, and scores
the photos in a fresh process per setting, which reports its peak resident memory and
the scoring time: ``streamed`` (the default) and ``whole batch`` (``_LARGE_PIXELS`` set
to 10**12: the behaviour before streaming).

Examples
--------
::

    python -m benchmarks.large_photos --name large_photos
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS, write_results

_SCORE = """
import json, resource, sys, time
from benchmarks.constants import set_constants
set_constants(json.loads(sys.argv[3]))
from msc_detector import MSCDetector
detector = MSCDetector.load(sys.argv[1])
paths = json.loads(sys.argv[2])
start = time.perf_counter()
scores = detector.score_samples(paths)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "scores": scores.tolist()}))
"""


def write_photos(folder: Path, n: int, width: int, height: int) -> list[str]:
    """``n`` noisy enlargements of the brick texture as JPEG files in ``folder``."""
    import skimage.data
    from PIL import Image

    base = np.asarray(Image.fromarray(skimage.data.brick()).resize((width, height)))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        noisy = np.clip(base.astype(np.int16) + rng.integers(-10, 11, base.shape), 0, 255)
        paths.append(str(folder / f"photo_{i:03d}.jpg"))
        Image.fromarray(noisy.astype(np.uint8)).convert("RGB").save(paths[-1], quality=90)
    return paths


def fit_model(path: Path) -> None:
    """Fit the default detector on 40 crops of 128 px of the texture; save it to ``path``."""
    import skimage.data

    from msc_detector import MSCDetector

    image = skimage.data.brick()
    rng = np.random.default_rng(1)
    corners = rng.integers(0, image.shape[0] - 128, (40, 2))
    crops = np.stack([image[y : y + 128, x : x + 128] for y, x in corners])
    MSCDetector(random_state=0).fit(crops).save(path)


def score(model: Path, paths: list[str], constants: list[str]) -> dict[str, Any]:
    """Score ``paths`` in a fresh process with ``constants`` set; its time and peak memory."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", _SCORE, str(model), json.dumps(paths), json.dumps(constants)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", default="large_photos")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.large_photos " + shlex.join(given)
    settings = {
        "streamed": [],
        "whole batch": ["msc_detector.data._LARGE_PIXELS=1000000000000"],
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = write_photos(folder, args.photos, args.width, args.height)
        fit_model(folder / "model.msc")
        for name, constants in settings.items():
            found = score(folder / "model.msc", paths, constants)
            rows.append({"setting": name, **found})
            print(name, {k: v for k, v in found.items() if k != "scores"}, flush=True)
    same = rows[0]["scores"] == rows[1]["scores"]
    for row in rows:
        del row["scores"]
    result = {
        "command": command,
        "machine": machine(),
        "settings": vars(args),
        "same_scores": same,
        "rows": rows,
    }
    table = render(result)
    print(table)
    write_results(RESULTS / f"{args.name}.json", result, table)
    return result


def render(result: dict[str, Any]) -> str:
    """The results as a Markdown table, with the command that made them."""
    s = result["settings"]
    lines = [
        "# Scoring camera-sized photos",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{s['photos']} JPEG photos of {s['width']} x {s['height']} pixels, scored by the "
        "default detector (batch size 64) in a fresh process per row. Same scores in both "
        f"rows: {result['same_scores']}.",
        "",
        "| decoding | peak memory MiB | scoring s | ms per photo |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        per = 1000 * row["seconds"] / s["photos"]
        lines.append(
            f"| {row['setting']} | {row['peak_rss_mb']:.0f} | {row['seconds']:.1f} | {per:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()

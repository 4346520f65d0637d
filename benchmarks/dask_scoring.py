"""Scoring image files in one process against a two-worker Dask LocalCluster.

Writes ``--n-files`` Fashion-MNIST training images (28 x 28, all classes) as PNG files
under ``--data-dir`` (kept between runs), fits one detector and saves it there, then
scores every file twice, each side in its own subprocess:

* **in-process**: ``MSCDetector.load(model).score_samples(paths)`` in the main thread,
  the library's plain way (torch's threads on every core, one DataLoader process
  decoding files on a 2-core machine), then again with ``num_workers=0`` (the main
  thread decodes the files between forward passes);
* **cluster**: :func:`msc_detector.dask.score_files` on
  ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` (Dask gives each
  worker process one torch thread), the rows gathered with ``client.compute``. It runs
  twice on the same cluster: *cold* (fresh worker processes: the time includes their
  imports of torch and timm and loading the detector) and *warm* (a second
  ``score_files`` call: the detector is shipped and loaded again, imports are done).
  Its workers start without the ``MALLOC_TRIM_THRESHOLD_=65536`` that Dask sets in
  worker processes by default (it turns off glibc's adaptive mmap threshold, so that
  every batch's activations are fresh pages); a third, warm run on a second cluster
  with Dask's default environment measures what that costs.

The detector is ``MSCDetector(image_size=64, flip_average=False, nearest_view=False,
loss=None)`` with its default EfficientNet-Lite0 ImageNet weights, fitted on
``--train-size`` images of one class of the test split (``loss=None``: no fine-tuning,
which does not change the cost of scoring). Both sides run on the CPU.

Measured per side: wall time and files per second; resident memory of the scoring
process before the run and its peak during it (sampled every 50 ms with psutil; for the
cluster, of each worker process, and the client's peak); the largest difference between
the two sides' scores (each side keeps its scores in ``--data-dir``). Each side writes
``<out-name>_<side>.json`` when it finishes, and a re-run with the same settings reuses
it (``--force`` redoes it), so the sides can be run one at a time. Timings need a quiet
machine: run it under the shared lock, ``flock /tmp/msc-heavy.lock python -m
benchmarks.dask_scoring``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import RESULTS

SIDES = ("inprocess", "cluster")
_NOT_SETTINGS = {"sides", "out_name", "results_dir", "force", "side"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-files", type=int, default=50_000, help="image files to score")
    p.add_argument("--train-size", type=int, default=500, help="training images (one class)")
    p.add_argument("--image-size", type=int, default=64, help="network input side")
    p.add_argument("--partition-size", type=int, default=None, help="default: the module's")
    p.add_argument("--data-dir", default="/tmp/msc-dask-bench", help="files and model")
    p.add_argument("--sides", choices=("both", *SIDES), default="both")
    p.add_argument("--out-name", default="dask_scoring")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="redo sides already measured")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(list(argv) if argv is not None else None)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    from msc_detector.dask import PARTITION_SIZE

    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    settings["partition_size"] = args.partition_size or PARTITION_SIZE
    return settings


# ------------------------------------------------------------------------------ data


def image_files(data_dir: Path, n: int) -> list[str]:
    """Write (once) and return ``n`` Fashion-MNIST training images as PNG files."""
    from PIL import Image

    from msc_detector.datasets import load_fashion_mnist

    images, _ = load_fashion_mnist("train")
    if n > len(images):
        raise SystemExit(f"--n-files is at most {len(images)} (the Fashion-MNIST training set)")
    folder = data_dir / "images"
    paths = [folder / f"{i // 1000:03d}" / f"{i:06d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".partial.png")
            Image.fromarray(images[i]).save(tmp)
            os.replace(tmp, path)
    return [str(path) for path in paths]


def model_file(data_dir: Path, settings: dict[str, Any]) -> Path:
    """Fit (once) the benchmark's detector and return its model file."""
    from msc_detector import MSCDetector
    from msc_detector.datasets import load_fashion_mnist

    path = data_dir / f"detector_{settings['image_size']}_{settings['train_size']}.msc"
    if not path.exists():
        images, labels = load_fashion_mnist("test")
        detector = MSCDetector(
            image_size=settings["image_size"],
            flip_average=False,
            nearest_view=False,
            loss=None,
            device="cpu",
            random_state=0,
        ).fit(images[labels == 0][: settings["train_size"]])
        detector.save(path)
    return path


# ------------------------------------------------------------------------- measuring


class PeakRSS:
    """Sample the resident memory of some processes every ``every`` seconds; keep peaks.

    Parameters
    ----------
    pids : callable returning a dict of name to pid
        Called at every sample, so that processes may come and go.
    """

    def __init__(self, pids: Callable[[], dict[str, int]], every: float = 0.05) -> None:
        self.pids = pids
        self.every = every
        self.peak_mb: dict[str, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            for name, pid in self.pids().items():
                try:
                    rss = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), rss)
            self._stop.wait(self.every)

    @contextmanager
    def running(self) -> Iterator[PeakRSS]:
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def _children() -> dict[str, int]:
    import psutil

    me = psutil.Process()
    return {"main": me.pid} | {f"child {c.pid}": c.pid for c in me.children(recursive=True)}


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _inprocess_run(detector: Any, paths: list[str]) -> dict[str, Any]:
    baseline = _rss_mb(os.getpid())
    monitor = PeakRSS(_children)
    with monitor.running():
        start = time.perf_counter()
        scores = detector.score_samples(paths)
        seconds = time.perf_counter() - start
    children = [v for k, v in monitor.peak_mb.items() if k != "main"]
    return {
        "seconds": seconds,
        "files_per_second": len(paths) / seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": monitor.peak_mb["main"],
        "peak_rss_dataloader_mb": max(children) if children else None,
        "scores": scores,
    }


def run_inprocess(paths: list[str], model: Path) -> dict[str, Any]:
    """Score in this process: as loaded (a DataLoader process decodes), then decoding here."""
    import torch

    from msc_detector import MSCDetector

    detector = MSCDetector.load(model, device="cpu")
    detector.score_samples(paths[:64])  # warm-up: first-use caches, thread pools
    result = _inprocess_run(detector, paths)
    detector.set_params(num_workers=0)
    decode_here = _inprocess_run(detector, paths)
    result["num_workers_0_equal"] = bool(
        np.array_equal(decode_here.pop("scores"), result["scores"])
    )
    result["num_workers_0"] = decode_here
    result["torch_threads"] = torch.get_num_threads()
    return result


def _cluster_run(client: Any, paths: list[str], model: Path, partition_size: int) -> dict:
    import msc_detector.dask as msc_dask
    from msc_detector import MSCDetector

    detector = MSCDetector.load(model, device="cpu")
    pids = client.run(os.getpid)
    baseline = [_rss_mb(pids[a]) for a in sorted(pids)]
    monitor = PeakRSS(lambda: {"client": os.getpid(), **pids})
    with monitor.running():
        start = time.perf_counter()
        frame = msc_dask.score_files(detector, paths, client=client, partition_size=partition_size)
        result = client.compute(frame).result()
        seconds = time.perf_counter() - start
    assert list(result["path"]) == paths and result["error"].isna().all()
    return {
        "seconds": seconds,
        "files_per_second": len(paths) / seconds,
        "partitions": frame.npartitions,
        "peak_rss_mb_client": monitor.peak_mb["client"],
        "baseline_rss_mb_workers": baseline,
        "peak_rss_mb_workers": [monitor.peak_mb.get(a, float("nan")) for a in sorted(pids)],
        "scores": result["score"].to_numpy(),
    }


@contextmanager
def local_cluster(dask_trim: bool) -> Iterator[Any]:
    """A two-worker LocalCluster's client; ``dask_trim``: Dask's MALLOC_TRIM_THRESHOLD_.

    Dask starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off
    glibc's adaptive mmap threshold; without it, the workers run as plain processes do.
    """
    import dask
    from distributed import Client, LocalCluster

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    if not dask_trim:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # a Dask nanny may have set it here
    with (
        dask.config.set({} if dask_trim else {key: None}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def run_cluster(
    paths: list[str], model: Path, partition_size: int, client: Any = None
) -> dict[str, Any]:
    """Score on fresh two-worker LocalClusters (or on ``client``'s).

    Cold, then warm, on workers without Dask's ``MALLOC_TRIM_THRESHOLD_``; then warm on
    workers with it (Dask's default), unless ``client`` is given.
    """
    if client is not None:
        return _cold_and_warm(client, paths, model, partition_size, time.perf_counter())
    start = time.perf_counter()
    with local_cluster(dask_trim=False) as tuned:
        result = _cold_and_warm(tuned, paths, model, partition_size, start)
    with local_cluster(dask_trim=True) as default:
        _cluster_run(default, paths[:256], model, 128)  # imports and first-use caches
        result["warm_dask_trim"] = _cluster_run(default, paths, model, partition_size)
    return result


def _cold_and_warm(
    client: Any, paths: list[str], model: Path, partition_size: int, start: float
) -> dict[str, Any]:
    started = time.perf_counter() - start
    cold = _cluster_run(client, paths, model, partition_size)
    warm = _cluster_run(client, paths, model, partition_size)
    threads = client.run(lambda: __import__("torch").get_num_threads())
    trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    return {
        "cluster_start_seconds": started,
        "cold": cold,
        "warm": warm,
        "worker_torch_threads": sorted(threads.values()),
        "worker_malloc_trim_threshold": sorted(map(str, trim.values())),
    }


# ------------------------------------------------------------------------ the report


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_side(
    side: str, settings: dict[str, Any], path: Path, client: Any = None
) -> dict[str, Any]:
    """Measure one side and write its report to ``path`` (``client``: an existing cluster)."""
    from benchmarks.machine_info import machine

    data_dir = Path(settings["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = image_files(data_dir, settings["n_files"])
    model = model_file(data_dir, settings)
    if side == "inprocess":
        result = run_inprocess(paths, model)
        np.save(scores_file(settings, side), result.pop("scores"))
    else:
        result = run_cluster(paths, model, settings["partition_size"], client)
        cold, warm = result["cold"].pop("scores"), result["warm"].pop("scores")
        result["cold_equals_warm"] = bool(np.array_equal(cold, warm))
        if "warm_dask_trim" in result:
            trimmed = result["warm_dask_trim"].pop("scores")
            result["dask_trim_equals_warm"] = bool(np.array_equal(trimmed, warm))
        np.save(scores_file(settings, side), warm)
    report = {"side": side, "settings": settings, "machine": machine(), **result}
    write_json(path, report)
    return report


def scores_file(settings: dict[str, Any], side: str) -> Path:
    """Where a side keeps its scores (beside the image files: too large to commit)."""
    return Path(settings["data_dir"]) / f"{settings['n_files']}_{side}_scores.npy"


def summarize(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    if "inprocess" in sides:
        s = sides["inprocess"]
        for name, run in (("", s), (", `num_workers=0`", s.get("num_workers_0"))):
            if run is None:
                continue
            loader = run["peak_rss_dataloader_mb"]
            rows.append(
                {
                    "run": f"in-process `score_samples`{name}",
                    "seconds": run["seconds"],
                    "files_per_second": run["files_per_second"],
                    "rss_mb": f"{run.get('baseline_rss_mb', float('nan')):.0f} -> "
                    f"{run['peak_rss_mb']:.0f}"
                    + (f" (+ DataLoader process {loader:.0f})" if loader else ""),
                }
            )
    if "cluster" in sides:
        s = sides["cluster"]
        names = {
            "cold": "cold",
            "warm": "warm",
            "warm_dask_trim": "warm, Dask's `MALLOC_TRIM_THRESHOLD_=65536`",
        }
        for run, label in names.items():
            if run not in s:
                continue
            r = s[run]
            before = r.get("baseline_rss_mb_workers", [float("nan")] * 2)
            workers = ", ".join(
                f"{a:.0f} -> {b:.0f}"
                for a, b in zip(before, r["peak_rss_mb_workers"], strict=True)
            )
            rows.append(
                {
                    "run": f"2-worker LocalCluster, {label}",
                    "seconds": r["seconds"],
                    "files_per_second": r["files_per_second"],
                    "rss_mb": f"workers {workers}; client peak {r['peak_rss_mb_client']:.0f}",
                }
            )
    summary: dict[str, Any] = {"rows": rows}
    if len(sides) == 2:
        settings = sides["inprocess"]["settings"]
        a, b = (np.load(scores_file(settings, side)) for side in SIDES)
        summary["max_abs_score_difference"] = float(np.max(np.abs(a - b)))
        summary["scores_identical"] = bool(np.array_equal(a, b))
        summary["warm_speedup"] = (
            sides["cluster"]["warm"]["files_per_second"] / sides["inprocess"]["files_per_second"]
        )
    return summary


def markdown(report: dict[str, Any]) -> str:
    settings, summary = report["settings"], report["summary"]
    any_side = next(iter(report["sides"].values()), {})
    cpu = any_side.get("machine", {}).get("cpu", "?")
    cores = any_side.get("machine", {}).get("cores", "?")
    lines = [
        f"# Scoring {settings['n_files']:,} image files: one process vs a 2-worker Dask "
        "LocalCluster",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {cpu}, {cores} cores, no GPU. Detector: EfficientNet-Lite0 (ImageNet "
        f"weights), image_size={settings['image_size']}, flip_average and nearest_view off, "
        f"loss=None, fitted on {settings['train_size']} images. Files: 28 x 28 Fashion-MNIST "
        f"PNGs. Cluster: partition_size={settings['partition_size']}, one thread per worker.",
        "",
        "| run | seconds | files/s | RSS before -> peak (MB) |",
        "|---|---:|---:|---|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['run']} | {row['seconds']:.1f} | {row['files_per_second']:.0f} | "
            f"{row['rss_mb']} |"
        )
    if "cluster" in report["sides"]:
        c = report["sides"]["cluster"]
        lines += [
            "",
            f"Cluster start-up (scheduler and two worker processes): "
            f"{c['cluster_start_seconds']:.1f} s, not included above. Workers start without "
            "Dask's `MALLOC_TRIM_THRESHOLD_` (config "
            "`distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`). *cold*: "
            "fresh workers (their imports of torch and timm and the detector's load are "
            "included); *warm*: a second `score_files` call on the same workers; the last "
            "row: warm, on a second cluster with Dask's default environment; "
            f"{c['warm']['partitions']} partitions. RSS: resident memory of each process "
            "before the run and its highest sample (every 50 ms) during it; it includes "
            "the shared libraries of torch.",
        ]
    if "max_abs_score_difference" in summary:
        same = "identical" if summary["scores_identical"] else "not identical"
        lines += [
            "",
            f"Scores of the two sides: {same} (largest difference "
            f"{summary['max_abs_score_difference']:.3g}); warm cluster / in-process "
            f"throughput: {summary['warm_speedup']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def _child_environment() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = settings_of(args)
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.side is not None:
        return run_side(args.side, settings, out_dir / f"{args.out_name}_{args.side}.json")
    wanted = SIDES if args.sides == "both" else (args.sides,)
    sides: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        path = out_dir / f"{args.out_name}_{side}.json"
        previous = json.loads(path.read_text()) if path.exists() else None
        same = previous is not None and previous.get("settings") == settings
        if side in wanted and (args.force or not same):
            print(f"=== {side} ===", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.dask_scoring", *argv, "--side", side]
            subprocess.run(cmd, check=True, env=_child_environment())
            previous, same = json.loads(path.read_text()), True
        elif same:
            print(f"=== {side}: reusing {path} ===")
        if same and previous is not None:
            sides[side] = previous
    report = {
        "name": args.out_name,
        "command": shlex.join(["python", "-m", "benchmarks.dask_scoring", *argv]),
        "settings": settings,
        "summary": summarize(sides),
        "sides": sides,
    }
    write_json(out_dir / f"{args.out_name}.json", report)
    table = markdown(report)
    (out_dir / f"{args.out_name}.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()

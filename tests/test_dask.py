"""Scoring on a Dask cluster: rows equal in-process scoring, one per path, errors per file.

One two-process LocalCluster serves the whole file; the killed-worker test runs last.
Worker processes import this module (for the helpers they run), so they get the
worktree and this folder on their path.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, MODULE_PRE, small_module
from distributed import Client
from PIL import Image

import msc_detector.dask as msc_dask
from benchmarks.dask_scoring import local_cluster
from msc_detector import MSCDetector

ROOT = Path(__file__).resolve().parents[1]
BAD = {"not_an_image.png", "truncated.png", "truncated.jpg", "missing.png", "folder.png"}


@pytest.fixture(scope="module")
def client() -> Client:
    before = os.environ.get("PYTHONPATH")
    parts = [str(ROOT), str(ROOT / "tests"), *([before] if before else [])]
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    try:
        # Workers without Dask's MALLOC_TRIM_THRESHOLD_, as the docs advise.
        with local_cluster(dask_trim=False) as client:
            yield client
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before


def _blob(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    cy, cx = rng.uniform(8, 24, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0) * rng.uniform(80, 250)
    return np.repeat(blob[..., None], 3, axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 readable PNGs, then unreadable files of each kind."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(_blob(rng)).save(root / f"img_{i:03d}.png")
    (root / "not_an_image.png").write_text("hello")
    png = (root / "img_000.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    # A truncated JPEG passes the cheap check and fails only when decoded.
    Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).save(root / "whole.jpg")
    whole = (root / "whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "folder.png").mkdir()
    return root


def _good(folder: Path) -> list[str]:
    return [str(folder / f"img_{i:03d}.png") for i in range(48)]


@pytest.fixture(scope="module")
def paths(folder: Path) -> list[str]:
    """Good files with the bad ones spread among them."""
    good = _good(folder)
    bad = [str(folder / name) for name in sorted(BAD)]
    return good[:10] + bad[:2] + good[10:30] + bad[2:] + good[30:]


@pytest.fixture(scope="module")
def timm_detector(folder: Path) -> MSCDetector:
    """A timm network (travels as a model file), fitted on files."""
    return MSCDetector(**FAST, num_workers=0).fit(_good(folder)[:24])


class SlowNet(torch.nn.Module):
    """``small_module`` whose forward pass first waits ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.body = small_module()
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.body(x)


def _module_detector(folder: Path, delay: float = 0.0) -> MSCDetector:
    """A module backbone (travels as a pickle), fitted on arrays."""
    images = np.stack([np.asarray(Image.open(p)) for p in _good(folder)[:24]])
    params = {**FAST, "weights": "auto", "num_workers": 0}  # a module brings its weights
    detector = MSCDetector(SlowNet(), preprocess=MODULE_PRE, **params).fit(images)
    detector.backbone_.delay = delay
    return detector


def _check_rows(result: pd.DataFrame, paths: list[str], detector: MSCDetector) -> None:
    """One row per path in input order; scores as in-process; the bad files reported."""
    assert list(result["path"]) == paths
    assert list(result.index) == list(range(len(paths)))
    bad = result["path"].map(lambda p: Path(p).name in BAD).to_numpy()
    good = result[~bad]
    assert good["error"].isna().all()
    expected = detector.score_samples(list(good["path"]))
    np.testing.assert_allclose(good["score"], expected, rtol=1e-5)
    np.testing.assert_allclose(good["decision"], expected - detector.offset_, rtol=1e-5)
    labels = np.where(expected - detector.offset_ < 0, "anomaly", "normal")  # as predict
    assert list(good["label"]) == list(labels)
    rates = detector.false_alarm_rate(list(good["path"]))
    np.testing.assert_allclose(good["false_alarm_rate"], rates)
    assert ((rates > 0) & (rates <= 1)).all()
    failed = result[bad].set_index(result[bad]["path"].map(lambda p: Path(p).name))
    assert set(failed.index) == BAD
    assert failed["score"].isna().all() and failed["decision"].isna().all()
    assert failed["label"].isna().all() and failed["false_alarm_rate"].isna().all()
    assert failed.loc["missing.png", "error"] == "no such file"
    assert failed.loc["folder.png", "error"] == "is a folder, not an image file"
    assert "cannot read the image" in failed.loc["not_an_image.png", "error"]
    assert "cannot read the image" in failed.loc["truncated.png", "error"]
    assert "truncated" in failed.loc["truncated.jpg", "error"]


def test_rows_equal_in_process_scoring(
    client: Client, paths: list[str], timm_detector: MSCDetector
) -> None:
    given = list(paths)
    params, offset = timm_detector.get_params(), timm_detector.offset_
    frame = msc_dask.score_files(timm_detector, paths, client=client, partition_size=7)
    assert frame.npartitions == 8
    columns = ["path", "score", "decision", "label", "false_alarm_rate", "error"]
    assert list(frame.columns) == columns
    result = frame.compute()
    _check_rows(result, paths, timm_detector)
    assert paths == given  # nothing the user passed is changed
    assert timm_detector.get_params() == params and timm_detector.offset_ == offset


def test_neighbor_columns_and_a_pickled_module_backbone(
    client: Client, paths: list[str], folder: Path
) -> None:
    detector = _module_detector(folder)
    frame = msc_dask.score_files(detector, paths, client=client, partition_size=16, neighbors=2)
    result = client.compute(frame).result()
    _check_rows(result, paths, detector)
    good = result[result["error"].isna()]
    distances, indices = detector.kneighbors(list(good["path"]), n_neighbors=2)
    for j in range(2):  # fitted on arrays: neighbours are positions in the training set
        assert list(good[f"neighbor_{j + 1}"]) == list(indices[:, j])
        np.testing.assert_allclose(good[f"neighbor_{j + 1}_distance"], distances[:, j], rtol=1e-5)
    assert result.loc[result["error"].notna(), "neighbor_1"].isna().all()


def test_neighbors_are_training_files_where_fitted_on_files(
    client: Client, paths: list[str], timm_detector: MSCDetector
) -> None:
    frame = msc_dask.score_files(timm_detector, paths[:12], client=client, neighbors=1)
    result = frame.compute()
    good = result[result["error"].isna()]
    indices = timm_detector.kneighbors(list(good["path"]), n_neighbors=1, return_distance=False)
    train = timm_detector.train_paths_
    assert list(good["neighbor_1"]) == [train[i] for i in indices[:, 0]]


def _count_loads() -> None:
    """On a worker: count detector loads and tasks in this process."""
    original_load, original_detector = msc_dask._load, msc_dask._Shipment.detector
    counts = {"loads": 0, "tasks": 0}

    def load(*args: object) -> MSCDetector:
        counts["loads"] += 1
        return original_load(*args)

    def detector(self: msc_dask._Shipment) -> MSCDetector:
        counts["tasks"] += 1
        return original_detector(self)

    load.restore = (original_load, original_detector)  # type: ignore[attr-defined]
    load.counts = counts  # type: ignore[attr-defined]
    msc_dask._load = load
    msc_dask._Shipment.detector = detector


def _read_counts() -> dict[str, int]:
    counts = dict(msc_dask._load.counts)
    msc_dask._load, msc_dask._Shipment.detector = msc_dask._load.restore
    return counts


def test_detector_is_loaded_once_per_worker(
    client: Client, folder: Path, timm_detector: MSCDetector
) -> None:
    client.run(_count_loads)
    try:
        frame = msc_dask.score_files(timm_detector, _good(folder), client=client, partition_size=4)
        frame.compute()
    finally:
        counts = client.run(_read_counts)
    assert sum(c["tasks"] for c in counts.values()) == frame.npartitions == 12
    for worker, c in counts.items():
        assert c["loads"] == (1 if c["tasks"] else 0), (worker, c)


def test_parquet_output(
    client: Client, paths: list[str], timm_detector: MSCDetector, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    msc_dask.score_to_parquet(timm_detector, paths, out, client=client, partition_size=5)
    names = sorted(p.name for p in out.iterdir())
    assert names[:2] == ["part.000000.parquet", "part.000001.parquet"] and len(names) == 11
    written = pd.read_parquet(out)
    assert list(written.index) == list(range(len(paths)))  # name order is input order
    _check_rows(written, paths, timm_detector)


def test_bad_arguments_are_named(
    client: Client, paths: list[str], folder: Path, timm_detector: MSCDetector
) -> None:
    with pytest.raises(TypeError, match="wrap it in a list"):
        msc_dask.score_files(timm_detector, paths[0], client=client)
    with pytest.raises(ValueError, match="paths is empty"):
        msc_dask.score_files(timm_detector, [], client=client)
    with pytest.raises(ValueError, match="partition_size must be a positive integer"):
        msc_dask.score_files(timm_detector, paths, client=client, partition_size=0)
    with pytest.raises(ValueError, match="neighbors must be a non-negative integer"):
        msc_dask.score_files(timm_detector, paths, client=client, neighbors=-1)
    with pytest.raises(AttributeError, match="not fitted"):
        msc_dask.score_files(MSCDetector(), paths, client=client)
    with pytest.raises(ValueError, match="module backbone"):
        msc_dask.score_files(_module_detector(folder), paths, client=client, device="cpu")


def test_missing_client_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_client() -> None:
        raise ValueError("No clients found")

    monkeypatch.setattr(msc_dask.distributed, "default_client", no_client)
    with pytest.raises(ValueError, match="No Dask client: pass client="):
        msc_dask._client(None)


def test_missing_dask_names_the_extra() -> None:
    code = "import sys; sys.modules['distributed'] = None; import msc_detector.dask"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert "pip install 'msc-detector[dask]'" in run.stderr


def test_benchmark_measures_both_sides(client: Client, tmp_path: Path) -> None:
    from benchmarks import dask_scoring
    from msc_detector.datasets import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    argv = ["--n-files", "40", "--train-size", "12", "--image-size", "32"]
    argv += ["--partition-size", "16", "--data-dir", str(tmp_path)]
    settings = dask_scoring.settings_of(dask_scoring.parse_args(argv))
    sides = {
        side: dask_scoring.run_side(side, settings, tmp_path / f"{side}.json", client)
        for side in dask_scoring.SIDES
    }
    assert sides["cluster"]["cold"]["partitions"] == 3
    assert sides["cluster"]["cold_equals_warm"]
    assert len(sides["cluster"]["warm"]["peak_rss_mb_workers"]) == 2
    report = {"command": "smoke", "settings": settings, "sides": sides}
    report["summary"] = dask_scoring.summarize(sides)
    assert report["summary"]["max_abs_score_difference"] < 1e-3
    table = dask_scoring.markdown(report)
    assert "| 2-worker LocalCluster, warm |" in table and "in-process" in table


def test_a_worker_with_dasks_trim_threshold_logs_a_hint(
    folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    detector = _module_detector(folder)
    shipment = msc_dask._pack(detector, "auto")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with caplog.at_level(logging.WARNING, logger="msc_detector.dask"):
        loaded = shipment.detector()
        assert shipment.detector() is loaded  # loaded once
    assert caplog.text.count("MALLOC_TRIM_THRESHOLD_=65536") == 1
    files = _good(folder)[:8]
    np.testing.assert_array_equal(loaded.score_samples(files), detector.score_samples(files))


def _partition_keys(client: Client) -> dict[str, list[str]]:
    """Scored partitions held in memory, by worker."""
    return {
        worker: [key for key in keys if "msc-score" in str(key)]
        for worker, keys in client.has_what().items()
    }


def test_a_killed_worker_still_scores_every_path_once(
    client: Client, folder: Path, paths: list[str]
) -> None:
    # Each forward pass waits 50 ms: a partition of 8 files (2 batches) takes > 0.1 s.
    detector = _module_detector(folder, delay=0.05)
    detector.set_params(batch_size=4)
    many = paths * 3  # 159 paths, 20 partitions
    frame = msc_dask.score_files(detector, many, client=client, partition_size=8)
    future = client.compute(frame)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None:  # a worker that holds a scored partition and is scoring another
        assert time.monotonic() < deadline, "no worker started scoring"
        held, processing = _partition_keys(client), client.processing()
        busy = [w for w, keys in held.items() if keys and processing.get(w)]
        victim = busy[0] if busy else None
        time.sleep(0.01)
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    result = future.result(timeout=120)
    assert victim not in client.scheduler_info()["workers"]  # it really died mid-run
    detector.backbone_.delay = 0.0
    assert list(result["path"]) == many
    assert list(result.index) == list(range(len(many)))
    _check_rows(result.iloc[: len(paths)], paths, detector)
    np.testing.assert_array_equal(
        result["score"].to_numpy().reshape(3, -1), np.tile(result["score"][: len(paths)], (3, 1))
    )
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it

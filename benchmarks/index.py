"""kNN indexes for large normal banks: build cost, memory, speed and recall, and ROC-AUC.

Two parts, each writing its results as it goes, so an interrupted run resumes:

``bank``
    Banks of 100k and 1M synthetic vectors of width 1280 (EfficientNet-Lite0's
    ``num_features``): a clustered Gaussian mixture on the unit sphere -- 1000 cluster
    centres, each vector its centre plus a spread in a shared 64-dimensional subspace
    (norm about 0.6) and isotropic noise (norm about 0.2), normalised. Each case runs in
    a fresh process that builds the index from chunks of 16384 vectors (never one
    float32 matrix, except inside the flat index itself) and records the build seconds,
    the peak resident memory of the process (``ru_maxrss``, which includes about 0.2 GB
    of Python, numpy and Faiss), queries per second for 1000 queries at ``k=10``, recall@1
    and recall@10 against exact search, and the error of the detector's score (the sum
    of the two nearest squared distances). Approximate kinds are also searched with 4x
    their default ``nprobe``/``efSearch``. Results: ``results/index_bank_<kind>_<n>.json``.
``roc``
    Fashion-MNIST classes 0, 6 and 9 with the budget of ``fm500_lite0``: a detector is
    fitted once per class (500 training images, one epoch, 112 pixels, 2000 test
    images), then the flat index over its training embeddings is swapped for each kind
    and the test set scored again, which isolates the effect of the index.
    Results: ``results/index_roc.json``.

``python -m benchmarks.index`` runs both and writes ``results/index.md``; ``--part``,
``--sizes`` and ``--kinds`` select. Timings need the shared lock on a shared machine::

    flock /tmp/msc-heavy.lock python -m benchmarks.index --part bank --sizes 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine_info import machine
from benchmarks.output import RESULTS

SCRATCH = Path("/tmp/msc-index-bench")  # exact neighbours of the queries, per bank size
DIM, CLUSTERS, RANK, CHUNK = 1280, 1000, 64, 16384
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
N_QUERIES, K = 1000, 10
ROC_CLASSES, ROC_TRAIN, ROC_TEST = (0, 6, 9), 500, 2000


class Bank:
    """The synthetic bank: the same chunks each time it is iterated (seeded per chunk)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        rng = np.random.default_rng(12345)  # the mixture itself is shared by all banks
        centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.basis = rng.normal(size=(RANK, DIM)).astype(np.float32) / np.sqrt(DIM)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, self.n, CHUNK):
            m = min(CHUNK, self.n - start)
            rng = np.random.default_rng([self.seed, start])
            spread = rng.normal(size=(m, RANK)).astype(np.float32) * (0.6 / np.sqrt(RANK))
            noise = rng.normal(size=(m, DIM)).astype(np.float32) * (0.2 / np.sqrt(DIM))
            x = self.centres[rng.integers(CLUSTERS, size=m)] + spread @ self.basis + noise
            yield x / np.linalg.norm(x, axis=1, keepdims=True)


def queries() -> np.ndarray:
    """The 1000 query vectors: drawn like the bank, with another seed."""
    return np.concatenate(list(Bank(N_QUERIES, seed=1)))


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_case(kind: str, n: int) -> dict[str, Any]:
    """Build one index in this process and measure it (see the module docstring)."""
    import faiss

    from msc_detector.index import IndexSpec, KNNIndex

    q = queries()
    base_rss = peak_rss_gb()
    spec = IndexSpec(kind)
    start = time.perf_counter()
    index = KNNIndex(spec, chunk_size=CHUNK).fit(Bank(n), total=n)
    build = time.perf_counter() - start
    build_rss = peak_rss_gb()
    truth_path = SCRATCH / f"truth_{n}.npz"
    settings = spec.resolve(n, DIM)
    knobs = {key: settings[key] for key in ("nprobe", "efSearch") if key in settings}
    rows = []
    for factor in (1, 4) if knobs else (1,):
        chosen = {key: value * factor for key, value in knobs.items()}
        if "nlist" in settings:  # nprobe searches at most every list
            chosen["nprobe"] = min(chosen["nprobe"], settings["nlist"])
        index.search(q[:10], K, chosen)  # warm up
        start = time.perf_counter()
        dist, idx = index.search(q, K, chosen)
        seconds = time.perf_counter() - start
        if kind == "flat":
            SCRATCH.mkdir(parents=True, exist_ok=True)
            np.savez(truth_path, dist=dist, idx=idx)
        truth = np.load(truth_path)
        exact_score = truth["dist"][:, :2].sum(axis=1)
        rows.append(
            {
                "settings": chosen,
                "queries_per_second": N_QUERIES / seconds,
                "recall_at_1": float(np.mean(idx[:, 0] == truth["idx"][:, 0])),
                "recall_at_10": float(
                    np.mean(
                        [len(set(a) & set(b)) / K for a, b in zip(idx, truth["idx"], strict=True)]
                    )
                ),
                "score_relative_error": float(
                    np.mean(np.abs(dist[:, :2].sum(axis=1) - exact_score) / exact_score)
                ),
            }
        )
    return {
        "kind": kind,
        "n": n,
        "dim": DIM,
        "faiss_class": index.faiss_class,
        "settings": settings,
        "build_seconds": build,
        "peak_rss_gb_after_build": build_rss,
        "rss_gb_before_build": base_rss,
        "index_bytes": int(faiss.serialize_index(index.index).size),
        "searches": rows,
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def bank_part(sizes: list[int], kinds: list[str]) -> None:
    """Run each missing case in a fresh process (flat first: it gives the exact answers)."""
    for n in sizes:
        for kind in sorted(kinds, key=lambda k: k != "flat"):
            path = RESULTS / f"index_bank_{kind}_{n}.json"
            if path.exists():
                continue
            print(f"bank: {kind} at {n} ...", flush=True)
            command = [sys.executable, "-m", "benchmarks.index", "--case", kind, str(n)]
            subprocess.run(command, check=True)


def roc_part() -> None:
    """Fit per class once, then score the test set through each index kind."""
    from sklearn.metrics import roc_auc_score

    from benchmarks.one_class import load_dataset
    from msc_detector import MSCDetector
    from msc_detector.index import IndexSpec, KNNIndex

    path = RESULTS / "index_roc.json"
    result = json.loads(path.read_text()) if path.exists() else {"classes": {}}
    x_tr, y_tr, x_te, y_te = load_dataset("fashion-mnist", None)
    rng = np.random.default_rng(0)  # the subsets of benchmarks.one_class --seed 0
    keep = np.sort(rng.permutation(len(x_te))[:ROC_TEST])
    x_te, y_te = x_te[keep], y_te[keep]
    params = {"image_size": 112, "epochs": 1, "random_state": 0}
    result["settings"] = {"classes": ROC_CLASSES, "train": ROC_TRAIN, "test": ROC_TEST, **params}
    result.setdefault("machine", machine())
    for cls in ROC_CLASSES:
        train = x_tr[y_tr == cls]
        train = train[np.sort(rng.permutation(len(train))[:ROC_TRAIN])]
        if str(cls) in result["classes"]:
            continue
        det = MSCDetector(**params).fit(train)
        bank, test = det.index_.vectors(), det.transform(x_te)
        target = (y_te == cls).astype(int)
        row: dict[str, Any] = {"dim": int(bank.shape[1]), "n": len(bank)}
        for kind in KINDS:
            index = KNNIndex(IndexSpec(kind)).fit(bank)
            scores = -index.search(test, det.n_neighbors)[0].sum(axis=1, dtype=np.float64)
            row[kind] = {
                "roc_auc": float(roc_auc_score(target, scores)),
                "settings": IndexSpec(kind).resolve(len(bank), bank.shape[1]),
            }
        result["classes"][str(cls)] = row
        print(
            f"roc: class {cls}: " + ", ".join(f"{k} {100 * row[k]['roc_auc']:.2f}" for k in KINDS)
        )
        path.write_text(json.dumps(result, indent=1))


def render() -> str:
    """Markdown tables of every result present; written to ``results/index.md``."""
    lines = ["# kNN indexes for large normal banks", ""]
    cases = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("index_bank_*.json"))]
    if cases:
        info = cases[0].get("machine", {})
        lines += [
            f"Machine: {info.get('cpu')}, {info.get('cores')} cores (shared), faiss "
            f"{info.get('faiss')}, {cases[0]['faiss_threads']} Faiss threads. Synthetic "
            f"bank of width {DIM} (see benchmarks/index.py); {N_QUERIES} queries, k={K}.",
            "",
            "| n | index | Faiss settings | build s | peak RSS GB | index GB | queries/s "
            "| recall@1 | recall@10 | score error % |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        cases.sort(key=lambda c: (c["n"], KINDS.index(c["kind"])))
        for c in cases:
            for i, search in enumerate(c["searches"]):
                shown = {**c["settings"], **search["settings"]} if i == 0 else search["settings"]
                build = (
                    f"{c['build_seconds']:.0f} | {c['peak_rss_gb_after_build']:.2f} "
                    f"| {c['index_bytes'] / 2**30:.2f}"
                    if i == 0
                    else " | | "
                )
                lines.append(
                    f"| {c['n']:,} | {c['kind']} | "
                    + ", ".join(f"{k}={v}" for k, v in shown.items())
                    + f" | {build} | {search['queries_per_second']:,.0f} "
                    f"| {search['recall_at_1']:.3f} | {search['recall_at_10']:.3f} "
                    f"| {100 * search['score_relative_error']:.2f} |"
                )
        lines += [
            "",
            "Every bank was built from chunks of 16384 vectors; peak RSS is of the whole "
            "process. Not run: 10M with PQ (its build would take about ten times the 1M "
            "IVF-PQ build of 396 s).",
        ]
    roc_path = RESULTS / "index_roc.json"
    if roc_path.exists():
        roc = json.loads(roc_path.read_text())
        lines += [
            "",
            "## Fashion-MNIST ROC-AUC (%) with each index over the same embeddings",
            "",
            f"Settings: {roc['settings']}. Bank: the {ROC_TRAIN} training embeddings of "
            "each class (two views joined); the index defaults scale with that size.",
            "",
            "| class | " + " | ".join(KINDS) + " | largest change |",
            "|---|" + "---|" * (len(KINDS) + 1),
        ]
        table = [[100 * row[k]["roc_auc"] for k in KINDS] for row in roc["classes"].values()]
        for label, aucs in [*zip(roc["classes"], table, strict=True), ("mean", np.mean(table, 0))]:
            change = max(abs(a - aucs[0]) for a in aucs)
            lines.append(
                f"| {label} | " + " | ".join(f"{a:.2f}" for a in aucs) + f" | {change:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    (RESULTS / "index.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["bank", "roc", "all"], default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--case", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        kind, n = args.case[0], int(args.case[1])
        result = {**run_case(kind, n), "machine": machine()}
        (RESULTS / f"index_bank_{kind}_{n}.json").write_text(json.dumps(result, indent=1))
        return
    if args.part in ("bank", "all"):
        bank_part(args.sizes, args.kinds)
    if args.part in ("roc", "all"):
        roc_part()
    print(render())


if __name__ == "__main__":
    main()

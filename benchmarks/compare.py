"""Combine one-class result files into one comparison table and a per-epoch plot.

Each input is a JSON file written by ``python -m benchmarks.one_class``. The table has one
row per class and one column per file (mean ROC-AUC in the last row); files with
per-epoch ROC-AUC also get a curve of the class-mean ROC-AUC against the epoch.

Example::

    python -m benchmarks.compare benchmarks/results/finding_*.json --name finding
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import RESULTS


def label(result: dict[str, Any], path: Path) -> str:
    loss = result["settings"]["params"].get("loss", "?")
    return "none (pretrained kNN)" if loss == "None" else f"{loss} ({path.stem})"


def per_epoch_means(result: dict[str, Any]) -> list[float]:
    """Class-mean ROC-AUC after each epoch, over classes that recorded every epoch."""
    curves = [
        r["roc_auc_per_epoch"] for r in result["classes"].values() if "roc_auc_per_epoch" in r
    ]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [float(np.mean([list(c.values())[e] for c in curves])) for e in range(n)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--name", default="comparison")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = {p: json.loads(p.read_text()) for p in args.files}
    labels = [label(r, p) for p, r in results.items()]
    classes = sorted({c for r in results.values() for c in r["classes"]}, key=int)
    lines = [
        f"# {args.name}",
        "",
        "ROC-AUC (%) per class; files: " + ", ".join(f"`{p.name}`" for p in results),
        "",
        "| class | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for cls in classes:
        cells = [
            f"{100 * r['classes'][cls]['roc_auc']:.2f}" if cls in r["classes"] else "-"
            for r in results.values()
        ]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    means = [
        f"**{100 * np.mean([c['roc_auc'] for c in r['classes'].values()]):.2f}**"
        for r in results.values()
    ]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    curves = {lab: per_epoch_means(r) for lab, r in zip(labels, results.values(), strict=True)}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        lines += ["", "Class-mean ROC-AUC (%) after each epoch (epoch 0 = pretrained):", ""]
        width = max(len(v) for v in curves.values())
        lines.append("| loss | " + " | ".join(str(e) for e in range(width)) + " |")
        lines.append("|---" * (width + 1) + "|")
        for lab, curve in curves.items():
            lines.append(f"| {lab} | " + " | ".join(f"{100 * v:.2f}" for v in curve) + " |")
    table = "\n".join(lines) + "\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.md").write_text(table)
    if curves:
        plot(curves, args.results_dir / f"{args.name}_per_epoch.png")
    print(table)
    return table


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, curve in curves.items():
        ax.plot(range(len(curve)), [100 * v for v in curve], marker="o", label=lab)
    ax.set_xlabel("epoch (0 = pretrained features)")
    ax.set_ylabel("mean ROC-AUC over classes (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

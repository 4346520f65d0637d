"""The four commands: ``fit``, ``score``, ``report`` and ``inspect``.

Each takes the parsed arguments and returns the exit status. Arguments are checked, and
outputs probed, before torch is imported or a model is loaded, so a mistake shows in a
fraction of a second; ``inspect`` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from msc_detector.cli import interrupts
from msc_detector.cli.errors import UserError
from msc_detector.cli.inputs import expand_images, folder_labels, path_key, read_labels
from msc_detector.cli.outputs import check_writable, printable, quote_path

__all__ = ["fit", "inspect", "report", "score"]

# Images scored from which a share flagged far above contamination earns a note.
_MANY = 20


def _status(args: argparse.Namespace, message: str, *, to_stderr: bool = False) -> None:
    """Print a status line unless ``-q``: to stdout, or stderr where stdout carries data."""
    if not args.quiet:
        print(printable(message), file=sys.stderr if to_stderr else sys.stdout, flush=True)


def _note_many_flagged(args: argparse.Namespace, detector: Any, flagged: int, scored: int) -> None:
    """Say, where the model's threshold flags most of many images, what that may mean."""
    share, expected = flagged / max(scored, 1), float(detector.contamination)
    if args.threshold is not None or scored < _MANY or share < max(0.5, 3 * expected):
        return
    _status(
        args,
        f"note: {flagged:,} of {scored:,} images ({share:.0%}) are flagged, where the "
        f"threshold flags about {expected:.0%} of normal images like the training ones. If "
        "most of these are normal, they differ from the training images (another batch, "
        "other lighting): score normal images held out from them and pass a threshold "
        "set from their scores with --threshold (see 'Thresholds' in the user guide).",
        to_stderr=True,
    )


def _model_file(model: str) -> str:
    if not Path(model).exists():
        raise UserError(f"no such model file: {model!r}")
    return model


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Load the model named in ``args`` with the scoring options applied.

    Returns the detector and the file's metadata. The file is verified before torch is
    imported, so a wrong or damaged file fails at once.
    """
    import msc_detector

    metadata = msc_detector.inspect(_model_file(args.model))
    from msc_detector.estimator import MSCDetector

    detector = MSCDetector.load(args.model, device=args.device)
    if args.batch_size is not None:
        detector.set_params(batch_size=args.batch_size)
    if args.num_workers is not None:
        detector.set_params(num_workers=args.num_workers)
    if args.threshold is not None:
        detector.offset_ = float(args.threshold)
    return detector, metadata


# ----------------------------------------------------------------------------- fit


def fit(args: argparse.Namespace) -> int:
    """Fit a detector on the images ``args.train`` names and save it to ``args.output``."""
    files = expand_images(args.train)
    check_writable(args.output)
    from msc_detector.estimator import MSCDetector

    detector = MSCDetector(
        backbone=args.backbone,
        weights=None if args.weights.lower() == "none" else args.weights,
        loss=None if args.loss == "none" else args.loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_neighbors=args.n_neighbors,
        image_size=args.image_size,
        crop_mode=args.crop_mode,
        contamination=args.contamination,
        device=args.device,
        precision=args.precision,
        num_workers=args.num_workers,
        random_state=args.random_state,
        verbose=int(args.progress),  # its progress bars
    )
    _status(args, f"fitting {args.backbone} on {len(files):,} images")
    start = time.perf_counter()
    # Absolute paths: the model keeps them to show the nearest training images later,
    # from whatever folder the report is made in.
    detector.fit([os.path.abspath(file) for file in files])
    seconds = time.perf_counter() - start
    interrupts.check()  # before the model replaces a file
    detector.save(args.output)
    _status(
        args,
        f"saved the model to {args.output} ({detector.n_train_:,} training images, fitted in "
        f"{seconds:.1f} s on {detector.device_}); threshold (offset_): {detector.offset_:.6g}",
    )
    return 0


# --------------------------------------------------------------------------- score


def _score_columns(k: int) -> list[str]:
    columns = ["path", "score", "decision", "label", "false_alarm_rate"]
    for j in range(1, k + 1):
        columns += [f"neighbor_{j}", f"neighbor_{j}_distance"]
    return [*columns, "error", "path_quoted"]


def _rows(chunk: Any, detector: Any, k: int) -> list[dict[str, Any]]:
    """Table rows of one scored chunk."""
    train_paths = detector.train_paths_
    rows = []
    for i, path in enumerate(chunk.paths):
        row: dict[str, Any] = dict.fromkeys(_score_columns(k))
        row["path"] = path  # the writer shows a byte that is not UTF-8 as U+FFFD
        row["path_quoted"] = quote_path(path)  # and this leads back to the file
        error = chunk.errors[i]
        if error is not None:
            row["error"] = error
            rows.append(row)
            continue
        score = float(chunk.scores[i])
        decision = score - detector.offset_
        row.update(score=score, decision=decision, label="anomaly" if decision < 0 else "normal")
        row["false_alarm_rate"] = float(chunk.false_alarm_rates[i])
        for j in range(k):
            index = int(chunk.neighbors[i, j])
            row[f"neighbor_{j + 1}"] = index if train_paths is None else train_paths[index]
            # float32: its shortest text, not the float64 expansion of its binary value
            row[f"neighbor_{j + 1}_distance"] = float(str(chunk.distances[i, j]))
        rows.append(row)
    return rows


def score(args: argparse.Namespace) -> int:
    """Score images and write one row per image to ``args.output``."""
    from msc_detector.cli.tables import TableWriter, table_format
    from msc_detector.files import score_files

    files = expand_images(args.images)
    fmt = table_format(args.output, args.format)
    to_stdout = args.output == "-"
    if not to_stdout:
        check_writable(args.output)
    detector, _ = _load(args)
    k = min(args.neighbors, detector.n_train_)
    types = {"score": "float", "decision": "float", "false_alarm_rate": "float"}
    for j in range(1, k + 1):
        types[f"neighbor_{j}_distance"] = "float"
        if detector.train_paths_ is None:
            types[f"neighbor_{j}"] = "int"
    flagged = unreadable = 0
    with TableWriter(args.output, fmt, _score_columns(k), types) as table:
        for chunk in score_files(detector, files, k, progress=args.progress):
            interrupts.check()
            rows = _rows(chunk, detector, k)
            table.write(rows)
            flagged += sum(row["label"] == "anomaly" for row in rows)
            unreadable += sum(row["error"] is not None for row in rows)
    where = "standard output" if to_stdout else args.output
    problems = f"; {unreadable:,} could not be read (see the error column)" if unreadable else ""
    _status(
        args,
        f"scored {len(files) - unreadable:,} images, {flagged:,} flagged as anomalies"
        f"{problems}; wrote {where}",
        to_stderr=to_stdout,
    )
    _note_many_flagged(args, detector, flagged, len(files) - unreadable)
    return 0


# -------------------------------------------------------------------------- report


def _report_inputs(args: argparse.Namespace) -> tuple[list[str], dict[str, bool]]:
    """Return the images to score and the labels known for them (by path key)."""
    if args.labels and (args.good or args.bad):
        raise UserError("use either --labels or --good/--bad, not both")
    files: list[str] = []
    labels: dict[str, bool] = {}
    if args.images:
        files = expand_images(args.images)
    if args.labels:
        listed, labels = read_labels(args.labels)
        if not files:
            files = listed
        elif not any(path_key(file) in labels for file in files):
            raise UserError(
                f"none of the images has a label in {args.labels!r}; its paths are read "
                "relative to its own folder"
            )
    if args.good or args.bad:
        labelled, labels = folder_labels(args.good or [], args.bad or [])
        seen = {path_key(file) for file in files}
        files += [file for file in labelled if path_key(file) not in seen]
    if not files:
        raise UserError("name the images to report on: IMAGES, --labels, or --good and --bad")
    return files, labels


def _label_code(is_anomaly: bool | None) -> int:
    """Return 1 for an anomaly, 0 for a normal image, -1 for an unlabelled one."""
    return -1 if is_anomaly is None else int(is_anomaly)


def report(args: argparse.Namespace) -> int:
    """Score images and write the HTML report to ``args.output``."""
    import numpy as np

    from msc_detector.cli import report as html
    from msc_detector.files import score_files

    files, labels = _report_inputs(args)
    check_writable(args.output)
    detector, metadata = _load(args)
    k = min(args.neighbors, detector.n_train_)
    n = len(files)
    scores = np.full(n, np.nan)
    neighbors = np.full((n, k), -1, np.int64)
    distances = np.full((n, k), np.nan, np.float32)
    errors: dict[int, str] = {}
    shown = html.TopMaps(args.top)  # the maps come from the scoring pass itself
    with_maps = detector.patch_bank_ is not None and args.top > 0
    start = 0
    for chunk in score_files(detector, files, k, progress=args.progress, maps=with_maps):
        interrupts.check()
        stop = start + len(chunk.paths)
        scores[start:stop] = chunk.scores
        neighbors[start:stop] = chunk.neighbors
        distances[start:stop] = chunk.distances
        errors.update({start + i: e for i, e in enumerate(chunk.errors) if e is not None})
        shown.add(start, chunk)
        start = stop
    maps, peaks = shown.finish(detector.model_)
    data = html.ReportData(
        model_path=args.model,
        metadata=metadata,
        threshold=float(detector.offset_),
        threshold_source=(
            "set with --threshold" if args.threshold is not None else "the model's offset_"
        ),
        paths=files,
        scores=scores,
        neighbors=neighbors,
        distances=distances,
        errors=errors,
        labels=np.array([_label_code(labels.get(path_key(f))) for f in files], np.int8),
        train_paths=detector.train_paths_,
        train_scores=np.asarray(detector.train_scores_),
        history=list(detector.history_),
        top=args.top,
        maps=maps,
        peaks=peaks,
    )
    html.write_report(html.render_report(data), args.output)
    flagged = int(np.sum(scores < data.threshold))
    problems = f", {len(errors):,} could not be read" if errors else ""
    _status(
        args,
        f"wrote the report to {args.output} ({n - len(errors):,} images scored, {flagged:,} "
        f"flagged as anomalies{problems})",
    )
    _note_many_flagged(args, detector, flagged, n - len(errors))
    return 0


# ------------------------------------------------------------------------- inspect


def inspect(args: argparse.Namespace) -> int:
    """Print the model file's metadata as JSON, without importing torch."""
    import msc_detector

    info = msc_detector.inspect(_model_file(args.model))
    print(json.dumps(info, indent=2))
    return 0

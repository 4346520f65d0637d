"""The HTML report: one self-contained file that shows what a detector flagged, and why.

It holds no script and loads nothing: charts are inline SVG (:mod:`msc_detector.cli.svg`),
images are downscaled ``data:`` URIs (:mod:`msc_detector.cli.thumbnails`), and a
Content-Security-Policy forbids anything else, so the file opens the same offline, in a
mail attachment or from an archive. Every path and name in it is escaped: file names
are user data.

Sections: summary figures; the score histogram with the threshold; with labels, ROC and
precision-recall curves and a table of thresholds; the most anomalous images, each
beside its nearest normal training images (and, for a detector with a patch bank, its
anomaly map as a heat overlay and the training image holding the normal patch nearest to
the map's peak); the most normal images; files that could not be read; the training
history and the model's settings.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from msc_detector.cli import evaluation, svg
from msc_detector.cli.outputs import atomic_file, printable
from msc_detector.cli.thumbnails import HEAT_COLORS, Thumbnail, make_overlay, make_thumbnail
from msc_detector.verdict import MEANINGS

__all__ = ["MapPeak", "ReportData", "TopMaps", "render_report", "write_report"]

NORMAL, ANOMALY, UNKNOWN = 0, 1, -1
_COLORS = {
    "normal": "#2e86de",
    "anomaly": "#e4572e",
    "unlabelled": "#8395a7",
    "train": "#222f3e",
    "threshold": "#222f3e",
}
_SHOWN_ERRORS = 200
_IN_USE = "the threshold in use"


@dataclass
class MapPeak:
    """The normal training patch nearest to the peak of an image's anomaly map.

    Attributes
    ----------
    distance : float
        Distance of the image's patch at the peak to that training patch.
    train_index : int
        Position of the training image that holds it.
    train_position : tuple of float
        Its centre as ``(row, column)`` fractions (0-1) of that image's height and width.
    """

    distance: float
    train_index: int
    train_position: tuple[float, float]


@dataclass
class ReportData:
    """Everything the report shows.

    Attributes
    ----------
    model_path : str
    metadata : dict
        :func:`msc_detector.inspect` of the model file.
    threshold : float
        Images scoring below it are labelled anomalies.
    threshold_source : str
        Where ``threshold`` comes from, in words.
    paths : list of str
        The scored image files.
    scores : ndarray of shape (n,)
        ``score_samples``; NaN where the file could not be read.
    neighbors : ndarray of shape (n, k)
        Positions of the nearest training images; -1 where unread.
    distances : ndarray of shape (n, k)
    errors : dict of int to str
        Why a file could not be read, by position.
    labels : ndarray of shape (n,), int
        1 anomaly, 0 normal, -1 unknown.
    train_paths : list of str or None
        The training files, or ``None`` for a detector fitted on arrays.
    train_scores : ndarray
        Leave-self-out scores of the training images.
    history : list of dict
        Per epoch ``epoch``, ``loss``, ``seconds``.
    top : int
        Images shown in the most anomalous and most normal sections.
    maps : dict of int to ndarray
        Anomaly maps ``(H, W)`` of images shown among the most anomalous, by position;
        empty for a detector without a patch bank.
    peaks : dict of int to MapPeak
        For images with a map: the training patch nearest to the map's peak.
    """

    model_path: str
    metadata: dict[str, Any]
    threshold: float
    threshold_source: str
    paths: list[str]
    scores: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    errors: dict[int, str]
    labels: np.ndarray
    train_paths: list[str] | None
    train_scores: np.ndarray
    history: list[dict[str, float]]
    top: int = 12
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    peaks: dict[int, MapPeak] = field(default_factory=dict)
    generated: str = field(
        default_factory=lambda: datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    )


def _most_anomalous(scores: np.ndarray, top: int) -> np.ndarray:
    """Positions of the ``top`` lowest finite scores, lowest first (ties in input order)."""
    scored = np.flatnonzero(np.isfinite(scores))
    return scored[np.argsort(scores[scored], kind="stable")][:top]


class TopMaps:
    """The anomaly maps and peaks of the ``top`` lowest-scoring images.

    Fed each scored chunk in turn (:func:`msc_detector.files.score_files` with maps), it
    keeps the small map sources of the lowest-scoring images so far; :meth:`finish`
    makes their maps. No image is decoded twice, and no full-size map is made for an
    image the report does not show.
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self.kept: dict[int, tuple[float, Any]] = {}

    def add(self, start: int, chunk: Any) -> None:
        """Offer the map sources of a chunk whose first file is at position ``start``."""
        for j, source in enumerate(chunk.map_sources):
            if source is not None and np.isfinite(chunk.scores[j]):
                self.kept[start + j] = (float(chunk.scores[j]), source)
        keep = sorted(self.kept, key=lambda i: (self.kept[i][0], i))[: self.top]
        self.kept = {i: self.kept[i] for i in keep}

    def finish(self, model: Any) -> tuple[dict[int, np.ndarray], dict[int, MapPeak]]:
        """Return ``ReportData.maps`` and ``ReportData.peaks`` of the kept images."""
        maps, peaks = {}, {}
        for i, (_, source) in self.kept.items():
            maps[i] = model.image_map(source)
            peak = model.map_peak(source, maps[i])
            owner, position = model.patches.source(int(peak["bank_index"]))
            peaks[i] = MapPeak(float(peak["distance"]), owner, position)
        return maps, peaks


# ----------------------------------------------------------------------- helpers


def _num(value: float, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "&ndash;"
    return escape(f"{value:.{digits}g}")


def _share(value: float) -> str:
    return "&ndash;" if not math.isfinite(value) else f"{value:.1%}"


def _short_names(paths: Sequence[str]) -> dict[str, str]:
    """Map each path to its part below the folder all of ``paths`` share."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    except ValueError:  # different drives
        return {p: p for p in paths}
    return {p: os.path.relpath(a, root) for p, a in zip(paths, absolute, strict=True)}


class _Thumbs:
    """Thumbnails made once per file, as ``<img>`` or a placeholder saying why not."""

    def __init__(self) -> None:
        self.cache: dict[str, Thumbnail | str] = {}

    def html(
        self,
        path: str | None,
        missing: str = "no image file",
        mark: tuple[float, float] | None = None,
    ) -> str:
        if path is None:
            return f'<div class="thumb none"><span>{escape(missing)}</span></div>'
        if mark is not None:  # one of a kind: not cached
            return _img(make_thumbnail(path, mark=mark), path)
        if path not in self.cache:
            self.cache[path] = make_thumbnail(path)
        return _img(self.cache[path], path)


def _img(thumb: Thumbnail | str, alt: str) -> str:
    """Return an ``<img>`` in its frame, or a placeholder saying why there is none."""
    if isinstance(thumb, str):
        return f'<div class="thumb none"><span>{escape(thumb)}</span></div>'
    small = max(thumb.width, thumb.height) < 120
    return (
        f'<div class="thumb"><img src="{thumb.uri}" alt="{escape(alt)}" '
        f'width="{thumb.width}" height="{thumb.height}"'
        f"{' class=px' if small else ''}></div>"
    )


def _figure(thumb: str, name: str, title: str, lines: Sequence[str], css: str = "") -> str:
    text = "".join(f"<span>{line}</span>" for line in lines)
    return (
        f'<figure class="{css}" title="{escape(title)}">{thumb}'
        f'<figcaption><span class="name">{escape(name)}</span>{text}</figcaption></figure>'
    )


def _badge(is_anomaly: bool) -> str:
    return '<b class="badge bad">anomaly</b>' if is_anomaly else '<b class="badge good">normal</b>'


# ---------------------------------------------------------------------- sections


def _summary(data: ReportData, scored: np.ndarray, curves: evaluation.Curves | None) -> str:
    flagged = int(np.sum(data.scores[scored] < data.threshold))
    n = int(scored.sum())
    cards = [
        ("images scored", f"{n:,}"),
        (
            "flagged as anomalies",
            f"{flagged:,} <small>({_share(flagged / n if n else math.nan)})</small>",
        ),
        ("threshold", _num(data.threshold)),
        ("training images", f"{len(data.train_scores):,}"),
    ]
    if data.errors:
        cards.insert(1, ("unreadable", f'<a href="#unreadable">{len(data.errors):,}</a>'))
    if curves is not None:
        cards += [
            ("ROC-AUC", f"{curves.roc_auc:.4f}"),
            ("average precision", f"{curves.average_precision:.4f}"),
        ]
    body = "".join(
        f'<div class="card"><div class="value">{value}</div>'
        f'<div class="key">{escape(key)}</div></div>'
        for key, value in cards
    )
    return f'<section class="cards">{body}</section>'


def _histogram(data: ReportData, scored: np.ndarray) -> str:
    mode = data.metadata["fitted"]["image_score_"]
    groups = []
    labelled = data.labels >= 0
    if labelled[scored].any():
        for value, name in ((NORMAL, "normal"), (ANOMALY, "anomaly")):
            chosen = scored & (data.labels == value)
            if chosen.any():
                groups.append(
                    svg.Series(
                        f"labelled {name} ({chosen.sum():,})", data.scores[chosen], _COLORS[name]
                    )
                )
        chosen = scored & ~labelled
        if chosen.any():
            groups.append(
                svg.Series(
                    f"unlabelled ({chosen.sum():,})", data.scores[chosen], _COLORS["unlabelled"]
                )
            )
    else:
        groups.append(
            svg.Series(f"scored images ({scored.sum():,})", data.scores[scored], _COLORS["normal"])
        )
    groups.append(
        svg.Series(
            "training images, leave-one-out", data.train_scores, _COLORS["train"], outline=True
        )
    )
    chart = svg.histogram(
        groups,
        title="Histogram of the scores, with the threshold",
        xlabel="score  (\u2190 more anomalous \u00b7 more normal \u2192)",
        markers=[
            svg.Marker(
                f"threshold {data.threshold:.4g}", data.threshold, color=_COLORS["threshold"]
            )
        ],
        bins=int(np.clip(np.sqrt(scored.sum()) * 2, 10, 50)),
    )
    return (
        '<section id="scores"><h2>Scores</h2>'
        f"<p>The score of an image is {escape(MEANINGS[mode])}: higher is more normal. Images "
        f"scoring below the threshold ({escape(data.threshold_source)}) are flagged as "
        "anomalies. The dashed outline shows the training images, each scored against the "
        "others; each group is drawn as shares of its own size.</p>"
        f'<div class="chart wide">{chart}</div></section>'
    )


def _against_labels(data: ReportData, scored: np.ndarray, curves: evaluation.Curves | None) -> str:
    head = '<section id="labels"><h2>Against the labels</h2>'
    chosen = scored & (data.labels >= 0)
    if not chosen.any():
        return (
            f"{head}<p class=note>No labels were given, so there are no ROC or "
            "precision-recall curves. Pass <code>--good DIR --bad DIR</code> or "
            "<code>--labels labels.csv</code> to see how well the scores separate normal "
            "images from anomalies.</p></section>"
        )
    scores, is_anomaly = data.scores[chosen], data.labels[chosen] == ANOMALY
    n_bad = int(is_anomaly.sum())
    counts = (
        f"{chosen.sum():,} labelled images: {chosen.sum() - n_bad:,} normal, {n_bad:,} anomalies."
    )
    model = evaluation.operating_point(scores, is_anomaly, data.threshold, _IN_USE)
    if curves is None:
        return (
            f"{head}<p>{counts} Curves need both normal and anomalous labelled images.</p>"
            f"{_threshold_table(scores, is_anomaly, data)}</section>"
        )
    roc = svg.line_chart(
        [
            svg.Line(f"ROC, AUC {curves.roc_auc:.4f}", curves.fpr, curves.tpr, _COLORS["anomaly"]),
            svg.Line("chance", [0, 1], [0, 1], "#b0b0b0", dashed=True),
        ],
        title=f"ROC curve, AUC {curves.roc_auc:.4f}",
        xlabel="false-positive rate (normal flagged)",
        ylabel="recall (anomalies flagged)",
        markers=[
            svg.Marker("threshold", model.false_positive_rate, model.recall, _COLORS["threshold"])
        ],
        x_range=(0.0, 1.0),
        y_range=(0.0, 1.0),
    )
    pr = svg.line_chart(
        [
            svg.Line(
                f"AP {curves.average_precision:.4f}",
                curves.recall,
                curves.precision,
                _COLORS["normal"],
            ),
            svg.Line("chance", [0, 1], [curves.prevalence] * 2, "#b0b0b0", dashed=True),
        ],
        title=f"Precision-recall curve, average precision {curves.average_precision:.4f}",
        xlabel="recall (anomalies flagged)",
        ylabel="precision",
        markers=[svg.Marker("threshold", model.recall, model.precision, _COLORS["threshold"])]
        if math.isfinite(model.precision)
        else [],
        x_range=(0.0, 1.0),
        y_range=(0.0, 1.0),
    )
    return (
        f"{head}<p>{counts} ROC-AUC <b>{curves.roc_auc:.4f}</b>, average precision "
        f"<b>{curves.average_precision:.4f}</b> (anomalies are the positive class; 1 is "
        "perfect). Recall is the share of anomalies flagged, precision the share of flagged "
        "images that are anomalies. The dot marks the threshold in use.</p>"
        f'<div class="charts"><div class="chart">{roc}</div><div class="chart">{pr}</div></div>'
        f"{_threshold_table(scores, is_anomaly, data)}</section>"
    )


def _threshold_table(scores: np.ndarray, is_anomaly: np.ndarray, data: ReportData) -> str:
    points = evaluation.candidate_points(scores, is_anomaly, data.threshold, _IN_USE)
    rows = []
    for point in points:
        current = _IN_USE in point.names
        names = ", ".join(point.names)
        rows.append(
            f"<tr{' class=current' if current else ''}><td class=n>{_num(point.threshold, 6)}</td>"
            f"<td>{escape(names)}</td><td class=n>{point.flagged:,}</td>"
            f"<td class=n>{_share(point.precision)}</td><td class=n>{_share(point.recall)}</td>"
            f"<td class=n>{_share(point.false_positive_rate)}</td>"
            f"<td class=n>{point.f1:.3f}</td></tr>"
        )
    return (
        "<h3>Thresholds</h3><p>What other thresholds would do to the labelled images: an "
        "image is flagged when its score is below the threshold. To use one, pass "
        "<code>--threshold</code> to <code>msc-detector score</code>.</p>"
        '<table class="data"><thead><tr><th class=n>threshold</th><th>chosen as</th>'
        "<th class=n>flagged</th><th class=n>precision</th><th class=n>recall</th>"
        "<th class=n>normal flagged</th><th class=n>F1</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _image_lines(data: ReportData, i: int) -> list[str]:
    decision = data.scores[i] - data.threshold
    lines = [
        f"score {_num(data.scores[i])}",
        f"decision {escape(f'{decision:+.3g}')}",
        _badge(bool(decision < 0)),
    ]
    if data.labels[i] >= 0:
        known = "anomaly" if data.labels[i] == ANOMALY else "normal"
        lines.append(f'<span class="muted">labelled {known}</span>')
    return lines


def _heat_range(maps: dict[int, np.ndarray]) -> tuple[float, float]:
    """Return the heat scale of a report: the median of the maps' values to their maximum.

    Most of an anomalous image is normal, so the median is a normal patch's distance:
    at least half of the pixels shown get no heat.
    """
    values = np.concatenate([m[np.isfinite(m)].ravel() for m in maps.values()])
    if values.size == 0:
        return 0.0, 1.0
    return float(np.median(values)), float(values.max())


def _map_figures(data: ReportData, i: int, heat: tuple[float, float], thumbs: _Thumbs) -> str:
    """Return figures of image ``i``'s anomaly map and the training patch nearest its peak."""
    peak_value = float(np.nanmax(data.maps[i])) if np.isfinite(data.maps[i]).any() else math.nan
    overlay = _img(
        make_overlay(data.paths[i], data.maps[i], *heat), f"anomaly map of {data.paths[i]}"
    )
    figures = [
        _figure(overlay, "anomaly map", data.paths[i], [f"peak {_num(peak_value, 3)}"], "map")
    ]
    peak = data.peaks.get(i)
    if peak is not None:
        lines = ["nearest normal patch to the peak", f"distance {_num(peak.distance, 3)}"]
        if data.train_paths is None:
            thumb = thumbs.html(None, "fitted on arrays: no file to show")
            name = title = f"training image {peak.train_index}"
        else:
            title = data.train_paths[peak.train_index]
            thumb = thumbs.html(title, mark=peak.train_position)
            name = _short_names(data.train_paths)[title]
        figures.append(_figure(thumb, name, title, lines, "map"))
    return "".join(figures)


def _anomalies(data: ReportData, order: np.ndarray, thumbs: _Thumbs, names: dict[str, str]) -> str:
    shown = order[: data.top]
    train_names = _short_names(data.train_paths or [])
    heat = _heat_range({i: data.maps[i] for i in shown if i in data.maps}) if data.maps else None
    rows = []
    for rank, i in enumerate(shown, start=1):
        query = _figure(
            thumbs.html(data.paths[i]),
            f"#{rank} {names[data.paths[i]]}",
            data.paths[i],
            _image_lines(data, i),
            "query" if data.scores[i] < data.threshold else "query normal",
        )
        if heat is not None and i in data.maps:
            query += _map_figures(data, i, heat, thumbs)
        neighbours = []
        for j, (index, distance) in enumerate(
            zip(data.neighbors[i], data.distances[i], strict=True)
        ):
            if index < 0:
                continue
            if data.train_paths is None:
                thumb = thumbs.html(None, "fitted on arrays: no file to show")
                name, title = f"training image {index}", f"training image {index}"
            else:
                path = data.train_paths[index]
                thumb, name, title = thumbs.html(path), train_names[path], path
            neighbours.append(
                _figure(
                    thumb,
                    name,
                    title,
                    [f"{_ordinal(j + 1)} nearest", f"distance {_num(distance, 3)}"],
                )
            )
        rows.append(
            f'<div class="pair">{query}<div class="arrow" aria-hidden="true">&rarr;</div>'
            f'<div class="neighbours">{"".join(neighbours)}</div></div>'
        )
    if not rows:
        return ""
    maps = ""
    if heat is not None:
        maps = (
            "<p>Beside each image, its anomaly map: how far each of its patches is from the "
            "nearest normal training patch, as heat over the image in grey "
            f'<span class="heat" aria-hidden="true"></span> from {_num(heat[0], 3)} (the '
            f"median of the maps shown; no heat) to {_num(heat[1], 3)} (their maximum). "
            "Darker parts were not inspected. Next to it, the training image holding the "
            "normal patch nearest to the map's peak, ringed.</p>"
        )
    return (
        '<section id="anomalies"><h2>Most anomalous images</h2>'
        f"<p>The {len(shown)} lowest-scoring images, each beside the normal training images "
        "nearest to it: what the detector compared it with. Hover over an image for its "
        f"full path.</p>{maps}{''.join(rows)}</section>"
    )


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _most_normal(
    data: ReportData, order: np.ndarray, thumbs: _Thumbs, names: dict[str, str]
) -> str:
    shown = order[::-1][: data.top]
    if len(order) <= data.top:  # everything is already shown above
        return ""
    figures = [
        _figure(
            thumbs.html(data.paths[i]), names[data.paths[i]], data.paths[i], _image_lines(data, i)
        )
        for i in shown
    ]
    return (
        '<section id="normal"><h2>Most normal images</h2>'
        f"<p>The {len(shown)} highest-scoring images.</p>"
        f'<div class="grid">{"".join(figures)}</div></section>'
    )


def _unreadable(data: ReportData) -> str:
    if not data.errors:
        return ""
    items = [
        f"<li><code>{escape(data.paths[i])}</code>: {escape(message)}</li>"
        for i, message in list(sorted(data.errors.items()))[:_SHOWN_ERRORS]
    ]
    more = len(data.errors) - len(items)
    tail = f"<li>&hellip; and {more:,} more</li>" if more > 0 else ""
    return (
        '<section id="unreadable"><h2>Files that could not be read</h2>'
        f"<p>Not scored: {len(data.errors):,} file{'s' if len(data.errors) > 1 else ''}.</p>"
        f'<ul class="errors">{"".join(items)}{tail}</ul></section>'
    )


def _training(data: ReportData) -> str:
    meta = data.metadata
    params, fitted, spec = (
        meta.get("params", {}),
        meta.get("fitted", {}),
        meta.get("backbone_spec", {}),
    )
    if data.history:
        epochs = [float(e.get("epoch", i + 1)) for i, e in enumerate(data.history)]
        losses = [float(e.get("loss", math.nan)) for e in data.history]
        chart = svg.line_chart(
            [svg.Line("mean training loss", epochs, losses, _COLORS["anomaly"], dots=True)],
            title="Training loss per epoch",
            xlabel="epoch",
            ylabel="loss",
            x_range=(min(epochs) - 0.5, max(epochs) + 0.5),
            width=400,
            height=240,
            integer_x=True,
        )
        rows = "".join(
            f"<tr><td class=n>{int(e.get('epoch', i + 1))}</td>"
            f"<td class=n>{_num(e.get('loss', math.nan))}</td>"
            f"<td class=n>{_num(e.get('seconds', math.nan), 3)}</td></tr>"
            for i, e in enumerate(data.history)
        )
        history = (
            f'<div class="charts"><div class="chart">{chart}</div>'
            '<div><table class="data"><thead><tr><th class=n>epoch</th><th class=n>loss</th>'
            f"<th class=n>seconds</th></tr></thead><tbody>{rows}</tbody></table></div></div>"
        )
    else:
        history = (
            "<p class=note>The network was not fine-tuned (<code>epochs</code> 0 or "
            "<code>loss</code> none): the detector uses the pretrained features, so there is "
            "no training history.</p>"
        )
    details = [
        ("model file", data.model_path),
        ("created", meta.get("created", "")),
        (
            "backbone",
            f"{spec.get('name', params.get('backbone'))} ({spec.get('architecture', '')})",
        ),
        ("weights", fitted.get("weights_source_", "")),
        ("image size", f"{fitted.get('image_size_', '')} px"),
        ("training images", f"{fitted.get('n_train_', '')}"),
        ("epochs", params.get("epochs")),
        ("loss", params.get("loss")),
        ("neighbours per score", params.get("n_neighbors")),
        ("contamination", params.get("contamination")),
        ("fitted on", f"{fitted.get('device_', '')}, {fitted.get('precision_', '')}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in details)
    return (
        '<section id="training"><h2>Training</h2>'
        f"{history}<h3>Model</h3><table class=kv>{table}</table></section>"
    )


_CSS = """
:root {
  --fg:#1e272e;
  --muted:#6b7785;
  --line:#e3e7ec;
  --bg:#f6f8fa;
  --bad:#e4572e;
  --good:#2e86de;
}
* { box-sizing:border-box }
body {
  margin:0;
  font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  color:var(--fg);
  background:var(--bg);
}
main { max-width:1180px; margin:0 auto; padding:24px 28px 48px }
header h1 { margin:0; font-size:26px }
header p { margin:4px 0 0; color:var(--muted) }
nav { margin:14px 0 0; display:flex; gap:16px; flex-wrap:wrap }
nav a { color:var(--good); text-decoration:none }
section {
  background:#fff;
  border:1px solid var(--line);
  border-radius:10px;
  padding:18px 22px;
  margin:18px 0;
}
h2 { margin:0 0 6px; font-size:19px }
h3 { margin:20px 0 6px; font-size:15px }
p { margin:6px 0 12px; max-width:900px }
.note { color:var(--muted) }
code {
  font-size:12.5px;
  background:var(--bg);
  padding:1px 4px;
  border-radius:4px;
  word-break:break-all;
}
section.cards { display:flex; flex-wrap:wrap; gap:12px; background:none; border:0; padding:0 }
.card {
  background:#fff;
  border:1px solid var(--line);
  border-radius:10px;
  padding:12px 18px;
  min-width:150px;
  flex:1;
}
.card .value { font-size:24px; font-weight:600 }
.card .value small { font-size:14px; font-weight:400; color:var(--muted) }
.card .value a { color:var(--bad) }
.card .key { color:var(--muted) }
.chart svg { width:100%; height:auto; display:block }
.chart.wide { max-width:860px }
.charts { display:flex; flex-wrap:wrap; gap:24px; align-items:flex-start }
.charts>.chart { flex:1 1 340px; max-width:480px }
table { border-collapse:collapse }
table.data th,table.data td {
  padding:5px 12px;
  border-bottom:1px solid var(--line);
  text-align:left;
}
table.data th { font-weight:600; background:var(--bg) }
table.data .n { text-align:right; font-variant-numeric:tabular-nums }
table.data tr.current td { background:#fff4e5; font-weight:600 }
table.kv th {
  white-space:nowrap;
  text-align:left;
  padding:3px 16px 3px 0;
  color:var(--muted);
  font-weight:400;
  vertical-align:top;
}
table.kv td { padding:3px 0; overflow-wrap:anywhere }
.pair {
  display:flex;
  align-items:flex-start;
  gap:14px;
  padding:14px 0;
  border-top:1px solid var(--line);
}
.pair:first-of-type { border-top:0 }
.arrow { font-size:26px; color:var(--muted); padding-top:48px }
figure.map { width:172px }
.heat {
  display:inline-block;
  width:90px;
  height:10px;
  border-radius:3px;
  vertical-align:middle;
  background:linear-gradient(90deg,HEAT_STOPS);
}
.neighbours,.grid { display:flex; flex-wrap:wrap; gap:14px }
figure { margin:0; width:148px }
figure.query { width:172px }
.thumb {
  width:100%;
  aspect-ratio:1;
  background:var(--bg);
  border:1px solid var(--line);
  border-radius:6px;
  display:flex;
  align-items:center;
  justify-content:center;
  overflow:hidden;
}
figure.query .thumb { border:2px solid var(--bad) }
figure.query.normal .thumb { border-color:var(--good) }
.thumb img { max-width:100%; max-height:100%; width:auto; height:auto }
.thumb img.px { image-rendering:pixelated; width:100%; height:100%; object-fit:contain }
.thumb.none span { color:var(--muted); font-size:12px; padding:8px; text-align:center }
figcaption { font-size:12px; line-height:1.4; margin-top:4px; display:flex; flex-direction:column }
figcaption .name {
  font-weight:600;
  overflow-wrap:anywhere;
  display:-webkit-box;
  -webkit-line-clamp:2;
  -webkit-box-orient:vertical;
  overflow:hidden
}
.badge { display:inline-block; font-size:11px; padding:0 6px; border-radius:8px; color:#fff }
.badge.bad { background:var(--bad) }
.badge.good { background:var(--good) }
.muted { color:var(--muted) }
ul.errors { margin:0; padding-left:20px }
footer { color:var(--muted); font-size:12px; text-align:center }
"""


_CSS = _CSS.replace("HEAT_STOPS", ",".join(f"rgb{color}" for color in HEAT_COLORS))


def render_report(data: ReportData) -> str:
    """Return the report as one HTML document."""
    scored = np.isfinite(data.scores)
    labelled = scored & (data.labels >= 0)
    curves = evaluation.curves(data.scores[labelled], data.labels[labelled] == ANOMALY)
    order = _most_anomalous(data.scores, len(data.scores))
    thumbs = _Thumbs()
    shown = [data.paths[i] for i in (*order[: data.top], *order[::-1][: data.top])]
    names = _short_names(shown)
    sections = [
        _summary(data, scored, curves),
        _histogram(data, scored) if scored.any() else "",
        _against_labels(data, scored, curves),
        _anomalies(data, order, thumbs, names),
        _most_normal(data, order, thumbs, names),
        _unreadable(data),
        _training(data),
    ]
    links = [
        (target, title)
        for target, title in (
            ("scores", "Scores"),
            ("labels", "Against the labels"),
            ("anomalies", "Most anomalous"),
            ("normal", "Most normal"),
            ("unreadable", "Unreadable files"),
            ("training", "Training"),
        )
        if any(f'id="{target}"' in s for s in sections)
    ]
    nav = "".join(f'<a href="#{t}">{escape(title)}</a>' for t, title in links)
    version = escape(str(data.metadata.get("versions", {}).get("msc_detector", "")))
    model = escape(Path(data.model_path).name)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>Anomaly report: {model}</title><style>{_CSS}</style></head><body><main>"
        f"<header><h1>Anomaly report</h1><p>Model <code>{escape(data.model_path)}</code> "
        f"&middot; {len(data.paths):,} images &middot; generated {escape(data.generated)}</p>"
        f"<nav>{nav}</nav></header>{''.join(sections)}"
        f"<footer>Made by msc-detector {version} (Mean-Shifted Contrastive anomaly "
        "detection).</footer></main></body></html>\n"
    )


def write_report(document: str, output: str) -> None:
    """Write ``document`` to ``output``, whole or not at all.

    Raises
    ------
    UserError
        When the folder does not exist or cannot be written.
    """
    with atomic_file(output) as handle:
        handle.write(printable(document))  # names that are not UTF-8: U+FFFD

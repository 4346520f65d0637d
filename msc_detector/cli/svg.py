"""Small inline SVG charts for the HTML report: histograms and line charts.

Written by hand, so that the report needs no plotting library and no script: each
function returns one ``<svg>`` element with a ``viewBox`` (it scales to its container),
a ``<title>`` for screen readers, axes with round tick values and a legend. All text is
escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np

__all__ = ["Line", "Marker", "Series", "histogram", "line_chart", "nice_ticks"]

_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'
_MARGIN = {"left": 58, "right": 16, "top": 34, "bottom": 44}


@dataclass
class Series:
    """Values to draw as one histogram group.

    ``outline`` draws a step line instead of filled bars (for a reference group).
    """

    name: str
    values: np.ndarray
    color: str
    outline: bool = False


@dataclass
class Line:
    """A polyline through ``(xs[i], ys[i])``; ``dashed`` for reference, ``dots`` marks points."""

    name: str
    xs: Sequence[float] | np.ndarray
    ys: Sequence[float] | np.ndarray
    color: str
    dashed: bool = False
    dots: bool = False


@dataclass
class Marker:
    """A labelled point (line charts) or a vertical line at ``x`` (histograms)."""

    name: str
    x: float
    y: float = math.nan
    color: str = "#d62728"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Return round tick values covering ``[lo, hi]``: about ``count`` multiples of 1, 2 or 5."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    for i in range(first, math.floor(hi / step + 1e-9) + 1):
        ticks.append(0.0 if i == 0 else i * step)
    return ticks


def _label(value: float, ticks: Sequence[float]) -> str:
    """Format a tick value with as many decimals as the tick spacing needs."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    exponent = math.floor(math.log10(step) + 1e-9)
    mantissa = step / 10.0**exponent
    decimals = max(0, -exponent) + (abs(mantissa - round(mantissa)) > 1e-6)
    decimals = min(decimals, 6)
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text.replace("-", "\u2212")


_LEGEND_ROW = 20  # pixels per legend row
_CHAR = 7.0  # average width of a 12-pixel character, for laying out the legend


@dataclass
class _Frame:
    """The plot area of a chart, its data limits and its legend.

    ``legend`` holds ``(name, color, kind)`` entries (kind: box, line or dash), laid
    out in rows above the plot; each extra row makes the chart taller.
    """

    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    legend: Sequence[tuple[str, str, str]] = ()
    parts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots: list[tuple[float, int]] = []  # (x, row) of each legend entry
        x, row = float(_MARGIN["left"]), 0
        for name, _, _ in self.legend:
            size = 18 + _CHAR * len(name)
            if self.slots and x + size > self.width - _MARGIN["right"]:
                x, row = float(_MARGIN["left"]), row + 1
            self.slots.append((x, row))
            x += size + 18
        rows = self.slots[-1][1] + 1 if self.slots else 0
        self.top = 14.0 + _LEGEND_ROW * rows
        self.height += _LEGEND_ROW * max(rows - 1, 0)

    @property
    def left(self) -> float:
        return _MARGIN["left"]

    @property
    def right(self) -> float:
        return self.width - _MARGIN["right"]

    @property
    def bottom(self) -> float:
        return self.height - _MARGIN["bottom"]

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + (value - lo) / ((hi - lo) or 1.0) * (self.right - self.left)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return self.bottom - (value - lo) / ((hi - lo) or 1.0) * (self.bottom - self.top)

    def axes(self, xlabel: str, ylabel: str, x_ticks: list[float], y_ticks: list[float]) -> None:
        grid, text = [], []
        for tick in y_ticks:
            y = self.y(tick)
            grid.append(f'<line x1="{self.left}" x2="{self.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
            text.append(
                f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                f"{escape(_label(tick, y_ticks))}</text>"
            )
        for tick in x_ticks:
            x = self.x(tick)
            grid.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.top}" y2="{self.bottom}"/>')
            text.append(
                f'<text x="{x:.1f}" y="{self.bottom + 16}" text-anchor="middle">'
                f"{escape(_label(tick, x_ticks))}</text>"
            )
        middle_x, middle_y = (self.left + self.right) / 2, (self.top + self.bottom) / 2
        text.append(
            f'<text x="{middle_x:.1f}" y="{self.height - 8}" text-anchor="middle" '
            f'fill="#333">{escape(xlabel)}</text>'
        )
        text.append(
            f'<text transform="translate(14 {middle_y:.1f}) rotate(-90)" text-anchor="middle" '
            f'fill="#333">{escape(ylabel)}</text>'
        )
        self.parts.insert(0, f'<g stroke="#e5e5e5" stroke-width="1">{"".join(grid)}</g>')
        self.parts.append(
            f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}" fill="none" stroke="#999"/>'
        )
        self.parts.append(f'<g fill="#555" font-size="11">{"".join(text)}</g>')

    def draw_legend(self) -> None:
        items = []
        for (name, color, kind), (x, row) in zip(self.legend, self.slots, strict=True):
            y = 10 + _LEGEND_ROW * row
            if kind == "box":
                swatch = f'<rect x="{x}" y="{y}" width="12" height="12" fill="{color}" rx="2"/>'
            else:
                dash = ' stroke-dasharray="4 3"' if kind == "dash" else ""
                swatch = (
                    f'<line x1="{x}" x2="{x + 14}" y1="{y + 6}" y2="{y + 6}" stroke="{color}" '
                    f'stroke-width="2.5"{dash}/>'
                )
            items.append(
                f'{swatch}<text x="{x + 18}" y="{y + 10}" font-size="12" fill="#333">'
                f"{escape(name)}</text>"
            )
        self.parts.append("".join(items))

    def render(self, title: str) -> str:
        self.draw_legend()
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
            f'role="img" {_FONT} font-size="12"><title>{escape(title)}</title>'
            f"{''.join(self.parts)}</svg>"
        )


def histogram(
    groups: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    markers: Sequence[Marker] = (),
    bins: int = 40,
    width: int = 680,
    height: int = 290,
) -> str:
    """Return an SVG histogram of the share of each group's values per bin.

    All groups share the bins, and each is normalised to its own size, so groups of
    different sizes compare. ``markers`` are vertical lines (the threshold).
    """
    finite = [g.values[np.isfinite(g.values)] for g in groups]
    pooled = np.concatenate([*finite, np.array([m.x for m in markers], float)])
    if pooled.size == 0:
        return ""
    lo, hi = float(pooled.min()), float(pooled.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.02
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    shares = [
        np.histogram(values, edges)[0] / max(len(values), 1) if len(values) else None
        for values in finite
    ]
    top = max((float(s.max()) for s in shares if s is not None), default=1.0) or 1.0
    y_ticks = nice_ticks(0.0, top * 1.05, 4)
    legend = [(g.name, g.color, "dash" if g.outline else "box") for g in groups]
    legend += [(m.name, m.color, "line") for m in markers]
    y_range = (0.0, max(y_ticks[-1], top * 1.05))
    frame = _Frame(width, height, (edges[0], edges[-1]), y_range, legend)
    for group, share in zip(groups, shares, strict=True):
        if share is None:
            continue
        if group.outline:
            points = [(frame.x(edges[0]), frame.y(0))]
            for i, value in enumerate(share):
                points += [
                    (frame.x(edges[i]), frame.y(value)),
                    (frame.x(edges[i + 1]), frame.y(value)),
                ]
            points.append((frame.x(edges[-1]), frame.y(0)))
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            frame.parts.append(
                f'<polyline points="{path}" fill="none" stroke="{group.color}" '
                'stroke-width="1.5" stroke-dasharray="4 3"/>'
            )
            continue
        bars = []
        for i, value in enumerate(share):
            if value <= 0:
                continue
            x0, x1 = frame.x(edges[i]), frame.x(edges[i + 1])
            y = frame.y(value)
            bars.append(
                f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                f'height="{frame.bottom - y:.1f}"/>'
            )
        frame.parts.append(f'<g fill="{group.color}" fill-opacity="0.6">{"".join(bars)}</g>')
    for marker in markers:
        x = frame.x(marker.x)
        frame.parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{frame.bottom}" '
            f'stroke="{marker.color}" stroke-width="2"/>'
        )
    frame.axes(xlabel, "share of images", nice_ticks(edges[0], edges[-1], 6), y_ticks)
    return frame.render(title)


def line_chart(
    lines: Sequence[Line],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    markers: Sequence[Marker] = (),
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    width: int = 380,
    height: int = 340,
    integer_x: bool = False,
) -> str:
    """Return an SVG chart of ``lines`` with labelled point ``markers``.

    The ranges default to the data's, padded a little. ``integer_x`` keeps only whole
    numbers as x ticks (epochs).
    """
    xs = np.concatenate([np.asarray(line.xs, float) for line in lines] or [np.zeros(1)])
    ys = np.concatenate([np.asarray(line.ys, float) for line in lines] or [np.zeros(1)])

    def span(values: np.ndarray) -> tuple[float, float]:
        values = values[np.isfinite(values)]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        pad = (hi - lo) * 0.05 or max(abs(lo) * 0.05, 0.5)
        return lo - pad, hi + pad

    x_range = x_range or span(xs)
    y_range = y_range or span(ys)
    legend = [(line.name, line.color, "dash" if line.dashed else "line") for line in lines]
    legend += [(m.name, m.color, "box") for m in markers]
    frame = _Frame(width, height, x_range, y_range, legend)
    for line in lines:
        path = " ".join(
            f"{frame.x(x):.1f},{frame.y(y):.1f}"
            for x, y in zip(line.xs, line.ys, strict=True)
            if math.isfinite(x) and math.isfinite(y)
        )
        dash = ' stroke-dasharray="4 3"' if line.dashed else ""
        frame.parts.append(
            f'<polyline points="{path}" fill="none" stroke="{line.color}" stroke-width="2" '
            f'stroke-linejoin="round"{dash}/>'
        )
        if line.dots:
            frame.parts.append(
                f'<g fill="{line.color}">'
                + "".join(
                    f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.5"/>'
                    for x, y in zip(line.xs, line.ys, strict=True)
                    if math.isfinite(x) and math.isfinite(y)
                )
                + "</g>"
            )
    for marker in markers:
        frame.parts.append(
            f'<circle cx="{frame.x(marker.x):.1f}" cy="{frame.y(marker.y):.1f}" r="5" '
            f'fill="{marker.color}" stroke="#fff" stroke-width="1.5"/>'
        )
    x_ticks = nice_ticks(*x_range, 5)
    if integer_x:
        x_ticks = [t for t in x_ticks if t == int(t)] or [float(round(sum(x_range) / 2))]
    frame.axes(xlabel, ylabel, x_ticks, nice_ticks(*y_range, 5))
    return frame.render(title)

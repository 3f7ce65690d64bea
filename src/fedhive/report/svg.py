"""Figures drawn as inline SVG: line, bar and box plots with axes, ticks and point
titles (the browser shows a point's values on hover), no script and nothing fetched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from fedhive.report.figures import AxisKind, Box, Figure, Series

__all__ = ["COLORS", "format_value", "nice_ticks", "render"]

#: One colour per run, in run order (colour-blind friendly, after Okabe and Ito).
COLORS = (
    "#0072b2",
    "#d55e00",
    "#009e73",
    "#cc79a7",
    "#e69f00",
    "#56b4e9",
    "#7f7f7f",
    "#000000",
    "#f0e442",
    "#8c564b",
)

WIDTH, HEIGHT = 640, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 12, 44


def color(run: int) -> str:
    return COLORS[run % len(COLORS)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers (1, 2 or 5 times a power of ten apart) spanning
    ``low``..``high``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def format_value(value: float, kind: AxisKind) -> str:
    """A tick or hover label: ``12``, ``1.5 MB``, ``90 s``, ``0.25``."""
    if kind == "round":
        return f"{value:g}"
    if kind == "bytes":
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value:.0f} B"
    if kind == "seconds":
        return f"{value:.3g} s" if abs(value) < 600 else f"{value / 60:.3g} min"
    return f"{value:.4g}"


class _Frame:
    """The plot area and its scales."""

    def __init__(self, x: Sequence[float], y: Sequence[float]) -> None:
        self.x_ticks = nice_ticks(min(x), max(x))
        self.y_ticks = nice_ticks(min(y), max(y))
        #: The x range drawn (the outer ticks, unless set: bars are centred on rounds).
        self.x_range = (self.x_ticks[0], self.x_ticks[-1])

    def px(self, value: float) -> float:
        low, high = self.x_range
        span = (high - low) or 1.0
        return LEFT + (value - low) / span * (WIDTH - LEFT - RIGHT)

    def py(self, value: float) -> float:
        low, high = self.y_ticks[0], self.y_ticks[-1]
        span = (high - low) or 1.0
        return HEIGHT - BOTTOM - (value - low) / span * (HEIGHT - TOP - BOTTOM)


def _axes(
    frame: _Frame, figure: Figure, x_labels: bool = True, y_kind: AxisKind | None = None
) -> list[str]:
    parts = []
    for tick in frame.y_ticks:
        y = frame.py(tick)
        parts.append(
            f'<line class="gridline" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        label = format_value(tick, y_kind or figure.y_kind)
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">')
        parts.append(f"{escape(label)}</text>")
    if x_labels:
        for tick in frame.x_ticks:
            x = frame.px(tick)
            parts.append(
                f'<text class="tick" x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                f'text-anchor="middle">{escape(format_value(tick, figure.x_kind))}</text>'
            )
    base = HEIGHT - BOTTOM
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}"/>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{base}"/>')
    middle = (LEFT + WIDTH - RIGHT) / 2
    parts.append(
        f'<text class="label" x="{middle:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{escape(figure.x_label)}</text>"
    )
    centre = (TOP + HEIGHT - BOTTOM) / 2
    parts.append(
        f'<text class="label" transform="translate(14 {centre:.1f}) rotate(-90)" '
        f'text-anchor="middle">{escape(figure.y_label)}</text>'
    )
    return parts


def _line(frame: _Frame, figure: Figure, series: Series) -> list[str]:
    points = " ".join(
        f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in zip(series.x, series.y, strict=True)
    )
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [
        f'<polyline class="series" data-label="{escape(series.label)}" fill="none" '
        f'stroke="{color(series.run)}" stroke-width="2"{dash} points="{points}"/>'
    ]
    if len(series.x) <= 60:
        for x, y in zip(series.x, series.y, strict=True):
            tip = (
                f"{series.label}: {figure.x_label} {format_value(x, figure.x_kind)}, "
                f"{figure.y_label} {format_value(y, figure.y_kind)}"
            )
            parts.append(
                f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3" '
                f'fill="{color(series.run)}"><title>{escape(tip)}</title></circle>'
            )
    return parts


def _lines(figure: Figure) -> list[str]:
    xs = [x for s in figure.series for x in s.x]
    ys = [y for s in figure.series for y in s.y]
    frame = _Frame(xs, ys)
    parts = _axes(frame, figure)
    for series in figure.series:
        parts += _line(frame, figure, series)
    return parts


def _bars(figure: Figure) -> list[str]:
    rounds = sorted({x for s in figure.series for x in s.x})
    counts = [y for s in figure.series for y in s.y]
    frame = _Frame([rounds[0] - 0.5, rounds[-1] + 0.5], [0.0, max(max(counts), 1.0)])
    frame.y_ticks = [t for t in frame.y_ticks if t == int(t)]  # counts are whole
    frame.x_ticks = nice_ticks(rounds[0], rounds[-1]) if len(rounds) > 1 else [rounds[0]]
    frame.x_range = (rounds[0] - 0.5, rounds[-1] + 0.5)
    frame.x_ticks = [t for t in frame.x_ticks if frame.x_range[0] <= t <= frame.x_range[1]]
    parts = _axes(frame, figure)
    slot = (WIDTH - LEFT - RIGHT) / len(rounds)
    width = max(slot * 0.8 / max(len(figure.series), 1), 0.5)
    for index, series in enumerate(figure.series):
        for x, y in zip(series.x, series.y, strict=True):
            if y <= 0:
                continue
            left = frame.px(x) - slot * 0.4 + index * width
            top = frame.py(y)
            tip = f"{series.label}: round {x:g}, {y:g} failures"
            parts.append(
                f'<rect class="bar" x="{left:.1f}" y="{top:.1f}" width="{width:.2f}" '
                f'height="{frame.py(0) - top:.1f}" fill="{color(series.run)}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    return parts


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _box(frame: _Frame, centre: float, width: float, box: Box, index: int) -> list[str]:
    q1, med, q3 = (_quantile(box.values, q) for q in (0.25, 0.5, 0.75))
    low, high = min(box.values), max(box.values)
    stroke = color(box.run)
    fill = "url(#hatch)" if box.hatched else stroke
    opacity = "0.9" if box.hatched else "0.35"
    half = width / 2
    tip = (
        f"{box.label.replace(chr(10), ' ')}: {len(box.values)} clients, median {med:.3f}, "
        f"quartiles {q1:.3f} to {q3:.3f}, range {low:.3f} to {high:.3f}"
    )
    parts = [
        f'<g class="box" data-label="{escape(box.label)}"><title>{escape(tip)}</title>',
        f'<line x1="{centre:.1f}" x2="{centre:.1f}" y1="{frame.py(low):.1f}" '
        f'y2="{frame.py(high):.1f}" stroke="{stroke}"/>',
        f'<rect x="{centre - half:.1f}" y="{frame.py(q3):.1f}" width="{width:.1f}" '
        f'height="{max(frame.py(q1) - frame.py(q3), 1):.1f}" fill="{fill}" '
        f'fill-opacity="{opacity}" stroke="{stroke}"/>',
        f'<line x1="{centre - half:.1f}" x2="{centre + half:.1f}" y1="{frame.py(med):.1f}" '
        f'y2="{frame.py(med):.1f}" stroke="{stroke}" stroke-width="3"/>',
    ]
    for i, value in enumerate(box.values):
        jitter = ((i * 0.618034 + index * 0.3) % 1 - 0.5) * width * 0.8
        parts.append(
            f'<circle cx="{centre + jitter:.1f}" cy="{frame.py(value):.1f}" r="2" '
            f'fill="{stroke}" fill-opacity="0.6"/>'
        )
    parts.append("</g>")
    return parts


def _boxes(figure: Figure) -> list[str]:
    frame = _Frame([0.0, 1.0], [0.0, 1.0])
    values = [v for b in figure.boxes for v in b.values]
    frame.y_ticks = nice_ticks(min(min(values), 0.0), max(max(values), 1.0))
    parts = _axes(frame, figure, x_labels=False)
    slot = (WIDTH - LEFT - RIGHT) / len(figure.boxes)
    for index, box in enumerate(figure.boxes):
        centre = LEFT + slot * (index + 0.5)
        parts += _box(frame, centre, min(slot * 0.5, 60), box, index)
        for line, text in enumerate(box.label.split("\n")[-2:]):
            parts.append(
                f'<text class="tick" x="{centre:.1f}" y="{HEIGHT - BOTTOM + 14 + 11 * line}" '
                f'text-anchor="middle">{escape(_clip(text, slot))}</text>'
            )
    return parts


def _clip(text: str, room: float) -> str:
    most = max(int(room / 6), 4)
    return text if len(text) <= most else text[: most - 1] + "\u2026"


def render(figure: Figure) -> str:
    """``figure`` as one ``<svg>`` element (empty string for an empty figure)."""
    if figure.empty:
        return ""
    body = {"line": _lines, "bar": _bars, "box": _boxes}[figure.kind](figure)
    hatch = (
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#888" stroke-width="2"/></pattern></defs>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'id="svg-{escape(figure.key)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" aria-label="{escape(figure.title)}">'
        f"{hatch if figure.kind == 'box' else ''}{''.join(body)}</svg>"
    )

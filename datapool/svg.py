"""Small hand-written SVG charts for the report page: line, histogram, bars, scatter.

Why hand-written rather than matplotlib: four simple chart kinds, each a few
dozen SVG elements, give a page of a few kB per chart that stays sharp at any
zoom, whose text is real text (searchable, copyable), with no plotting library
to install or to keep away from a display backend. Every function returns one
``<svg>`` element as a string; values are escaped; nothing is fetched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 460, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 26, 42
COLOURS = {
    "pool": "#6b6b6b",
    "new": "#4e79a7",
    "picked": "#e15759",
    "before": "#9aa0a6",
    "after": "#e15759",
    "line": "#4e79a7",
    "bar": "#4e79a7",
    "rule": "#59a14f",
}


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round ticks covering ``[low, high]`` (1, 2 or 5 times a power of 10)."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low] if math.isfinite(low) else [0.0]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Frame:
    """A chart's plotting area and the data ranges it maps to pixels."""

    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return LEFT + (value - self.x0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return HEIGHT - BOTTOM - (value - self.y0) / span * (HEIGHT - TOP - BOTTOM)


def _axes(frame: Frame, title: str, x_label: str, y_label: str, *, x_ticks: bool = True) -> str:
    """Title, axis lines, tick labels and axis names of ``frame``."""
    parts = [f'<text x="{WIDTH / 2}" y="16" class="title">{escape(title)}</text>']
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts.append(f'<path d="M{LEFT},{TOP} V{bottom} H{right}" class="axis"/>')
    for tick in nice_ticks(frame.y0, frame.y1):
        y = frame.y(tick)
        parts.append(f'<path d="M{LEFT - 4},{y:.1f} H{right}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="ytick">{_fmt(tick)}</text>')
    for tick in nice_ticks(frame.x0, frame.x1) if x_ticks else []:
        x = frame.x(tick)
        parts.append(f'<text x="{x:.1f}" y="{bottom + 15}" class="xtick">{_fmt(tick)}</text>')
    parts.append(
        f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" class="label">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text transform="translate(13,{(TOP + bottom) / 2}) rotate(-90)" '
        f'class="label">{escape(y_label)}</text>'
    )
    return "".join(parts)


def _svg(name: str, body: str) -> str:
    return (
        f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">{body}</svg>'
    )


def colour(series: str) -> str:
    """The colour of a series: by the first word of its name (``"after (picks at 0)"``)."""
    return COLOURS.get(series.split(" ")[0].rstrip(","), COLOURS["bar"])


def legend(items: Sequence[tuple[str, str]], *, x: float = WIDTH - RIGHT - 130) -> str:
    """Coloured squares with names, top right: ``[(name, colour)]``."""
    return "".join(
        f'<rect x="{x}" y="{TOP + 4 + 15 * i}" width="10" height="10" fill="{c}"/>'
        f'<text x="{x + 14}" y="{TOP + 13 + 15 * i}" class="legend">{escape(n)}</text>'
        for i, (n, c) in enumerate(items)
    )


def line_chart(
    name: str,
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    title: str,
    x_label: str,
    y_label: str,
    rules: Sequence[tuple[float, str]] = (),
) -> str:
    """Points joined by a line; ``rules`` are labelled horizontal lines ``[(y, text)]``."""
    finite = [y for y in ys if math.isfinite(y)] + [r for r, _ in rules]
    top = max(finite, default=1.0) * 1.05 or 1.0
    frame = Frame(min(xs, default=0.0), max(xs, default=1.0), 0.0, top)
    pts = [(frame.x(x), frame.y(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    body = [_axes(frame, title, x_label, y_label)]
    if pts:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS["line"]}"/>')
        body.extend(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{COLOURS["line"]}"/>'
            for x, y in pts[:500]
        )
    for value, text in rules:
        y = frame.y(value)
        body.append(
            f'<path d="M{LEFT},{y:.1f} H{WIDTH - RIGHT}" class="rule"/>'
            f'<text x="{WIDTH - RIGHT - 2}" y="{y - 3:.1f}" class="rulelabel">'
            f"{escape(text)}</text>"
        )
    return _svg(name, "".join(body))


def histogram_chart(
    name: str,
    centres: Sequence[float],
    series: dict[str, Sequence[int]],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> str:
    """Overlaid translucent bar histograms on shared bins (``series``: name -> counts)."""
    width = (centres[1] - centres[0]) if len(centres) > 1 else 1.0
    # Head room above the tallest bar for the legend.
    top = max((max(c, default=0) for c in series.values()), default=0) * 1.3 or 1.0
    frame = Frame(
        min(centres, default=0.0) - width / 2, max(centres, default=1.0) + width / 2, 0.0, top
    )
    body = [_axes(frame, title, x_label, y_label)]
    for key, counts in series.items():
        fill = colour(key)
        for centre, count in zip(centres, counts, strict=True):
            if count:
                x, y = frame.x(centre - width / 2), frame.y(count)
                w = frame.x(centre + width / 2) - x
                body.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w - 1, 1):.1f}" '
                    f'height="{frame.y(0) - y:.1f}" fill="{fill}" opacity="0.6"/>'
                )
    body.append(legend([(k, colour(k)) for k in series]))
    return _svg(name, "".join(body))


def bar_chart(
    name: str,
    labels: Sequence[str],
    values: Sequence[int],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> str:
    """Vertical bars, one per label, in the given order."""
    n = max(len(labels), 1)
    frame = Frame(0.0, float(n), 0.0, max(values, default=0) * 1.05 or 1.0)
    body = [_axes(frame, title, x_label, y_label, x_ticks=False)]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        x, y = frame.x(i + 0.1), frame.y(value)
        w = frame.x(i + 0.9) - x
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{frame.y(0) - y:.1f}"'
            f' fill="{COLOURS["bar"]}"><title>{escape(label)}: {value}</title></rect>'
        )
        if n <= 40:
            body.append(
                f'<text x="{x + w / 2:.1f}" y="{HEIGHT - BOTTOM + 13}" class="xtick">'
                f"{escape(label[:8])}</text>"
            )
    return _svg(name, "".join(body))


def scatter_chart(
    name: str,
    groups: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> str:
    """Points of each group (``name -> (xs, ys)``) in its colour, later groups on top."""
    xs = [x for gx, _ in groups.values() for x in gx] or [0.0, 1.0]
    ys = [y for _, gy in groups.values() for y in gy] or [0.0, 1.0]
    pad_x, pad_y = (max(xs) - min(xs)) * 0.05 or 1.0, (max(ys) - min(ys)) * 0.05 or 1.0
    # Room on the right for the legend, so it covers no point.
    frame = Frame(min(xs) - pad_x, max(xs) + 8 * pad_x, min(ys) - pad_y, max(ys) + pad_y)
    body = [_axes(frame, title, x_label, y_label)]
    for key, (gx, gy) in groups.items():
        fill = colour(key)
        radius = 3.5 if key == "picked" else 2.5
        body.extend(
            f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="{radius}" '
            f'fill="{fill}" opacity="0.75"/>'
            for x, y in zip(gx, gy, strict=True)
        )
    body.append(legend([(k, colour(k)) for k in groups]))
    return _svg(name, "".join(body))

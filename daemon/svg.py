"""Charts drawn on the server as SVG text, for the dashboard (`benchsync.daemon.web`).

No JavaScript and no CDN: a chart is a string of SVG that the page embeds, so
it renders offline, in any browser, and tests can count its marks. Every
label is escaped here; callers pass values as they came (from peers too).

`bar_chart` draws one horizontal bar per `Bar` (class `bar`, one per group),
scaled to the largest value, with the label on the left and the value on the
right; each bar carries its label and value in a `<title>` (shown on hover).
`line_chart` draws one `polyline.series` per `Series` over time, a
`circle.point` per point and a `circle.flag` ring on a flagged series' latest
point (a regression).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

BAR_HEIGHT = 18  # pixels per bar
BAR_GAP = 6  # pixels between bars
LABEL_WIDTH = 260  # pixels for the labels left of the bars
VALUE_WIDTH = 90  # pixels for the values right of the bars
PLOT_WIDTH = 420  # pixels the longest bar takes
TITLE_HEIGHT = 24  # pixels above the first bar
MAX_LABEL_CHARS = 40  # a longer label is cut (its <title> keeps it whole)
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")


@dataclass(frozen=True)
class Bar:
    """One mark: `label` (untrusted text), `value` (None or NaN draws an empty bar),
    `series` picks its colour (e.g. the hardware type)."""

    label: str
    value: float | None
    series: str = ""


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3g}"


def bar_chart(bars: Sequence[Bar], *, title: str, unit: str, chart_id: str) -> str:
    """An SVG element (a string) with one `rect.bar` per bar, in the given order.

    `title` and `unit` are shown above the bars; `chart_id` becomes the element's
    id (a fixed name of ours, not outside text).
    """
    finite = [b.value for b in bars if b.value is not None and math.isfinite(b.value)]
    top = max([v for v in finite if v > 0], default=1.0)
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(dict.fromkeys(b.series
                                                                            for b in bars))}
    width = LABEL_WIDTH + PLOT_WIDTH + VALUE_WIDTH
    height = TITLE_HEIGHT + len(bars) * (BAR_HEIGHT + BAR_GAP) + BAR_GAP
    out = [
        f'<svg id="{escape(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="0" y="16" class="chart-title">{escape(title)} ({escape(unit)})</text>',
    ]
    for i, bar in enumerate(bars):
        y = TITLE_HEIGHT + i * (BAR_HEIGHT + BAR_GAP)
        value = bar.value if bar.value is not None and math.isfinite(bar.value) else 0.0
        length = max(0.0, value) / top * PLOT_WIDTH
        label = bar.label
        if len(label) > MAX_LABEL_CHARS:
            label = label[: MAX_LABEL_CHARS - 1] + "…"
        shown = _number(bar.value)
        out.append(
            f'<g class="mark"><title>{escape(bar.label)}: {escape(shown)} {escape(unit)}</title>'
            f'<text x="{LABEL_WIDTH - 6}" y="{y + BAR_HEIGHT - 5}" text-anchor="end" '
            f'class="label">{escape(label)}</text>'
            f'<rect class="bar" x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" '
            f'height="{BAR_HEIGHT}" fill="{colours[bar.series]}"/>'
            f'<text x="{LABEL_WIDTH + length + 4:.1f}" y="{y + BAR_HEIGHT - 5}" '
            f'class="value">{escape(shown)}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)


# --- line charts ----------------------------------------------------------------------------

LINE_WIDTH = 640  # pixels of the plot area of a line chart
LINE_HEIGHT = 260  # pixels of its height
AXIS_LEFT = 70  # pixels left of the plot for the value axis
AXIS_BOTTOM = 36  # pixels below the plot for the time axis
LEGEND_WIDTH = 300  # pixels right of the plot for the legend
LEGEND_ROW = 18  # pixels per legend entry
Y_TICKS = 4  # value gridlines above zero
POINT_RADIUS = 3  # pixels
FLAG_RADIUS = 7  # pixels of the ring around a flagged (regressed) latest point


@dataclass(frozen=True)
class Series:
    """One line: `label` (untrusted text) and its `points` as (time in seconds since
    the epoch, value), oldest first; `flagged` rings its latest point (a regression)."""

    label: str
    points: Sequence[tuple[float, float]]
    flagged: bool = False


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def line_chart(series: Sequence[Series], *, title: str, unit: str, chart_id: str) -> str:
    """An SVG element (a string): one `polyline.series` per series (in order; one
    point draws no line but is still one polyline), one `circle.point` per point,
    one `circle.flag` ring on the latest point of each flagged series, and a legend.

    Time runs left to right over the range of every point (UTC labels at both
    ends); values from zero up to the largest. `chart_id` is a fixed name of ours.
    """
    finite = [(t, v) for s in series for t, v in s.points if math.isfinite(t) and math.isfinite(v)]
    t0 = min((t for t, _ in finite), default=0.0)
    t1 = max((t for t, _ in finite), default=1.0)
    top = max([v for _, v in finite if v > 0], default=1.0)
    span = t1 - t0 if t1 > t0 else 1.0
    title_h = TITLE_HEIGHT + 8  # room for the top value label
    plot_h = LINE_HEIGHT
    width = AXIS_LEFT + LINE_WIDTH + LEGEND_WIDTH
    legend_h = title_h + len(series) * LEGEND_ROW
    height = max(title_h + plot_h + AXIS_BOTTOM, legend_h + BAR_GAP)

    def x(t: float) -> float:
        middle = not t1 > t0  # one instant: in the middle
        return AXIS_LEFT + (LINE_WIDTH / 2 if middle else (t - t0) / span * LINE_WIDTH)

    def y(v: float) -> float:
        return title_h + plot_h - max(0.0, v) / top * plot_h

    out = [
        f'<svg id="{escape(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="0" y="16" class="chart-title">{escape(title)} ({escape(unit)})</text>',
    ]
    for i in range(Y_TICKS + 1):
        v = top * i / Y_TICKS
        out.append(
            f'<line class="grid" x1="{AXIS_LEFT}" x2="{AXIS_LEFT + LINE_WIDTH}" '
            f'y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
            f'<text x="{AXIS_LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end" '
            f'class="tick">{escape(_number(v))}</text>'
        )
    bottom = title_h + plot_h
    if finite:
        out.append(
            f'<text x="{AXIS_LEFT}" y="{bottom + 18}" class="tick">{escape(_date(t0))}</text>'
            f'<text x="{AXIS_LEFT + LINE_WIDTH}" y="{bottom + 18}" text-anchor="end" '
            f'class="tick">{escape(_date(t1))} UTC</text>'
        )
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        points = [(t, v) for t, v in s.points if math.isfinite(t) and math.isfinite(v)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        marks = "".join(
            f'<circle class="point" cx="{x(t):.1f}" cy="{y(v):.1f}" r="{POINT_RADIUS}" '
            f'fill="{colour}"><title>{escape(s.label)}: {escape(_number(v))} {escape(unit)} '
            f"at {escape(_date(t))} UTC</title></circle>"
            for t, v in points
        )
        if s.flagged and points:
            t, v = points[-1]
            marks += (f'<circle class="flag" cx="{x(t):.1f}" cy="{y(v):.1f}" r="{FLAG_RADIUS}" '
                      'fill="none" stroke="#b00020" stroke-width="2"><title>regression: '
                      f"{escape(s.label)}</title></circle>")  # fmt: skip
        label = s.label if len(s.label) <= MAX_LABEL_CHARS else s.label[: MAX_LABEL_CHARS - 1] + "…"
        ly = title_h + i * LEGEND_ROW + 12
        lx = AXIS_LEFT + LINE_WIDTH + 16
        flag = " ⚑" if s.flagged else ""
        out.append(
            f'<g class="line{" regressed" if s.flagged else ""}"><title>{escape(s.label)}</title>'
            f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" '
            f'stroke-width="2"/>{marks}'
            f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{ly}" class="legend">{escape(label)}{flag}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)

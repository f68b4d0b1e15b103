"""Charts drawn on the server as SVG text, for the dashboard (`benchsync.daemon.web`).

No JavaScript and no CDN: a chart is a string of SVG that the page embeds, so
it renders offline, in any browser, and tests can count its marks. Every
label is escaped here; callers pass values as they came (from peers too).

`bar_chart` draws one horizontal bar per `Bar` (class `bar`, one per group),
scaled to the largest value, with the label on the left and the value on the
right; each bar carries its label and value in a `<title>` (shown on hover).
"""

from __future__ import annotations

import math
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

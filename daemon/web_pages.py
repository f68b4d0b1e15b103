"""The dashboard's HTML: pages rendered on the server, readable without JavaScript.

Every function here takes data (dicts as the JSON endpoints return them) and
returns HTML text; nothing here queries or does I/O. Every value is escaped
on its way into the page (`_e`, `_attr`): model names, addresses and errors
come from peers and are untrusted. Links carry the page's state as query
parameters (filters, sort), so sorting and filtering are plain links and a
plain GET form. Charts come from `benchsync.daemon.svg`.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from benchsync.daemon.svg import Bar, Series, bar_chart, line_chart

SHORT_ID_HEAD = 8  # characters of a peer ID shown before the ellipsis
SHORT_ID_TAIL = 6  # characters shown after it
LAB_REFRESH = 10  # seconds between reloads of the Lab page (meta refresh, no JavaScript)
MAX_MODELS_SHOWN = 12  # models listed per node on the Lab page

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{background:#263238;color:#fff;padding:8px 16px}
header a{color:#cfd8dc;margin-right:16px;text-decoration:none}
header a.active{color:#fff;font-weight:bold}
main{padding:12px 16px}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th a{color:inherit}
.err{color:#b00020}
.muted{color:#777}
code{font-size:12px}
form label{margin-right:10px}
.chart text{font:12px system-ui,sans-serif}
.chart .chart-title{font-weight:bold}
tr.regressed td{background:#fde7e9}
"""

NAV = (("lab", "/", "Lab"), ("results", "/results", "Results"), ("trends", "/trends", "Trends"),
       ("versions", "/versions", "Versions"))


def _e(value: Any) -> str:
    """`value` as text safe between tags ("" for None)."""
    return "" if value is None else escape(str(value), quote=False)


def _attr(value: Any) -> str:
    """`value` as text safe inside a double-quoted attribute."""
    return "" if value is None else escape(str(value), quote=True)


def short_id(peer_id: str) -> str:
    """A peer ID's short form, with the whole ID on hover."""
    if len(peer_id) <= SHORT_ID_HEAD + SHORT_ID_TAIL + 1:
        shown = peer_id
    else:
        shown = f"{peer_id[:SHORT_ID_HEAD]}…{peer_id[-SHORT_ID_TAIL:]}"
    return f'<abbr class="peer" title="{_attr(peer_id)}">{_e(shown)}</abbr>'


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(n)


def layout(title: str, active: str, body: str, *, refresh: int | None = None) -> str:
    """A whole page: head (title, style, optional meta refresh), navigation, `body` (HTML)."""
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == active else ""}>{_e(label)}</a>'
        for key, href, label in NAV
    )
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)} · benchsync</title>{meta}"
        f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head>'
        f"<body><header><strong>benchsync</strong> &nbsp; {nav}</header>"
        f"<main><h1>{_e(title)}</h1>{body}</main></body></html>\n"
    )


def error_page(status: int, message: str, hint: str | None) -> str:
    """The page of an error (a bad filter, a query that failed)."""
    body = f'<p class="err" id="error">{_e(message)}</p>'
    if hint:
        body += f"<p>Try: {_e(hint)}</p>"
    return layout(f"Error {status}", "", body)


# --- Lab -----------------------------------------------------------------------------------


def lab_page(lab: Mapping[str, Any]) -> str:
    """This node and every node it knows: identity, addresses, head, replica lag, errors."""
    rows = []
    for n in lab["nodes"]:
        addrs = "<br>".join(f"<code>{_e(a)}</code>" for a in n["addrs"]) or (
            '<span class="muted">none known</span>'
        )
        models = n["models"][:MAX_MODELS_SHOWN]
        more = len(n["models"]) - len(models)
        models_html = ", ".join(_e(m) for m in models) + (f" and {more} more" if more > 0 else "")
        lag = "" if n["lag_seq"] is None else f"{n['lag_seq']} ({n['lag_seconds']:.1f} s)"
        role = "this node" if n["self"] else ("connected" if n["connected"] else "not connected")
        error = f'<span class="err">{_e(n["last_error"])}</span>' if n["last_error"] else ""
        cid = f'<code title="{_attr(n["head_cid"])}">{_e(n["head_cid"])}</code>' if n[
            "head_cid"] else ""  # fmt: skip
        rows.append(
            f'<tr class="node" data-peer="{_attr(n["peer_id"])}">'
            f"<td>{short_id(n['peer_id'])}</td><td>{_e(role)}</td><td>{addrs}</td>"
            f'<td class="num">{_number(n["head_seq"])}</td><td>{cid}</td>'
            f'<td class="num">{_e(lag)}</td><td>{error}</td>'
            f'<td class="num">{_bytes(n["replica_bytes"])}</td>'
            f'<td class="num">{_number(n["results"])}</td><td class="models">{models_html}</td>'
            "</tr>"
        )
    head = "".join(f"<th>{_e(c)}</th>" for c in (
        "Peer", "Role", "Addresses", "Head seq", "Head CID", "Replica lag (seq, time)",
        "Last sync error", "Replica bytes", "Results", "Models",
    ))  # fmt: skip
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lab["generated_at"]))
    body = (
        f'<p>Network <code>{_e(lab["network"])}</code>: {len(lab["nodes"])} nodes. '
        f"This node received {_bytes(lab['received_bytes'])} and served "
        f"{_bytes(lab['served_bytes'])} of blocks. "
        f'<span class="muted">Updated {_e(generated)}; reloads every {LAB_REFRESH} s.</span></p>'
        f'<table id="nodes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )
    return layout("Lab", "lab", body + _lab_regressions(lab), refresh=LAB_REFRESH)


def _lab_regressions(lab: Mapping[str, Any]) -> str:
    """The current regressions across the lab (the Trends page's flags), each a link
    to its Trends view."""
    items = []
    for r in lab.get("regressions", ()):
        heading, unit = TREND_METRICS[r["metric"]]
        href = "/trends?" + _query({"metric": r["metric"], "model": r["model"],
                                    "hardware": r["hardware"]})  # fmt: skip
        items.append(
            f'<li class="regression" data-metric="{_attr(r["metric"])}">'
            f'<a href="{_attr(href)}">{_e(r["model"])} · {_e(r["hardware"])}</a>: '
            f"{_e(heading.lower())} {_number(r['latest'], 2)} vs {_number(r['baseline'], 2)} "
            f"{_e(unit)} ({_e(_percent(r['change']))})</li>"
        )
    out = "<h2>Regressions</h2>"
    if items:
        out += f'<ul id="regressions">{"".join(items)}</ul>'
    else:
        out += '<p id="no-regressions">No regressions.</p>'
    unchecked = lab.get("regressions_unchecked") or []
    if unchecked:
        out += (f'<p class="err" id="regressions-unchecked">Not checked (too many points): '
                f"{_e(', '.join(unchecked))}; see Trends with filters.</p>")  # fmt: skip
    return out


# --- Results -------------------------------------------------------------------------------

RESULT_COLUMNS = (  # (key, heading, numeric)
    ("model", "Model", False),
    ("hardware", "Hardware", False),
    ("runs", "Runs", True),
    ("nodes", "Nodes", True),
    ("throughput", "Throughput (items/s)", True),
    ("latency_ms", "Latency (ms)", True),
)
FILTER_LABELS = (
    ("model", "Model"), ("hardware", "Hardware"), ("precision", "Precision"),
    ("batch_size", "Batch size"), ("origin", "Origin node"),
)  # fmt: skip


def _query(params: Mapping[str, Any]) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _select(name: str, label: str, current: str, values: Sequence[tuple[str, str]],
            any_label: str | None = "all") -> str:  # fmt: skip
    """A labelled <select> of (value, shown) pairs, `current` selected ("" with
    `any_label`: a first choice meaning any)."""
    choices = [] if any_label is None else [
        f'<option value=""{" selected" if current == "" else ""}>{_e(any_label)}</option>']
    for v, shown in values:
        selected = " selected" if v == current else ""
        choices.append(f'<option value="{_attr(v)}"{selected}>{_e(shown)}</option>')
    return f'<label>{_e(label)} <select name="{name}">{"".join(choices)}</select></label>'


def _filter_selects(filters: Mapping[str, Any], options: Mapping[str, Sequence[str]]) -> str:
    """One menu per filter (FILTER_LABELS), the current value selected even when no
    row has it any more."""
    selects = []
    for key, label in FILTER_LABELS:
        current = "" if filters.get(key) is None else str(filters[key])
        values = list(options.get(key, ()))
        if current and current not in values:
            values.append(current)
        shown = [(v, v if key != "origin" else f"{v[:SHORT_ID_HEAD]}…{v[-SHORT_ID_TAIL:]}")
                 for v in values]  # fmt: skip
        selects.append(_select(key, label, current, shown))
    return "".join(selects)


def results_page(results: Mapping[str, Any], options: Mapping[str, Sequence[str]]) -> str:
    """Filters (a GET form), bar charts of throughput and latency (one bar per group
    shown), the sortable table and a link to the CSV of the same groups."""
    filters: Mapping[str, Any] = results["filters"]
    sort, order = results["sort"], results["order"]
    groups = results["groups"]

    form = (
        f'<form id="filters" method="get" action="/results">{_filter_selects(filters, options)}'
        f'<input type="hidden" name="sort" value="{_attr(sort)}">'
        f'<input type="hidden" name="order" value="{_attr(order)}">'
        '<button type="submit">Filter</button> <a href="/results">clear</a></form>'
    )

    state = {**filters, "sort": sort, "order": order}
    heads = []
    for key, heading, numeric in RESULT_COLUMNS:
        if key == sort:  # the same column again: the other way round
            next_order = "asc" if order == "desc" else "desc"
        else:  # largest numbers first, names from A
            next_order = "desc" if numeric else "asc"
        arrow = (" ▼" if order == "desc" else " ▲") if key == sort else ""
        href = "/results?" + _query({**state, "sort": key, "order": next_order})
        heads.append(f'<th><a class="sort" data-sort="{key}" href="{_attr(href)}">'
                     f"{_e(heading)}{arrow}</a></th>")  # fmt: skip
    rows = []
    for g in groups:
        cells = []
        for key, _, numeric in RESULT_COLUMNS:
            value = g[key]
            cells.append(f'<td class="num">{_number(value, 2)}</td>' if numeric
                         else f"<td>{_e(value)}</td>")  # fmt: skip
        rows.append(f'<tr class="group">{"".join(cells)}</tr>')
    table = (
        f'<table id="results"><thead><tr>{"".join(heads)}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>'
    )
    def bars(measure: str) -> list[Bar]:
        return [Bar(f"{g['model']} · {g['hardware']}", g[measure], g["hardware"]) for g in groups]

    charts = (
        bar_chart(bars("throughput"), title="Mean throughput", unit="items/s",
                  chart_id="throughput-chart")
        + "<br>"
        + bar_chart(bars("latency_ms"), title="Mean latency", unit="ms", chart_id="latency-chart")
    )  # fmt: skip
    csv_href = "/results.csv?" + _query(state)
    count = len(groups)
    summary = (
        f'<p id="summary">{count} groups (model × hardware) over {results["runs"]:,} results '
        f'from every node\'s rows (replicas scope). <a id="csv" href="{_attr(csv_href)}" '
        f'download>Download CSV</a></p>'
    )
    if results["truncated"]:
        summary += (f'<p class="err">Showing the first {count} of {results["total_groups"]} '
                    "groups: narrow the filters.</p>")  # fmt: skip
    if not groups:
        charts = '<p class="muted" id="empty">No results match these filters.</p>'
    return layout("Results", "results", form + summary + charts + table)


# --- Trends --------------------------------------------------------------------------------


TREND_METRICS = {"throughput": ("Throughput", "items/s"), "latency_ms": ("Latency", "ms")}


def _series_label(s: Mapping[str, Any]) -> str:
    """A series' label (plain text): model · hardware, and the short origin node if split."""
    label = f"{s['model']} · {s['hardware']}"
    origin = s.get("origin")
    if origin:
        short = origin if len(origin) <= SHORT_ID_HEAD + SHORT_ID_TAIL + 1 else (
            f"{origin[:SHORT_ID_HEAD]}…{origin[-SHORT_ID_TAIL:]}")  # fmt: skip
        label += f" · {short}"
    return label


def _percent(change: float | None) -> str:
    return "" if change is None else f"{change:+.1f} %"


def trends_page(trends: Mapping[str, Any], options: Mapping[str, Sequence[str]],
                max_shown: int) -> str:  # fmt: skip
    """The metric over time (one line per model x hardware, or per model x hardware x
    origin node with `by=origin`; at most `max_shown`, regressed ones first), the list
    of regressions and a table of every series."""
    filters: Mapping[str, Any] = trends["filters"]
    metric = trends["metric"]
    heading, unit = TREND_METRICS[metric]
    metrics = [(key, f"{h} ({u})") for key, (h, u) in TREND_METRICS.items()]
    by_origin = trends.get("by") == "origin"
    splits = [("", "model × hardware"), ("origin", "model × hardware × origin node")]
    form = (
        '<form id="filters" method="get" action="/trends">'
        f"{_select('metric', 'Metric', metric, metrics, any_label=None)}"
        f"{_filter_selects(filters, options)}"
        f"{_select('by', 'One line per', 'origin' if by_origin else '', splits, any_label=None)}"
        '<button type="submit">Show</button> '
        '<a href="/trends">clear</a></form>'
    )
    series = trends["series"]
    threshold = trends["threshold_percent"]
    worse = "lower" if trends["higher_is_better"] else "higher"
    regressed = [s for s in series if s["regressed"]]
    summary = (
        f'<p id="summary">{len(series)} series '
        f"(model × hardware{' × origin node' if by_origin else ''}) from every node's rows; "
        f"a point is the mean of the results in one of {trends['buckets']} equal spans of "
        f"time. A series is flagged when its latest point is {worse} than the median of "
        f"its previous {trends['baseline_points']} points by more than {threshold:g} % "
        "(setting web_regression_threshold).</p>"
    )
    if regressed:
        items = "".join(
            f'<li class="regression">{_e(_series_label(s))}: '
            f"{_number(s['latest'], 2)} vs {_number(s['baseline'], 2)} {_e(unit)} "
            f"({_e(_percent(s['change']))})</li>" for s in regressed
        )
        summary += f'<h2>Regressions</h2><ul id="regressions">{items}</ul>'
    else:
        summary += '<p id="no-regressions">No regressions.</p>'
    shown = series[:max_shown]
    if len(series) > len(shown):
        summary += (f'<p class="err">Drawing the first {len(shown)} of {len(series)} series: '
                    "narrow the filters.</p>")  # fmt: skip
    chart = line_chart(
        [Series(_series_label(s), [(p["t"], p["value"]) for p in s["points"]],
                s["regressed"]) for s in shown],
        title=heading, unit=unit, chart_id="trend-chart",
    ) if series else '<p class="muted" id="empty">No results match these filters.</p>'  # fmt: skip
    head = "".join(f"<th>{_e(c)}</th>" for c in (
        "Model", "Hardware", *(("Origin",) if by_origin else ()), "Points", "Runs",
        f"Latest ({unit})", f"Baseline ({unit})", "Change", "Regression",
    ))  # fmt: skip
    rows = []
    for s in series:
        flag = "yes" if s["regressed"] else "no"
        origin = f'<td class="origin">{short_id(s["origin"] or "")}</td>' if by_origin else ""
        rows.append(
            f'<tr class="series{" regressed" if s["regressed"] else ""}" data-regressed="{flag}">'
            f"<td>{_e(s['model'])}</td><td>{_e(s['hardware'])}</td>"
            f"{origin}"
            f'<td class="num">{len(s["points"])}</td><td class="num">{_number(s["runs"])}</td>'
            f'<td class="num">{_number(s["latest"], 2)}</td>'
            f'<td class="num">{_number(s["baseline"], 2)}</td>'
            f'<td class="num">{_e(_percent(s["change"]))}</td><td>{flag}</td></tr>'
        )
    table = (f'<table id="series"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')  # fmt: skip
    return layout("Trends", "trends", form + summary + chart + table)


# --- Versions ------------------------------------------------------------------------------


def short_cid(cid: str) -> str:
    """A CID's short form, with the whole CID on hover."""
    shown = cid if len(cid) <= 2 * SHORT_ID_TAIL + 1 else f"{cid[:8]}…{cid[-SHORT_ID_TAIL:]}"
    return f'<code class="cid" title="{_attr(cid)}">{_e(shown)}</code>'


def versions_page(versions: Mapping[str, Any]) -> str:
    """This node's history, newest first: seq, CID, time, rows per table with the
    change since the version before, tags, pinned, thinned."""
    entries = versions["versions"]
    tables = sorted({t for v in entries for t, n in v["rows"].items() if n})
    head = "".join(f"<th>{_e(c)}</th>" for c in ("Seq", "CID", "Created", *tables, "Bytes",
                                                 "Tags", "Kept"))  # fmt: skip
    rows = []
    for v in entries:
        change = v["rows_change"] or {}
        cells = []
        for t in tables:
            delta = change.get(t)
            more = f' <span class="muted delta">({delta:+,})</span>' if delta else ""
            cells.append(f'<td class="num rows" data-table="{_attr(t)}">'
                         f"{_number(v['rows'].get(t, 0))}{more}</td>")  # fmt: skip
        kept = [w for w, on in (("pinned", v["pinned"]), ("thinned", v["thinned"])) if on]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created_at"]))
        tags = ", ".join(f'<span class="tag">{_e(t)}</span>' for t in v["tags"])
        rows.append(
            f'<tr class="version" data-seq="{int(v["seq"])}" data-cid="{_attr(v["cid"])}">'
            f'<td class="num">{int(v["seq"])}</td><td>{short_cid(v["cid"])}</td>'
            f"<td>{_e(created)}</td>{''.join(cells)}"
            f'<td class="num">{_bytes(v["bytes"])}</td><td>{tags}</td>'
            f"<td>{_e(', '.join(kept))}</td></tr>"
        )
    body = (
        f"<p>The history of this node ({short_id(versions['peer_id'])}), newest first: "
        f"{len(entries)} versions. Rows per table, with the change since the version "
        "before in brackets. Thinned versions keep only their manifest.</p>"
    )
    if versions["truncated"]:
        body += (f'<p class="muted">Showing the newest {len(entries)}; `benchsync log` '
                 "lists all.</p>")  # fmt: skip
    body += (f'<table id="versions"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')  # fmt: skip
    return layout("Versions", "versions", body)

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

from benchsync.daemon.svg import Bar, bar_chart

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
"""

NAV = (("lab", "/", "Lab"), ("results", "/results", "Results"))


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
    return layout("Lab", "lab", body, refresh=LAB_REFRESH)


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


def results_page(results: Mapping[str, Any], options: Mapping[str, Sequence[str]]) -> str:
    """Filters (a GET form), bar charts of throughput and latency (one bar per group
    shown), the sortable table and a link to the CSV of the same groups."""
    filters: Mapping[str, Any] = results["filters"]
    sort, order = results["sort"], results["order"]
    groups = results["groups"]

    selects = []
    for key, label in FILTER_LABELS:
        current = "" if filters.get(key) is None else str(filters[key])
        choices = [f'<option value=""{" selected" if current == "" else ""}>all</option>']
        values = list(options.get(key, ()))
        if current and current not in values:
            values.append(current)
        for v in values:
            selected = " selected" if v == current else ""
            shown = v if key != "origin" else f"{v[:SHORT_ID_HEAD]}…{v[-SHORT_ID_TAIL:]}"
            choices.append(f'<option value="{_attr(v)}"{selected}>{_e(shown)}</option>')
        selects.append(
            f'<label>{_e(label)} <select name="{key}">{"".join(choices)}</select></label>'
        )
    form = (
        f'<form id="filters" method="get" action="/results">{"".join(selects)}'
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

"""The lab dashboard: a read-only web listener of the node (`--web-listen HOST:PORT`).

Owns the dashboard's listener (`WebServer`), its routes (`web_router`) and the
data behind each page (`Dashboard`): the Lab page reads the node's own state
(no query), the Results page aggregates every node's rows in DuckDB, in the
`replicas` scope, through the node's one query gate and sandbox workers
(`QueryService.query`): rows never reach the browser, only groups. The
Trends page aggregates a metric per model x hardware per time bucket (one
point each) and flags a series whose latest point is worse than the median of
its previous points by more than `web_regression_threshold` percent; the
Versions page reads the node's own history (`Node.history`, tags, pins).

The listener is the control API's server (`benchsync.daemon.control`: h11,
deadlines, connection limits, a watched handler) on TCP only, with its own
routes and answers: HTML pages, CSV and JSON. It is read-only: GET and HEAD
are served, every other method is answered 405 whatever the path. With
`web_token` set, every request needs it (HTTP Basic password, any user name,
which browsers ask for; or `Authorization: Bearer`), checked before a body is
read. Pages are HTML with SVG charts drawn on the server (`web_pages`,
`svg`), so they need no JavaScript and no network beyond the node; a strict
Content-Security-Policy forbids scripts altogether.

Routes: `/` (Lab), `/results`, `/results.csv`, `/trends`, `/versions`, and
`/api/lab`, `/api/results`, `/api/trends`, `/api/versions` (the same data as JSON).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import dataclasses
import hmac
import io
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import h11
import trio

from benchsync.daemon.api import answering
from benchsync.daemon.control import (
    JSON_TYPE,
    REFUSE_TIMEOUT,
    SERVER_NAME,
    ApiError,
    Connection,
    ControlServer,
    ControlSocketError,
    Request,
    Router,
    Text,
    open_tcp_listeners,
)
from benchsync.daemon.web_pages import (
    error_page,
    lab_page,
    results_page,
    trends_page,
    versions_page,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from benchsync.daemon.node import Node

MAX_WEB_CONNECTIONS = 32  # served at once; more are answered 503 and closed at once
MAX_WEB_BODY_BYTES = 4 * 1024  # bytes; no route takes a body (a larger one gets 413)
MAX_FILTER_CHARS = 200  # characters of one filter value (longer: 400)
MAX_GROUPS_SHOWN = 200  # groups (model x hardware) on the page, in the chart and the CSV
MAX_GROUPS = 10_000  # groups aggregated at most; more is an error asking for filters
MAX_OPTIONS = 5_000  # distinct values offered in the filter menus, all fields together
TREND_BUCKETS = 120  # points per series at most: the time range in this many equal buckets
TREND_BASELINE = 10  # previous points whose median is a series' baseline
MAX_TREND_POINTS = 50_000  # points aggregated at most; more is an error asking for filters
MAX_SERIES_SHOWN = 24  # series drawn in the Trends chart (the table lists them all)
MAX_VERSIONS_SHOWN = 200  # versions on the Versions page, newest first
READ_METHODS = ("GET", "HEAD")
HTTP_STATUSES = frozenset(s.value for s in HTTPStatus)
HTML_TYPE = "text/html; charset=utf-8"
CSV_TYPE = "text/csv; charset=utf-8"
# Nothing runs in a page: no script, no plugin, no outside resource, no framing.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)  # fmt: skip

log = logging.getLogger(__name__)

# --- the listener -------------------------------------------------------------------------


class WebListenError(ControlSocketError):
    """The dashboard's address (setting `web_listen`) cannot be listened on."""

    def __init__(self, address: tuple[str, int], message: str, hint: str) -> None:
        super().__init__(Path(), message, hint, where=f"web_listen {address[0]}:{address[1]}")
        self.address = address


@dataclasses.dataclass(frozen=True)
class Download(Text):
    """A body the browser saves as `filename` (Content-Disposition: attachment)."""

    filename: str = "download"


class WebServer(ControlServer):
    """Serves a `Router` read-only on one TCP address (no Unix socket; `socket_path`
    is unused), with the control server's deadlines and connection limit.

    `token`, when set, is asked of every request (`authorize`).
    """

    name: ClassVar[str] = "dashboard"

    def __init__(self, router: Router, address: tuple[str, int], token: str | None = None,
                 *, max_connections: int = MAX_WEB_CONNECTIONS) -> None:  # fmt: skip
        super().__init__(router, Path(), token=token, max_body_bytes=MAX_WEB_BODY_BYTES,
                         max_tcp_connections=max_connections)  # fmt: skip
        self.address = address

    async def run(
        self, *, task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; `task_status.started((host, port))` with the
        port resolved. Raises `WebListenError` before serving if the address cannot be
        listened on."""
        host = self.address[0]
        listeners = await open_tcp_listeners(
            self.address, partial(WebListenError, self.address),
            other_port="give --web-listen (BENCHSYNC_WEB_LISTEN) another port",
            other_address="give --web-listen (BENCHSYNC_WEB_LISTEN) an address of this machine",
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, partial(self._serve, transport="tcp"),
                                listeners)  # fmt: skip
            bound = listeners[0].socket.getsockname()
            log.info("dashboard on http://%s:%d/", host, bound[1])
            task_status.started((host, int(bound[1])))

    def connection(self, stream: trio.abc.Stream, transport: str) -> Connection:
        return _WebConnection(self, stream, transport)

    async def refuse_busy(self, stream: trio.abc.Stream) -> None:
        """Answer 503 (plain text) on a connection over the limit, without reading its request."""
        limit = self.max_tcp_connections
        payload = f"the dashboard serves at most {limit} connections at once; retry\n".encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        with trio.move_on_after(REFUSE_TIMEOUT), contextlib.suppress(trio.BrokenResourceError,
                                                                     trio.ClosedResourceError):
            await stream.send_all(head.encode("ascii") + payload)

    async def dispatch(self, request: Request) -> tuple[int, Any]:
        """Route a GET (HEAD as GET); any other method is 405 on every path."""
        if request.method not in READ_METHODS:
            return 405, ApiError(
                405, "read_only", f"the dashboard is read-only: {request.method} is refused",
                "use GET; records and snapshots go through the CLI or the control API",
            )  # fmt: skip
        if request.method == "HEAD":
            request = dataclasses.replace(request, method="GET")
        return await super().dispatch(request)

    def authorize(self, headers: Mapping[str, str]) -> None:
        """With a token: ApiError 401 unless the request carries it (Bearer, or the
        password of Basic authentication)."""
        if self.token is None:
            return
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = credentials.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        # compare_digest takes time independent of where the tokens differ.
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
            raise ApiError(
                401, "unauthorized", "this dashboard needs its token",
                "give the web_token as the password (any user name), or send "
                "Authorization: Bearer <web_token>",
            )  # fmt: skip


class _WebConnection(Connection):
    """The control API's connection handling, answering with the dashboard's bodies:
    HTML (an error on a page path is an HTML page), CSV, JSON; no body for HEAD."""

    _request: Request | None = None

    async def _dispatch_while_connected(self, request: Request) -> tuple[int, Any] | None:
        self._request = request
        return await super()._dispatch_while_connected(request)

    async def _respond(self, status: int, body: Any, *, close: bool = False) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        request = self._request
        if isinstance(body, ApiError):
            if request is not None and not request.path.startswith("/api/"):
                body = Text(error_page(status, body.message, body.hint), HTML_TYPE)
            else:
                body = body.body()
        headers = [("Server", SERVER_NAME.decode()), *SECURITY_HEADERS]
        if isinstance(body, Text):
            payload = body.body.encode() if isinstance(body.body, str) else body.body
            headers.append(("Content-Type", body.content_type))
            if isinstance(body, Download):
                headers.append(("Content-Disposition", f'attachment; filename="{body.filename}"'))
        else:
            payload = (json.dumps(body, ensure_ascii=False) + "\n").encode()
            headers.append(("Content-Type", JSON_TYPE))
        headers.append(("Content-Length", str(len(payload))))
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="benchsync dashboard"'))
        if status == 405:
            headers.append(("Allow", ", ".join(READ_METHODS)))
        if close:
            headers.append(("Connection", "close"))
        reason = HTTPStatus(status).phrase.encode() if status in HTTP_STATUSES else b""
        await self._send(h11.Response(status_code=status, headers=headers, reason=reason))
        if request is None or request.method != "HEAD":
            await self._send(h11.Data(data=payload))
        await self._send(h11.EndOfMessage())


# --- the data ---------------------------------------------------------------------------------

# Results by model x hardware over every node's rows; each filter is a parameter
# (NULL: no filter), so no outside text is ever part of the SQL.
RESULTS_SQL = """
SELECT m.model_name AS model, h.hardware_type AS hardware,
       count(*) AS runs, count(DISTINCT p.origin) AS nodes,
       avg(p.throughput_items_per_second) AS throughput,
       avg(p.average_latency_ms) AS latency_ms
FROM performance_results p
JOIN models m ON p.model_id = m.model_id
JOIN hardware_platforms h ON p.hardware_id = h.hardware_id
WHERE ($model IS NULL OR m.model_name = $model)
  AND ($hardware IS NULL OR h.hardware_type = $hardware)
  AND ($precision IS NULL OR p.precision = $precision)
  AND ($batch_size IS NULL OR p.batch_size = $batch_size)
  AND ($origin IS NULL OR p.origin = $origin)
GROUP BY m.model_name, h.hardware_type
ORDER BY model, hardware
LIMIT $limit
"""
OPTIONS_SQL = """
SELECT field, value FROM (
  SELECT DISTINCT 'model' AS field, m.model_name AS value FROM performance_results p
    JOIN models m ON p.model_id = m.model_id
  UNION ALL SELECT DISTINCT 'hardware', h.hardware_type FROM performance_results p
    JOIN hardware_platforms h ON p.hardware_id = h.hardware_id
  UNION ALL SELECT DISTINCT 'precision', precision FROM performance_results
  UNION ALL SELECT DISTINCT 'batch_size', CAST(batch_size AS VARCHAR) FROM performance_results
  UNION ALL SELECT DISTINCT 'origin', origin FROM performance_results
) WHERE value IS NOT NULL
ORDER BY field, TRY_CAST(value AS BIGINT) NULLS LAST, value
LIMIT $limit
"""
ORIGINS_SQL = """
SELECT p.origin, count(*) AS results, list(DISTINCT m.model_name ORDER BY m.model_name) AS models
FROM performance_results p JOIN models m ON p.model_id = m.model_id
GROUP BY p.origin
"""
SORT_KEYS = ("model", "hardware", "runs", "nodes", "throughput", "latency_ms")
TEXT_FILTERS = ("model", "hardware", "precision", "origin")
CSV_COLUMNS = SORT_KEYS


@dataclasses.dataclass(frozen=True)
class ResultFilters:
    """What the Results page shows: filters (None: any) and the sort."""

    model: str | None = None
    hardware: str | None = None
    precision: str | None = None
    batch_size: int | None = None
    origin: str | None = None
    sort: str = "throughput"
    order: str = "desc"

    @classmethod
    def from_request(cls, request: Request) -> ResultFilters:
        """The filters of a request's query string; ApiError 400 for a value too long,
        a batch size that is not an integer, or an unknown sort column or order."""
        values = _filter_values(request)
        sort = request.query.get("sort") or "throughput"
        order = request.query.get("order") or "desc"
        if sort not in SORT_KEYS or order not in ("asc", "desc"):
            raise ApiError(400, "bad_query", "unknown sort column or order",
                           f"sort by one of {', '.join(SORT_KEYS)}, order asc or desc")
        return cls(**values, sort=sort, order=order)

    def params(self) -> dict[str, Any]:
        """The SQL parameters of RESULTS_SQL (the limit included)."""
        return {"model": self.model, "hardware": self.hardware, "precision": self.precision,
                "batch_size": self.batch_size, "origin": self.origin, "limit": MAX_GROUPS + 1}

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*TEXT_FILTERS, "batch_size")}


def _filter_values(request: Request) -> dict[str, Any]:
    """The filters (TEXT_FILTERS and batch_size) of a request's query string, None
    for any; ApiError 400 for a value too long or a batch size not an integer."""
    values: dict[str, Any] = {}
    for name in TEXT_FILTERS:
        text = request.query.get(name) or None
        if text is not None and len(text) > MAX_FILTER_CHARS:
            raise ApiError(400, "bad_query", f"filter {name} is longer than "
                           f"{MAX_FILTER_CHARS} characters", "pick a value from the menu")
        values[name] = text
    values["batch_size"] = request.query_int("batch_size", minimum=0, maximum=2**31 - 1)
    return values


# A metric over time: per model x hardware, the filtered rows' time range cut into
# $buckets equal buckets, one point (the mean, at the bucket's latest time) per bucket.
TRENDS_SQL = """
WITH f AS (
  SELECT m.model_name AS model, h.hardware_type AS hardware, epoch(p.created_at) AS t,
         CASE WHEN $by = 'origin' THEN p.origin END AS origin,
         CASE WHEN $metric = 'latency_ms' THEN p.average_latency_ms
              ELSE p.throughput_items_per_second END AS v
  FROM performance_results p
  JOIN models m ON p.model_id = m.model_id
  JOIN hardware_platforms h ON p.hardware_id = h.hardware_id
  WHERE p.created_at IS NOT NULL
    AND ($model IS NULL OR m.model_name = $model)
    AND ($hardware IS NULL OR h.hardware_type = $hardware)
    AND ($precision IS NULL OR p.precision = $precision)
    AND ($batch_size IS NULL OR p.batch_size = $batch_size)
    AND ($origin IS NULL OR p.origin = $origin)
), span AS (SELECT min(t) AS lo, greatest(max(t) - min(t), 1e-9) AS width FROM f)
SELECT model, hardware, origin,
       least(floor((t - lo) / width * $buckets), $buckets - 1)::BIGINT AS bucket,
       max(t) AS t, avg(v) AS value, count(*) AS runs
FROM f, span
WHERE v IS NOT NULL AND isfinite(v)
GROUP BY model, hardware, origin, bucket
ORDER BY model, hardware, origin, bucket
LIMIT $limit
"""
HIGHER_IS_BETTER = {"throughput": True, "latency_ms": False}  # the Trends page's metrics
TREND_SPLITS = ("origin",)  # `by`: one line per model x hardware x this (None: per model x hw)


@dataclasses.dataclass(frozen=True)
class TrendFilters:
    """What the Trends page shows: the metric and the filters (None: any)."""

    metric: str = "throughput"
    model: str | None = None
    hardware: str | None = None
    precision: str | None = None
    batch_size: int | None = None
    origin: str | None = None
    by: str | None = None  # "origin": one line per origin node too

    @classmethod
    def from_request(cls, request: Request) -> TrendFilters:
        """ApiError 400 for an unknown metric or split, or a bad filter (`_filter_values`)."""
        metric = request.query.get("metric") or "throughput"
        if metric not in HIGHER_IS_BETTER:
            raise ApiError(400, "bad_query", "unknown metric",
                           f"metric is one of {', '.join(HIGHER_IS_BETTER)}")  # fmt: skip
        by = request.query.get("by") or None
        if by is not None and by not in TREND_SPLITS:
            raise ApiError(400, "bad_query", "unknown split (by)",
                           f"by is one of {', '.join(TREND_SPLITS)}")  # fmt: skip
        return cls(metric, **_filter_values(request), by=by)

    def params(self) -> dict[str, Any]:
        """The SQL parameters of TRENDS_SQL."""
        return {**self.to_json(), "buckets": TREND_BUCKETS, "limit": MAX_TREND_POINTS + 1}

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name)
                for name in ("metric", *TEXT_FILTERS, "batch_size", "by")}  # fmt: skip


def regression(values: list[float], threshold: float, higher_is_better: bool
               ) -> dict[str, Any]:  # fmt: skip
    """A series' latest value against its baseline (the median of the TREND_BASELINE
    values before it): {"latest", "baseline", "change" (percent, None without a
    baseline), "regressed" (worse by more than `threshold` percent)}."""
    latest = values[-1] if values else None
    previous = values[-1 - TREND_BASELINE:-1]
    baseline = statistics.median(previous) if previous else None
    change = None
    if latest is not None and baseline is not None and baseline > 0:
        change = (latest - baseline) / baseline * 100.0
    worse = change is not None and (-change if higher_is_better else change) > threshold
    return {"latest": latest, "baseline": baseline, "change": change, "regressed": worse}


def _sort_key(sort: str) -> Any:
    def key(group: Mapping[str, Any]) -> tuple[int, Any]:
        value = group[sort]
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (1, 0) if missing else (0, value)

    return key


def _finite(value: Any) -> Any:
    """None for NaN and infinities (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Dashboard:
    """The pages and endpoints of one node's dashboard."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/", self.lab_html)
        r.add("GET", "/lab", self.lab_html)
        r.add("GET", "/results", self.results_html)
        r.add("GET", "/results.csv", self.results_csv)
        r.add("GET", "/api/lab", self.lab_json)
        r.add("GET", "/api/results", self.results_json)
        r.add("GET", "/trends", self.trends_html)
        r.add("GET", "/api/trends", self.trends_json)
        r.add("GET", "/versions", self.versions_html)
        r.add("GET", "/api/versions", self.versions_json)
        return r

    async def _query(self, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Rows of a read-only query over every node's rows (replicas scope), through
        the node's one gate and sandbox; typed errors become ApiErrors."""
        with answering():
            table = await self.node.queries.query(sql, dict(params), scope="replicas")
        return [{k: _finite(v) for k, v in row.items()} for row in table.to_pylist()]

    # --- Lab

    async def lab(self) -> dict[str, Any]:
        """This node and every node it knows of (connected, dialled, replicated, or
        seen in the replicas' rows), as the Lab page and /api/lab show them."""
        status = await self.node.status()
        origins = {r["origin"]: r for r in await self._query(ORIGINS_SQL, {})}
        me = status["peer_id"]
        nodes: dict[str, dict[str, Any]] = {}

        def entry(peer_id: str) -> dict[str, Any]:
            return nodes.setdefault(peer_id, {
                "peer_id": peer_id, "self": peer_id == me, "connected": False, "addrs": [],
                "head_seq": None, "head_cid": None, "lag_seq": None, "lag_seconds": None,
                "last_error": None, "replica_bytes": None, "results": 0, "models": [],
            })  # fmt: skip

        own = entry(me)
        own.update(addrs=list(status["addrs"]), head_seq=status["head_seq"],
                   head_cid=status["head"], connected=True)  # fmt: skip
        for p in status["peers"]:
            n = entry(p["peer_id"])
            n.update(connected=True, addrs=list(p["addrs"]))
            if p.get("head"):
                n.update(head_seq=p["head"]["seq"], head_cid=p["head"]["root"])
        for d in status["dials"]:
            n = entry(d["peer_id"])
            n["addrs"] = n["addrs"] or list(d["addrs"])
            n["last_error"] = d["last_error"]
        for r in status["replicas"]:
            n = entry(r["dataset"])
            n.update(lag_seq=r["lag"], lag_seconds=r["lag_seconds"], replica_bytes=r["bytes"])
            n["head_seq"] = r["seq_seen"] if r["seq_seen"] is not None else r["seq_installed"]
            n["head_cid"] = r["head_seen"] or r["head_installed"]
            n["last_error"] = r["last_error"] or n["last_error"]
        for origin, row in origins.items():
            entry(origin).update(results=row["results"], models=list(row["models"] or []))
        ordered = [own] + sorted((n for n in nodes.values() if not n["self"]),
                                 key=lambda n: n["peer_id"])  # fmt: skip
        return {
            "peer_id": me, "network": status["network"], "generated_at": time.time(),
            "received_bytes": status["received_bytes"], "served_bytes": status["served_bytes"],
            "nodes": ordered, **await self.regressions(),
        }  # fmt: skip

    async def regressions(self) -> dict[str, Any]:
        """The current regressions across the lab: every metric's series (model x
        hardware, every node's rows) that the Trends page flags, from `trends` itself.
        {"regressions": [{"metric", "model", "hardware", "latest", "baseline",
        "change"}], "regressions_unchecked": [metrics with too many points to check]}."""
        found: list[dict[str, Any]] = []
        unchecked: list[str] = []
        for metric in HIGHER_IS_BETTER:
            try:
                data = await self.trends(TrendFilters(metric))
            except ApiError as e:
                if e.code != "too_many_points":
                    raise
                unchecked.append(metric)
                continue
            found += [{"metric": metric, **{k: s[k] for k in (
                "model", "hardware", "latest", "baseline", "change")}}
                for s in data["series"] if s["regressed"]]  # fmt: skip
        return {"regressions": found, "regressions_unchecked": unchecked}

    async def lab_html(self, request: Request) -> tuple[int, Any]:
        return 200, Text(lab_page(await self.lab()), HTML_TYPE)

    async def lab_json(self, request: Request) -> tuple[int, Any]:
        return 200, await self.lab()

    # --- Results

    async def results(self, filters: ResultFilters) -> dict[str, Any]:
        """Groups (model x hardware) of the filtered results, sorted, at most
        MAX_GROUPS_SHOWN; ApiError 400 when more than MAX_GROUPS match."""
        groups = await self._query(RESULTS_SQL, filters.params())
        if len(groups) > MAX_GROUPS:
            raise ApiError(400, "too_many_groups",
                           f"more than {MAX_GROUPS} model x hardware groups match",
                           "filter by model or hardware")  # fmt: skip
        groups.sort(key=_sort_key(filters.sort), reverse=filters.order == "desc")
        if filters.order == "desc":  # missing values last either way
            groups.sort(key=lambda g: _sort_key(filters.sort)(g)[0])
        return {
            "scope": "replicas", "filters": filters.to_json(), "sort": filters.sort,
            "order": filters.order, "total_groups": len(groups),
            "truncated": len(groups) > MAX_GROUPS_SHOWN,
            "runs": sum(g["runs"] for g in groups),
            "groups": groups[:MAX_GROUPS_SHOWN],
        }  # fmt: skip

    async def options(self) -> dict[str, list[str]]:
        """The values each filter menu offers (from every node's rows)."""
        out: dict[str, list[str]] = {}
        for row in await self._query(OPTIONS_SQL, {"limit": MAX_OPTIONS}):
            out.setdefault(row["field"], []).append(row["value"])
        return out

    async def results_html(self, request: Request) -> tuple[int, Any]:
        filters = ResultFilters.from_request(request)
        data = await self.results(filters)
        return 200, Text(results_page(data, await self.options()), HTML_TYPE)

    async def results_json(self, request: Request) -> tuple[int, Any]:
        return 200, await self.results(ResultFilters.from_request(request))

    async def results_csv(self, request: Request) -> tuple[int, Any]:
        data = await self.results(ResultFilters.from_request(request))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for g in data["groups"]:
            writer.writerow(["" if g[c] is None else g[c] for c in CSV_COLUMNS])
        return 200, Download(out.getvalue(), CSV_TYPE, filename="benchsync-results.csv")


    # --- Trends

    async def trends(self, filters: TrendFilters) -> dict[str, Any]:
        """Series (model x hardware, and origin node with `by=origin`) of the metric
        over time, each with its points (oldest first) and its regression check;
        regressed series first."""
        rows = await self._query(TRENDS_SQL, filters.params())
        if len(rows) > MAX_TREND_POINTS:
            raise ApiError(400, "too_many_points",
                           f"more than {MAX_TREND_POINTS} points match",
                           "filter by model or hardware")  # fmt: skip
        threshold = self.node.config.web_regression_threshold
        higher_is_better = HIGHER_IS_BETTER[filters.metric]
        by_key: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
        for row in rows:
            if row["value"] is not None and row["t"] is not None:
                by_key.setdefault((row["model"], row["hardware"], row["origin"]), []).append(row)
        series = []
        for (model, hardware, origin), points in by_key.items():
            check = regression([p["value"] for p in points], threshold, higher_is_better)
            series.append({
                "model": model, "hardware": hardware, "origin": origin, **check,
                "runs": sum(p["runs"] for p in points),
                "points": [{"t": p["t"], "value": p["value"], "runs": p["runs"]} for p in points],
            })  # fmt: skip
        series.sort(key=lambda s: (not s["regressed"], s["model"], s["hardware"],
                                   s["origin"] or ""))  # fmt: skip
        return {
            "scope": "replicas", "filters": filters.to_json(), "metric": filters.metric,
            "by": filters.by, "threshold_percent": threshold,
            "higher_is_better": higher_is_better,
            "baseline_points": TREND_BASELINE, "buckets": TREND_BUCKETS, "series": series,
        }  # fmt: skip

    async def trends_html(self, request: Request) -> tuple[int, Any]:
        data = await self.trends(TrendFilters.from_request(request))
        return 200, Text(trends_page(data, await self.options(), MAX_SERIES_SHOWN), HTML_TYPE)

    async def trends_json(self, request: Request) -> tuple[int, Any]:
        return 200, await self.trends(TrendFilters.from_request(request))

    # --- Versions

    async def versions(self) -> dict[str, Any]:
        """This node's own history, newest first (at most MAX_VERSIONS_SHOWN), each
        version with its tags, whether it is pinned or thinned, and the change of
        each table's row count since the version before it."""
        dataset = self.node.dataset

        def read() -> tuple[list[Any], dict[str, str], dict[str, float], dict[str, float]]:
            history = dataset.history(MAX_VERSIONS_SHOWN + 1)
            return history, dataset.tags(), dataset.pins(), dataset.thinned()

        history, tags, pins, thinned = await trio.to_thread.run_sync(read)
        names: dict[str, list[str]] = {}
        for name, cid in sorted(tags.items()):
            names.setdefault(cid, []).append(name)
        entries = [v.to_json() for v in history]
        for i, v in enumerate(entries):
            before = entries[i + 1]["rows"] if i + 1 < len(entries) else None
            v["rows_change"] = None if before is None else {
                t: n - before.get(t, 0) for t, n in v["rows"].items() if n != before.get(t, 0)
            }  # fmt: skip
            v.update(tags=names.get(v["cid"], []), pinned=v["cid"] in pins,
                     thinned=v["cid"] in thinned)  # fmt: skip
        return {
            "peer_id": self.node.peer_id, "truncated": len(entries) > MAX_VERSIONS_SHOWN,
            "versions": entries[:MAX_VERSIONS_SHOWN],
        }  # fmt: skip

    async def versions_html(self, request: Request) -> tuple[int, Any]:
        return 200, Text(versions_page(await self.versions()), HTML_TYPE)

    async def versions_json(self, request: Request) -> tuple[int, Any]:
        return 200, await self.versions()


def web_router(node: Node) -> Router:
    """The dashboard's routes for `node`."""
    return Dashboard(node).router()


def web_server(node: Node) -> WebServer | None:
    """The dashboard's listener from `node`'s settings; None when `web_listen` is unset."""
    address = node.config.web_address
    if address is None:
        return None
    return WebServer(web_router(node), address, node.config.web_token)

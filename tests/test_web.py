"""The lab dashboard (issue 15) in a real browser, against real nodes.

Two `benchsync up` processes share a lab key; node0 serves the dashboard on
loopback (`--web-listen`), node1 records other hardware and is replicated
into node0. Debian's headless Chromium loads each page and dumps the DOM it
rendered; the tests assert on that DOM (rows, chart marks, links), on the
CSV, on the Trends page (one line and one point per series and point of
planted data, a planted regression flagged and a steady series not), the
Versions page, `benchsync demo --serve`, and on what the listener refuses:
other methods than GET, a missing token, a non-loopback address without one,
hostile text in every filter and in a model name (it stays text: no element
comes of it).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import trio

from benchsync.daemon.control import Router
from benchsync.daemon.demo import (
    NodeProcess,
    free_port,
    lab_key_file,
    sample_results,
    wait_converged,
)
from benchsync.daemon.web import WebListenError, WebServer

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT = 60.0  # seconds for Chromium to load and dump one page
VIRTUAL_TIME_BUDGET = 5000  # milliseconds of page time before the DOM is dumped
HTTP_TIMEOUT = 30.0  # seconds per plain HTTP request
START_TIMEOUT = 30.0  # seconds for `benchsync up` to refuse a bad setting
PER_NODE = 20  # results recorded on each node (5 models x one hardware type each)
HOSTILE_MODEL = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>"\'&'
TOKEN = "dashboard-token-0123456789abcdef"
NETWORK = "webtest"
DEMO_TIMEOUT = 120.0  # seconds for `benchsync demo --serve` to print its dashboard URL
TREND_MODEL = "trend-net"
# (throughput, latency) per day, oldest first. node0 (cuda): throughput falls 30 % on the
# last day (a regression), latency steady; node1 (rocm): throughput steady, latency up 60 %.
TREND_POINTS = (
    [(100.0, 10.0), (104.0, 10.2), (98.0, 9.9), (102.0, 10.1), (99.0, 10.0), (70.0, 10.0)],
    [(50.0, 5.0), (51.0, 5.1), (49.0, 4.9), (50.0, 5.0), (52.0, 8.0)],
)




# --- a DOM from Chromium's dump ------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.text_parts) + "".join(c.text for c in self.children)

    def iter(self) -> Iterator[Element]:
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Element]:
        return [e for e in self.iter() if e.tag == tag
                and all(e.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())]

    def by_id(self, id_: str) -> Element:
        found = [e for e in self.iter() if e.attrs.get("id") == id_]
        assert len(found) == 1, f"{len(found)} elements with id {id_!r}"
        return found[0]

    def classed(self, tag: str, cls: str) -> list[Element]:
        return [e for e in self.iter() if e.tag == tag and cls in e.attrs.get("class", "").split()]


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text_parts.append(data)


def parse(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def chromium_args(profile: Path) -> list[str]:
    assert CHROMIUM is not None
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", "--no-first-run", f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET}",
    ]  # fmt: skip


def browse(url: str, profile: Path, screenshot: Path | None = None) -> Element:
    """The DOM Chromium renders for `url` (and, with `screenshot`, a PNG of the page)."""
    result = subprocess.run([*chromium_args(profile), "--dump-dom", url], capture_output=True,
                            text=True, timeout=BROWSER_TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    if screenshot is not None:
        subprocess.run([*chromium_args(profile), "--window-size=1280,1000",
                        f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=BROWSER_TIMEOUT, check=True)  # fmt: skip
        assert screenshot.stat().st_size > 0
    return parse(result.stdout)


def http(method: str, url: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --- the lab -------------------------------------------------------------------------------


@dataclass
class WebLab:
    nodes: list[NodeProcess]
    url: str  # node0's dashboard, ending in "/"
    profile: Path
    shots: Path

    def page(self, path: str, shot: str | None = None) -> Element:
        return browse(self.url + path.lstrip("/"), self.profile,
                      self.shots / shot if shot else None)  # fmt: skip

    def rows(self, path: str) -> list[list[str]]:
        dom = self.page(path)
        return [[td.text.strip() for td in tr.find_all("td")]
                for tr in dom.by_id("results").classed("tr", "group")]  # fmt: skip


@pytest.fixture(scope="module")
def weblab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebLab]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (CI installs it in .ci/run when root)")
    base = tmp_path_factory.mktemp("web")  # screenshots stay in shots/ after the run
    key = lab_key_file(base)
    web_port = free_port()
    nodes = [NodeProcess(base / f"node{i}", free_port(), NETWORK, lab_key=key)
             for i in range(2)]  # fmt: skip
    nodes[0].extra_args = ["--web-listen", f"127.0.0.1:{web_port}"]
    nodes[0].bootstrap, nodes[1].bootstrap = [nodes[1].addr], [nodes[0].addr]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_ready()
        for i, n in enumerate(nodes):
            records = sample_results(i, PER_NODE)
            if i == 0:
                records.append({**records[0], "model_name": HOSTILE_MODEL})
            records += trend_records(records[0], i)
            n.client.post("/v1/record/perf", {"records": records})
            n.client.post("/v1/snapshot")
        wait_converged(nodes)
        (base / "profile").mkdir()
        (base / "shots").mkdir()
        yield WebLab(nodes, f"http://127.0.0.1:{web_port}/", base / "profile", base / "shots")
    finally:
        for n in nodes:
            n.stop()


def trend_records(template: dict[str, Any], node_index: int) -> list[dict[str, Any]]:
    """TREND_POINTS[node_index] as results of TREND_MODEL, one a day (at a different hour
    on each node, so every result is a point of its own)."""
    start = datetime(2026, 12, 1, 6 + 12 * node_index)
    return [{**template, "model_name": TREND_MODEL, "throughput": tput, "latency_avg": latency,
             "created_at": (start + timedelta(days=day)).isoformat()}
            for day, (tput, latency) in enumerate(TREND_POINTS[node_index])]  # fmt: skip


# --- pages in the browser ------------------------------------------------------------------


def test_results_page_shows_every_nodes_groups_with_one_bar_each(weblab: WebLab) -> None:
    dom = weblab.page("/results", shot="results.png")
    rows = [[td.text.strip() for td in tr.find_all("td")]
            for tr in dom.by_id("results").classed("tr", "group")]  # fmt: skip
    models = {r["model_name"] for r in sample_results(0, PER_NODE)} | {HOSTILE_MODEL}
    expected = ({(m, "cuda") for m in models | {TREND_MODEL}}
                | {(r["model_name"], "rocm") for r in sample_results(1, PER_NODE)}
                | {(TREND_MODEL, "rocm")})  # fmt: skip
    assert {(r[0], r[1]) for r in rows} == expected  # node1's rows come from its replica
    assert len(rows) == len(expected)
    for chart in ("throughput-chart", "latency-chart"):
        bars = dom.by_id(chart).classed("rect", "bar")
        assert len(bars) == len(rows)
        assert all(float(b.attrs["width"]) > 0 for b in bars)
    # default sort: throughput, largest first
    throughput = [float(r[4].replace(",", "")) for r in rows]
    assert throughput == sorted(throughput, reverse=True)


def test_filters_and_sort_links_narrow_and_order_the_rows(weblab: WebLab) -> None:
    rocm = weblab.rows("/results?hardware=rocm")
    assert rocm and all(r[1] == "rocm" for r in rocm)
    only_node1 = weblab.rows("/results?" + urllib.parse.urlencode(
        {"origin": weblab.nodes[1].peer_id}))  # fmt: skip
    assert {r[1] for r in only_node1} == {"rocm"}
    two = weblab.rows("/results?model=bert-base-uncased&batch_size=4&precision=fp16")
    assert sorted((r[0], r[1]) for r in two) == [("bert-base-uncased", "cuda"),
                                                 ("bert-base-uncased", "rocm")]
    one = weblab.rows("/results?model=bert-base-uncased&batch_size=4&precision=fp16&"
                      + urllib.parse.urlencode({"origin": weblab.nodes[0].peer_id}))
    assert [(r[0], r[1]) for r in one] == [("bert-base-uncased", "cuda")]
    assert weblab.rows("/results?precision=int4") == []
    # the table's own sort link for latency, followed twice, flips the order
    dom = weblab.page("/results?hardware=cuda")
    link = next(a for a in dom.classed("a", "sort") if a.attrs["data-sort"] == "latency_ms")
    ascending = weblab.rows(link.attrs["href"])
    values = [float(r[5].replace(",", "")) for r in ascending]
    assert values == sorted(values, reverse=True)  # a numeric column opens largest first
    again = weblab.page(link.attrs["href"])
    flip = next(a for a in again.classed("a", "sort") if a.attrs["data-sort"] == "latency_ms")
    flipped = [float(r[5].replace(",", "")) for r in weblab.rows(flip.attrs["href"])]
    assert flipped == sorted(values)


def test_csv_download_is_what_the_page_shows(weblab: WebLab) -> None:
    path = "/results?hardware=cuda&sort=model&order=asc"
    dom = weblab.page(path)
    shown = [[td.text.strip() for td in tr.find_all("td")]
             for tr in dom.by_id("results").classed("tr", "group")]  # fmt: skip
    href = dom.by_id("csv").attrs["href"]
    status, headers, body = http("GET", weblab.url + href.lstrip("/"))
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert "attachment" in headers["Content-Disposition"]
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0] == ["model", "hardware", "runs", "nodes", "throughput", "latency_ms"]
    assert [(r[0], r[1], r[2]) for r in table[1:]] == [(r[0], r[1], r[2]) for r in shown]
    assert HOSTILE_MODEL in [r[0] for r in table[1:]]


def test_lab_page_shows_both_nodes(weblab: WebLab) -> None:
    dom = weblab.page("/", shot="lab.png")
    nodes = {tr.attrs["data-peer"]: tr for tr in dom.by_id("nodes").classed("tr", "node")}
    assert set(nodes) == {n.peer_id for n in weblab.nodes}
    for n in weblab.nodes:
        abbr = nodes[n.peer_id].classed("abbr", "peer")[0]
        assert abbr.attrs["title"] == n.peer_id and len(abbr.text) < len(n.peer_id)
    models1 = nodes[weblab.nodes[1].peer_id].classed("td", "models")[0].text
    assert "whisper-tiny" in models1
    assert any(m.attrs.get("http-equiv") == "refresh" for m in dom.find_all("meta"))


def test_hostile_model_name_stays_text(weblab: WebLab) -> None:
    dom = weblab.page("/results?" + urllib.parse.urlencode({"model": HOSTILE_MODEL}))
    assert dom.find_all("script") == [] and dom.find_all("img") == []
    rows = [[td.text for td in tr.find_all("td")]
            for tr in dom.by_id("results").classed("tr", "group")]  # fmt: skip
    assert [r[0] for r in rows] == [HOSTILE_MODEL]
    assert "pwned" not in dom.find_all("title")[0].text  # the document's, not a bar's
    lab = weblab.page("/")
    assert lab.find_all("script") == [] and HOSTILE_MODEL in lab.by_id("nodes").text


def _lines(dom: Element) -> dict[str, Element]:
    """The Trends chart's lines by their series label."""
    lines = dom.by_id("trend-chart").classed("g", "line")
    return {g.find_all("title")[0].text: g for g in lines}


def test_trends_draw_one_line_per_series_and_one_point_per_point(weblab: WebLab) -> None:
    dom = weblab.page("/trends?" + urllib.parse.urlencode({"model": TREND_MODEL}),
                      shot="trends.png")  # fmt: skip
    chart = dom.by_id("trend-chart")
    assert len(chart.classed("polyline", "series")) == len(TREND_POINTS)
    lines = _lines(dom)
    assert set(lines) == {f"{TREND_MODEL} · cuda", f"{TREND_MODEL} · rocm"}
    for hw, points in zip(("cuda", "rocm"), TREND_POINTS, strict=True):
        line = lines[f"{TREND_MODEL} · {hw}"]
        assert len(line.classed("circle", "point")) == len(points)
        assert len(line.classed("polyline", "series")[0].attrs["points"].split()) == len(points)
    assert len(chart.classed("circle", "point")) == sum(len(p) for p in TREND_POINTS)
    # every series of the lab: as many lines as model x hardware pairs, and points as the JSON
    everything = weblab.page("/trends")
    status, _, body = http("GET", weblab.url + "api/trends")
    series = json.loads(body)["series"]
    assert status == 200 and len(series) == len(weblab.rows("/results"))
    assert len(everything.by_id("trend-chart").classed("polyline", "series")) == len(series)
    assert len(everything.by_id("trend-chart").classed("circle", "point")) == sum(
        len(s["points"]) for s in series)
    assert everything.find_all("script") == [] and everything.find_all("img") == []


def test_trends_by_origin_draw_one_line_per_origin_node(weblab: WebLab) -> None:
    ids = [n.peer_id for n in weblab.nodes]
    for query, origins in (({"model": TREND_MODEL}, set(ids)),  # cuda on node0, rocm on node1
                           ({"model": TREND_MODEL, "hardware": "cuda"}, {ids[0]}),
                           ({}, set(ids))):  # fmt: skip
        by = {**query, "by": "origin"}
        dom = weblab.page("/trends?" + urllib.parse.urlencode(by))
        status, _, body = http("GET", weblab.url + "api/trends?" + urllib.parse.urlencode(by))
        series = json.loads(body)["series"]
        assert status == 200 and {s["origin"] for s in series} == origins
        with_rows = {(s["model"], s["hardware"], s["origin"]) for s in series}
        assert len(with_rows) == len(series)  # one series per model x hardware x origin
        polylines = dom.by_id("trend-chart").classed("polyline", "series")
        assert len(polylines) == len(series)
        if query:  # each model x hardware here has rows from one node: a line per origin
            assert len(polylines) == len(origins)
        shown = {abbr.attrs["title"] for td in dom.by_id("series").classed("td", "origin")
                 for abbr in td.find_all("abbr")}  # fmt: skip
        assert shown == origins
    # the planted regression is flagged on its origin's line
    dom = weblab.page("/trends?" + urllib.parse.urlencode({"model": TREND_MODEL, "by": "origin"}))
    assert len(dom.by_id("trend-chart").classed("circle", "flag")) == 1
    status, _, _ = http("GET", weblab.url + "trends?by=nonsense")
    assert status == 400


def test_trends_flag_a_planted_regression_and_not_a_steady_series(weblab: WebLab) -> None:
    query = {"model": TREND_MODEL}
    for metric, regressed, steady in (("throughput", "cuda", "rocm"),  # lower is worse
                                      ("latency_ms", "rocm", "cuda")):  # higher is worse
        dom = weblab.page("/trends?" + urllib.parse.urlencode({**query, "metric": metric}))
        lines = _lines(dom)
        assert "regressed" in lines[f"{TREND_MODEL} · {regressed}"].attrs["class"].split()
        assert "regressed" not in lines[f"{TREND_MODEL} · {steady}"].attrs["class"].split()
        assert len(dom.by_id("trend-chart").classed("circle", "flag")) == 1
        flags = {tr.find_all("td")[1].text: tr.attrs["data-regressed"]
                 for tr in dom.by_id("series").classed("tr", "series")}  # fmt: skip
        assert flags == {regressed: "yes", steady: "no"}
        listed = [li.text for li in dom.by_id("regressions").classed("li", "regression")]
        assert len(listed) == 1 and f"{TREND_MODEL} · {regressed}" in listed[0]
    # the threshold (10 % by default) is what separates them: -30 % flagged, +4 % not
    status, _, body = http("GET", weblab.url + "api/trends?model=" + TREND_MODEL)
    doc = json.loads(body)
    assert status == 200 and doc["threshold_percent"] == 10.0
    change = {s["hardware"]: round(s["change"]) for s in doc["series"]}
    assert change == {"cuda": -30, "rocm": 4}
    steady_only = weblab.page("/trends?" + urllib.parse.urlencode({**query, "hardware": "rocm"}))
    steady_only.by_id("no-regressions")
    assert steady_only.by_id("trend-chart").classed("circle", "flag") == []
    # the Lab page lists the same regressions across the lab, each linking to its Trends view
    lab = weblab.page("/")
    on_lab = {(li.attrs["data-metric"], li.find_all("a")[0].text): li.find_all("a")[0]
              for li in lab.by_id("regressions").classed("li", "regression")}  # fmt: skip
    planted = {("throughput", f"{TREND_MODEL} · cuda"), ("latency_ms", f"{TREND_MODEL} · rocm")}
    steady_series = {("throughput", f"{TREND_MODEL} · rocm"),
                     ("latency_ms", f"{TREND_MODEL} · cuda")}
    assert planted <= set(on_lab) and not steady_series & set(on_lab)
    for metric, label in planted:
        hardware = label.rsplit(" · ", 1)[1]
        href = on_lab[(metric, label)].attrs["href"]
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(href).query) == {
            "metric": [metric], "model": [TREND_MODEL], "hardware": [hardware]}
        linked = weblab.page(href)
        assert len(linked.by_id("trend-chart").classed("circle", "flag")) == 1
    status, _, body = http("GET", weblab.url + "api/lab")
    flagged = {(r["metric"], r["model"], r["hardware"]) for r in json.loads(body)["regressions"]}
    assert status == 200 and len(flagged) == len(on_lab)


def test_versions_page_lists_the_history_with_rows_and_tags(weblab: WebLab) -> None:
    node = weblab.nodes[0]
    head = node.client.post("/v1/tags", {"name": "web-test"})
    history = node.client.get("/v1/history")["versions"]
    dom = weblab.page("/versions", shot="versions.png")
    rows = dom.by_id("versions").classed("tr", "version")
    assert [(int(tr.attrs["data-seq"]), tr.attrs["data-cid"]) for tr in rows] == [
        (v["seq"], v["cid"]) for v in history]
    top = rows[0]
    cid = top.classed("code", "cid")[0]
    assert cid.attrs["title"] == history[0]["cid"] and len(cid.text) < len(history[0]["cid"])
    assert head["cid"] == history[0]["cid"]  # the tag names the head
    assert "web-test" in [t.text for t in top.classed("span", "tag")]
    perf = {td.attrs["data-table"]: td for td in top.classed("td", "rows")}["performance_results"]
    recorded = PER_NODE + 1 + len(TREND_POINTS[0])
    assert perf.text.split()[0] == str(history[0]["rows"]["performance_results"]) == str(recorded)


def test_demo_serve_keeps_the_lab_and_prints_the_dashboard_url(tmp_path: Path) -> None:
    # stdout block-buffered, as in a pipe to `tee`: the URL must be flushed anyway
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BENCHSYNC_") and k != "PYTHONUNBUFFERED"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchsync.daemon.cli", "demo", "--nodes", "2", "--results", "10",
         "--serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    # Raw reads of the pipe: a buffered readline() could hold the URL line in its
    # buffer while select() waits on the (empty) pipe.
    out, url = b"", None
    deadline = time.monotonic() + DEMO_TIMEOUT
    try:
        while url is None and (left := deadline - time.monotonic()) > 0:
            if not select.select([proc.stdout], [], [], left)[0]:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            for line in out.decode(errors="replace").splitlines():
                if line.startswith("dashboard of node0: "):
                    url = line.split(": ", 1)[1].strip()
        if url is None:
            proc.kill()
            rest, err = proc.communicate()
            pytest.fail(f"no dashboard URL within {DEMO_TIMEOUT:g} s:\n"
                        + (out + rest + err).decode(errors="replace"))  # fmt: skip
        assert url.startswith("http://127.0.0.1:")
        assert proc.poll() is None  # still running
        status, _, body = http("GET", url + "api/results")
        assert status == 200 and len(json.loads(body)["groups"]) > 0
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (out + rest + err).decode(errors="replace")
    assert b"all nodes stopped cleanly" in rest


# --- what the listener refuses -------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_writes_are_refused(weblab: WebLab, method: str) -> None:
    for path in ("results", "api/results", "v1/record/perf", "nowhere"):
        status, headers, _ = http(method, weblab.url + path, {"Content-Type": "application/json"},
                                  b'{"model_name": "x"}')  # fmt: skip
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = http("GET", weblab.url + "api/results?model=x")
    assert status == 200 and b'"groups": []' in body  # nothing was recorded


def test_hostile_query_string_in_every_filter(weblab: WebLab) -> None:
    hostile = "' OR 1=1; DROP TABLE models; --<script>x</script>"
    for page, names, row in (
        ("results", ("model", "hardware", "precision", "origin", "batch_size", "sort", "order"),
         'class="group"'),
        ("trends", ("model", "hardware", "precision", "origin", "batch_size", "metric", "by"),
         'class="series'),
    ):  # fmt: skip
        for name in names:
            url = weblab.url + page + "?" + urllib.parse.urlencode({name: hostile})
            status, _, body = http("GET", url)
            assert status in (200, 400), (page, name, status)
            assert b"<script>x" not in body
            if status == 200:  # a filter nobody matches
                assert row not in body.decode()
    status, _, _ = http("GET", weblab.url + "results?model=" + "x" * 10_000)
    assert status == 400
    assert len(weblab.rows("/results")) > 0  # the tables are still there


def test_head_answers_without_body(weblab: WebLab) -> None:
    status, headers, body = http("HEAD", weblab.url + "results")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def _up(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchsync.daemon.cli", "up", "--home", str(home),
         "--listen", "/ip4/127.0.0.1/tcp/0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_non_loopback_without_token_is_refused_at_start(tmp_path: Path) -> None:
    proc = _up(tmp_path / "home", "--web-listen", f"0.0.0.0:{free_port()}")
    out, err = proc.communicate(timeout=START_TIMEOUT)
    assert proc.returncode == 1 and "ready" not in out
    assert "Error:" in err and "web_listen" in err
    assert "Try:" in err and "BENCHSYNC_WEB_TOKEN" in err and "--web-public" in err


async def test_a_used_port_is_a_typed_error_naming_the_setting() -> None:
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(WebListenError) as info:
            await WebServer(Router(), ("127.0.0.1", port)).run()
    finally:
        taken.close()
    assert info.value.address == ("127.0.0.1", port)
    assert info.value.message == f"web_listen 127.0.0.1:{port}: the port is in use"
    assert info.value.hint == (
        "stop the program using it (`ss -ltnp` shows it), or give --web-listen "
        "(BENCHSYNC_WEB_LISTEN) another port"
    )


def test_token_is_asked_of_every_request(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path / "home", free_port(), NETWORK,
                       extra_args=["--web-listen", f"0.0.0.0:{port}"],
                       env={"BENCHSYNC_WEB_TOKEN": TOKEN})  # fmt: skip
    node.start()
    try:
        node.wait_ready()
        url = f"http://127.0.0.1:{port}/results"
        status, headers, _ = http("GET", url)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"lab:not-the-token-at-all").decode()
        assert http("GET", url, {"Authorization": f"Basic {wrong}"})[0] == 401
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert http("GET", url, {"Authorization": f"Basic {basic}"})[0] == 200
        assert http("GET", url, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        # the token is checked before the method: a stranger learns nothing
        assert http("POST", url, body=b"x")[0] == 401
    finally:
        code = node.stop(signal.SIGTERM)
    assert code == 0, node.tail_log()  # a clean stop with the dashboard open

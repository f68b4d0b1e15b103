"""Benchmark: the dashboard's Results page vs the same aggregation query alone.

Issue 15 asks that pages aggregate in DuckDB (rows never reach the browser)
and that a 1M-row lab's pages take < 1 s. One `benchsync up` process holds
`--rows` performance results (written offline with `BenchmarkDB.ingest_arrow`,
like bench_node.py; 200 models x 6 hardware types) and serves its dashboard
on loopback. Measured in one run, median of `--repeat` after one warm-up
(the warm-up loads the tables into the query sandbox):
- page: GET /results over HTTP, the whole page as a browser gets it (the
  groups query, the filter menus' query, sorting, HTML and SVG rendering);
- api: GET /api/results (the groups query and JSON, no HTML);
- query: the page's aggregation (web.RESULTS_SQL, no filters) alone through
  the control API's /v1/query in the same `replicas` scope, gate and sandbox.
Ratio: page / query (what the page adds to its one aggregation).

Run: .venv/bin/python bench/bench_web.py [--rows 1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_node import fill_large_dataset  # noqa: E402
from bench_query import timed  # noqa: E402

from benchsync.daemon.demo import NodeProcess, free_port  # noqa: E402
from benchsync.daemon.web import RESULTS_SQL, ResultFilters  # noqa: E402

HTTP_TIMEOUT = 120.0  # seconds for one page


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        body: bytes = response.read()
        return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="performance results")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measure")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="benchsync-bench-web-"))
    web_port = free_port()
    node = NodeProcess(base / "node", free_port(), f"bench-{os.getpid()}",
                       extra_args=["--snapshot-interval", "0", "--snapshot-after-writes", "0",
                                   "--web-listen", f"127.0.0.1:{web_port}"])  # fmt: skip
    try:
        took = fill_large_dataset(node.home, args.rows)
        print(f"{args.rows:,} results written in {took:.1f} s (data in {base})")
        node.start()
        node.wait_ready()
        url = f"http://127.0.0.1:{web_port}/"
        client = node.client
        params = ResultFilters().params()
        body = {"sql": RESULTS_SQL, "params": params, "scope": "replicas"}
        groups = len(client.post("/v1/query", body)["rows"])
        page_bytes = len(get(url + "results"))
        page = timed(lambda: get(url + "results"), args.repeat, warm_up=True)
        api = timed(lambda: get(url + "api/results"), args.repeat, warm_up=True)
        query = timed(lambda: client.post("/v1/query", body), args.repeat, warm_up=True)
    finally:
        code = node.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"groups (model x hardware): {groups}; page {page_bytes / 1024:.0f} KiB of HTML")
    print(f"Results page (GET /results):        {page * 1000:8.1f} ms")
    print(f"Results JSON (GET /api/results):    {api * 1000:8.1f} ms")
    print(f"the aggregation alone (/v1/query):  {query * 1000:8.1f} ms")
    print(f"ratio page / query: {page / query:.2f}x; api / query: {api / query:.2f}x")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

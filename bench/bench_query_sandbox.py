"""What the query sandbox costs a node's own queries (not part of the test run).

Since issue 17 every query a node answers (local and replicas scopes too)
passes the read-only gate and runs in a sandbox worker process under an OS
memory limit, over Arrow copies of the node's tables that a worker keeps
until the next write. This measures, in one run, next to its baseline:

1. a warm GROUP BY through a real `benchsync up` (control API, `local` scope),
   next to the same SQL on an in-process DuckDB holding the same rows
   (`duckdb.connect()` over a copy of the database file, read-only);
2. the first such query after a write (the worker reloads the tables), next
   to the same baseline;
3. for scale, the same query through the `benchsync query` CLI (process start
   included).

Run: .venv/bin/python bench/bench_query_sandbox.py [--rows 1000000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
from bench_node import fill_large_dataset

from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.storage.db import DB_FILENAME

SQL = (
    "SELECT h.hardware_type, count(*) AS n, avg(r.throughput_items_per_second) AS tput "
    "FROM performance_results r JOIN hardware_platforms h USING (hardware_id) "
    "GROUP BY 1 ORDER BY 1"
)
RECORD = {"model_name": "bench-model", "hardware_type": "cpu", "throughput": 1.0}


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    quiet = ["--snapshot-interval", "0", "--snapshot-after-writes", "0"]
    node = NodeProcess(base / "node", free_port(), "bench-sandbox", extra_args=quiet)
    try:
        fill_large_dataset(node.home, args.rows)
        copy = base / "copy.duckdb"
        shutil.copy(node.home / DB_FILENAME, copy)
        node.start()
        node.wait_ready()
        client = node.client

        def through_node() -> None:
            client.post("/v1/query", {"sql": SQL, "scope": "local"})

        through_node()  # the worker loads the tables once
        warm = timed(through_node, args.repeat)
        after_write = []
        for _ in range(args.repeat):
            client.post("/v1/record/perf", {"records": [RECORD]})
            after_write += timed(through_node, 1)

        con = duckdb.connect(str(copy), read_only=True)
        con.sql(SQL).to_arrow_table()
        baseline = timed(lambda: con.sql(SQL).to_arrow_table(), args.repeat)
        con.close()

        cli = timed(lambda: subprocess.run(
            [sys.executable, "-m", "benchsync.daemon.cli", "query", SQL,
             "--home", str(node.home)],
            check=True, capture_output=True), 3)  # fmt: skip
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)

    b = statistics.median(baseline)
    print(f"rows: {args.rows:,}  query: GROUP BY hardware over performance_results")
    print(f"in-process DuckDB (baseline)     median {b * 1e3:8.1f} ms")
    for name, samples in (("node, warm worker", warm), ("node, first after a write", after_write),
                          ("`benchsync query` CLI", cli)):  # fmt: skip
        m = statistics.median(samples)
        print(f"{name:<32} median {m * 1e3:8.1f} ms   {m / b:6.1f}x baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: a GROUP BY aggregate fanned out over libp2p to N nodes vs one DuckDB.

In one process and one run: N P2PNodes on 127.0.0.1 (TCP + Noise + Yamux), each
with its own BenchmarkDB file holding rows/N performance_results (same
generator as bench_query.py), every node serving `/benchsync/query/1.0.0`.
Node 0 coordinates (its own part runs locally, N-1 parts over the network).
Reported, median of --repeat runs after one warm-up (the warm-up loads each
node's tables into its sandbox):
- latency of the distributed query, decomposed strategy (avg/stddev/max merge
  exactly) and rows strategy (median(): every node ships its matching rows),
- the same query on one DuckDB holding the union: a 1-thread sandbox (what
  each node gets) and the plain database file (all cores),
- bytes moved over the network per strategy (response frames, as received).

Run: .venv/bin/python bench/bench_query_network.py [--rows 1000000] [--nodes 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query import LIMITS, MEMORY_LIMIT, ROWS_SQL, SQL, make_node  # noqa: E402

from benchsync.daemon.network import P2PNode  # noqa: E402
from benchsync.daemon.query import QueryService  # noqa: E402
from benchsync.storage.blockstore import MemoryBlockstore  # noqa: E402
from benchsync.storage.db import BenchmarkDB  # noqa: E402
from benchsync.storage.sandbox import QuerySandbox  # noqa: E402

NETWORK = "bench"
QUERY_TIMEOUT = 120.0  # seconds: generous, the box is shared


def fill(db: BenchmarkDB, tables: dict[str, pa.Table]) -> None:
    """Insert a generated node's tables into a real database (by column name)."""

    def job(conn: duckdb.DuckDBPyConnection) -> None:
        for name, table in tables.items():
            if name == "performance_results":
                table = table.append_column("test_case", pa.array(["default"] * len(table)))
            conn.register("src", table)
            conn.execute(f"INSERT INTO {name} BY NAME SELECT * FROM src")
            conn.unregister("src")

    db.write(job)


def median_time(times: list[float]) -> float:
    return statistics.median(times)


async def run(args: argparse.Namespace, tmp: Path) -> None:
    gen = duckdb.connect()
    gen.sql("SELECT setseed(0.5)").fetchall()
    per = args.rows // args.nodes
    data = [make_node(gen, per, i * 10_000_000) for i in range(args.nodes)]
    union_tables = {name: pa.concat_tables([d[name] for d in data]) for name in data[0]}

    t0 = time.perf_counter()
    dbs = []
    for i, d in enumerate(data):
        (tmp / f"n{i}").mkdir()
        db = BenchmarkDB(tmp / f"n{i}" / "bench.duckdb")
        fill(db, d)
        dbs.append(db)
    union_db = BenchmarkDB(tmp / "union.duckdb")
    fill(union_db, union_tables)
    print(f"loaded {args.rows} rows into {args.nodes} node databases + the union "
          f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    union_sandbox = QuerySandbox(memory_limit=MEMORY_LIMIT, threads=1)
    union_sandbox.load({t: union_db.query(f"SELECT * FROM {t}") for t in union_tables})

    nodes = [P2PNode(tmp / f"n{i}", network=NETWORK, blockstore=MemoryBlockstore(),
                     lab_key=bytes(32))  # one lab
             for i in range(args.nodes)]  # fmt: skip
    # The node's default settings: median()'s rows ship bounded by query_ship_max_bytes,
    # not by query_max_rows (100k), so 200k rows per node need no raised limit.
    services = [QueryService(n, db, network=NETWORK)
                for n, db in zip(nodes, dbs, strict=True)]  # fmt: skip
    for s in services:
        s.register()
    async with trio.open_nursery() as nursery:
        for n in nodes:
            await nursery.start(n.run)
        for n in nodes[1:]:
            await n.connect(nodes[0].addrs[0])
        coordinator = services[0]
        for label, sql in (("decomposed", SQL), ("rows", ROWS_SQL)):
            warm = await coordinator.execute(sql, timeout_s=QUERY_TIMEOUT, require_all=True)
            assert warm.strategy == label, warm.reason
            assert len(warm.peers) == args.nodes
            times, moved = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                result = await coordinator.execute(sql, timeout_s=QUERY_TIMEOUT, require_all=True)
                times.append(time.perf_counter() - t)
                moved.append(sum(p.bytes for p in result.peers))
            dist = median_time(times)
            one = await trio.to_thread.run_sync(
                lambda sql=sql: median_time(
                    [_timed(lambda: union_sandbox.execute(sql, limits=LIMITS))
                     for _ in range(args.repeat)]))  # fmt: skip
            plain = await trio.to_thread.run_sync(
                lambda sql=sql: median_time([_timed(lambda: union_db.query(sql))
                                             for _ in range(args.repeat)]))  # fmt: skip
            want = union_db.query(sql)
            assert result.table.num_rows == want.num_rows, (result.table, want)
            print(f"{label:>10}: fan-out to {args.nodes} nodes {dist * 1e3:8.1f} ms | "
                  f"one DuckDB, 1 thread {one * 1e3:8.1f} ms ({dist / one:5.2f}x) | "
                  f"one DuckDB file, all threads {plain * 1e3:8.1f} ms ({dist / plain:5.2f}x) | "
                  f"network bytes {statistics.median(moved) / 1024:10.1f} KiB")  # fmt: skip
            args.moved[label] = statistics.median(moved)
        nursery.cancel_scope.cancel()
    for s in services:
        s.close()
    for db in [*dbs, union_db]:
        db.close()
    union_sandbox.close()
    ratio = args.moved["rows"] / args.moved["decomposed"]
    print(f"network bytes, rows strategy / decomposed: {ratio:.0f}x "
          f"({args.nodes} nodes, {args.rows} rows)")


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    args.moved = {}
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-query-net-") as tmp:
        trio.run(run, args, Path(tmp))


if __name__ == "__main__":
    main()

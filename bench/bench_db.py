"""Benchmark the benchmark database against raw DuckDB in the same run.

Measures (a) p50 latency of one `store_performance_result` against a plain
parameterised INSERT (autocommit) into a table of the same shape, and (b) bulk
ingest rows/s of `ingest_records` (list of dicts) and `ingest_arrow` against
appending an Arrow table with `INSERT INTO t SELECT * FROM arrow`, and against
storing the same records one by one. Prints a small table with ratios.

Run: .venv/bin/python bench/bench_db.py [--singles N] [--rows N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from benchsync.storage.db import BenchmarkDB

SINGLES = 300  # single inserts timed
BULK_ROWS = 50_000  # rows per bulk ingest


def records(n: int) -> list[dict]:
    return [{"model_name": f"model-{i % 50}", "hardware_type": ("cpu", "cuda")[i % 2],
             "device_name": "dev", "batch_size": 1 + i % 16, "throughput": float(i),
             "latency_avg": 1.5, "latency_p99": 3.0, "memory_peak": 512.0} for i in range(n)]


def p50(fn, n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--singles", type=int, default=SINGLES)
    ap.add_argument("--rows", type=int, default=BULK_ROWS)
    args = ap.parse_args()
    recs = records(args.rows)
    table = pa.Table.from_pylist(recs)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        raw = duckdb.connect(str(tmp / "raw.duckdb"))
        raw.execute("CREATE TABLE t (id INTEGER, model_id INTEGER, hardware_id INTEGER, "
                    "batch_size INTEGER, throughput FLOAT, latency FLOAT, p99 FLOAT, mem FLOAT)")
        raw_single = p50(lambda i: raw.execute("INSERT INTO t VALUES (?, 1, 1, 1, ?, 1.5, 3, 512)",
                                               [i, float(i)]), args.singles)
        with BenchmarkDB(tmp / "one.duckdb") as db:
            db.store_performance_result(**recs[0])  # create model/hardware first
            ours_single = p50(lambda i: db.store_performance_result(**recs[i % 100]),
                              args.singles)
        arrow = pa.table({"id": range(args.rows), "model_id": [1] * args.rows,
                          "hardware_id": [1] * args.rows, "batch_size": table["batch_size"],
                          "throughput": table["throughput"], "latency": table["latency_avg"],
                          "p99": table["latency_p99"], "mem": table["memory_peak"]})
        t = time.perf_counter()
        raw.register("arrow_rows", arrow)
        raw.execute("INSERT INTO t SELECT * FROM arrow_rows")
        raw_bulk = args.rows / (time.perf_counter() - t)
        raw.close()
        with BenchmarkDB(tmp / "bulk.duckdb") as db:
            t = time.perf_counter()
            db.ingest_records("perf", recs)
            ours_records = args.rows / (time.perf_counter() - t)
        with BenchmarkDB(tmp / "arrow.duckdb") as db:
            t = time.perf_counter()
            db.ingest_arrow("perf", table)
            ours_arrow = args.rows / (time.perf_counter() - t)
    one_by_one = 1 / ours_single
    print(f"{'measure':44} {'value':>14} {'ratio':>10}")
    print(f"{'raw DuckDB INSERT, p50':44} {raw_single * 1e3:11.3f} ms {1.0:10.2f}")
    print(f"{'store_performance_result, p50':44} {ours_single * 1e3:11.3f} ms "
          f"{ours_single / raw_single:9.2f}x  (of raw INSERT)")
    print(f"{'raw DuckDB Arrow append':44} {raw_bulk:10.0f} r/s {1.0:10.2f}")
    print(f"{'ingest_arrow':44} {ours_arrow:10.0f} r/s {ours_arrow / raw_bulk:9.2f}x  "
          f"(of raw append)")
    print(f"{'ingest_records (list of dicts)':44} {ours_records:10.0f} r/s "
          f"{ours_records / raw_bulk:9.2f}x  (of raw append)")
    print(f"{'ingest_records vs one-by-one store':44} {'':14} "
          f"{ours_records / one_by_one:9.0f}x  faster")


if __name__ == "__main__":
    main()

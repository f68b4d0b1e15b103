"""Benchmark: a `replicas`-scope join vs the same query on one DuckDB holding the union.

Issue 10 asks that the replicas scope's id remapping (`storage.scopes`: every
id column becomes `tag(origin) * 2**32 + id`, so joins on ids stay within one
origin) keep the views fast: aim <= 1.5x one DuckDB over the union.

Data: NODES origins, ROWS performance_results rows each (Parquet replicas on
disk, like installed ones), every node numbering its models and hardware from
1. Measured, in one run:
- scope: `scope_tables` (read the replicas' Parquet, remap ids, union) — what a
  sandbox worker does once per change of the data, not per query;
- query: the README's join shape in a sandbox loaded with those tables;
- baseline: the same query in a sandbox holding one union whose ids were made
  unique when it was written (what one DuckDB file holding every node's rows
  would be), with the same data already in memory.
Ratios: query / baseline (per query, the aim), (scope + query) / baseline.

Run: .venv/bin/python bench/bench_query_replicas.py [--nodes 6] [--rows 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query import LIMITS, MEMORY_LIMIT, timed  # noqa: E402

from benchsync.storage.sandbox import QuerySandbox  # noqa: E402
from benchsync.storage.scopes import ReplicaTables, ScopeInput, scope_tables  # noqa: E402

MODELS = [f"model-{i}" for i in range(50)]
HARDWARE = ["cpu", "cuda", "rocm", "mps", "tpu"]
SQL = (
    "SELECT m.model_name, h.hardware_type, count(*) AS n, "
    "avg(r.throughput_items_per_second) AS tput, max(r.batch_size) AS bs "
    "FROM performance_results r JOIN models m USING (model_id) "
    "JOIN hardware_platforms h USING (hardware_id) GROUP BY 1, 2 ORDER BY 1, 2"
)


def node_tables(rng: random.Random, rows: int, id_base: int = 0) -> dict[str, pa.Table]:
    """One node's tables; ids from 1 (+ id_base for the union baseline)."""
    names = rng.sample(MODELS, len(MODELS))
    hw = rng.sample(HARDWARE, len(HARDWARE))
    models = pa.table({"model_id": pa.array(range(1 + id_base, len(names) + 1 + id_base),
                                            pa.int64()), "model_name": names})  # fmt: skip
    hardware = pa.table({"hardware_id": pa.array(range(1 + id_base, len(hw) + 1 + id_base),
                                                  pa.int64()), "hardware_type": hw})  # fmt: skip
    perf = pa.table({
        "result_id": pa.array(range(1 + id_base, rows + 1 + id_base), pa.int64()),
        "model_id": pa.array([rng.randrange(len(names)) + 1 + id_base for _ in range(rows)],
                             pa.int64()),
        "hardware_id": pa.array([rng.randrange(len(hw)) + 1 + id_base for _ in range(rows)],
                                pa.int64()),
        "batch_size": pa.array([rng.choice([1, 2, 4, 8]) for _ in range(rows)], pa.int32()),
        "throughput_items_per_second": pa.array([rng.uniform(1, 1000) for _ in range(rows)]),
    })  # fmt: skip
    return {"models": models, "hardware_platforms": hardware, "performance_results": perf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--rows", type=int, default=200_000, help="performance_results rows per node")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        replicas, union_parts = [], []
        own: dict[str, pa.Table] = {}
        for i in range(args.nodes):
            # Same seed per node for both: the same rows, only the ids differ.
            tables = node_tables(random.Random(i), args.rows)
            union_parts.append(node_tables(random.Random(i), args.rows, id_base=i * 10**7))
            if i == 0:
                own = tables
                continue
            where = Path(tmp) / f"node{i}"
            where.mkdir()
            files = {}
            for name, table in tables.items():
                pq.write_table(table, where / f"{name}.parquet")
                files[name] = where / f"{name}.parquet"
            replicas.append(ReplicaTables(f"12D3KooWnode{i}", files))
        scope = ScopeInput(own, origin="12D3KooWnode0", replicas=replicas)
        union = {name: pa.concat_tables([p[name] for p in union_parts]) for name in own}

        scope_s = timed(lambda: scope_tables(scope), args.repeat, warm_up=True)
        with QuerySandbox(memory_limit=MEMORY_LIMIT) as box, \
                QuerySandbox(memory_limit=MEMORY_LIMIT) as base:  # fmt: skip
            box.load(scope_tables(scope))
            base.load(union)
            got = box.execute(SQL, limits=LIMITS)
            want = base.execute(SQL, limits=LIMITS)
            assert got.column("n").to_pylist() == want.column("n").to_pylist(), "wrong answer"
            query_s = timed(lambda: box.execute(SQL, limits=LIMITS), args.repeat, warm_up=True)
            base_s = timed(lambda: base.execute(SQL, limits=LIMITS), args.repeat, warm_up=True)
    total = args.nodes * args.rows
    print(f"{args.nodes} origins x {args.rows} rows = {total} performance_results rows")
    print(f"scope build (Parquet read + id remap + union): {scope_s * 1000:8.1f} ms")
    print(f"replicas-scope join query:                     {query_s * 1000:8.1f} ms")
    print(f"one DuckDB over the union (baseline):          {base_s * 1000:8.1f} ms")
    print(f"ratio query / baseline:                        {query_s / base_s:8.2f}x  (aim <= 1.5x)")
    print(f"ratio (scope build + query) / baseline:        {(scope_s + query_s) / base_s:8.2f}x")


if __name__ == "__main__":
    main()

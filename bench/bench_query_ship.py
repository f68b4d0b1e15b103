"""Benchmark: network-scope plans in-process vs one DuckDB over the union (issue 10).

N datasets of --rows performance_results each, in the replicas scope's shape
(`origin` column, origin-tagged ids: `scope_tables`). Each query runs the
coordinator's path in-process: every node part of the plan in one sandbox per
dataset (tables loaded before timing, as a warm node has them), the answers
through Arrow IPC (the wire's encoding), their union, the merge in a sandbox.
No libp2p (bench_query_network.py measures that): this isolates the plan.

Reported, median of --repeat runs:
- GROUP BY (decomposed) vs one DuckDB sandbox over the union: the ratio;
- median() inside a CTE (shipped: every dataset ships the named columns of
  each base table, the coordinator runs the query): bytes shipped and time,
  vs one DuckDB over the union.

Run: .venv/bin/python bench/bench_query_ship.py [--nodes 4] [--rows 50000] [--repeat 3]
(the issue's figure: --nodes 10 --rows 200000)
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query import LIMITS, MEMORY_LIMIT, SQL, make_node, timed  # noqa: E402

from benchsync.protocol.planner import plan_sql  # noqa: E402
from benchsync.storage.distquery import DUCKDB, union_partials  # noqa: E402
from benchsync.storage.sandbox import QuerySandbox  # noqa: E402
from benchsync.storage.sandbox_worker import from_ipc, to_ipc  # noqa: E402
from benchsync.storage.scopes import ScopeInput, scope_tables  # noqa: E402

SHIP_SQL = (
    "WITH t AS (SELECT origin, model_id, median(throughput_items_per_second) AS med "
    "FROM performance_results GROUP BY ALL) "
    "SELECT m.model_name, round(avg(t.med), 3) AS med FROM t "
    "JOIN models m USING (origin, model_id) GROUP BY 1 ORDER BY 1"
)
GROUP_SQL = SQL.replace("ON p.model_id = m.model_id", "USING (origin, model_id)").replace(
    "ON p.hardware_id = h.hardware_id", "USING (origin, hardware_id)")


def _rows(table: pa.Table) -> list[str]:
    """Rows as comparable text, floats to 6 significant digits (merge order differs)."""
    return sorted(str([f"{v:.6g}" if isinstance(v, float) else v for v in r.values()])
                  for r in table.to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rows", type=int, default=50_000, help="performance_results per node")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    gen = duckdb.connect()
    gen.sql("SELECT setseed(0.5)").fetchall()
    datasets = [scope_tables(ScopeInput(make_node(gen, args.rows), origin=f"12D3KooWBench{i}"))
                for i in range(args.nodes)]  # fmt: skip
    boxes = []
    for tables in datasets:
        box = QuerySandbox(memory_limit=MEMORY_LIMIT, threads=1)
        box.load(tables)
        boxes.append(box)
    union = QuerySandbox(memory_limit=MEMORY_LIMIT)
    union.load({name: pa.concat_tables([d[name] for d in datasets]) for name in datasets[0]})

    def network(sql: str) -> tuple[pa.Table, int]:
        plan = plan_sql(sql, None, DUCKDB)
        answers: dict[str, list[pa.Table]] = {name: [] for name, _ in plan.node_parts()}
        wire = 0
        for box in boxes:
            for name, node_sql in plan.node_parts():
                ipc = to_ipc(box.execute(node_sql, limits=LIMITS))
                wire += len(ipc)
                answers[name].append(from_ipc(ipc))
        unions = {name: union_partials(parts) for name, parts in answers.items()}
        with QuerySandbox(memory_limit=MEMORY_LIMIT) as merge:
            merge.load(unions)
            return merge.execute(plan.merge_sql, limits=LIMITS), wire

    print(f"{args.nodes} datasets x {args.rows} rows, median of {args.repeat}")
    for label, sql in (("GROUP BY (decomposed)", GROUP_SQL), ("median in a CTE (shipped)",
                                                              SHIP_SQL)):
        strategy = plan_sql(sql, None, DUCKDB).strategy
        got, wire = network(sql)
        want = union.execute(sql, limits=LIMITS)
        assert _rows(got) == _rows(want), label
        t_net = timed(functools.partial(network, sql), args.repeat)
        t_one = timed(functools.partial(union.execute, sql, limits=LIMITS), args.repeat)
        print(f"{label:28s} strategy={strategy:10s} network {t_net * 1000:8.1f} ms   "
              f"one DuckDB {t_one * 1000:7.1f} ms   ratio {t_net / t_one:5.2f}x   "
              f"shipped {wire / 2**20:8.2f} MiB")


if __name__ == "__main__":
    main()

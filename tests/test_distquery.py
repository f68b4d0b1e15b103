"""Distributed answers equal one DuckDB over the union of every node's rows."""

from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchsync.protocol.planner import PARTIALS_TABLE, QueryPlan, check_partial, plan_sql
from benchsync.storage.distquery import DUCKDB, union_partials
from benchsync.storage.sandbox import QueryLimits, QueryRefused, QuerySandbox, run_once
from benchsync.storage.sandbox_worker import from_ipc, to_ipc

LIMITS = QueryLimits(timeout_s=30.0, max_rows=1_000_000, max_bytes=64 * 1024 * 1024)
MEMORY_LIMIT = "512MB"  # DuckDB size string, per sandbox


def plan(sql: str, params: list[Any] | None = None) -> QueryPlan:
    return plan_sql(sql, params, DUCKDB)


def execute_over_nodes(sql: str, nodes: list[dict[str, pa.Table]],
                       params: list[Any] | None = None) -> pa.Table:  # fmt: skip
    """The whole fan-out in-process: plan, run the node part on one sandbox per
    node, union the partial answers and merge them in a fresh sandbox."""
    p = plan(sql, params)
    partials = [run_once(p.node_sql, tables, limits=LIMITS, memory_limit=MEMORY_LIMIT)
                for tables in nodes]  # fmt: skip
    for i, t in enumerate(partials):
        check_partial(p, i, t.column_names)
    union = union_partials(partials)
    return run_once(p.merge_sql, {PARTIALS_TABLE: union}, limits=LIMITS,
                    memory_limit=MEMORY_LIMIT)  # fmt: skip

MODELS = ["bert-base", "gpt2", "vit-b16", "t5-small"]
HARDWARE = ["cpu", "cuda", "rocm", "mps"]
PRECISIONS = ["fp32", "fp16", "int8", None]
ID_STRIDE = 1_000_000  # ids of node i in the union: i * ID_STRIDE + local id


def make_node(rng: random.Random, rows: int) -> dict[str, pa.Table]:
    """One node's tables with the original schema's columns; local ids start at 1
    and collide across nodes, names are shuffled so ids map to different values."""
    names = rng.sample(MODELS, k=rng.randint(1, len(MODELS)))
    hw = rng.sample(HARDWARE, k=rng.randint(1, len(HARDWARE)))
    models = pa.table({
        "model_id": pa.array(range(1, len(names) + 1), pa.int32()),
        "model_name": names, "model_family": [n.split("-")[0] for n in names],
        "parameters_million": pa.array([rng.uniform(1, 500) for _ in names], pa.float32()),
    })  # fmt: skip
    hardware = pa.table({
        "hardware_id": pa.array(range(1, len(hw) + 1), pa.int32()),
        "hardware_type": hw, "device_name": [f"{h}-dev" for h in hw],
        "memory_gb": pa.array([rng.choice([8.0, 16.0, 80.0]) for _ in hw], pa.float32()),
    })  # fmt: skip
    perf = pa.table({
        "result_id": pa.array(range(1, rows + 1), pa.int32()),
        "model_id": pa.array([rng.randint(1, len(names)) for _ in range(rows)], pa.int32()),
        "hardware_id": pa.array([rng.randint(1, len(hw)) for _ in range(rows)], pa.int32()),
        "test_case": pa.array([rng.choice(["default", "long"]) for _ in range(rows)], pa.string()),
        "batch_size": pa.array([rng.choice([1, 2, 4, 8]) for _ in range(rows)], pa.int32()),
        "precision": pa.array([rng.choice(PRECISIONS) for _ in range(rows)], pa.string()),
        "average_latency_ms": pa.array(
            [None if rng.random() < 0.1 else rng.uniform(0.5, 50) for _ in range(rows)],
            pa.float32()),
        "throughput_items_per_second": pa.array(
            [rng.uniform(10, 2000) for _ in range(rows)], pa.float32()),
        "memory_peak_mb": pa.array([rng.uniform(100, 9000) for _ in range(rows)], pa.float32()),
    })  # fmt: skip
    return {"models": models, "hardware_platforms": hardware, "performance_results": perf}


def union_db(nodes: list[dict[str, pa.Table]]) -> duckdb.DuckDBPyConnection:
    """One DuckDB holding every node's rows, ids made globally unique."""
    con = duckdb.connect()
    id_cols = {"model_id", "hardware_id", "result_id"}
    for name in nodes[0]:
        parts = []
        for i, node in enumerate(nodes):
            t = node[name]
            for c in id_cols & set(t.column_names):
                col = pa.array([v + i * ID_STRIDE for v in t[c].to_pylist()], pa.int64())
                t = t.set_column(t.column_names.index(c), c, col)
            parts.append(t)
        con.register(f"_{name}", pa.concat_tables(parts))
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM _{name}")
    return con


def norm(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def sort_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    # floats rounded so that a last-bit difference cannot reorder rows
    return tuple((x is None, str(type(x)), round(x, 6) if isinstance(x, float) else x)
                 for x in row)  # fmt: skip


def assert_same(got: pa.Table, want: pa.Table, ordered: bool) -> None:
    assert got.column_names == want.column_names
    g = [tuple(norm(v) for v in r.values()) for r in got.to_pylist()]
    w = [tuple(norm(v) for v in r.values()) for r in want.to_pylist()]
    assert len(g) == len(w), (g, w)
    if not ordered:
        g, w = sorted(g, key=sort_key), sorted(w, key=sort_key)
    for rg, rw in zip(g, w, strict=True):
        for a, b in zip(rg, rw, strict=True):
            if isinstance(a, float) or isinstance(b, float):
                assert a is not None and b is not None, (rg, rw)
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6), (rg, rw)
            else:
                assert a == b, (rg, rw)


def check(sql: str, nodes: list[dict[str, pa.Table]], ordered: bool) -> QueryPlan:
    want = union_db(nodes).sql(sql).to_arrow_table()
    got = execute_over_nodes(sql, nodes)
    assert_same(got, want, ordered)
    return plan(sql)


JOINED = (
    "FROM performance_results p JOIN models m ON p.model_id = m.model_id "
    "JOIN hardware_platforms h ON p.hardware_id = h.hardware_id"
)


def test_join_on_local_ids_groups_by_values_across_nodes() -> None:
    rng = random.Random(7)
    nodes = [make_node(rng, 40) for _ in range(4)]
    sql = (f"SELECT m.model_name, h.hardware_type, count(*) AS n, "
           f"avg(p.throughput_items_per_second) AS tput, stddev(p.average_latency_ms) AS sd "
           f"{JOINED} WHERE p.batch_size >= 2 GROUP BY m.model_name, h.hardware_type "
           f"HAVING count(*) > 1 ORDER BY m.model_name, h.hardware_type")  # fmt: skip
    p = check(sql, nodes, ordered=True)
    assert p.strategy == "decomposed"


def test_fallback_is_exact_and_says_why() -> None:
    rng = random.Random(8)
    nodes = [make_node(rng, 30) for _ in range(3)]
    sql = (f"SELECT m.model_name, median(p.average_latency_ms) AS med, "
           f"count(DISTINCT p.batch_size) AS sizes {JOINED} GROUP BY 1 ORDER BY 1")
    p = check(sql, nodes, ordered=True)
    assert p.strategy == "rows"
    assert "median" in p.reason
    # projection pushed down: only the referenced columns travel
    assert "memory_peak_mb" not in p.node_sql


def test_global_aggregate_over_empty_nodes() -> None:
    rng = random.Random(9)
    nodes = [make_node(rng, 0), make_node(rng, 5)]
    check("SELECT count(*), sum(batch_size), avg(memory_peak_mb), var_samp(batch_size) "
          "FROM performance_results WHERE batch_size > 100", nodes, ordered=True)


def test_decomposed_ships_fewer_bytes_than_rows() -> None:
    rng = random.Random(10)
    node = make_node(rng, 2000)
    sql = "SELECT precision, avg(throughput_items_per_second) FROM performance_results GROUP BY 1"
    decomposed = plan(sql)
    rows_plan = plan(sql.replace("avg(", "median("))

    with QuerySandbox(memory_limit=MEMORY_LIMIT) as sb:
        sb.load(node)
        small = sb.execute(decomposed.node_sql, limits=LIMITS)
        big = sb.execute(rows_plan.node_sql, limits=LIMITS)
    assert small.num_rows == 4 and big.num_rows == 2000
    assert len(to_ipc(small)) * 5 < len(to_ipc(big))
    assert from_ipc(to_ipc(small)).equals(small)


def test_parameters_are_bound() -> None:
    rng = random.Random(11)
    nodes = [make_node(rng, 20) for _ in range(2)]
    got = execute_over_nodes(
        "SELECT count(*) AS n FROM performance_results WHERE batch_size = ? AND test_case = ?",
        nodes, params=[4, "long"])  # fmt: skip
    want = sum(
        sum(1 for r in n["performance_results"].to_pylist()
            if r["batch_size"] == 4 and r["test_case"] == "long")
        for n in nodes
    )  # fmt: skip
    assert got.to_pylist() == [{"n": want}]


@pytest.mark.parametrize("sql, words", [
    ("WITH c AS (SELECT 1 AS x) SELECT x FROM c", "WITH"),
    ("SELECT count(*) FROM (SELECT * FROM models) s", "derived table"),
    ("SELECT * FROM models WHERE model_id IN (SELECT model_id FROM performance_results)",
     "subqueries"),
    ("SELECT model_name FROM models UNION SELECT hardware_type FROM hardware_platforms",
     "UNION"),
    ("SELECT count(*) FROM range(10)", "table function"),
])  # fmt: skip
def test_unsplittable_queries_ship_their_tables(sql: str, words: str) -> None:
    """What cannot be split runs at the coordinator over the shipped base tables
    (issue 10, observation 4: these were refused)."""
    p = plan(sql)
    assert p.strategy == "shipped" and words in p.reason
    assert p.merge_sql == sql and not p.node_sql


def test_planning_passes_the_sandbox_gate_first() -> None:
    """What no sandbox would run is refused before it is planned, in the gate's words."""
    with pytest.raises(QueryRefused, match="one statement"):
        plan("SELECT 1; SELECT 2")
    with pytest.raises(QueryRefused, match="no file, network, extension or settings access"):
        plan("SELECT count(*) FROM duckdb_settings()")


# --- property test: random data over 1..6 nodes, random queries from a grammar -------

KEYS = ["m.model_name", "h.hardware_type", "p.precision", "p.batch_size", "p.test_case"]
MEASURES = ["p.throughput_items_per_second", "p.average_latency_ms", "p.batch_size",
            "p.memory_peak_mb"]  # fmt: skip
AGGS = ["count(*)", "count({m})", "sum({m})", "min({m})", "max({m})", "avg({m})",
        "var_samp({m})", "var_pop({m})", "stddev_samp({m})", "stddev_pop({m})",
        "bool_and({m} > 100)", "bool_or({m} > 100)", "max(m.model_name)",
        "round(avg({m}), 3) + count(*)", "sum({m}) FILTER (WHERE p.batch_size > 2)",
        # fallbacks
        "median({m})", "count(DISTINCT {m})", "quantile_cont({m}, 0.9)",
        "sum(count(*)) OVER ()"]  # fmt: skip
FILTERS = ["", "WHERE p.batch_size > 1", "WHERE p.precision = 'fp16' OR p.precision IS NULL",
           "WHERE h.hardware_type <> 'cpu' AND p.average_latency_ms < 40"]  # fmt: skip


@st.composite
def queries(draw: st.DrawFn) -> tuple[str, bool]:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=2))
    aggs = [draw(st.sampled_from(AGGS)).format(m=draw(st.sampled_from(MEASURES)))
            for _ in range(draw(st.integers(1, 3)))]  # fmt: skip
    items = keys + [f"{a} AS v{i}" for i, a in enumerate(aggs)]
    sql = f"SELECT {', '.join(items)} {JOINED} {draw(st.sampled_from(FILTERS))}"
    if keys:
        sql += " GROUP BY " + ", ".join(keys)
    if draw(st.booleans()):
        sql += f" HAVING count(*) > {draw(st.integers(0, 5))}"
    ordered = draw(st.booleans())
    if ordered:  # order by every output column so that ties cannot differ
        cols = list(range(1, len(items) + 1))
        sql += " ORDER BY " + ", ".join(f"{c} {draw(st.sampled_from(['ASC', 'DESC']))}"
                                        f" NULLS FIRST" for c in cols)  # fmt: skip
        if draw(st.booleans()):
            sql += f" LIMIT {draw(st.integers(1, 5))}"
    return sql, ordered


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query=queries(), n_nodes=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_distributed_answer_equals_single_database(query: tuple[str, bool], n_nodes: int,
                                                   seed: int) -> None:  # fmt: skip
    sql, ordered = query
    rng = random.Random(seed)
    nodes = [make_node(rng, rng.randint(0, 25)) for _ in range(n_nodes)]
    want = union_db(nodes).sql(sql).to_arrow_table()
    got = execute_over_nodes(sql, nodes)
    # ORDER BY with floats: compare order only when no two floats are near-equal
    assert_same(got, want, ordered)


@pytest.mark.parametrize("sql, ordered, strategy", [
    (f"SELECT h.hardware_type, count(*) AS n {JOINED} GROUP BY ALL ORDER BY count(*) DESC, 1",
     True, "decomposed"),
    (f"SELECT DISTINCT count(*) > 5 AS big {JOINED} GROUP BY m.model_name", False, "decomposed"),
    (f"SELECT m.model_name AS name, sum(p.batch_size) s {JOINED} GROUP BY name HAVING s > 10 "
     "ORDER BY name", True, "decomposed"),
    (f"SELECT upper(m.model_name) u, max(p.batch_size) - min(p.batch_size) AS spread {JOINED} "
     "GROUP BY upper(m.model_name) ORDER BY u", True, "decomposed"),
    (f"SELECT count(*), CASE WHEN avg(p.batch_size) > 3 THEN 'big' ELSE 'small' END {JOINED}",
     True, "decomposed"),
    ("SELECT m.model_name, count(*) FROM performance_results p, models m "
     "WHERE p.model_id = m.model_id GROUP BY 1", False, "decomposed"),
    (f"SELECT p.precision, avg(p.batch_size) FILTER (WHERE p.test_case = 'long') {JOINED} "
     "GROUP BY ROLLUP (p.precision)", False, "rows"),
    (f"SELECT m.model_name, p.throughput_items_per_second {JOINED} ORDER BY 2 DESC LIMIT 3",
     True, "rows"),
    (f"SELECT p.batch_size, row_number() OVER (ORDER BY p.batch_size, "
     f"p.throughput_items_per_second) rn {JOINED} ORDER BY rn LIMIT 4", True, "rows"),
    ("SELECT * EXCLUDE (result_id, model_id, hardware_id) FROM performance_results "
     "WHERE batch_size = 8", False, "rows"),
])  # fmt: skip
def test_sql_forms(sql: str, ordered: bool, strategy: str) -> None:
    rng = random.Random(3)
    nodes = [make_node(rng, 30) for _ in range(3)]
    assert check(sql, nodes, ordered).strategy == strategy

"""Cross-node aggregate queries: parse, render, run the node part, merge.

This module does the DuckDB side of `benchsync.protocol.planner`: it parses
SQL with DuckDB's own parser (`json_serialize_sql`), hands the AST to the pure
planner, renders the planned ASTs back to SQL (`json_deserialize_sql`), runs
the node part in a node's `QuerySandbox` and merges the nodes' partial answers
at the coordinator in a fresh sandbox holding one table, `partials`.

Each node answers for its own dataset only (the tables loaded in its
sandbox), never for replicas it holds, so no row is counted twice.
`execute_over_nodes` simulates the whole fan-out in-process (tests, bench);
the libp2p fan-out calls `run_node_part` on each peer and `merge` here.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import pyarrow as pa

from benchsync.protocol.planner import (
    DEFAULT_AGGREGATES,
    PARTIALS_TABLE,
    PlanError,
    QueryPlan,
    bind_parameters,
    plan_query,
)
from benchsync.storage.sandbox import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT,
    QuerySandbox,
    gate,
    parse_select,
)
from benchsync.storage.sandbox_worker import from_ipc, to_ipc

__all__ = ["QueryLimits", "check", "execute_over_nodes", "from_ipc", "merge", "merge_input",
           "parse", "plan", "render", "run_node_part", "to_ipc"]  # fmt: skip

MERGE_MEMORY_LIMIT = "1GB"  # DuckDB size string for the coordinator's merge sandbox


@dataclass(frozen=True)
class QueryLimits:
    """Limits a node (or the merge) applies to one query."""

    timeout_s: float = DEFAULT_TIMEOUT  # seconds
    max_rows: int = DEFAULT_MAX_ROWS  # rows in the answer
    max_bytes: int = DEFAULT_MAX_BYTES  # bytes of Arrow data in the answer


# The parser connection: plain in-memory DuckDB used only for json_(de)serialize_sql.
_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def _parse_conn() -> duckdb.DuckDBPyConnection:
    global _parser
    if _parser is None:
        _parser = duckdb.connect(
            ":memory:", config={"enable_external_access": False, "lock_configuration": True}
        )
    return _parser


def parse(sql: str) -> dict[str, Any]:
    """Parse SQL with DuckDB's parser; returns the `json_serialize_sql` document.

    Raises InvalidSQL for SQL that does not parse, QueryRefused for statements
    other than SELECT.
    """
    with _parser_lock:
        return parse_select(_parse_conn(), sql)


def check(sql: str) -> dict[str, Any]:
    """The sandbox's read-only gate (`sandbox.gate`), run on the parser connection.

    Returns the AST; raises InvalidSQL or QueryRefused. Cheap: callers use it
    to refuse a query before handing it to a sandbox (which checks again).
    """
    with _parser_lock:
        return gate(_parse_conn(), sql)


def render(ast: Mapping[str, Any]) -> str:
    """Render a `json_serialize_sql`-shaped document back to SQL text."""
    with _parser_lock:
        conn = _parse_conn()
        row = conn.execute("SELECT json_deserialize_sql(?)", [json.dumps(ast)]).fetchall()[0]
    assert row is not None
    return str(row[0])


def _expression_name(expr: dict[str, Any]) -> str:
    """DuckDB's column name for an unaliased select item: its SQL text."""
    doc = {
        "error": False,
        "statements": [
            {
                "node": {
                    "type": "SELECT_NODE", "modifiers": [], "cte_map": {"map": []},
                    "select_list": [expr], "from_table": {"type": "EMPTY", "alias": "",
                                                          "sample": None},
                    "where_clause": None, "group_expressions": [], "group_sets": [],
                    "aggregate_handling": "STANDARD_HANDLING", "having": None,
                    "sample": None, "qualify": None,
                },
                "named_param_map": [],
            }
        ],
    }  # fmt: skip
    return render(doc).removeprefix("SELECT ")


@functools.cache
def aggregate_names() -> frozenset[str]:
    """Every aggregate function DuckDB knows (so the planner can tell median() from round())."""
    with _parser_lock:
        rows = _parse_conn().execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type = 'aggregate'"
        ).fetchall()
    return frozenset(r[0].lower() for r in rows) | DEFAULT_AGGREGATES


def plan(sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> QueryPlan:
    """Plan `sql` for execution across nodes; returns a QueryPlan with SQL filled in.

    Parameters are bound into the plan as constants. Raises InvalidSQL,
    QueryRefused (not a SELECT), or PlanError (a SELECT that cannot be split).
    """
    ast = parse(sql)
    if params:
        ast = bind_parameters(ast, params)
    p = plan_query(ast, aggregates=aggregate_names(), name_of=_expression_name)
    return replace(p, node_sql=render(p.node_ast), merge_sql=render(p.merge_ast))


def run_node_part(sandbox: QuerySandbox, plan: QueryPlan,
                  limits: QueryLimits | None = None) -> pa.Table:  # fmt: skip
    """Run the plan's node part on one node's sandbox; returns its partial answer.

    Raises the sandbox's QueryError subclasses.
    """
    limits = limits or QueryLimits()
    assert plan.node_sql is not None, "plan() renders node_sql; use it, not plan_query()"
    return sandbox.execute(plan.node_sql, timeout_s=limits.timeout_s,
                           max_rows=limits.max_rows, max_bytes=limits.max_bytes)  # fmt: skip


def merge(plan: QueryPlan, partials: Sequence[pa.Table],
          limits: QueryLimits | None = None) -> pa.Table:  # fmt: skip
    """Merge the nodes' partial answers into the final answer.

    Runs the plan's merge part in a fresh sandbox (it may contain the
    caller's expressions) over the union of `partials`. Raises QueryError
    subclasses, or PlanError when a partial does not have the planned columns.
    """
    limits = limits or QueryLimits()
    assert plan.merge_sql is not None, "plan() renders merge_sql; use it, not plan_query()"
    union = merge_input(plan, partials)
    with QuerySandbox(memory_limit=MERGE_MEMORY_LIMIT) as sandbox:
        sandbox.load({PARTIALS_TABLE: union})
        return sandbox.execute(plan.merge_sql, timeout_s=limits.timeout_s,
                               max_rows=limits.max_rows, max_bytes=limits.max_bytes)  # fmt: skip


def merge_input(plan: QueryPlan, partials: Sequence[pa.Table]) -> pa.Table:
    """The one table (`partials`) the merge runs over: the union of the nodes' answers.

    Raises PlanError when a partial does not have the planned columns.
    """
    if not partials:
        raise PlanError("no partial answers to merge; at least one node must answer")
    for i, t in enumerate(partials):
        if plan.partial_columns and tuple(t.column_names) != plan.partial_columns:
            raise PlanError(
                f"partial answer {i} has columns {t.column_names}, expected "
                f"{list(plan.partial_columns)}; the node ran a different plan"
            )
    # Nodes may type a column differently (e.g. all-NULL -> NULL type); let Arrow unify.
    try:
        return pa.concat_tables(partials, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise PlanError(f"partial answers disagree on column types: {e}") from None


def execute_over_nodes(
    sql: str,
    nodes: Sequence[Mapping[str, pa.Table]],
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    limits: QueryLimits | None = None,
) -> pa.Table:
    """Plan `sql`, run its node part on one sandbox per node, and merge: the
    in-process simulation of a network query. Returns the final answer."""
    p = plan(sql, params)
    partials = []
    for tables in nodes:
        with QuerySandbox() as sandbox:
            sandbox.load(tables)
            partials.append(run_node_part(sandbox, p, limits))
    return merge(p, partials, limits)
